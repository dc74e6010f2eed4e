"""Image captioning (--task captioning): say what is where in a composed scene (Xu et al. 2015).

Scenes of scikit-learn's 8x8 digits (the default, pip only) or Fashion-MNIST items (apt-get install
dataset-fashion-mnist) on a grid, captioned by what is where, e.g. "seven top left and two bottom right"
(`jaxseq.tasks.scenes` has the grammar). Test scenes use held-out item images and new layouts. With 2 to
4 objects on a 3 x 3 grid there are ~1.4 M captions, so a model cannot pass by memorising them.

Captions are cut into words (their vocabulary is ~25 words, built from the training captions and saved
in the run as `vocab_target.json`). A model reads the image with a CNN encoder whose spatial grid is the
attention memory (`--model lstm-bahdanau`, `lstm-luong`), or only its summary vector (`lstm-seq2seq`).
`evaluate` decodes the test scenes with beam search and reports BLEU (word n-grams), chrF and exact match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.errors import CheckpointError, ConfigError
from jaxseq.tasks import seq2seq_common as S
from jaxseq.tasks.common import epoch_rows, evaluate_sums, padded_rows
from jaxseq.tasks.vocab import Vocab

CELL = {"digits": 8, "fashion": 28}  # the side of one item image
VOCAB_FILE = "vocab_target.json"


@dataclass(frozen=True)
class Captioning:
    """Captioning of composed scenes (--task captioning); see the module docstring."""

    items: Literal["digits", "fashion"] = "digits"
    """The item images: scikit-learn's digits, or Fashion-MNIST (Debian's dataset-fashion-mnist)."""
    grid: int = 3
    """Cells per side of the scene; one item fits a cell."""
    min_objects: int = 2
    """The fewest objects in a scene."""
    max_objects: int = 4
    """The most objects in a scene."""
    train_scenes: int = 10000
    """Training scenes."""
    val_scenes: int = 500
    """Validation scenes (the loop's periodic evaluation)."""
    test_scenes: int = 1000
    """Test scenes, decoded by the final evaluation."""
    data_seed: int = 0
    """Seed of the scenes."""
    batch_size: int = 64
    """Scenes per step (the global batch)."""
    beam_size: int = 3
    """Beams in the final evaluation (1: greedy)."""

    unit = "tok"

    def prepare(self, run_dir=None) -> dict:
        """{"vocab": Vocab, "<split>": {"images": float32 [n, H, W, 1], "tgt": [int32 [m]], "text": [str]},
        "width": T}; with run_dir, the run's saved vocabulary."""
        from jaxseq.tasks.scenes import make_scenes

        counts = {"train": self.train_scenes, "val": self.val_scenes, "test": self.test_scenes}
        scenes = {name: make_scenes(n, split=name, items=self.items, grid=self.grid, min_objects=self.min_objects,
                                    max_objects=self.max_objects, seed=self.data_seed) for name, n in counts.items()}
        vocab = self._load_vocab(run_dir) if run_dir is not None else Vocab.build(scenes["train"][1], "word")
        data = {"vocab": vocab}
        for name, (images, captions) in scenes.items():
            tgt = [vocab.encode(c, name=f"{name} caption {i}") for i, c in enumerate(captions)]
            data[name] = {"images": images, "tgt": tgt, "text": captions}
        # Every caption fits: at most max_objects objects of at most 5 words, and " and " between them.
        data["width"] = max(len(t) for split in counts for t in data[split]["tgt"]) + 1
        return data

    def save(self, data, run_dir) -> None:
        data["vocab"].save(Path(run_dir) / VOCAB_FILE)

    def _load_vocab(self, run_dir) -> Vocab:
        path = Path(run_dir) / VOCAB_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; is {run_dir} a run directory written by `jaxseq train`?")
        return Vocab.load(path)

    def model_spec(self, data) -> dict:
        return {"interface": "seq2seq", "source": "image", "vocab_size": data["vocab"].size,
                "image_shape": list(self._image_shape())}

    def _image_shape(self) -> tuple[int, int, int]:
        side = self.grid * CELL[self.items]
        return side, side, 1

    def _arrays(self, split_data, rows, width, valid=None) -> dict:
        batch = {"src": split_data["images"][rows], **S.target_arrays([split_data["tgt"][r] for r in rows], width)}
        batch["weight"] = np.ones(len(rows), bool) if valid is None else valid
        return batch

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """Training batch `index` (see `jaxseq.tasks.seq2seq_common`), epochs of fresh permutations."""
        if split != "train":
            raise ConfigError(f"Captioning.batch serves split 'train'; evaluation uses eval_batches (got {split!r}).")
        if self.batch_size < 1:
            raise ConfigError(f"--captioning.batch-size must be >= 1, got {self.batch_size}.")
        rows = epoch_rows(len(data["train"]["tgt"]), self.batch_size, index, seed)
        return self._arrays(data["train"], rows, data["width"])

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        if split not in ("val", "test"):
            raise ConfigError(f"Captioning.eval_batches serves 'val' or 'test', got {split!r}.")
        n = len(data[split]["tgt"])
        return [self._arrays(data[split], rows, data["width"], valid)
                for rows, valid in padded_rows(n, self.batch_size, max_batches)]

    def loss(self, model, variables, batch, rng=None):
        return S.seq2seq_loss(model, variables, batch, rng)

    def example_inputs(self, data):
        return (jax.ShapeDtypeStruct((1, *self._image_shape()), jnp.float32), jax.ShapeDtypeStruct((1, 2), jnp.int32))

    def caption(self, model, variables, data, images, *, beam_size: int | None = None) -> list[str]:
        """Captions of images float32 [n, H, W, 1] by beam search (the task's beam size by default)."""
        out = []
        for rows, valid in padded_rows(len(images), self.batch_size, 1 << 30):
            tokens = S.decode(model, variables, images[rows], None, beam_size=beam_size or self.beam_size,
                              max_new_tokens=data["width"])
            out += [data["vocab"].decode(t) for t, ok in zip(tokens, valid) if ok]
        return out

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """Test loss (nats per caption token) and the beam-search captions' BLEU, chrF and exact match."""
        report = evaluate_sums(self, model, variables, self.eval_batches(data, "test", max_batches))
        n = min(len(data["test"]["text"]), max_batches * self.batch_size)
        hypotheses = self.caption(model, variables, data, data["test"]["images"][:n])
        report.update(S.scores(hypotheses, data["test"]["text"][:n], bleu_tokenize="13a"))
        return report
