"""The cuDNN LSTM path (jaxseq.cudnn_lstm), checked on CPU.

cuDNN's kernel itself needs an NVIDIA GPU. What can go wrong around it is checked here: the weight
packing (jaxseq's [d_in, 4H] / [H, 4H] matrices to cuDNN's flat vector), per-row sequence lengths,
rows with no valid step, and gradients flowing back through the packing. For that, `lstm_cudnn` runs
with `jax.experimental.rnn`'s pure-JAX reference of the kernel, which unpacks the same flat vector
with JAX's own `unpack_lstm_weights`, and is compared with jaxseq's reference scan of `LSTM.step`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import rnn

from jaxseq.cells import LSTM
from jaxseq.cudnn_lstm import cudnn_available, cudnn_expresses, lstm_cudnn, pack_weights
from jaxseq.scan import _lax_scan_cell


def _reference_kernel(x, h0, c0, w, lengths, d_in, hidden, layers, dropout, bidirectional):
    """`rnn.lstm`'s signature, run by `rnn.lstm_ref` on the unpacked weights (works on CPU)."""
    W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(w, d_in, hidden, layers, bidirectional)
    return rnn.lstm_ref(x, h0, c0, W_ih, W_hh, b_ih, b_hh, lengths, d_in, hidden, layers, dropout, bidirectional)


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


def test_kernel_path_matches_the_step_scan_with_prefix_masks_outputs_and_gradients():
    cell, params, xs, mask, carry0, w = _problem()
    resets = jnp.zeros(mask.shape, bool)

    def loss(run):
        def f(p, x, c):
            ys, (h, cc) = run(p, x, c)
            return jnp.sum(ys * w) + jnp.sum(jnp.sin(h)) + jnp.sum(jnp.cos(cc))

        return jax.jit(lambda p, x, c: (run(p, x, c), jax.grad(f, argnums=(0, 1, 2))(p, x, c)))

    got = loss(lambda p, x, c: lstm_cudnn(p, x, mask, c, kernel=_reference_kernel))(params, xs, carry0)
    want = loss(lambda p, x, c: _lax_scan_cell(cell, p, x, mask, c, resets, 1))(params, xs, carry0)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == e.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5)


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
