"""The fused whole-sequence recurrences (jaxseq.kernels.fused_rnn) against the plain scan of `cell.step`.

Reference: `jaxseq.scan.reference_recurrence`, i.e. `lax.scan` over `cell.step` with JAX's own
autodiff. Checked: outputs, final carry, and gradients w.r.t. params, xs and carry0, with
padding + holes in the mask, resets, a non-zero carry0, odd sizes, batch 1, length 1,
length 0, under jit, in both internal layouts (batch- and feature-major), and through
`jaxseq.unroll` (forward, reverse, bidirectional).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.kernels import fused_rnn
from jaxseq.cells import GRU, LSTM, Elman, bidirectional
from jaxseq.scan import StepOnly, reference_recurrence, unroll

CELLS = {
    "lstm": lambda d, h: LSTM(d, h),
    "gru": lambda d, h: GRU(d, h),
    "elman_tanh": lambda d, h: Elman(d, h, nonlinearity="tanh"),
    "elman_relu": lambda d, h: Elman(d, h, nonlinearity="relu"),
}


def _fused(cell):
    if isinstance(cell, LSTM):
        return fused_rnn.lstm_sequence
    if isinstance(cell, GRU):
        return fused_rnn.gru_sequence
    return lambda *a: fused_rnn.elman_sequence(*a, nonlinearity=cell.nonlinearity)


def _problem(cell, batch, steps, seed=0, holes=True, resets=True):
    """Random xs, a right-padded mask with holes, random resets and a non-zero carry0."""
    k = jax.random.split(jax.random.key(seed), 6)
    params = cell.init(k[0])
    xs = jax.random.normal(k[1], (batch, steps, cell.d_in))
    # Right-padded rows of lengths 0, T, T-1, T-2, ... (a single row: T).
    lengths = np.maximum(steps - np.arange(-1, batch - 1), 0) if batch > 1 else np.array([steps])
    lengths[0] = 0 if batch > 1 else lengths[0]
    mask = np.arange(steps)[None, :] < lengths[:, None]
    if holes:  # a hole every third step, at a different phase in each row
        mask &= (np.arange(steps)[None, :] + np.arange(batch)[:, None]) % 3 != 1
    reset = np.asarray(jax.random.bernoulli(k[3], 0.25, (batch, steps))) if resets else np.zeros((batch, steps), bool)
    carry0 = jax.tree.map(lambda a: jax.random.normal(k[4], a.shape), cell.initial_carry((batch,)))
    w = jax.random.normal(k[5], (batch, steps, cell.d_out))
    return params, xs, jnp.asarray(mask), jnp.asarray(reset), carry0, w


def _loss(run, w):
    """A loss touching every output and the final carry (sin, so carry cotangents are not constant)."""
    def loss(params, xs, carry0):
        ys, carry = run(params, xs, carry0)
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))
    return loss


def _assert_close(got, want, what):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == e.shape and g.dtype == e.dtype, what
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5, err_msg=what)


def _outputs_and_grads(run, w):
    """One jitted function: (ys, carry) and the gradients w.r.t. params, xs, carry0."""
    loss = _loss(run, w)
    return jax.jit(lambda p, x, c: (run(p, x, c), jax.grad(loss, argnums=(0, 1, 2))(p, x, c)))


def _compare(cell, params, xs, mask, resets, carry0, w):
    ref = _outputs_and_grads(lambda p, x, c: reference_recurrence(cell, p, x, mask, c, resets, 1), w)
    fused = _outputs_and_grads(lambda p, x, c: _fused(cell)(p, x, mask, c, resets), w)
    got, want = fused(params, xs, carry0), ref(params, xs, carry0)
    _assert_close(got[0], want[0], "outputs and final carry")
    _assert_close(got[1], want[1], "gradients w.r.t. params, xs, carry0")
    return got


@pytest.fixture(params=["batch_major", "feature_major"])
def layout(request, monkeypatch):
    """Run a test in each of fused_rnn's two internal layouts (chosen by size in real use)."""
    threshold = 1 if request.param == "feature_major" else 10**9
    monkeypatch.setattr(fused_rnn, "FEATURE_MAJOR_MIN_HIDDEN", threshold)
    monkeypatch.setattr(fused_rnn, "FEATURE_MAJOR_MIN_HIDDEN_INFERENCE", threshold)
    return request.param


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_matches_scan_with_padding_holes_resets_and_carry0(kind, layout):
    cell = CELLS[kind](5, 7)  # odd sizes
    params, xs, mask, resets, carry0, w = _problem(cell, batch=5, steps=9)
    assert not mask[0].any() and not mask[4, -1] and (~mask[4, :5]).any() and resets[mask].any()
    (ys, _), grads = _compare(cell, params, xs, mask, resets, carry0, w)
    # Not a vacuous comparison: every gradient is non-trivial...
    for g in jax.tree.leaves(grads):
        assert float(jnp.abs(g).max()) > 1e-3
    # ...and row 0 (length 0) outputs zeros and gets no gradient through xs.
    assert float(jnp.abs(ys[0]).max()) == 0.0 and float(jnp.abs(grads[1][0]).max()) == 0.0


@pytest.mark.parametrize("kind,batch,steps", [("lstm", 1, 6), ("gru", 3, 1)])
def test_matches_scan_batch_one_and_length_one(kind, batch, steps, layout):
    # The loop driver is shared by the cells, so each edge shape is checked on one of them.
    cell = CELLS[kind](3, 4)
    params, xs, mask, resets, carry0, w = _problem(cell, batch, steps, seed=batch + steps, holes=False)
    mask = mask.at[:, 0].set(True)  # no empty rows here: length one means one valid step
    _compare(cell, params, xs, mask, resets, carry0, w)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_length_zero_returns_carry0_and_its_gradient(kind):
    cell = CELLS[kind](3, 4)
    params, xs, mask, resets, carry0, w = _problem(cell, batch=2, steps=0)
    (ys, carry), (g_params, _, g_carry) = _outputs_and_grads(
        lambda p, x, c: _fused(cell)(p, x, mask, c, resets), w
    )(params, xs, carry0)
    assert ys.shape == (2, 0, 4)
    _assert_close(carry, carry0, "carry of an empty sequence")
    _assert_close(g_carry, jax.tree.map(jnp.cos, carry0), "d sum(sin(carry)) / d carry0")
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_params))


@pytest.mark.parametrize("kind", ["lstm", "gru", "elman_relu"])
def test_unroll_dispatches_to_the_fused_form(kind):
    cell = CELLS[kind](3, 5)
    xs = jnp.ones((2, 4, 3))
    jaxpr = str(jax.make_jaxpr(lambda p: unroll(cell, p, xs))(cell.init(jax.random.key(0))))
    assert "custom_vjp_call" in jaxpr  # the fused path is the one that runs
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda p: unroll(StepOnly(cell), p, xs))(
        cell.init(jax.random.key(0))))


def test_unroll_reverse_and_bidirectional_match_reference():
    """Through jaxseq.unroll: reverse=True permutes time per row; bidirectional runs both."""
    cell = LSTM(3, 5)
    params, xs, mask, resets, carry0, w = _problem(cell, batch=3, steps=6, holes=False)
    bi, bi_ref = bidirectional(cell), bidirectional(StepOnly(cell))
    bparams = bi.init(jax.random.key(1))
    w2 = jnp.concatenate([w, w[..., ::-1]], -1)

    def run(c):
        def f(p, x, c0):
            ys_r, carry_r = unroll(c.forward, p["forward"], x, mask=mask, carry=c0, resets=resets, reverse=True)
            ys_b, _ = unroll(c, p, x, mask=mask, resets=resets)
            return ys_b + jnp.concatenate([ys_r, ys_r], -1), carry_r
        return _outputs_and_grads(f, w2)

    got, want = run(bi)(bparams, xs, carry0), run(bi_ref)(bparams, xs, carry0)
    _assert_close(got[0], want[0], "reverse / bidirectional outputs")
    _assert_close(got[1], want[1], "reverse / bidirectional gradients")
