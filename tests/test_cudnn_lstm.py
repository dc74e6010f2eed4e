"""The cuDNN LSTM path (jaxseq.kernels.cudnn_lstm): what can be checked on CPU.

The weight packing (jaxseq's [d_in, 4H] / [H, 4H] matrices to cuDNN's flat vector, unpacked by JAX's
own `unpack_lstm_weights`), the run-time condition, and that the CPU never takes the path. cuDNN's
kernel itself against the reference is in tests/test_gpu.py (marked gpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import rnn

from jaxseq.cells import LSTM
from jaxseq.kernels.cudnn_lstm import cudnn_available, cudnn_expresses, pack_weights


def _problem(batch=4, steps=7, d_in=5, hidden=6):
    k = jax.random.split(jax.random.key(0), 5)
    cell = LSTM(d_in, hidden)
    params = cell.init(k[0])
    xs = jax.random.normal(k[1], (batch, steps, d_in))
    lengths = np.array([steps, 0, 3, 1][:batch])
    mask = jnp.asarray(np.arange(steps)[None] < lengths[:, None])
    carry0 = (jax.random.normal(k[2], (batch, hidden)), jax.random.normal(k[3], (batch, hidden)))
    w = jax.random.normal(k[4], (batch, steps, hidden))
    return cell, params, xs, mask, carry0, w


def test_pack_weights_is_cudnns_layout():
    cell, params, *_ = _problem()
    flat = pack_weights(params)
    assert flat.shape == (rnn.get_num_params_in_lstm(cell.d_in, cell.d_hidden, 1, False),)
    W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(flat, cell.d_in, cell.d_hidden, 1, False)
    np.testing.assert_array_equal(W_ih[0], params["w_ih"].T)
    np.testing.assert_array_equal(W_hh[0], params["w_hh"].T)
    np.testing.assert_array_equal(b_ih[0], params["b_ih"])
    np.testing.assert_array_equal(b_hh[0], params["b_hh"])


@pytest.mark.parametrize(
    "mask, resets, expected",
    [
        ([[1, 1, 1], [1, 1, 0], [0, 0, 0]], [[0, 0, 0]] * 3, True),  # prefixes, an empty row
        ([[1, 0, 1], [1, 1, 1], [1, 1, 1]], [[0, 0, 0]] * 3, False),  # a hole
        ([[0, 1, 1], [1, 1, 1], [1, 1, 1]], [[0, 0, 0]] * 3, False),  # left padding
        ([[1, 1, 1]] * 3, [[0, 0, 0], [0, 1, 0], [0, 0, 0]], False),  # a reset
    ],
)
def test_cudnn_expresses_prefix_masks_without_resets_only(mask, resets, expected):
    assert bool(cudnn_expresses(jnp.asarray(mask, bool), jnp.asarray(resets, bool))) is expected


def test_cpu_never_takes_the_cudnn_path():
    _, params, xs, *_ = _problem()
    assert jax.default_backend() != "gpu"
    assert not cudnn_available(xs, params)
