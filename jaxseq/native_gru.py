"""The GRU on the native CPU kernels (`jaxseq/native/rnn_cpu.cc`, its GRU section): as
`jaxseq.native_lstm` does for the LSTM, the two recurrent loops as XLA FFI custom calls and the
weight-gradient and input-gradient matmuls in XLA.

The kernels' 32-column tiles hold [r, z, h W_hn, x W_in] for 8 hidden units (the last two apart, since r
multiplies only the first), so the bias is passed in that panel order and the gradients of the
[dr, dz, dhn, dn] columns are permuted back to jaxseq's [r | z | n] blocks here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import native
# The same conditions as the LSTM's (one CPU device, float32, H % 32 == 0, H >= MIN_HIDDEN): the params
# have the same names.
from jaxseq.native_lstm import _perm, native_eligible  # noqa: F401


def _forward(params, xs, mask, h0, resets, training):
    b, t, _ = xs.shape
    hidden = params["w_hh"].shape[0]
    b_ih, b_hh = params["b_ih"], params["b_hh"]
    blocks = jnp.concatenate([b_ih[: 2 * hidden] + b_hh[: 2 * hidden], b_hh[2 * hidden:], b_ih[2 * hidden:]])
    bias = blocks[_perm(hidden)[0]]  # [r, z, hn, xn] blocks -> panel order
    saved = (native.f32(b * t, 4 * hidden), native.f32(b, t, hidden)) if training else ()
    outs = (native.f32(b, t, hidden),) + saved + (native.f32(b, hidden),)
    target = "jaxseq_gru_fwd" if training else "jaxseq_gru_infer"
    return native.call(target, outs, xs, params["w_ih"], bias, params["w_hh"], h0, mask, resets)


@jax.custom_vjp
def _gru(params, xs, mask, h0, resets):
    return _forward(params, xs, mask, h0, resets, training=False)


def _gru_fwd(params, xs, mask, h0, resets):
    ys, gates, hs, h = _forward(params, xs, mask, h0, resets, training=True)
    return (ys, h), (params, xs, gates, hs, mask, resets)


def _gru_bwd(res, cts):
    params, xs, gates, hs, mask, resets = res
    dys, dh = cts
    b, t, d = xs.shape
    hidden = hs.shape[-1]
    dz, dh0 = native.call("jaxseq_gru_bwd", (native.f32(b * t, 4 * hidden), native.f32(b, hidden)),
                    gates, hs, params["w_hh"], mask, resets, dys, dh, aliases={0: 0})  # [dr, dz, dhn, dn] over the gates
    perm, inv = _perm(hidden)
    # dz's panel columns of the blocks [r, z, hn] (W_hh's gradient) and [r, z, xn] (W_ih's), in jaxseq's order
    hh, ih = inv[: 3 * hidden], np.concatenate([inv[: 2 * hidden], inv[3 * hidden:]])
    sums = jnp.sum(dz, axis=0)
    w_blocks = jnp.concatenate([params["w_ih"][:, : 2 * hidden], jnp.zeros((d, hidden), dz.dtype), params["w_ih"][:, 2 * hidden:]], 1)
    grads = {
        "w_ih": (xs.reshape(b * t, d).T @ dz)[:, ih],
        "w_hh": (hs.reshape(b * t, hidden).T @ dz)[:, hh],
        "b_ih": sums[ih],
        "b_hh": sums[hh],
    }
    dxs = (dz @ w_blocks[:, perm].T).reshape(b, t, d)
    return grads, dxs, None, dh0, None


_gru.defvjp(_gru_fwd, _gru_bwd)


def gru_sequence_native(params, xs, mask, carry0, resets):
    """`jaxseq.fused_rnn.gru_sequence` on the native kernels (check `native_eligible` first).

    xs [B, T, d_in]; mask, resets [B, T] bool; carry0 h [B, H]. Returns ys [B, T, H] and the final h.
    """
    if not native.available():
        raise RuntimeError(f"jaxseq's native RNN kernels are unavailable: {native.unavailable_reason()}")
    return _gru(params, xs, mask.astype(bool), jnp.asarray(carry0, jnp.float32), resets.astype(bool))
