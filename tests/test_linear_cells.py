"""minGRU, minLSTM, LRU: the parallel (associative-scan) form against the sequential one,
against float64 NumPy loops of the papers' recurrences, and on a small learning task."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseq.config import RNNConfig, TrainConfig
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.linear_cells import LRU, MinGRU, MinLSTM, make_linear_cell
from jaxseq.models import build_model
from jaxseq.models.rnn_lm import RecurrentLM
from jaxseq.scan import StepOnly
from jaxseq.scan import unroll as _unroll

# Jitted: one XLA compile per test is far cheaper than running the associative scan op by op.
unroll = jax.jit(_unroll, static_argnums=0, static_argnames=("reverse", "unroll"))

D_IN, H = 5, 6

CELLS = {
    "mingru": MinGRU(D_IN, H),
    "minlstm": MinLSTM(D_IN, H),
    "lru": LRU(D_IN, H),
}


@functools.lru_cache(maxsize=None)
def _init(cell, seed=0):
    """Jitted and cached: one compile per cell (random init compiles slowly op by op)."""
    return jax.jit(cell.init)(jax.random.key(seed))


def _inputs(cell, batch=4, steps=9, seed=0):
    """xs, mask, resets and a non-zero initial carry covering every case of unroll's semantics.

    Row 0: all valid, random resets. Row 1: right-padded (length 5) with a reset at t = 0
    and one on its last, masked step (so its final carry is carry0). Row 2: random holes
    and resets (some on holes). Row 3: empty (mask all False).
    """
    rng = np.random.RandomState(seed)
    xs = jnp.asarray(rng.randn(batch, steps, cell.d_in), jnp.float32)
    mask = np.ones((batch, steps), bool)
    resets = rng.rand(batch, steps) > 0.7
    if batch > 1:
        mask[1, 5:] = False
        resets[1] = False
        resets[1, [0, steps - 1]] = True
    if batch > 2:
        mask[2] = rng.rand(steps) > 0.4
    if batch > 3:
        mask[3] = False
    carry = jax.tree.map(lambda c: jnp.asarray(rng.randn(*c.shape), jnp.float32), cell.initial_carry((batch,)))
    return xs, jnp.asarray(mask), jnp.asarray(resets), carry


def _assert_tree_close(a, b, rtol=1e-5, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


# --------------------------------------------------------------------------- parallel == sequential


@functools.partial(jax.jit, static_argnums=0, static_argnames="reverse")
def _outputs_and_grads(cell, params, xs, carry, mask, resets, w_y, w_c, reverse=False):
    """(ys, final carry) and the gradient of a random linear function of them w.r.t. (params, xs, carry0)."""
    def loss(p, x, h0):
        ys, hT = _unroll(cell, p, x, mask=mask, resets=resets, carry=h0, reverse=reverse)
        value = jnp.sum(ys * w_y) + sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(hT), jax.tree.leaves(w_c)))
        return value, (ys, hT)

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, carry)
    return out, grads


# reverse=True is unroll's generic permutation, not the cell's: checked once, on the complex LRU.
@pytest.mark.parametrize("name, reverse", [("mingru", False), ("minlstm", False), ("lru", False), ("lru", True)])
def test_parallel_matches_sequential_with_gradients(name, reverse):
    """The associative scan equals the lax.scan of `step`: outputs, final carry, and gradients
    w.r.t. params, inputs and the initial carry, with padding, holes, resets and reverse."""
    cell = CELLS[name]
    params = _init(cell)
    xs, mask, resets, carry = _inputs(cell)
    rng = np.random.RandomState(1)
    w_y = jnp.asarray(rng.randn(*xs.shape[:2], cell.d_out), jnp.float32)
    w_c = jax.tree.map(lambda c: jnp.asarray(rng.randn(*c.shape), jnp.float32), carry)
    args = (params, xs, carry, mask, resets, w_y, w_c)
    (ys, c), grads = _outputs_and_grads(cell, *args, reverse=reverse)
    (ys_ref, c_ref), grads_ref = _outputs_and_grads(StepOnly(cell), *args, reverse=reverse)
    assert ys.shape == (4, 9, cell.d_out)
    _assert_tree_close((ys, c), (ys_ref, c_ref))
    _assert_tree_close(grads, grads_ref, rtol=1e-4, atol=1e-5)
    # Masked steps output zero, and their inputs get exactly zero gradient.
    invalid = ~np.asarray(mask)
    assert np.all(np.asarray(ys)[invalid] == 0)
    assert np.all(np.asarray(grads[1])[invalid] == 0)
    # The empty row keeps its initial carry; in forward time so does row 1 (masked reset last).
    _assert_tree_close(_row(c, 3), _row(carry, 3), rtol=0, atol=0)
    if not reverse:
        _assert_tree_close(_row(c, 1), _row(carry, 1), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mingru", "lru"])
def test_length_one_and_zero(name):
    cell = CELLS[name]
    params = _init(cell)
    xs, _, _, carry = _inputs(cell, batch=2, steps=1)
    mask, resets = jnp.array([[True], [False]]), jnp.array([[False], [True]])
    # One step by hand.
    c1, y1 = cell.step(params, carry, xs[:, 0])
    ys, c = unroll(cell, params, xs, carry=carry)
    _assert_tree_close((ys[:, 0], c), (y1, c1))
    # Row 1 is masked at t = 0 (and reset): its carry stays carry0, its output 0.
    ys, c = unroll(cell, params, xs, mask=mask, resets=resets, carry=carry)
    _assert_tree_close((ys[0, 0], _row(c, 0)), (y1[0], _row(c1, 0)))
    _assert_tree_close((ys[1, 0], _row(c, 1)), (jnp.zeros_like(y1[1]), _row(carry, 1)), rtol=0, atol=0)

    empty = jnp.zeros((2, 0, cell.d_in), jnp.float32)
    ys, c = unroll(cell, params, empty, carry=carry)
    assert ys.shape == (2, 0, cell.d_out)
    _assert_tree_close(c, carry, rtol=0, atol=0)


# --------------------------------------------------------------------------- float64 NumPy references


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_g(x):
    return np.where(x >= 0, x + 0.5, _np_sigmoid(x))


def _np_loop(step, carry0, xs, mask, resets):
    """The masking/reset semantics of unroll around a per-row `step(h [B, S], x [B, d]) -> (h, y)`."""
    h, ys = carry0.copy(), []
    for t in range(xs.shape[1]):
        h = np.where(resets[:, t, None], carry0, h)
        h_new, y = step(h, xs[:, t])
        h = np.where(mask[:, t, None], h_new, h)
        ys.append(np.where(mask[:, t, None], y, 0.0))
    return np.stack(ys, 1), h


def _np_step_min(kind, p):
    w, b = np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)

    def step(h, x):
        k = x @ w + b
        if kind == "mingru":
            k_z, k_h = np.split(k, 2, axis=-1)
            z = _np_sigmoid(k_z)
            h = (1 - z) * h + z * _np_g(k_h)
        else:
            k_f, k_i, k_h = np.split(k, 3, axis=-1)
            f, i = _np_sigmoid(k_f), _np_sigmoid(k_i)
            h = f / (f + i) * h + i / (f + i) * _np_g(k_h)
        return h, h

    return step


def _np_step_lru(p):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    gamma = np.exp(p["gamma_log"])
    B = p["B_re"] + 1j * p["B_im"]
    C = p["C_re"] + 1j * p["C_im"]

    def step(h, x):
        h = lam * h + gamma * (x @ B)
        return h, (h @ C).real + p["D"] * x

    return step


@pytest.mark.parametrize("name", ["mingru", "minlstm", "lru"])
def test_matches_float64_numpy_loop(name):
    cell = CELLS[name]
    params = _init(cell)
    xs, mask, resets, carry = _inputs(cell, batch=4, steps=12, seed=2)
    # Scale the inputs up so gates saturate and g() runs on both of its branches.
    xs = xs * 3.0
    ys, c = unroll(cell, params, xs, mask=mask, resets=resets, carry=carry)
    args = (np.asarray(xs, np.float64), np.asarray(mask), np.asarray(resets))
    if name == "lru":
        c0 = np.asarray(carry[0], np.float64) + 1j * np.asarray(carry[1], np.float64)
        ys_ref, c_ref = _np_loop(_np_step_lru(params), c0, *args)
        c = np.asarray(c[0]) + 1j * np.asarray(c[1])
    else:
        ys_ref, c_ref = _np_loop(_np_step_min(name, params), np.asarray(carry, np.float64), *args)
    np.testing.assert_allclose(np.asarray(ys), ys_ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(c), c_ref, rtol=1e-5, atol=2e-5)


# --------------------------------------------------------------------------- long sequences, init


@pytest.mark.parametrize("name", ["mingru", "minlstm", "lru"])
def test_long_sequence_finite_and_agrees(name):
    cell = CELLS[name]
    params = _init(cell)
    xs, mask, _, carry = _inputs(cell, batch=2, steps=2048, seed=3)
    xs = xs * 4.0
    ys, _ = unroll(cell, params, xs, mask=mask, carry=carry)
    assert np.all(np.isfinite(np.asarray(ys)))
    ys_ref, _ = unroll(StepOnly(cell), params, xs, mask=mask, carry=carry)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_ref), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mingru", "lru"])
def test_long_sequence_gradients_finite(name):
    cell = CELLS[name]
    params = _init(cell)
    xs, mask, _, carry = _inputs(cell, batch=2, steps=2048, seed=3)
    grads = jax.jit(jax.grad(lambda p, x: jnp.mean(_unroll(cell, p, x, mask=mask, carry=carry)[0] ** 2)))(params, xs)
    assert all(np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_lru_init_on_ring():
    cell = LRU(4, 512, r_min=0.8, r_max=0.95, max_phase=math.pi / 10)
    p = _init(cell, 8)
    lam = np.asarray(cell.eigenvalues(p))
    r = np.abs(lam)
    assert r.min() >= 0.8 - 1e-6 and r.max() <= 0.95 + 1e-6
    # Uniform in area on the ring: the mean of |lambda|^2 is the midpoint of [r_min^2, r_max^2].
    assert abs(np.mean(r**2) - (0.8**2 + 0.95**2) / 2) < 0.01
    phase = np.exp(np.asarray(p["theta_log"]))
    assert phase.min() >= 0 and phase.max() <= math.pi / 10 + 1e-6
    np.testing.assert_allclose(np.exp(np.asarray(p["gamma_log"])), np.sqrt(1 - r**2), rtol=1e-4)


def test_lru_init_with_zero_r_min_is_finite():
    p = _init(LRU(3, 256, r_min=0.0, r_max=0.5), 9)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in p.values())


def test_bad_configs_and_shapes_raise():
    with pytest.raises(ConfigError, match="r_max"):
        LRU(4, 8, r_max=1.0)
    with pytest.raises(ConfigError, match="d_hidden"):
        MinGRU(4, 0)
    with pytest.raises(ConfigError, match="unknown linear cell kind"):
        make_linear_cell("mamba", 4, 8)
    cell = MinLSTM(4, 8)
    with pytest.raises(ShapeError, match="d_in=4"):
        cell.step(_init(cell), cell.initial_carry((2,)), jnp.zeros((2, 5)))
    with pytest.raises(ShapeError, match="d_in=4"):
        _unroll(cell, _init(cell), jnp.zeros((2, 3, 5)))


# --------------------------------------------------------------------------- stacks and models

LM_SPEC = {"interface": "lm", "vocab_size": 11}  # what CharLM.model_spec gives for an 11-character vocabulary


def test_build_model_kinds():
    for kind, cls in [("mingru", MinGRU), ("minlstm", MinLSTM), ("lru", LRU)]:
        model = build_model(TrainConfig(model=kind, rnn=RNNConfig(d_embed=8, d_hidden=12)), LM_SPEC)
        assert isinstance(model, RecurrentLM) and type(model.cell) is cls
        stacked = build_model(TrainConfig(model=kind, rnn=RNNConfig(d_embed=8, d_hidden=12, num_layers=3,
                                                                    residual=True)), LM_SPEC).cell
        assert len(stacked.cells) == 3 and stacked.residual and all(c.norm for c in stacked.cells)
        assert stacked.d_out == (8 if kind == "lru" else 12)


@pytest.mark.parametrize("kind", ["mingru", "lru"])
def test_build_model_step_matches_apply(kind):
    """The model protocol's key test: stepping token by token reproduces apply's logits.

    Two residual pre-norm blocks (with the LRU's GLU), so the stacked parallel unroll is
    checked against stepping the stack.
    """
    config = TrainConfig(model=kind, rnn=RNNConfig(d_embed=8, d_hidden=12, num_layers=2, residual=True))
    model = build_model(config, LM_SPEC)
    tokens = jax.random.randint(jax.random.key(11), (2, 7), 0, 11)
    mask = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
    variables = jax.jit(model.init)(jax.random.key(12), tokens[:, :1])  # params do not depend on T
    logits = jax.jit(model.apply)(variables, tokens, mask=mask)
    state = model.apply(variables, 2, 7, method="init_state")
    step = jax.jit(lambda v, s, tok: model.apply(v, s, tok, method="step"))
    for t in range(7):
        state, logits_t = step(variables, state, tokens[:, t])
        valid = np.asarray(mask[:, t])
        np.testing.assert_allclose(np.asarray(logits_t)[valid], np.asarray(logits[:, t])[valid], rtol=1e-4, atol=1e-5)


def test_mingru_lm_learns_repetitive_text():
    """A one-layer minGRU LM learns next-character prediction on a periodic string.

    The 45-character sentence has 28 distinct symbols (log 28 = 3.33 nats, unigram entropy
    about 3.1); after 80 Adam steps the loss on positions >= 8 is below 0.1 nats (measured:
    0.01 at step 50, about 8 s of CPU, most of it compiling).
    """
    text = "the quick brown fox jumps over the lazy dog. "
    vocab = sorted(set(text))
    ids = np.array([vocab.index(ch) for ch in text * 40], np.int32)
    model = RecurrentLM(vocab_size=len(vocab), cell=MinGRU(16, 64), d_embed=16)
    rng = np.random.RandomState(0)
    seq = 25

    def batch():
        starts = rng.randint(0, len(ids) - seq, size=16)
        window = np.stack([ids[s:s + seq] for s in starts])
        return jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])

    params = jax.jit(model.init)(jax.random.key(13), batch()[0][:, :1])  # params do not depend on T
    opt = optax.adam(2e-2)
    opt_state = opt.init(params)

    def loss_fn(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, 8:], y[:, 8:]).mean()

    @jax.jit
    def train_step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = None
    for _ in range(80):
        params, opt_state, loss = train_step(params, opt_state, *batch())
        first = float(loss) if first is None else first
    final = float(jax.jit(loss_fn)(params, *batch()))
    assert first > 3.0
    assert final < 0.1, f"minGRU LM loss {final:.3f} after 80 steps (started at {first:.3f})"
