"""Speech as sequences of mu-law samples: next-sample prediction with a speaker id, in bits per sample.

Data, offline: sentences of the built-in docstring corpus spoken by espeak-ng (pip `espeakng-loader`),
one speaker per voice, resampled to `sample_rate` and cached (`jaxseq.data.speech`); or a folder with one
sub-folder of mono 16-bit WAV files per speaker, all at `sample_rate`. Samples are mu-law companded to
256 classes (van den Oord et al. 2016). The split is by sentence (by file for a folder): the first
`test_fraction` of the sentences, in the corpus's hash order, are held out for every voice, so the test
set is unseen text in voices the model has heard. Training batches are random windows of
`segment_len + 1` samples, a pure function of (seed, index); evaluation cuts the test utterances into
consecutive windows (each starts with no context, the same for every model).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq.errors import ConfigError, DataError
from jaxseq.tasks.common import evaluate_sums, padded_rows

LEVELS = 256
SPEAKERS_FILE = "speakers.json"


@dataclass(frozen=True)
class Audio:
    """Next-sample prediction on mu-law speech (--task audio), conditioned on the speaker."""

    source: str = "espeak"
    """"espeak": corpus sentences synthesised by espeak-ng, one speaker per voice (pip espeakng-loader);
    or a folder holding one sub-folder of mono 16-bit WAV files (at sample_rate) per speaker."""
    voices: tuple[str, ...] = ("en-us", "en-us+f3", "en+m3", "en-gb-scotland")
    """espeak-ng voices, one speaker each (source "espeak")."""
    sentences: int = 100
    """Corpus sentences each voice reads (source "espeak")."""
    test_fraction: float = 0.1
    """Sentences (files, for a folder) held out for testing, as a fraction."""
    sample_rate: int = 16000
    """Samples per second of the audio the model sees (espeak-ng's 22,050 Hz output is resampled)."""
    segment_len: int = 1024
    """Samples per training window (predicting each from the ones before it in the window)."""
    batch_size: int = 8
    """Windows per step (the global batch, split over the mesh's data axis)."""
    test_windows: int = 512
    """Test windows of segment_len samples that evaluation covers, spread evenly over the held-out
    utterances (0: all of them)."""
    sample_seconds: float = 1.0
    """Seconds of audio `jaxseq sample` generates per WAV (unless it is given --seconds)."""

    unit = "sample"

    def _check(self) -> None:
        if not 8000 <= self.sample_rate <= 48000:
            raise ConfigError(f"--audio.sample-rate must be in [8000, 48000] Hz, got {self.sample_rate}.")
        if self.source == "espeak" and self.sample_rate > 22050:
            raise ConfigError(f"--audio.sample-rate {self.sample_rate}: espeak-ng speaks at 22050 Hz; "
                              f"choose a rate <= 22050 (16000 is WaveNet's).")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--audio.test-fraction must be in (0, 1), got {self.test_fraction}.")
        for name in ("segment_len", "batch_size", "sentences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--audio.{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.source == "espeak" and not self.voices:
            raise ConfigError("--audio.voices must name at least one espeak-ng voice, e.g. en-us en-us+f3.")

    def prepare(self, run_dir=None) -> dict:
        """{"codes": uint8 [N] (mu-law, all utterances end to end), "starts", "lengths": int64 [U],
        "speaker": int32 [U], "test": bool [U], "speakers": list of names}."""
        from jaxseq.data import speech as S

        self._check()
        if self.source == "espeak":
            c = S.speech_corpus(tuple(self.voices), self.sentences, self.sample_rate)
            audio = c["audio"].astype(np.float64) / 32768.0
            n_test = max(1, round(self.sentences * self.test_fraction))
            if n_test >= self.sentences:
                raise ConfigError(f"--audio.sentences {self.sentences} with --audio.test-fraction "
                                  f"{self.test_fraction} leaves no training sentence; ask for more sentences.")
            data = {"starts": c["starts"], "lengths": c["lengths"], "speaker": c["speaker"],
                    "test": c["sentence"] < n_test, "speakers": list(self.voices)}
        else:
            audio, data = _load_folder(Path(self.source), self.sample_rate, self.test_fraction)
        data["codes"] = S.mu_law_encode(audio, LEVELS).astype(np.uint8)
        for split, rows in (("train", ~data["test"]), ("test", data["test"])):
            if not np.any(data["lengths"][rows] > self.segment_len):
                raise DataError(f"no {split} utterance is longer than --audio.segment-len {self.segment_len} samples; "
                                f"lower it or add longer audio.")
        return data

    def save(self, data, run_dir) -> None:
        (Path(run_dir) / SPEAKERS_FILE).write_text(json.dumps(data["speakers"]) + "\n")

    def model_spec(self, data) -> dict:
        return {"interface": "audio", "levels": LEVELS, "num_speakers": len(data["speakers"])}

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """Training batch `index`: {"inputs", "targets": int32 [B, L], "speaker": int32 [B], "mask": bool [B, L]}.

        Utterances are drawn in proportion to their windows, offsets uniformly: a pure function of (seed, index).
        """
        if split != "train":
            raise ConfigError(f"Audio.batch serves split 'train'; evaluation uses eval_batches (got {split!r}).")
        L = self.segment_len
        rows = np.flatnonzero(~data["test"] & (data["lengths"] > L))
        room = data["lengths"][rows] - L  # offsets 0 .. length - L - 1 leave L + 1 samples
        rng = np.random.default_rng([seed, index])
        pick = rng.choice(len(rows), size=self.batch_size, p=room / room.sum())
        starts = data["starts"][rows[pick]] + np.floor(rng.random(self.batch_size) * room[pick]).astype(np.int64)
        windows = data["codes"][starts[:, None] + np.arange(L + 1)].astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:], "speaker": data["speaker"][rows[pick]],
                "mask": np.ones((self.batch_size, L), bool)}

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        """The test utterances cut into consecutive windows of L + 1 samples (the last of each masked past
        its end), `test_windows` of them evenly spread, in batches of batch_size (the last padded with
        masked rows)."""
        if split != "val":
            raise ConfigError(f"Audio.eval_batches serves split 'val' (the test sentences), got {split!r}.")
        L = self.segment_len
        spans = [(int(data["starts"][u]) + lo, min(L + 1, int(data["lengths"][u]) - lo), int(data["speaker"][u]))
                 for u in np.flatnonzero(data["test"]) for lo in range(0, int(data["lengths"][u]) - 1, L)]
        if 0 < self.test_windows < len(spans):  # evenly spread, so every voice and sentence is represented
            spans = [spans[i] for i in np.linspace(0, len(spans) - 1, self.test_windows).round().astype(int)]
        spans = spans[: max_batches * self.batch_size]
        windows = np.zeros((len(spans), L + 1), np.int32)
        for i, (start, n, _) in enumerate(spans):
            windows[i, :n] = data["codes"][start: start + n]
        speakers = np.asarray([s for _, _, s in spans], np.int32)
        masks = np.arange(L)[None, :] < np.asarray([n - 1 for _, n, _ in spans])[:, None]
        out = []
        for rows, valid in padded_rows(len(windows), self.batch_size, max_batches):
            out.append({"inputs": windows[rows, :-1], "targets": windows[rows, 1:], "speaker": speakers[rows],
                        "mask": masks[rows] & valid[:, None]})
        return out

    def loss(self, model, variables, batch, rng=None):
        """Mean next-sample cross-entropy (nats) over masked-in targets; sums: count, sum_loss, sum_bits."""
        logits = model.apply(variables, batch["inputs"], batch["speaker"]).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["mask"]
        count = jnp.sum(mask, dtype=jnp.int32)
        sum_loss = jnp.sum(jnp.where(mask, ce, 0.0))
        sums = {"count": count, "sum_loss": sum_loss, "sum_bits": sum_loss / math.log(2.0)}
        return sum_loss / jnp.maximum(count, 1).astype(jnp.float32), sums

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """Test NLL over the held-out sentences (or `max_batches`): {"loss" (nats), "bits" (per sample), "count"}."""
        return evaluate_sums(self, model, variables, self.eval_batches(data, "val", max_batches))

    def example_inputs(self, data):
        return (jax.ShapeDtypeStruct((1, self.segment_len), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))

    def speakers(self, run_dir) -> list[str]:
        """The speaker names of a saved run (index = speaker id)."""
        path = Path(run_dir) / SPEAKERS_FILE
        if path.is_file():
            return json.loads(path.read_text())
        return list(self.voices)

    def write_samples(self, run, args) -> list[str]:
        """`jaxseq sample RUN_DIR`: args.num_samples WAVs per speaker (or only --speaker), each --seconds long
        (default --audio.sample-seconds), into args.out or RUN_DIR/samples; returns the paths."""
        from jaxseq.data.speech import mu_law_decode, write_wav
        from jaxseq.models.wavenet import generate

        names = self.speakers(args.run_dir)
        speaker = getattr(args, "speaker", None)
        if speaker is not None and not 0 <= speaker < len(names):
            raise ConfigError(f"--speaker {speaker} is out of range: this run has {len(names)} speakers, ids 0..{len(names) - 1} "
                              f"({', '.join(f'{i}: {n}' for i, n in enumerate(names))}).")
        seconds = getattr(args, "seconds", 0.0) or self.sample_seconds
        if seconds <= 0 or args.num_samples < 1:
            raise ConfigError(f"--seconds ({seconds}) must be > 0 and --num-samples ({args.num_samples}) >= 1.")
        ids = [speaker] if speaker is not None else list(range(len(names)))
        rows = np.repeat(np.asarray(ids, np.int32), args.num_samples)
        codes = generate(run.model, run.variables, jnp.asarray(rows), int(round(seconds * self.sample_rate)),
                         jax.random.key(args.seed), temperature=args.temperature, top_k=args.top_k)
        out = Path(args.out or Path(args.run_dir) / "samples")
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for r, s in enumerate(rows):
            path = out / f"{_safe(names[s])}_{r % args.num_samples}.wav"
            write_wav(path, mu_law_decode(np.asarray(codes[r]), LEVELS), self.sample_rate)
            paths.append(str(path))
            print(path)
        return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _load_folder(root: Path, rate: int, test_fraction: float):
    """A folder of speaker sub-folders of WAV files -> (audio float64 [N], data dict as `Audio.prepare`)."""
    from jaxseq.data.speech import read_wav

    if not root.is_dir():
        raise DataError(f"--audio.source {root}: no such folder; give 'espeak' or a folder with one sub-folder "
                        f"of WAV files per speaker.")
    speakers = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.wav")))
    if not speakers:
        raise DataError(f"--audio.source {root} holds no sub-folder with .wav files (one sub-folder per speaker).")
    pieces, speaker, test = [], [], []
    for s, name in enumerate(speakers):
        files = sorted((root / name).glob("*.wav"))
        n_test = max(1, round(len(files) * test_fraction)) if len(files) > 1 else 0
        for i, f in enumerate(files):
            pieces.append(read_wav(f, rate))
            speaker.append(s)
            test.append(i >= len(files) - n_test)  # the last files of each speaker, in name order
    lengths = np.array([len(p) for p in pieces], np.int64)
    data = {"starts": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), "lengths": lengths,
            "speaker": np.array(speaker, np.int32), "test": np.array(test, bool), "speakers": speakers}
    return np.concatenate(pieces), data
