"""The LSTM and the GRU on the native CPU kernels (`rnn_cpu.cc`): the two recurrent loops as XLA FFI
custom calls, the large matmuls after the backward loop in XLA.

Same semantics and signature as `jaxseq.kernels.fused_rnn.lstm_sequence` / `gru_sequence` (masks,
resets, carry0, gradients of params, xs and carry0), which they replace on CPU when `native_eligible`
holds (the dispatch table's "cpu-native-lstm" and "cpu-native-gru"); the XLA path is the reference
they are tested against (tests/test_native_rnn.py).

LSTM forward: the kernel computes each step's [h | x_t] [W_hh; W_ih] with the cell in the matmul's
epilogue and returns ys, the activated gates, the carries entering each step and the final carry.
Backward: the kernel turns the gates into the gate cotangents dz in place and returns dh0, dc0; then
dW_hh = H_prev^T dz, dW_ih = X^T dz, db = sum dz and dX = dz W_ih^T are large matmuls in XLA, as in
the fused path. The kernels keep the gate columns in "panel order" (panel p = the i, f, g, o columns
of hidden units 8p..8p+7, so a tile's epilogue holds whole cells): they pack the weights that way
themselves, the bias is permuted here, and dz's columns are permuted back in the weight gradients.
The GRU's 32-column tiles hold [r, z, h W_hn, x W_in] for 8 hidden units (the last two apart, since r
multiplies only the first), so its bias is passed in that panel order and the gradients of the
[dr, dz, dhn, dn] columns are permuted back to jaxseq's [r | z | n] blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.kernels import cpu


@functools.cache
def _perm(hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """Panel order -> jaxseq's column order (i, f, g, o blocks of H), and its inverse."""
    q = np.arange(4 * hidden)
    p, gate, unit = q // 32, (q % 32) // 8, q % 8
    perm = gate * hidden + 8 * p + unit
    return perm, np.argsort(perm)


# Below this width the XLA path trains faster (hidden 64, batch 32: LSTM 308k against 284k tokens/s,
# GRU 361k against 252k; the kernels' per-call threads and per-step barriers outweigh a tiny matmul).
MIN_HIDDEN = 128


def native_supported(params, xs) -> bool:
    """What the kernels can compute: the CPU backend with one device (a sharded program keeps the XLA
    path, which XLA can partition), float32, hidden a multiple of 32, at least one row and one step, and
    the kernels built."""
    if not cpu.on_single_cpu() or xs.ndim != 3:
        return False
    if any(a.dtype != jnp.float32 for a in (xs, params["w_ih"], params["w_hh"], params["b_ih"], params["b_hh"])):
        return False
    hidden = params["w_hh"].shape[0]
    return hidden % 32 == 0 and xs.shape[0] > 0 and xs.shape[1] > 0 and cpu.available()


def native_eligible(params, xs) -> bool:
    """`native_supported` and wide enough to gain: hidden >= `MIN_HIDDEN` (the "auto" rule)."""
    return params["w_hh"].shape[0] >= MIN_HIDDEN and native_supported(params, xs)


def _lstm_forward(params, xs, mask, carry0, resets, training):
    b, t, _ = xs.shape
    hidden = params["w_hh"].shape[0]
    bias = (params["b_ih"] + params["b_hh"])[_perm(hidden)[0]]
    state = (cpu.f32(b, t, hidden),) + ((cpu.f32(b * t, 4 * hidden), cpu.f32(b, t, hidden), cpu.f32(b, t, hidden)) if training else ())
    outs = state + (cpu.f32(b, hidden), cpu.f32(b, hidden))
    target = "jaxseq_lstm_fwd" if training else "jaxseq_lstm_infer"
    return cpu.call(target, outs, xs, params["w_ih"], bias, params["w_hh"], *carry0, mask, resets)


@jax.custom_vjp
def _lstm(params, xs, mask, carry0, resets):
    ys, h, c = _lstm_forward(params, xs, mask, carry0, resets, training=False)
    return ys, (h, c)


def _lstm_fwd(params, xs, mask, carry0, resets):
    ys, gates, hs, cs, h, c = _lstm_forward(params, xs, mask, carry0, resets, training=True)
    return (ys, (h, c)), (params, xs, gates, hs, cs, mask, resets)


def _lstm_bwd(res, cts):
    params, xs, gates, hs, cs, mask, resets = res
    dys, (dh, dc) = cts
    b, t, d = xs.shape
    hidden = hs.shape[-1]
    dz, dh0, dc0 = cpu.call("jaxseq_lstm_bwd", (cpu.f32(b * t, 4 * hidden), cpu.f32(b, hidden), cpu.f32(b, hidden)),
                         gates, cs, params["w_hh"], mask, resets, dys, dh, dc, aliases={0: 0})  # dz over the gates
    perm, inv = _perm(hidden)
    db = jnp.sum(dz, axis=0)[inv]
    grads = {
        "w_ih": (xs.reshape(b * t, d).T @ dz)[:, inv],
        "w_hh": (hs.reshape(b * t, hidden).T @ dz)[:, inv],
        "b_ih": db,
        "b_hh": db,
    }
    dxs = (dz @ params["w_ih"][:, perm].T).reshape(b, t, d)
    return grads, dxs, None, (dh0, dc0), None


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


def lstm_sequence_native(params, xs, mask, carry0, resets):
    """`jaxseq.kernels.fused_rnn.lstm_sequence` on the native kernels (check `native_eligible` first).

    xs [B, T, d_in]; mask, resets [B, T] bool; carry0 (h, c) [B, H] each.
    Returns ys [B, T, H] (0 on masked steps) and the final (h, c).
    """
    if not cpu.available():
        raise RuntimeError(f"jaxseq's native LSTM kernels are unavailable: {cpu.unavailable_reason()}")
    carry0 = tuple(jnp.asarray(a, jnp.float32) for a in carry0)
    return _lstm(params, xs, mask.astype(bool), carry0, resets.astype(bool))


# ---------------------------------------------------------------------------------------------- GRU


def _gru_forward(params, xs, mask, h0, resets, training):
    b, t, _ = xs.shape
    hidden = params["w_hh"].shape[0]
    b_ih, b_hh = params["b_ih"], params["b_hh"]
    blocks = jnp.concatenate([b_ih[: 2 * hidden] + b_hh[: 2 * hidden], b_hh[2 * hidden:], b_ih[2 * hidden:]])
    bias = blocks[_perm(hidden)[0]]  # [r, z, hn, xn] blocks -> panel order
    saved = (cpu.f32(b * t, 4 * hidden), cpu.f32(b, t, hidden)) if training else ()
    outs = (cpu.f32(b, t, hidden),) + saved + (cpu.f32(b, hidden),)
    target = "jaxseq_gru_fwd" if training else "jaxseq_gru_infer"
    return cpu.call(target, outs, xs, params["w_ih"], bias, params["w_hh"], h0, mask, resets)


@jax.custom_vjp
def _gru(params, xs, mask, h0, resets):
    return _gru_forward(params, xs, mask, h0, resets, training=False)


def _gru_fwd(params, xs, mask, h0, resets):
    ys, gates, hs, h = _gru_forward(params, xs, mask, h0, resets, training=True)
    return (ys, h), (params, xs, gates, hs, mask, resets)


def _gru_bwd(res, cts):
    params, xs, gates, hs, mask, resets = res
    dys, dh = cts
    b, t, d = xs.shape
    hidden = hs.shape[-1]
    dz, dh0 = cpu.call("jaxseq_gru_bwd", (cpu.f32(b * t, 4 * hidden), cpu.f32(b, hidden)),
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
    """`jaxseq.kernels.fused_rnn.gru_sequence` on the native kernels (check `native_eligible` first).

    xs [B, T, d_in]; mask, resets [B, T] bool; carry0 h [B, H]. Returns ys [B, T, H] and the final h.
    """
    if not cpu.available():
        raise RuntimeError(f"jaxseq's native RNN kernels are unavailable: {cpu.unavailable_reason()}")
    return _gru(params, xs, mask.astype(bool), jnp.asarray(carry0, jnp.float32), resets.astype(bool))
