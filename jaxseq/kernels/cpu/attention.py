"""Attention on the native CPU kernel (`attention_cpu.cc`): FlashAttention-2's forward and
backward as two XLA FFI custom calls, float32, in the caller's [B, T, H, d] layout.

Same semantics as `jaxseq.kernels.flash_attention` (causal masking with a query offset, static or traced and
per row; a key-padding mask; grouped-query heads; exact zeros and zero gradients for a query that sees
no key), which it replaces on a single-device CPU backend when `native_eligible` holds (the dispatch table's
"cpu-native-flash" entry, chosen by `jaxseq.attention`). Tested against a float64 NumPy attention, gradients included
(tests/test_native_attention.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.kernels import cpu
from jaxseq.checks import check_qkv, key_validity, row_offsets


def native_eligible(q, k, v) -> bool:
    """Static conditions for the native kernel: the CPU backend with one device (a sharded program keeps
    the XLA path, which XLA can partition), float32 q, k, v, head_dim a multiple of 32, and the kernels
    built."""
    if not cpu.on_single_cpu():
        return False
    if any(x.dtype != jnp.float32 or x.ndim != 4 for x in (q, k, v)):
        return False
    return q.shape[-1] % 32 == 0 and cpu.available()


def _forward(q, k, v, kvalid, offset, causal, scale):
    B, T, H, _ = q.shape
    outs = (cpu.f32(*q.shape), cpu.f32(B, H, T))
    return cpu.call("jaxseq_attention_fwd", outs, q, k, v, kvalid, offset, causal=causal, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, kvalid, offset, causal, scale):
    return _forward(q, k, v, kvalid, offset, causal, scale)[0]


def _attention_fwd(q, k, v, kvalid, offset, causal, scale):
    out, lse = _forward(q, k, v, kvalid, offset, causal, scale)
    return out, (q, k, v, kvalid, offset, out, lse)


def _attention_bwd(causal, scale, res, dout):
    q, k, v, kvalid, offset, out, lse = res
    outs = (cpu.f32(*q.shape), cpu.f32(*k.shape), cpu.f32(*v.shape))
    dq, dk, dv = cpu.call("jaxseq_attention_bwd", outs, q, k, v, kvalid, offset, out, lse, dout.astype(jnp.float32),
                             causal=causal, scale=np.float32(scale))
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def native_attention(q, k, v, *, causal: bool = False, key_padding_mask=None, q_offset=0, scale: float | None = None):
    """Scaled dot-product attention on the native CPU kernel (check `native_eligible` first).

    Args:
      q: [B, T, H, d] float32 queries.  k, v: [B, S, Hkv, d], H % Hkv == 0.
      causal: query i sits at absolute position q_offset + i and sees keys at positions <= that.
      key_padding_mask: bool [B, S], True = valid key.
      q_offset: int, or int array [] / [B] (traced is fine: the kernel reads it at run time and still
        skips the key blocks a query block cannot see). Only used when causal.
      scale: logit scale, default 1/sqrt(d).

    Returns:
      [B, T, H, d] float32. A query that may attend to no key returns exact zeros, with zero gradients.
    """
    B, T, H, S = check_qkv(q, k, v)
    if not cpu.available():
        raise RuntimeError(f"jaxseq's native attention kernel is unavailable: {cpu.unavailable_reason()}")
    if T == 0:
        return jnp.zeros(q.shape, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kvalid = key_validity(key_padding_mask, B, S)
    offset = row_offsets(q_offset if causal else 0, B)
    return _attention(q, k, v, kvalid, offset, bool(causal), scale)
