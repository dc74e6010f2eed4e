"""Language-model batches from one long array of token ids, the nanoGPT way.

A training batch is a pure function of (seed, index): `lm_batch(ids, seed=s, index=i)` draws its
window starts with `np.random.default_rng([s, i])`. A resumed run therefore needs no data-loader
state: the data position is the step number. Evaluation windows are fixed, non-overlapping and
spread over the whole split, so validation losses compare across runs and models.

Batches are dicts of host NumPy arrays:
  inputs  int32 [B, T]   ids[s : s+T]
  targets int32 [B, T]   ids[s+1 : s+T+1]  (the token after each input)
  mask    bool  [B, T]   True where the target counts in the loss
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxseq.checks import check_tokens
from jaxseq.errors import ConfigError, DataError, ShapeError

BATCH_KEYS = ("inputs", "targets", "mask")


def split_ids(ids, val_fraction: float, seq_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) of `ids` for training, the last val_fraction for validation (nanoGPT's split).

    Both parts must hold at least one window of seq_len + 1 tokens (seq_len inputs and the next token).
    """
    ids = _as_ids(ids)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}; 0.1 keeps the last 10% for validation.")
    n = len(ids)
    cut = int(n * (1.0 - val_fraction))
    train, val = ids[:cut], ids[cut:]
    need = seq_len + 1
    if len(train) < need or len(val) < need:
        raise DataError(
            f"corpus of {n} tokens split with val_fraction={val_fraction} gives {len(train)} training and "
            f"{len(val)} validation tokens, but each part needs at least seq_len + 1 = {need}; use a larger "
            f"corpus, a smaller seq_len, or a val_fraction that leaves both parts long enough."
        )
    return train, val


def lm_batch(ids, *, batch_size: int, seq_len: int, seed: int, index: int) -> dict:
    """Training batch number `index`: `batch_size` random windows of `ids`, a pure function of (seed, index).

    ids: int [N] with N >= seq_len + 1. Returns {"inputs", "targets": int32 [B, T], "mask": bool [B, T]}.
    """
    ids = _as_ids(ids)
    _check_sizes(batch_size=batch_size, seq_len=seq_len)
    if seed < 0 or index < 0:
        raise ConfigError(f"lm_batch needs seed >= 0 and index >= 0, got seed={seed}, index={index}.")
    n = len(ids)
    if n < seq_len + 1:
        raise DataError(f"ids hold {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower seq_len or use more text.")
    rng = np.random.default_rng([seed, index])
    # As nanoGPT's get_batch: starts in [0, N - T), so the target window s+1 .. s+T stays inside.
    starts = rng.integers(0, n - seq_len, size=batch_size)
    return _windows(ids, starts, seq_len, np.ones(batch_size, dtype=bool))


def eval_batches(ids, *, batch_size: int, seq_len: int, max_batches: int) -> list[dict]:
    """Up to `max_batches` deterministic batches of non-overlapping windows spread evenly over `ids`.

    The split is tiled into windows at starts 0, T, 2T, ...; if there are more than
    batch_size * max_batches of them, an evenly spaced subset is taken. When the windows do not fill
    the last batch, its remaining rows repeat window 0 with mask False (fixed shapes, so one compiled
    eval step serves every batch; the masked rows add nothing to a masked mean).
    """
    ids = _as_ids(ids)
    _check_sizes(batch_size=batch_size, seq_len=seq_len)
    if max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1, got {max_batches}.")
    available = (len(ids) - 1) // seq_len
    if available < 1:
        raise DataError(f"ids hold {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower seq_len or use more text.")
    k = min(available, batch_size * max_batches)
    tiles = (np.arange(k, dtype=np.int64) * available) // k  # distinct because k <= available
    starts = tiles * seq_len
    num_batches = -(-k // batch_size)
    pad = num_batches * batch_size - k
    starts = np.concatenate([starts, np.zeros(pad, dtype=np.int64)])
    valid = np.concatenate([np.ones(k, dtype=bool), np.zeros(pad, dtype=bool)])
    return [
        _windows(ids, starts[i : i + batch_size], seq_len, valid[i : i + batch_size])
        for i in range(0, num_batches * batch_size, batch_size)
    ]


def validate_batch(batch, vocab_size: int) -> dict:
    """Host-side checks of an LM batch: keys, integer ids in [0, vocab_size), shapes, a bool mask, not empty.

    Raises DataError (missing keys, empty batch), ShapeError (dtype, rank, shape mismatch) or
    TokenRangeError (ids out of range). Returns the batch unchanged.
    """
    if not isinstance(batch, Mapping):
        raise DataError(f"a batch must be a dict with keys {BATCH_KEYS}, got {type(batch).__name__}.")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise DataError(f"batch is missing key(s) {missing}; an LM batch has {BATCH_KEYS} (got {sorted(batch)}).")
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
    check_tokens(inputs, vocab_size, name="batch['inputs']", ndim=2)
    check_tokens(targets, vocab_size, name="batch['targets']", ndim=2)
    shape = tuple(np.shape(inputs))
    if tuple(np.shape(targets)) != shape:
        raise ShapeError(f"batch['targets'] has shape {tuple(np.shape(targets))} but batch['inputs'] has {shape}; they must agree.")
    if tuple(np.shape(mask)) != shape:
        raise ShapeError(f"batch['mask'] has shape {tuple(np.shape(mask))} but batch['inputs'] has {shape}; they must agree.")
    if np.asarray(mask).dtype != np.bool_:
        raise ShapeError(f"batch['mask'] must be bool (True = the target counts), got dtype {np.asarray(mask).dtype}.")
    if 0 in shape:
        raise DataError(f"batch is empty (shape {shape}); every batch needs at least one row and one time step.")
    if not np.asarray(mask).any():
        raise DataError("batch['mask'] is all False: no target counts, so the loss would be 0/0.")
    return batch


def _windows(ids: np.ndarray, starts: np.ndarray, seq_len: int, valid: np.ndarray) -> dict:
    w = ids[starts[:, None] + np.arange(seq_len + 1)]  # [B, T + 1]
    return {
        "inputs": w[:, :-1].astype(np.int32),
        "targets": w[:, 1:].astype(np.int32),
        "mask": np.repeat(valid[:, None], seq_len, axis=1),
    }


def _as_ids(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ShapeError(f"ids must be a 1-D array of token ids (the encoded corpus), got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ShapeError(f"ids must be integer token ids, got dtype {arr.dtype}; encode the text with the tokenizer.")
    return arr


def _check_sizes(**sizes):
    for name, v in sizes.items():
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}.")
