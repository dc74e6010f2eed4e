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


def _np_shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_qkv(q, k, v):
    """Check attention inputs q [B, T, H, d], k, v [B, S, Hkv, d] (H % Hkv == 0, S > 0, one dtype); returns (B, T, H, S)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(_np_shape(x)) != 4:
            raise ShapeError(f"{name} must have rank 4 [batch, time, heads, head_dim], got shape {_np_shape(x)}.")
    (B, T, H, d), (Bk, S, Hkv, dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ShapeError(f"k and v must have the same shape [B, S, kv_heads, d], got k {k.shape} and v {v.shape}.")
    if Bk != B:
        raise ShapeError(f"q has batch {B} but k/v have batch {Bk}; they must match.")
    if dk != d:
        raise ShapeError(f"q has head_dim {d} but k/v have head_dim {dk}; project them to the same size.")
    if H % Hkv != 0:
        raise ShapeError(
            f"q has {H} heads and k/v have {Hkv}; the number of query heads must be a multiple of the "
            f"key/value heads (grouped-query attention). Choose num_kv_heads dividing num_heads."
        )
    if S == 0:
        raise ShapeError("k/v have length 0: there is nothing to attend to; give at least one key.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first.")
    return B, T, H, S


def key_validity(key_padding_mask, B: int, S: int):
    """bool [B, S], True = valid key: the checked key-padding mask, or all True when None."""
    if key_padding_mask is None:
        return jnp.ones((B, S), bool)
    if tuple(np.shape(key_padding_mask)) != (B, S):
        raise ShapeError(
            f"key_padding_mask must be bool [batch, keys] = {(B, S)}, got shape {tuple(np.shape(key_padding_mask))}."
        )
    return jnp.asarray(key_padding_mask).astype(bool)


def row_offsets(q_offset, B: int):
    """int32 [B]: the checked query offset (an int, or an int array [] / [batch]) for each row."""
    off = jnp.asarray(q_offset)
    if off.ndim not in (0, 1) or (off.ndim == 1 and off.shape[0] != B):
        raise ShapeError(f"q_offset must be an int, or an int array of shape [] or [batch] = [{B}], got {off.shape}.")
    if not jnp.issubdtype(off.dtype, jnp.integer):
        raise ShapeError(f"q_offset must hold integer positions, got dtype {off.dtype}.")
    return jnp.broadcast_to(off.astype(jnp.int32), (B,))


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
