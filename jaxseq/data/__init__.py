"""Data: corpora, the character tokenizer, and LM batches.

    bundle = prepare_data(config.char_lm)                 # text -> tokenizer -> train/val ids
    batch = lm_batch(bundle.train_ids, batch_size=32, seq_len=128, seed=0, index=step)
    validate_batch(batch, bundle.tokenizer.vocab_size)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxseq.data.batches import eval_batches, lm_batch, split_ids, validate_batch
from jaxseq.data.corpus import build_stdlib_text, load_text, stdlib_cache_path, stdlib_text
from jaxseq.data.tokenizer import CharTokenizer
from jaxseq.errors import DataError

__all__ = [
    "CharTokenizer",
    "DataBundle",
    "build_stdlib_text",
    "eval_batches",
    "lm_batch",
    "load_text",
    "prepare_data",
    "split_ids",
    "stdlib_cache_path",
    "stdlib_text",
    "validate_batch",
]


class DataBundle(NamedTuple):
    """A corpus ready for training: its tokenizer and the encoded splits (int32 [N_train], int32 [N_val])."""

    tokenizer: CharTokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray


def prepare_data(data_config, tokenizer: CharTokenizer | None = None) -> DataBundle:
    """Load `data_config.source`, build (or reuse) the tokenizer, encode, and split.

    data_config: a `jaxseq.tasks.CharLM` (source, text_column, val_fraction, seq_len).
    tokenizer: the run's saved tokenizer when resuming; the corpus must then use only its characters.
    The vocabulary is built from the whole corpus (train and validation), so validation text never
    holds an unknown character.
    """
    source = data_config.source
    text = load_text(source, data_config.text_column)
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(text)
    else:
        unknown = tokenizer.unknown_chars(text)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise DataError(
                f"data source {source!r} holds {len(unknown)} character(s) that the run's saved tokenizer "
                f"(vocab_size={tokenizer.vocab_size}) does not know: {shown}. A resumed run must read the "
                f"corpus it was trained on; check --char-lm.source, or start a new run."
            )
    ids = tokenizer.encode(text)
    train_ids, val_ids = split_ids(ids, data_config.val_fraction, data_config.seq_len)
    return DataBundle(tokenizer, train_ids, val_ids)
