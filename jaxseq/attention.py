"""Attention: the one owner of `jax.nn.dot_product_attention`, the KV cache, and positional codes.

Layout everywhere is batch-major, heads before the head dimension:
    q: [B, T, H, d]      (T queries)
    k, v: [B, S, Hkv, d] (S keys), H % Hkv == 0: Hkv == H is multi-head, 1 < Hkv < H grouped-query,
                          Hkv == 1 multi-query attention.

Masks are boolean, True = may attend. Positions are absolute token indices.

What this adds over the raw op:
  * one `mask` argument that takes a key-padding mask [B, S] or a full mask [B, T, S] / [B|1, H|1, T|1, S];
  * causal masking with a query offset (per row if ragged), which is what decoding from a KV cache needs:
    query i sits at absolute position q_offset + i and sees keys at positions <= q_offset + i;
  * EXACT ZEROS (and zero, finite gradients) for a query that may attend to nothing. The raw op gives
    such a query a uniform softmax, i.e. the mean of the values: a silent wrong number;
  * shape checks that raise ShapeError naming the argument;
  * one dispatch table (`jaxseq.kernels.dispatch.ATTENTION`) picks cuDNN's fused kernel on GPU when the
    inputs are eligible, on CPU a native FlashAttention-2 kernel (or the blockwise JAX one) when the call
    is long enough, the dense XLA path (the reference) elsewhere or under kernels="reference".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.checks import check_qkv, is_concrete
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.kernels import dispatch

_IMPLEMENTATIONS = (None, "xla", "cudnn", "flash", "native")


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _as_4d_mask(mask, B, T, H, S):
    """Bring a user mask to [B|1, H|1, T|1, S] bool, checking it broadcasts."""
    shp = _shape(mask)
    if len(shp) == 2:  # key padding [B, S]
        want = (B, S)
        if shp != want:
            raise ShapeError(f"mask of rank 2 is a key-padding mask and must be [batch, keys] = {want}, got {shp}.")
        mask = mask[:, None, None, :]
    elif len(shp) == 3:  # [B, T, S]
        if shp[0] not in (1, B) or shp[1] not in (1, T) or shp[2] != S:
            raise ShapeError(f"mask of rank 3 must broadcast to [batch, queries, keys] = {(B, T, S)}, got {shp}.")
        mask = mask[:, None, :, :]
    elif len(shp) == 4:
        if shp[0] not in (1, B) or shp[1] not in (1, H) or shp[2] not in (1, T) or shp[3] != S:
            raise ShapeError(
                f"mask of rank 4 must broadcast to [batch, heads, queries, keys] = {(B, H, T, S)}, got {shp}."
            )
    else:
        raise ShapeError(
            f"mask must be [B, S] (key padding), [B, T, S] or [B, H, T, S], got shape {shp}."
        )
    dtype = mask.dtype
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
        raise ShapeError(f"mask must be boolean (True = may attend), got dtype {dtype}; put additive terms in bias.")
    return jnp.asarray(mask).astype(bool)


def causal_mask(q_len: int, k_len: int, q_offset=0):
    """[B|1, 1, T, S] bool: query i (absolute position q_offset + i) sees keys at positions <= q_offset + i.

    q_offset: int, or int array [B] for rows at different positions (ragged KV caches).
    """
    offset = jnp.asarray(q_offset, jnp.int32)
    if offset.ndim not in (0, 1):
        raise ShapeError(f"q_offset must be a scalar or [batch], got shape {offset.shape}.")
    q_pos = offset.reshape(-1, 1) + jnp.arange(q_len, dtype=jnp.int32)  # [B|1, T]
    k_pos = jnp.arange(k_len, dtype=jnp.int32)  # [S]
    return (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [B|1, 1, T, S]


def attention(
    q,
    k,
    v,
    *,
    mask=None,
    causal: bool = False,
    bias=None,
    q_offset=0,
    scale: float | None = None,
    implementation: str | None = None,
    kernels: str = "auto",
):
    """Scaled dot-product attention.

    Args:
      q: [B, T, H, d] queries.  k, v: [B, S, Hkv, d] keys and values, H % Hkv == 0.
      mask: bool, True = may attend. [B, S] (key padding), [B, T, S], or [B|1, H|1, T|1, S].
      causal: query i sees only keys at positions <= q_offset + i (keys sit at positions 0..S-1).
      bias: float, broadcastable to [B, H, T, S], added to the logits (use `mask` for masking).
      q_offset: absolute position of query 0: int, or int array [B] (one per row). Only used if causal.
      scale: logit scale, default 1/sqrt(d).
      implementation: None (the dispatch table `jaxseq.kernels.dispatch.ATTENTION` picks, see
        `kernels`), or force one: "xla" (the dense reference), "cudnn", "flash" (blockwise in JAX,
        causal and/or key padding only) or "native" (the CPU kernel, the same masks as "flash").
      kernels: "auto" (the first eligible entry of the table: on a single-device CPU the native kernel
        from NATIVE_MIN_LEN queries and keys, else flash from FLASH_MIN_LEN, for causal and/or
        key-padding calls; cuDNN on GPU in half precision; else XLA) or "reference" (the dense XLA
        path; then `implementation` may only be None or "xla").

    Returns:
      [B, T, H, d] in q's dtype. A query whose mask row is all False returns exact zeros, with zero
      (finite) gradients into q, k, v through that row.
    """
    B, T, H, S = check_qkv(q, k, v)
    if bias is not None:
        try:
            ok = np.broadcast_shapes(_shape(bias), (B, H, T, S)) == (B, H, T, S) and len(_shape(bias)) <= 4
        except ValueError:
            ok = False
        if not ok:
            raise ShapeError(f"bias has shape {_shape(bias)}; it must broadcast to [batch, heads, queries, keys] = {(B, H, T, S)}.")
    if implementation not in _IMPLEMENTATIONS:
        raise ConfigError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}.")
    dispatch.check_policy(kernels)
    call = dispatch.AttentionCall(q, k, v, mask, causal, bias)
    if implementation is None:
        entries = dispatch.candidates("attention", call, kernels)
    elif kernels == "reference" and implementation != "xla":
        raise ConfigError(f"kernels='reference' runs the dense XLA path; it contradicts implementation={implementation!r}. "
                          "Drop one of the two.")
    else:
        entries = [dispatch.forced_attention(call, implementation)]
    for i, entry in enumerate(entries):
        try:
            if entry.run is None:
                out = _dense(q, k, v, mask, causal, bias, q_offset, scale, entry.name)
            else:
                kpm = None if mask is None else _as_4d_mask(mask, B, T, H, S)[:, 0, 0, :]  # checks shape and dtype
                out = entry.run(q, k, v, causal=causal, key_padding_mask=kpm, q_offset=q_offset, scale=scale)
        except (NotImplementedError, RuntimeError, ValueError):
            # cuDNN rejects some shapes (head_dim, odd lengths with a bias, ...) at trace time: take the next entry.
            if entry.name != "cudnn" or implementation is not None or i == len(entries) - 1:
                raise
            continue
        dispatch.record("attention", entry.name)
        return out


def _dense(q, k, v, mask, causal, bias, q_offset, scale, implementation):
    """The reference: `jax.nn.dot_product_attention` on XLA (or cuDNN) with jaxseq's masking semantics."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    full = None
    if mask is not None:
        full = _as_4d_mask(mask, B, T, H, S)
    use_is_causal = False
    if causal:
        static_zero = isinstance(q_offset, (int, np.integer)) and int(q_offset) == 0
        if static_zero and full is None:
            # The raw op's own causal mask (top-left aligned) equals offset 0; cuDNN can then skip
            # the masked blocks instead of reading a mask tensor.
            use_is_causal = True
        else:
            offset = jnp.asarray(q_offset)
            if offset.ndim == 1 and offset.shape[0] != B:
                raise ShapeError(f"q_offset has shape {offset.shape}; it must be a scalar or [batch] = [{B}].")
            cm = causal_mask(T, S, q_offset)
            full = cm if full is None else (full & cm)

    valid = None
    if full is not None:
        # Rows with nothing to attend to: let them see everything (so the op, and its gradient, stay
        # finite and cheap), then zero their output below.
        valid = jnp.any(full, axis=-1, keepdims=True)  # [b, h, t, 1]
        full = full | ~valid

    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=full, scale=scale, is_causal=use_is_causal, implementation=implementation
    )
    if valid is not None:
        keep = jnp.transpose(valid, (0, 2, 1, 3))  # [b, t, h, 1], broadcast against [B, T, H, d]
        out = jnp.where(keep, out, jnp.zeros((), out.dtype))
    return out


# ----------------------------------------------------------------------------------------------------
# KV cache


class KVCache(NamedTuple):
    """Keys and values of one attention layer for decoding, fixed size so `jit` compiles once.

    k, v: [B, max_len, Hkv, d]. index: [B] int32, how many positions of each row are written, i.e.
    where that row's next token goes. Rows may be at different positions (ragged prompts). Every leaf
    has the batch as its leading axis, so beam search can reorder a cache with `x[beam_indices]`.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @staticmethod
    def create(batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        if batch_size < 1 or max_len < 1:
            raise ShapeError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}.")
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def update(self, k, v, lengths=None) -> "KVCache":
        """Write k, v [B, T, Hkv, d] at positions index[b] + t; advance index by lengths [B] (default T).

        Positions past `lengths[b]` (right padding) are written too but stay beyond the row's index:
        causal masking with q_offset=index hides them and the next update overwrites them. Writes past
        max_len are dropped (a scatter in mode="drop", so they never clobber earlier positions); the
        model checks for overflow where the index is concrete.
        """
        B, T = k.shape[:2]
        if k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:] or v.shape != k.shape:
            raise ShapeError(
                f"KV cache holds [B, max_len, Hkv, d] = {self.k.shape}; got new k {k.shape} and v {v.shape}."
            )
        pos = self.index[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
        rows = jnp.arange(B)[:, None]
        new_k = self.k.at[rows, pos].set(k.astype(self.k.dtype), mode="drop")
        new_v = self.v.at[rows, pos].set(v.astype(self.v.dtype), mode="drop")
        step = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        return KVCache(new_k, new_v, self.index + step)


def check_cache_room(cache: KVCache, new_tokens) -> None:
    """Raise if writing `new_tokens` (int or [B]) would run past the cache; only when values are concrete."""
    if is_concrete(cache.index) and is_concrete(new_tokens):
        end = np.asarray(cache.index) + np.asarray(new_tokens)
        if end.size and int(end.max()) > cache.max_len:
            raise ShapeError(
                f"the KV cache holds max_len={cache.max_len} positions but a row would reach {int(end.max())}; "
                f"call init_state with a larger max_len."
            )


# ----------------------------------------------------------------------------------------------------
# Positional codes


def sinusoidal_positions(positions, d_model: int, base: float = 10000.0):
    """Vaswani et al.'s fixed code: [..., d_model] float32 for int positions [...].

    PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)).
    """
    if d_model % 2:
        raise ShapeError(f"sinusoidal positions need an even d_model, got {d_model}.")
    inv_freq = base ** (-jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)  # [d/2]
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [..., d/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], d_model)


def apply_rope(x, positions, *, base: float = 10000.0):
    """Rotary position embedding (Su et al. 2021) in the "rotate half" layout of GPT-NeoX / LLaMA.

    Dimension i of the first half is paired with dimension i + d/2 and the pair is rotated by the angle
    position * base^(-2i/d). Since rotations compose, <rope(q, m), rope(k, n)> depends on m - n only.

    Args:
      x: [B, T, H, d] (d even) queries or keys.
      positions: int [B, T] or [T], absolute positions of the T tokens.
    Returns: x rotated, same shape and dtype (computed in float32).
    """
    if len(_shape(x)) != 4:
        raise ShapeError(f"apply_rope expects x of shape [batch, time, heads, head_dim], got {_shape(x)}.")
    B, T, _, d = x.shape
    if d % 2:
        raise ShapeError(f"rotary embedding needs an even head_dim, got {d}.")
    pos = jnp.asarray(positions)
    if _shape(pos) not in ((T,), (B, T), (1, T)):
        raise ShapeError(f"positions must be [time] or [batch, time] = [{B}, {T}], got {_shape(pos)}.")
    pos = jnp.broadcast_to(pos, (B, T)).astype(jnp.float32)
    inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [d/2]
    angles = pos[:, :, None, None] * inv_freq  # [B, T, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
