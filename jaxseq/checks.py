"""Validation at the edges: shapes, dtypes, token ranges, masks.

Checks on values (token ranges) run only on concrete arrays, i.e. outside
`jit`; inside a trace only static facts (rank, dtype, shape) are checked. Data
loaders validate every batch on the host, so jitted code sees checked values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.errors import ShapeError, TokenRangeError


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_tokens(tokens, vocab_size: int | None = None, *, name: str = "tokens", ndim: int | tuple[int, ...] = 2):
    """Check an array of token ids: integer dtype, expected rank, ids in [0, vocab_size).

    Returns the array unchanged so it can be used inline.
    """
    dtype = jnp.asarray(tokens).dtype if not hasattr(tokens, "dtype") else tokens.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ShapeError(
            f"{name} must hold integer token ids, got dtype {dtype}; "
            f"convert with {name}.astype(jnp.int32) (and check they are not embeddings or logits)."
        )
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if len(np.shape(tokens)) not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ShapeError(
            f"{name} must have rank {want} ([batch, time] for sequences, [batch] for one step), "
            f"got shape {tuple(np.shape(tokens))}."
        )
    if vocab_size is not None and is_concrete(tokens) and np.size(tokens) > 0:
        arr = np.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise TokenRangeError(
                f"{name} holds id {bad}, outside [0, {vocab_size}) for vocab_size={vocab_size}; "
                f"encode with the model's tokenizer, or raise vocab_size (padding must use a valid id "
                f"plus mask=False, not -1)."
            )
    return tokens


def check_mask(mask, shape: tuple[int, ...], *, name: str = "mask"):
    """Check a validity mask: boolean (or 0/1 integer) with exactly `shape`. Returns a bool array."""
    if mask is None:
        return None
    if tuple(np.shape(mask)) != tuple(shape):
        raise ShapeError(
            f"{name} has shape {tuple(np.shape(mask))} but the data has shape {tuple(shape)}; "
            f"{name}[b, t] must say whether position t of row b is valid."
        )
    dtype = mask.dtype if hasattr(mask, "dtype") else np.asarray(mask).dtype
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
        raise ShapeError(f"{name} must be boolean (True = valid), got dtype {dtype}.")
    return jnp.asarray(mask).astype(bool)


def check_features(xs, d_in: int, *, name: str = "xs", ndim: int = 3):
    """Check a float feature array [..., d_in] of the expected rank."""
    if len(np.shape(xs)) != ndim:
        raise ShapeError(
            f"{name} must have rank {ndim} ([batch, time, features] for unroll), got shape {tuple(np.shape(xs))}."
        )
    if np.shape(xs)[-1] != d_in:
        raise ShapeError(f"{name} has {np.shape(xs)[-1]} features in its last axis but the cell expects d_in={d_in}.")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise ShapeError(f"{name} must be floating point, got {xs.dtype}; embed token ids first.")
    return xs
