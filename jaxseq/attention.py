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
  * implementation=None picks cuDNN's fused kernel on GPU when the inputs are eligible, on CPU a native
    FlashAttention-2 kernel (or the blockwise JAX one) when the call is long enough, XLA elsewhere
    (the raw op's None always means XLA today).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.checks import is_concrete
from jaxseq.errors import ConfigError, ShapeError

_IMPLEMENTATIONS = (None, "xla", "cudnn", "flash", "native")


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(_shape(x)) != 4:
            raise ShapeError(f"{name} must have rank 4 [batch, time, heads, head_dim], got shape {_shape(x)}.")
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


def _key_validity(key_padding_mask, B: int, S: int):
    """bool [B, S], True = valid key: the checked key-padding mask, or all True when None."""
    if key_padding_mask is None:
        return jnp.ones((B, S), bool)
    if tuple(np.shape(key_padding_mask)) != (B, S):
        raise ShapeError(
            f"key_padding_mask must be bool [batch, keys] = {(B, S)}, got shape {tuple(np.shape(key_padding_mask))}."
        )
    return jnp.asarray(key_padding_mask).astype(bool)


def _row_offsets(q_offset, B: int):
    """int32 [B]: the checked query offset (an int, or an int array [] / [batch]) for each row."""
    off = jnp.asarray(q_offset)
    if off.ndim not in (0, 1) or (off.ndim == 1 and off.shape[0] != B):
        raise ShapeError(f"q_offset must be an int, or an int array of shape [] or [batch] = [{B}], got {off.shape}.")
    if not jnp.issubdtype(off.dtype, jnp.integer):
        raise ShapeError(f"q_offset must hold integer positions, got dtype {off.dtype}.")
    return jnp.broadcast_to(off.astype(jnp.int32), (B,))


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


def _pick_implementation(q, implementation):
    if implementation not in _IMPLEMENTATIONS:
        raise ConfigError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}.")
    if implementation is not None:
        return [implementation]
    # cuDNN's fused kernel takes only half precision; try it first on GPU and fall back to XLA
    # when it rejects the shapes (head_dim, odd lengths with a bias, ...): it says so at trace time.
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return ["cudnn", "xla"]
    return ["xla"]


# On CPU, jaxseq.flash_attention (blockwise, skips the causal masked half, own backward) beats the
# dense XLA lowering, forward + backward, from this many queries and keys on when causal, and from twice
# as many without the causal mask (measured, batch 8, 4 heads of 64, one core: causal 1.35x at 256 and
# 2.2x at 512, non-causal 1.0x at 256 and 1.7x at 512, slower below 256; two cores at 256: causal 1.3x,
# non-causal 0.9x). On GPU cuDNN stays the choice.
FLASH_MIN_LEN = 256
# The native kernel (jaxseq.native_attention) is taken on a single-device CPU from this many queries and
# keys on (see NATIVE_MIN_LEN's measurement in benchmarks/README.md, attention attempt 17).
NATIVE_MIN_LEN = 64


def _maybe_blockwise(q, k, v, mask, causal, bias, q_offset, scale, implementation):
    """Route to the native kernel or jaxseq.flash_attention when asked, or (auto) on CPU when the call
    is one they can express (causal and/or key padding, no bias) and long enough to gain."""
    if implementation not in (None, "flash", "native"):
        return None
    T, S = q.shape[1], k.shape[1]
    expressible = bias is None and (mask is None or len(_shape(mask)) == 2)
    from jaxseq.native_attention import native_attention, native_eligible

    if implementation is None:
        if jax.default_backend() != "cpu" or not expressible:
            return None
        if min(T, S) >= NATIVE_MIN_LEN and native_eligible(q, k, v):  # (eligibility builds the kernels)
            implementation = "native"
        elif min(T, S) >= (FLASH_MIN_LEN if causal else 2 * FLASH_MIN_LEN):
            implementation = "flash"
        else:
            return None
    elif not expressible:
        raise ConfigError(
            f"implementation={implementation!r} takes causal masking and a key-padding mask [batch, keys] only; "
            "use implementation='xla' for a bias or a [B, T, S] / [B, H, T, S] mask."
        )
    elif implementation == "native" and not native_eligible(q, k, v):
        from jaxseq import native

        raise ConfigError(
            "implementation='native' needs float32 q, k, v with head_dim a multiple of 32 on a single-device "
            f"CPU backend, and the native kernels built ({native.unavailable_reason() or 'they are'}); "
            "use implementation='flash' or 'xla'."
        )
    if mask is not None:
        mask = _as_4d_mask(mask, q.shape[0], T, q.shape[2], S)[:, 0, 0, :]  # checks shape and dtype
    kw = dict(causal=causal, key_padding_mask=mask, q_offset=q_offset, scale=scale)
    if implementation == "native":
        return native_attention(q, k, v, **kw)
    from jaxseq.flash_attention import flash_attention

    return flash_attention(q, k, v, **kw)


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
):
    """Scaled dot-product attention.

    Args:
      q: [B, T, H, d] queries.  k, v: [B, S, Hkv, d] keys and values, H % Hkv == 0.
      mask: bool, True = may attend. [B, S] (key padding), [B, T, S], or [B|1, H|1, T|1, S].
      causal: query i sees only keys at positions <= q_offset + i (keys sit at positions 0..S-1).
      bias: float, broadcastable to [B, H, T, S], added to the logits (use `mask` for masking).
      q_offset: absolute position of query 0: int, or int array [B] (one per row). Only used if causal.
      scale: logit scale, default 1/sqrt(d).
      implementation: None (auto: cuDNN on GPU when eligible; on a single-device CPU the native kernel
        (jaxseq.native_attention: float32, head_dim a multiple of 32) from NATIVE_MIN_LEN queries and
        keys, else "flash" from FLASH_MIN_LEN (twice that if not causal), when the mask is causal
        and/or key padding and there is no bias; else XLA), "xla", "cudnn", "flash"
        (jaxseq.flash_attention: blockwise in JAX, no bias or full mask), or "native" (the CPU kernel,
        the same masks as "flash").

    Returns:
      [B, T, H, d] in q's dtype. A query whose mask row is all False returns exact zeros, with zero
      (finite) gradients into q, k, v through that row.
    """
    B, T, H, S = _check_qkv(q, k, v)
    if bias is not None:
        try:
            ok = np.broadcast_shapes(_shape(bias), (B, H, T, S)) == (B, H, T, S) and len(_shape(bias)) <= 4
        except ValueError:
            ok = False
        if not ok:
            raise ShapeError(f"bias has shape {_shape(bias)}; it must broadcast to [batch, heads, queries, keys] = {(B, H, T, S)}.")
    if implementation not in _IMPLEMENTATIONS:
        raise ConfigError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}.")
    blockwise = _maybe_blockwise(q, k, v, mask, causal, bias, q_offset, scale, implementation)
    if blockwise is not None:
        return blockwise
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

    out = None
    for impl in _pick_implementation(q, implementation):
        try:
            out = jax.nn.dot_product_attention(
                q, k, v, bias=bias, mask=full, scale=scale, is_causal=use_is_causal, implementation=impl
            )
            break
        except (NotImplementedError, RuntimeError, ValueError):
            if impl == "xla" or implementation is not None:
                raise
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
