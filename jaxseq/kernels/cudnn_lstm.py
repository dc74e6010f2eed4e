"""The LSTM on NVIDIA GPUs through cuDNN (`jax.experimental.rnn`), for the calls cuDNN can express.

The dispatch table's "cudnn-lstm" entry (`jaxseq.kernels.dispatch`): on a CUDA backend, for float32
inputs and parameters, `lstm_sequence_cudnn` runs cuDNN's fused LSTM when, at run time, every row's
mask is a prefix (valid steps first, as cuDNN's per-row sequence lengths express) and no reset occurs;
otherwise it runs jaxseq's own fused recurrence (`jaxseq.kernels.fused_rnn.lstm_sequence`). The two are
one `lax.cond`, so the choice costs nothing at trace time and a masked or reset batch still gets exact
jaxseq semantics.

cuDNN's LSTM is jaxseq's: gate order i, f, g, o, two biases, sigmoid / tanh. Only the weight layout
differs: cuDNN takes one flat vector (W_ih [4H, d_in], W_hh [4H, H], b_ih, b_hh, see
`jax.experimental.rnn`), where jaxseq stores w_ih [d_in, 4H] and w_hh [H, 4H] for `x @ w`.
`pack_weights` converts; gradients flow back through it to jaxseq's parameters.

Float32 matmuls follow JAX's default precision (cuDNN may use TF32 on Ampere and later, as XLA's own
float32 matmuls do); set `jax_default_matmul_precision="highest"` for full float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxseq.kernels.fused_rnn import lstm_sequence


def pack_weights(params) -> jax.Array:
    """jaxseq LSTM params -> cuDNN's flat weight vector [4H * (d_in + H) + 8H] (one layer, one direction)."""
    parts = (params["w_ih"].T, params["w_hh"].T, params["b_ih"], params["b_hh"])
    return jnp.concatenate([p.reshape(-1) for p in parts])


def cudnn_available(xs, params) -> bool:
    """Static part of the choice: a GPU backend, and float32 inputs and parameters."""
    if jax.default_backend() != "gpu":
        return False
    return xs.ndim == 3 and all(a.dtype == jnp.float32 for a in (xs, params["w_ih"], params["w_hh"]))


def cudnn_expresses(mask, resets) -> jax.Array:
    """Run-time part: no resets, and each row's mask is a prefix (True... then False...). bool []."""
    lengths = jnp.sum(mask, axis=1)
    prefix = jnp.all(mask == (jnp.arange(mask.shape[1])[None] < lengths[:, None]))
    return prefix & ~jnp.any(resets)


def lstm_cudnn(params, xs, mask, carry0):
    """`lstm_sequence` semantics for prefix masks and no resets, on cuDNN's kernel (`jax.experimental.rnn`).

    xs [B, T, d_in]; mask [B, T] (a prefix per row); carry0 (h, c), each [B, H].
    Returns ys [B, T, H] (zero on masked steps) and the final (h, c), each [B, H] (held after a row ends).
    """
    from jax.experimental import rnn  # GPU-only machinery: imported when a GPU call is traced

    d_in, hidden = params["w_ih"].shape[0], params["w_hh"].shape[0]
    h0, c0 = carry0
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    # cuDNN returns the state of the last valid step, and h_n of a row with no valid step is
    # undefined there; jaxseq keeps carry0 for such a row.
    ys, h_n, c_n = rnn.lstm(
        xs, h0[None], c0[None], pack_weights(params), jnp.maximum(lengths, 1), d_in, hidden, 1, 0.0, False
    )
    empty = (lengths == 0)[:, None]
    ys = jnp.where(mask[..., None], ys, jnp.zeros((), ys.dtype))
    return ys, (jnp.where(empty, h0, h_n[0]), jnp.where(empty, c0, c_n[0]))


def lstm_sequence_cudnn(params, xs, mask, carry0, resets, unroll=1):
    """`jaxseq.kernels.fused_rnn.lstm_sequence`, on cuDNN when (at run time) `cudnn_expresses` the call.
    Check `cudnn_available` first."""
    return lax.cond(
        cudnn_expresses(mask, resets),
        lambda: lstm_cudnn(params, xs, mask, carry0),
        lambda: lstm_sequence(params, xs, mask, carry0, resets, unroll),
    )
