"""Music (--task music): folk tunes as ABC text, or Bach chorales as piano rolls (`--music.dataset`).

folk (default): the 8,514 Essen folk tunes that ship with music21, as text (ABC notation, header fields
M:, L:, K: and the body; ids and titles dropped), tunes separated by a blank line. It is character
language modelling through the "lm" interface, with CharLM's tokenizer, batches and loss (every LM
family of the model table trains on it), split by tune: a fixed permutation, the last `val_fraction`
of tunes held out. Tunes that fail the structural check or that music21 cannot parse are skipped and
counted (the verdicts are cached once; see jaxseq.data.music_data); `prepare` prints the counts and the
report carries them. Reported: validation nats and bits per character. Samples: generated tunes cut
at the first blank line, parsed by music21, written as .abc, .mid and .wav when they parse.

chorales: the four-part chorales of music21 as binary piano rolls on a sixteenth-note grid (`grid` =
0.25 quarter notes), MIDI pitches low_pitch..high_pitch (36-81 holds every note), split by chorale.
The "frames" interface: inputs float [B, T, P] are the previous frames (a silent frame before the
first), targets [B, T, P] the frames, loss the sum over pitches of the sigmoid cross-entropy (one
independent Bernoulli per pitch), reported per frame in nats and bits. Training batches are random
windows of `seq_len` frames of random chorales; evaluation runs over whole validation chorales (cut
into pieces of `eval_len` frames only if longer). Samples: Bernoulli draws from the recurrent form,
written as .mid and .wav.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq.errors import ConfigError, DataError
from jaxseq.tasks.char_lm import TOKENIZER_FILE, CharLM, _check_split
from jaxseq.tasks.common import epoch_rows, evaluate_sums


class FolkData(NamedTuple):
    """Folk tunes ready for CharLM's batches: tokenizer, train_ids int32 [N], val_ids int32 [M], the
    validation tunes (text) and the data stats (tunes read, skipped by each check, kept, split)."""

    tokenizer: object
    train_ids: np.ndarray
    val_ids: np.ndarray
    val_tunes: list
    stats: dict


class ChoraleData(NamedTuple):
    """Piano rolls: train and val lists of float32 [L_i + 1, P] (a silent frame first), and the stats."""

    train: list
    val: list
    stats: dict


@dataclass(frozen=True)
class Music:
    """Music (--task music): folk tunes in ABC as characters, or Bach chorales as piano rolls."""

    dataset: Literal["folk", "chorales"] = "folk"
    """"folk": the Essen folk tunes as ABC text (the "lm" interface);
    "chorales": Bach's four-part chorales as piano rolls (the "frames" interface)."""
    source: str = "essen"
    """folk: "essen" (music21's Essen collection, 8,514 tunes) or a local .abc file or folder."""
    val_fraction: float = 0.1
    """The fraction of tunes (chorales) held out for validation, chosen by a fixed permutation."""
    seq_len: int = 128
    """folk: characters per training sequence; chorales: frames per training window."""
    batch_size: int = 32
    """Sequences per step (the global batch, split over the mesh's data axis)."""
    grid: float = 0.25
    """chorales: the frame length in quarter notes (0.25: sixteenth notes)."""
    low_pitch: int = 36
    """chorales: the lowest MIDI pitch of the roll (notes outside the range are counted and dropped)."""
    high_pitch: int = 81
    """chorales: the highest MIDI pitch of the roll."""
    max_chorales: int = 0
    """chorales: read only the first this many chorales of music21's iterator (0: all)."""
    eval_len: int = 1024
    """chorales: evaluation rows hold up to this many frames; a longer chorale is cut into pieces
    (a Transformer needs --transformer.max-len >= eval_len)."""

    unit = "tok"

    def __post_init__(self):
        if self.dataset not in ("folk", "chorales"):
            raise ConfigError(f"--music.dataset must be 'folk' or 'chorales', got {self.dataset!r}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--music.val-fraction must be in (0, 1), got {self.val_fraction}.")
        if self.seq_len < 1 or self.batch_size < 1 or self.eval_len < 1:
            raise ConfigError("--music.seq-len, --music.batch-size and --music.eval-len must be >= 1.")
        if not (0 <= self.low_pitch <= self.high_pitch <= 127) or self.grid <= 0:
            raise ConfigError(f"--music.low-pitch/--music.high-pitch must satisfy 0 <= low <= high <= 127 and "
                              f"--music.grid > 0; got {self.low_pitch}, {self.high_pitch}, {self.grid}.")

    @property
    def folk(self) -> bool:
        return self.dataset == "folk"

    @property
    def d_frame(self) -> int:
        return self.high_pitch - self.low_pitch + 1

    def _char_lm(self) -> CharLM:
        # The folk path is character language modelling: CharLM's batches, evaluation and loss.
        return CharLM(source=self.source, val_fraction=self.val_fraction, seq_len=self.seq_len,
                      batch_size=self.batch_size)

    # -- data ----------------------------------------------------------------------------------------

    def prepare(self, run_dir=None):
        """FolkData or ChoraleData (see their docstrings); prints what was read and skipped."""
        data = self._prepare_folk(run_dir) if self.folk else self._prepare_chorales()
        if jax.process_index() == 0:
            print("music data: " + ", ".join(f"{k}={v}" for k, v in data.stats.items()), flush=True)
        return data

    def _prepare_folk(self, run_dir) -> FolkData:
        from jaxseq.data import CharTokenizer
        from jaxseq.data import music_data as M

        tunes, stats = M.folk_tunes(self.source)
        train, val = M.split_by_tune(tunes, self.val_fraction)
        train_text, val_text = "".join(t + "\n" for t in train), "".join(t + "\n" for t in val)
        if run_dir is not None:
            tokenizer = CharTokenizer.load(Path(run_dir) / TOKENIZER_FILE)
            unknown = tokenizer.unknown_chars(train_text + val_text)
            if unknown:
                raise DataError(f"--music.source {self.source!r} holds characters {unknown[:10]} that the run's "
                                f"tokenizer does not know; resume with the source the run was trained on.")
        else:
            tokenizer = CharTokenizer.from_text(train_text + val_text)
        for name, text in (("training", train_text), ("validation", val_text)):
            if len(text) < self.seq_len + 1:
                raise DataError(f"the {name} tunes hold {len(text)} characters, fewer than --music.seq-len + 1 = "
                                f"{self.seq_len + 1}; use more tunes or a shorter --music.seq-len.")
        stats = {**stats, "kept": len(tunes), "train_tunes": len(train), "val_tunes": len(val)}
        return FolkData(tokenizer, tokenizer.encode(train_text), tokenizer.encode(val_text), val, stats)

    def _prepare_chorales(self) -> ChoraleData:
        from jaxseq.data import music_data as M

        rolls, stats = M.chorale_rolls(self.grid, self.low_pitch, self.high_pitch, self.max_chorales)
        order = np.random.default_rng(0).permutation(len(rolls))
        n_val = max(1, int(round(len(rolls) * self.val_fraction)))
        if n_val >= len(rolls):
            raise DataError(f"{len(rolls)} chorales cannot be split with --music.val-fraction {self.val_fraction}; "
                            f"raise --music.max-chorales (0: all).")
        silent = np.zeros((1, self.d_frame), np.float32)
        seqs = [np.concatenate([silent, r.astype(np.float32)]) for r in rolls]
        train, val = [seqs[i] for i in order[:-n_val]], [seqs[i] for i in order[-n_val:]]
        stats = {**stats, "train_chorales": len(train), "val_chorales": len(val),
                 "train_frames": sum(len(s) - 1 for s in train), "val_frames": sum(len(s) - 1 for s in val)}
        return ChoraleData(train, val, stats)

    def save(self, data, run_dir) -> None:
        if self.folk:
            data.tokenizer.save(Path(run_dir) / TOKENIZER_FILE)

    def model_spec(self, data) -> dict:
        if self.folk:
            return {"interface": "lm", "vocab_size": data.tokenizer.vocab_size}
        longest = max(len(s) - 1 for s in data.val)  # the evaluation rows' length: a Transformer must reach it
        return {"interface": "frames", "d_frame": self.d_frame, "max_len": min(longest, self.eval_len)}

    def example_inputs(self, data):
        if self.folk:
            return jax.ShapeDtypeStruct((1, self.seq_len), jnp.int32)
        return jax.ShapeDtypeStruct((1, self.seq_len, self.d_frame), jnp.float32)

    # -- batches -------------------------------------------------------------------------------------

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """folk: CharLM's {"inputs", "targets" int32 [B, T], "mask"}; chorales: {"inputs", "targets": float32
        [B, T, P], "mask": bool [B, T]}, random windows of random chorales, a pure function of (seed, index)."""
        if self.folk:
            return self._char_lm().batch(data, split, index, seed)
        _check_split(split, "train")
        rows = epoch_rows(len(data.train), self.batch_size, index, seed)
        rng = np.random.default_rng([seed, index, 1])
        pieces = []
        for r in rows:
            seq = data.train[r]
            start = int(rng.integers(0, max(1, len(seq) - self.seq_len)))
            pieces.append(seq[start : start + self.seq_len + 1])
        return _frame_batch(pieces, self.seq_len, self.d_frame)

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        """folk: CharLM's windows over the validation text; chorales: every validation chorale whole
        (pieces of eval_len frames), rows padded to one length with mask False."""
        if self.folk:
            return self._char_lm().eval_batches(data, split, max_batches)
        _check_split(split, "val")
        pieces = [seq[s : s + self.eval_len + 1] for seq in data.val for s in range(0, len(seq) - 1, self.eval_len)]
        T = max(len(p) for p in pieces) - 1
        batches = [_frame_batch(pieces[i : i + self.batch_size], T, self.d_frame, rows=self.batch_size)
                   for i in range(0, len(pieces), self.batch_size)]
        return batches[:max_batches]

    # -- loss and evaluation ---------------------------------------------------------------------------

    def loss(self, model, variables, batch, rng=None):
        """folk: CharLM's mean next-character NLL; chorales: mean per-frame NLL (nats, summed over pitches).
        sums: count (characters or frames), sum_loss, sum_bits."""
        if self.folk:
            return self._char_lm().loss(model, variables, batch, rng)
        return frames_loss(model, variables, batch, rng)

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """Validation {"loss" (nats per character or frame), "bits", "count"} and the data's skip counts."""
        report = evaluate_sums(self, model, variables, self.eval_batches(data, "val", max_batches))
        skipped = {k: v for k, v in data.stats.items() if k.startswith(("skipped", "notes_out"))}
        return {**report, **skipped}

    def fit(self, model, data):
        """Count-based models (the n-gram) on the folk text."""
        if not self.folk:
            raise ConfigError("count-based models serve only --music.dataset folk (text).")
        return self._char_lm().fit(model, data)

    def write_samples(self, run, args) -> list[str]:
        """Generate `args.num_samples` tunes (folk) or chorales and write .mid and .wav files (and .abc for
        folk) into args.out or RUN_DIR/samples; returns the paths written. See jaxseq.tasks.music_samples."""
        from jaxseq.tasks.music_samples import write_chorale_samples, write_folk_samples

        out = Path(args.out) if args.out else Path(args.run_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        if self.folk:
            paths, summary = write_folk_samples(self, run, args, out)
        else:
            paths, summary = write_chorale_samples(self, run, args, out)
        print("music samples: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
        return paths


def frames_loss(model, variables, batch, rng=None):
    """Mean over valid frames of sum_p BCE(sigmoid(logits[..., p]), targets[..., p]) (nats), and its sums.

    batch = {"inputs", "targets": float [B, T, P], "mask": bool [B, T]}; rng None = deterministic.
    Returns (loss, {"count": valid frames, "sum_loss", "sum_bits"}).
    """
    rngs = None if rng is None else {"dropout": rng}
    logits = model.apply(variables, batch["inputs"], mask=batch["mask"], deterministic=rng is None, rngs=rngs)
    nll = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["targets"]).sum(-1)  # [B, T]
    mask = jnp.asarray(batch["mask"], bool)
    sum_nll = jnp.sum(jnp.where(mask, nll, 0.0))
    count = jnp.sum(mask, dtype=jnp.int32)
    return sum_nll / jnp.maximum(count, 1).astype(jnp.float32), {"count": count, "sum_loss": sum_nll,
                                                                  "sum_bits": sum_nll / math.log(2)}


def _frame_batch(pieces: list, T: int, P: int, rows: int | None = None) -> dict:
    """Pieces float32 [n_i + 1, P] (n_i >= 1 targets each) -> inputs/targets [rows, T, P], mask [rows, T];
    rows beyond the pieces (padding) have mask False."""
    rows = len(pieces) if rows is None else rows
    inputs = np.zeros((rows, T, P), np.float32)
    targets = np.zeros((rows, T, P), np.float32)
    mask = np.zeros((rows, T), bool)
    for i, p in enumerate(pieces):
        n = min(len(p) - 1, T)
        if n < 1:
            raise DataError("a chorale with no frame reached a batch; check --music.grid and the pitch range.")
        inputs[i, :n], targets[i, :n], mask[i, :n] = p[:n], p[1 : n + 1], True
    return {"inputs": inputs, "targets": targets, "mask": mask}
