"""Character language modelling: next-character prediction on a text corpus, in nats and bits per character.

Data: Python's own docstrings by default (always present, built with `ast` and cached), a local file or
folder of .txt files, or a Hugging Face dataset; a character tokenizer built from the whole corpus and
saved in the run (`tokenizer.json`), so `jaxseq sample RUN_DIR` and a resume read the same vocabulary.
Batches are random windows, a pure function of (seed, index) (`jaxseq.data.lm_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.errors import CheckpointError, ConfigError
from jaxseq.losses import lm_loss
from jaxseq.tasks.common import evaluate_sums

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class CharLM:
    """Next-character prediction (--task char_lm): where text comes from and how it is cut into batches."""

    source: str = "stdlib"
    """"stdlib" (built from Python's own docstrings, always present),
    a local file or folder of .txt files,
    or a Hugging Face hub dataset name (needs the hub cache or network)."""
    text_column: str = "text"
    """The column that holds the text, for a hub dataset."""
    val_fraction: float = 0.1
    """The last part of the text held out for validation, as a fraction."""
    seq_len: int = 128
    """Tokens per training sequence."""
    batch_size: int = 32
    """Sequences per step (the global batch, split over the mesh's data axis)."""

    unit = "tok"

    def prepare(self, run_dir=None):
        """The corpus as a `jaxseq.data.DataBundle`; with `run_dir`, the vocabulary saved there."""
        from jaxseq import data as D  # the data package imports `datasets` lazily; keep `import jaxseq` fast

        tokenizer = None if run_dir is None else self.prepare_tokenizer(run_dir)
        return D.prepare_data(self, tokenizer=tokenizer)

    def prepare_tokenizer(self, run_dir):
        """The run's saved `jaxseq.data.CharTokenizer` (sampling needs it, not the corpus)."""
        from jaxseq.data import CharTokenizer

        return CharTokenizer.load(self._tokenizer_path(run_dir))

    def save(self, data, run_dir) -> None:
        data.tokenizer.save(Path(run_dir) / TOKENIZER_FILE)

    def model_spec(self, data) -> dict:
        return {"interface": "lm", "vocab_size": data.tokenizer.vocab_size}

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """Training batch `index`: {"inputs", "targets": int32 [B, T], "mask": bool [B, T]}."""
        from jaxseq import data as D

        _check_split(split, "train")
        b = D.lm_batch(data.train_ids, batch_size=self.batch_size, seq_len=self.seq_len, seed=seed, index=index)
        return D.validate_batch(b, data.tokenizer.vocab_size)

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        """Up to `max_batches` fixed batches of non-overlapping windows spread over the validation text."""
        from jaxseq import data as D

        _check_split(split, "val")
        batches = D.eval_batches(data.val_ids, batch_size=self.batch_size, seq_len=self.seq_len,
                                 max_batches=max_batches)
        return [D.validate_batch(b, data.tokenizer.vocab_size) for b in batches]

    def loss(self, model, variables, batch, rng=None):
        """Mean next-token NLL (nats) over valid targets; sums: count (tokens), sum_loss, sum_bits."""
        return lm_loss(model, variables, batch, rng)

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """Validation loss over the whole held-out text (or `max_batches`): {"loss", "bits", "count"}."""
        return evaluate_sums(self, model, variables, self.eval_batches(data, "val", max_batches))

    def fit(self, model, data):
        """Count-based models (the n-gram) are fitted in one pass over the training ids."""
        return model.fit_variables(np.asarray(data.train_ids))

    def example_inputs(self, data):
        """One row of inputs with the training shape, for `model.init`."""
        return jax.ShapeDtypeStruct((1, self.seq_len), jnp.int32)

    @staticmethod
    def _tokenizer_path(run_dir) -> Path:
        path = Path(run_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; is {run_dir} a run directory written by `jaxseq train`?")
        return path


def _check_split(split: str, *allowed: str) -> None:
    if split not in allowed:
        raise ConfigError(f"split must be one of {allowed} for this task, got {split!r}.")
