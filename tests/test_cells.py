"""Cells against independent references: a float64 NumPy loop and PyTorch (via jaxseq.interop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.cells import GRU, LSTM, Bidirectional, Elman, Stack, bidirectional, make_cell, stack
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.scan import unroll

# unroll jitted once per (cell, shapes): eager unroll would recompile its scan on every call
_unroll = jax.jit(unroll, static_argnames=("cell", "reverse", "unroll"))

D_IN, H = 5, 7  # odd sizes on purpose: a transposed weight would not broadcast silently


def np_init(cell, seed=0):
    """Params of `cell`'s layout drawn with NumPy: `cell.init` compiles a threefry kernel per
    weight shape (seconds each on a busy CPU), which would dominate these tests' run time."""
    shapes = jax.eval_shape(cell.init, jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.4, 0.4, s.shape), s.dtype), shapes)


CELLS = {
    "elman_tanh": lambda d, h: Elman(d, h, nonlinearity="tanh"),
    "elman_relu": lambda d, h: Elman(d, h, nonlinearity="relu"),
    "lstm": lambda d, h: LSTM(d, h),
    "gru": lambda d, h: GRU(d, h),
}


# --- float64 NumPy reference, written from the PyTorch documentation's equations -------------


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _torch_layout(params):
    """jaxseq params -> float64 torch-layout weights: W_ih [G*H, d_in], W_hh [G*H, H], biases [G*H]."""
    return {
        "W_ih": np.asarray(params["w_ih"], np.float64).T,
        "W_hh": np.asarray(params["w_hh"], np.float64).T,
        "b_ih": np.asarray(params["b_ih"], np.float64),
        "b_hh": np.asarray(params["b_hh"], np.float64),
    }


def np_step(kind, W, carry, x):
    """One step for a batch: x [N, d_in]; carry h [N, H] (LSTM: (h, c)). Returns (carry, y)."""
    hidden = W["W_hh"].shape[1]

    def gate(k, h, with_h=True):
        """Pre-activation of gate block k: W_ik x + b_ik (+ W_hk h + b_hk)."""
        rows = slice(k * hidden, (k + 1) * hidden)
        a = x @ W["W_ih"][rows].T + W["b_ih"][rows]
        if with_h:
            a = a + h @ W["W_hh"][rows].T + W["b_hh"][rows]
        return a

    if kind.startswith("elman"):
        a = gate(0, carry)
        h = np.tanh(a) if kind == "elman_tanh" else np.maximum(a, 0.0)
        return h, h
    if kind == "lstm":
        h, c = carry
        i, f, g, o = _sigmoid(gate(0, h)), _sigmoid(gate(1, h)), np.tanh(gate(2, h)), _sigmoid(gate(3, h))
        c = f * c + i * g
        h = o * np.tanh(c)
        return (h, c), h
    if kind == "gru":
        h = carry
        rows_n = slice(2 * hidden, 3 * hidden)
        r = _sigmoid(gate(0, h))
        z = _sigmoid(gate(1, h))
        n = np.tanh(gate(2, h, with_h=False) + r * (h @ W["W_hh"][rows_n].T + W["b_hh"][rows_n]))
        h = (1.0 - z) * n + z * h
        return h, h
    raise AssertionError(kind)


def np_unroll(kind, W, xs, carry):
    """xs [B, T, d_in] float64 -> (ys [B, T, H], final carry)."""
    ys = []
    for t in range(xs.shape[1]):
        carry, y = np_step(kind, W, carry, xs[:, t])
        ys.append(y)
    return np.stack(ys, axis=1), carry


def _random_carry(kind, rng, shape):
    h = rng.normal(size=shape) * 0.5
    return (h, rng.normal(size=shape) * 0.5) if kind == "lstm" else h


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-5):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("batch,steps", [(3, 6), (1, 1), (1, 4)])
def test_unroll_matches_numpy(kind, batch, steps):
    cell = CELLS[kind](D_IN, H)
    params = np_init(cell, 0)
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(batch, steps, D_IN))
    carry0 = _random_carry(kind, rng, (batch, H))
    want_ys, want_carry = np_unroll(kind, _torch_layout(params), xs, carry0)

    carry0_j = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), carry0)
    ys, carry = _unroll(cell, params, jnp.asarray(xs, jnp.float32), carry=carry0_j)
    assert ys.shape == (batch, steps, H) and ys.dtype == jnp.float32
    _assert_tree_close(ys, want_ys)
    _assert_tree_close(carry, want_carry)
    if kind == "elman_relu":  # the relu branch really ran: some units are exactly zero, some positive
        assert (np.asarray(ys) == 0).any() and (np.asarray(ys) > 0).any()


@pytest.mark.parametrize("kind", list(CELLS))
def test_step_with_leading_batch_dims(kind):
    cell = CELLS[kind](D_IN, H)
    params = np_init(cell, 2)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, D_IN))
    carry0 = _random_carry(kind, rng, (2, 3, H))
    flat = jax.tree.map(lambda a: a.reshape(6, H), carry0)
    want_carry, want_y = np_step(kind, _torch_layout(params), flat, x.reshape(6, D_IN))

    assert jax.tree.map(jnp.shape, cell.initial_carry((2, 3))) == jax.tree.map(np.shape, carry0)
    carry, y = cell.step(params, jax.tree.map(jnp.asarray, carry0), jnp.asarray(x, jnp.float32))
    assert y.shape == (2, 3, H)
    _assert_tree_close(jax.tree.map(lambda a: a.reshape(6, H), carry), want_carry)
    _assert_tree_close(y.reshape(6, H), want_y)


def test_init_follows_pytorch_layout_and_bounds():
    for kind, gates in [("elman_tanh", 1), ("lstm", 4), ("gru", 3)]:
        cell = CELLS[kind](D_IN, H)
        p = jax.eval_shape(cell.init, jax.random.key(0))  # shapes only: no threefry compile per kind
        assert p["w_ih"].shape == (D_IN, gates * H) and p["w_hh"].shape == (H, gates * H)
        assert p["b_ih"].shape == (gates * H,) and p["b_hh"].shape == (gates * H,)
        assert all(v.dtype == jnp.float32 for v in p.values()) and cell.d_out == H
    # values (one shared init for all three): U(-1/sqrt(H), 1/sqrt(H)), as PyTorch
    bound = 1 / np.sqrt(H)
    for v in LSTM(D_IN, H).init(jax.random.key(0)).values():
        v = np.asarray(v)
        assert np.abs(v).max() <= bound and v.max() > 0.7 * bound and v.min() < -0.7 * bound


# --- PyTorch ---------------------------------------------------------------------------------

TORCH_KINDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
# (num_layers, bidirectional, batch_first, batch, steps): covers 1 and 3 layers, both
# directions, both layouts, batch 1 and length 1.
# Every kind gets the single-layer and the 3-layer bidirectional case; the rest rotate
# over kinds (each case is a separate jit compile of a gradient: the cost of this file).
_ALL = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
TORCH_CASES = [
    (kind, *config)
    for config, kinds in [
        ((1, False, False, 3, 6), _ALL),
        ((3, True, True, 2, 4), _ALL),
        ((1, True, False, 1, 1), ["rnn_tanh", "lstm", "gru"]),
        ((3, False, True, 1, 5), ["rnn_relu", "gru"]),
    ]
    for kind in kinds
]


def _torch_module(kind, num_layers, bidirectional, batch_first, **kw):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    common = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
    if kind.startswith("rnn"):
        return torch.nn.RNN(D_IN, H, nonlinearity=kind[4:], **common)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](D_IN, H, **common)


@pytest.mark.parametrize("kind,num_layers,bidir,batch_first,batch,steps", TORCH_CASES)
def test_matches_torch_outputs_states_and_gradients(kind, num_layers, bidir, batch_first, batch, steps):
    torch = pytest.importorskip("torch")
    from jaxseq.interop import carry_from_torch, carry_to_torch, from_torch, to_torch_state_dict

    module = _torch_module(kind, num_layers, bidir, batch_first)
    cell, params = from_torch(module)
    dirs = 2 if bidir else 1
    is_lstm = kind == "lstm"

    gen = torch.Generator().manual_seed(1)
    x_shape = (batch, steps, D_IN) if batch_first else (steps, batch, D_IN)
    x = torch.randn(x_shape, generator=gen, requires_grad=True)
    state_shape = (num_layers * dirs, batch, H)
    h0 = (0.5 * torch.randn(state_shape, generator=gen)).requires_grad_()
    c0 = (0.5 * torch.randn(state_shape, generator=gen)).requires_grad_()
    out_weights = torch.randn(x_shape[:2] + (dirs * H,), generator=gen)
    h_weights, c_weights = torch.randn(state_shape, generator=gen), torch.randn(state_shape, generator=gen)

    # torch: outputs, final states, gradients of one scalar loss by autograd
    out, state = module(x, (h0, c0) if is_lstm else h0)
    hn, cn = state if is_lstm else (state, None)
    loss = (out * out_weights).sum() + (hn * h_weights).sum() + ((cn * c_weights).sum() if is_lstm else 0.0)
    loss.backward()

    # jax: the same loss, batch-major
    def to_batch_major(t):
        a = jnp.asarray(t.detach().numpy())
        return a if batch_first else jnp.swapaxes(a, 0, 1)

    xs, out_w = to_batch_major(x), to_batch_major(out_weights)
    carry0 = carry_from_torch(cell, h0, c0 if is_lstm else None)
    state_w = carry_from_torch(cell, h_weights, c_weights if is_lstm else None)

    @jax.jit
    def jloss(params, xs, carry0):
        ys, carry = _unroll(cell, params, xs, carry=carry0)
        state_term = sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(carry), jax.tree.leaves(state_w)))
        return jnp.sum(ys * out_w) + state_term, (ys, carry)

    (jl, (ys, carry)), (g_params, g_xs, g_carry) = jax.value_and_grad(jloss, argnums=(0, 1, 2), has_aux=True)(
        params, xs, carry0
    )

    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ys), to_batch_major(out), **tol)
    final = carry_to_torch(cell, carry)
    if is_lstm:
        np.testing.assert_allclose(final[0].numpy(), hn.detach().numpy(), **tol)
        np.testing.assert_allclose(final[1].numpy(), cn.detach().numpy(), **tol)
    else:
        np.testing.assert_allclose(final.numpy(), hn.detach().numpy(), **tol)
    np.testing.assert_allclose(float(jl), loss.item(), rtol=1e-5, atol=1e-4)

    np.testing.assert_allclose(np.asarray(g_xs), to_batch_major(x.grad), **tol)
    g_state = carry_to_torch(cell, g_carry)
    if is_lstm:
        np.testing.assert_allclose(g_state[0].numpy(), h0.grad.numpy(), **tol)
        np.testing.assert_allclose(g_state[1].numpy(), c0.grad.numpy(), **tol)
    else:
        np.testing.assert_allclose(g_state.numpy(), h0.grad.numpy(), **tol)
    g_torch_names = to_torch_state_dict(cell, g_params)
    torch_grads = dict(module.named_parameters())
    assert set(g_torch_names) == set(torch_grads)
    for name, g in g_torch_names.items():
        np.testing.assert_allclose(g.numpy(), torch_grads[name].grad.numpy(), err_msg=name, **tol)


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_from_torch_structure_and_layout(kind):
    pytest.importorskip("torch")
    from jaxseq.interop import from_torch

    module = _torch_module(kind, 3, True, False, dropout=0.25)
    cell, params = from_torch(module)
    assert isinstance(cell, Stack) and cell.dropout == 0.25 and not cell.residual
    assert all(isinstance(layer, Bidirectional) for layer in cell.cells)
    assert cell.d_in == D_IN and cell.d_out == 2 * H and cell.cells[1].d_in == 2 * H
    np.testing.assert_array_equal(
        np.asarray(params["layer_1"]["backward"]["w_ih"]), module.weight_ih_l1_reverse.detach().numpy().T
    )
    np.testing.assert_array_equal(np.asarray(params["layer_2"]["forward"]["b_hh"]), module.bias_hh_l2.detach().numpy())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))

    single, single_params = from_torch(_torch_module(kind, 1, False, True))
    assert not isinstance(single, (Stack, Bidirectional)) and set(single_params) == {"w_ih", "w_hh", "b_ih", "b_hh"}
    if kind.startswith("rnn"):
        assert single.nonlinearity == kind[4:]


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_bias_false_gives_zero_bias(kind):
    torch = pytest.importorskip("torch")
    from jaxseq.interop import from_torch, to_torch_state_dict

    module = _torch_module(kind, 2, False, True, bias=False)
    cell, params = from_torch(module)
    assert float(jnp.abs(params["layer_1"]["b_hh"]).max()) == 0.0
    x = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(0))
    ys, _ = _unroll(cell, params, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(ys), module(x)[0].detach().numpy(), rtol=1e-5, atol=1e-5)
    module.load_state_dict(to_torch_state_dict(cell, params, bias=False))  # strict: no bias keys
    params["layer_0"]["b_ih"] = params["layer_0"]["b_ih"].at[0].set(1.0)
    with pytest.raises(ConfigError, match="b_ih"):
        to_torch_state_dict(cell, params, bias=False)


def test_from_torch_rejects_what_it_cannot_port():
    torch = pytest.importorskip("torch")
    from jaxseq.interop import from_torch

    with pytest.raises(ConfigError, match="proj_size"):
        from_torch(torch.nn.LSTM(D_IN, H, proj_size=3))
    with pytest.raises(ConfigError, match="nn.RNN, nn.LSTM or nn.GRU"):
        from_torch(torch.nn.Linear(D_IN, H))


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_round_trip_jax_params_into_torch(kind):
    torch = pytest.importorskip("torch")
    from jaxseq.interop import from_torch, to_torch, to_torch_state_dict, torch_kwargs

    base = {"rnn_tanh": "rnn", "rnn_relu": "rnn", "lstm": "lstm", "gru": "gru"}[kind]
    nonlin = kind[4:] if kind.startswith("rnn") else "tanh"
    layer = lambda d: make_cell(base, d, H, nonlinearity=nonlin)  # noqa: E731
    cell = stack([bidirectional(layer(D_IN)), bidirectional(layer(2 * H))])
    params = np_init(cell, 5)

    kwargs = torch_kwargs(cell)
    assert kwargs["num_layers"] == 2 and kwargs["bidirectional"] and kwargs["input_size"] == D_IN
    module = _torch_module(kind, 2, True, True)  # fresh torch weights, then overwritten
    module.load_state_dict(to_torch_state_dict(cell, params))
    x = torch.randn(3, 4, D_IN, generator=torch.Generator().manual_seed(0))
    if kind == "lstm":  # from_torch is checked against torch for every kind above; one jax run suffices here
        ys, _ = _unroll(cell, params, jnp.asarray(x.numpy()))
        np.testing.assert_allclose(module(x)[0].detach().numpy(), np.asarray(ys), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(to_torch(cell, params, batch_first=True)(x)[0].detach().numpy(),
                                  module(x)[0].detach().numpy())

    back_cell, back_params = from_torch(module)  # and back: the very same params, bit for bit
    assert back_cell == cell
    jax.tree.map(np.testing.assert_array_equal, back_params, params)


def test_to_torch_rejects_unportable_cells():
    pytest.importorskip("torch")
    from jaxseq.interop import to_torch_state_dict

    residual = stack([LSTM(H, H), LSTM(H, H)], residual=True)
    with pytest.raises(ConfigError, match="residual"):
        to_torch_state_dict(residual, np_init(residual, 0))
    mixed = stack([LSTM(D_IN, H), GRU(H, H)])
    with pytest.raises(ConfigError, match="layer 1"):
        to_torch_state_dict(mixed, np_init(mixed, 0))


def test_carry_conversion_round_trip_and_errors():
    torch = pytest.importorskip("torch")
    from jaxseq.interop import carry_from_torch, carry_to_torch

    cell = stack([bidirectional(LSTM(D_IN, H)), bidirectional(LSTM(2 * H, H)), bidirectional(LSTM(2 * H, H))])
    h, c = torch.randn(6, 2, H), torch.randn(6, 2, H)
    carry = carry_from_torch(cell, h, c)
    assert jax.tree.map(jnp.shape, carry) == jax.tree.map(jnp.shape, cell.initial_carry((2,)))
    # torch index layer * 2 + direction: layer 1 backward is h[3]
    np.testing.assert_array_equal(np.asarray(carry[1][1][0]), h[3].numpy())
    h2, c2 = carry_to_torch(cell, carry)
    np.testing.assert_array_equal(h2.numpy(), h.numpy())
    np.testing.assert_array_equal(c2.numpy(), c.numpy())
    with pytest.raises(ShapeError, match="needs both h and c"):
        carry_from_torch(cell, h)
    with pytest.raises(ShapeError, match="num_layers \\* num_directions"):
        carry_from_torch(cell, h[:4], c[:4])


# --- Stack -----------------------------------------------------------------------------------


def _three_layer_stack(residual=False, dropout=0.0):
    return Stack((LSTM(D_IN, H), GRU(H, H), Elman(H, H)), residual=residual, dropout=dropout)


def _np_zero_carry(kind, shape):
    h = np.zeros(shape)
    return (h, h) if kind == "lstm" else h


@pytest.mark.parametrize("residual", [False, True])
def test_stack_unroll_equals_stepping_and_numpy(residual):
    cell = _three_layer_stack(residual)
    assert [cell.uses_residual(i) for i in range(3)] == [False, residual, residual]  # 5 -> 7 cannot add
    params = np_init(cell, 0)
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, D_IN)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    ys, carry = _unroll(cell, params, xs, mask=mask)

    # float64 reference: layer by layer, adding the layer's input where the widths agree
    x = np.asarray(xs, np.float64)
    for i, kind in enumerate(["lstm", "gru", "elman_tanh"]):
        y, _ = np_unroll(kind, _torch_layout(params[f"layer_{i}"]), x, _np_zero_carry(kind, (2, H)))
        x = x + y if residual and x.shape[-1] == H else y
    np.testing.assert_allclose(np.asarray(ys[0]), x[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ys[1, :3]), x[1, :3], rtol=1e-5, atol=1e-5)  # right padding: prefix
    assert not np.asarray(ys[1, 3:]).any()

    step = jax.jit(cell.step)
    for b in range(2):  # step each row over its valid part only
        c = cell.initial_carry((1,))
        length = int(mask[b].sum())
        for t in range(length):
            c, y = step(params, c, xs[b:b + 1, t])
            np.testing.assert_allclose(np.asarray(y[0]), np.asarray(ys[b, t]), rtol=1e-5, atol=1e-6)
        _assert_tree_close(jax.tree.map(lambda a: a[0], c), jax.tree.map(lambda a: a[b], carry), atol=1e-6)


def test_stack_dropout_only_with_key_deterministic_rate_and_scaling():
    # Layer 1 is tanh(x @ I): it shows layer 0's output after dropout, element by element.
    cell = Stack((Elman(D_IN, 64), Elman(64, 64)), dropout=0.3)
    params = np_init(cell, 0)
    params["layer_1"] = {"w_ih": jnp.eye(64), "w_hh": jnp.zeros((64, 64)), "b_ih": jnp.zeros(64), "b_hh": jnp.zeros(64)}
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, D_IN)), jnp.float32)
    clean, _ = _unroll(cell, params, xs)  # no key: no dropout
    a, _ = _unroll(cell, params, xs, key=jax.random.key(7))
    b, _ = _unroll(cell, params, xs, key=jax.random.key(7))
    c, _ = _unroll(cell, params, xs, key=jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key, same mask
    assert not np.array_equal(np.asarray(a) == 0, np.asarray(c) == 0)  # another key, another mask

    y0, _ = np_unroll("elman_tanh", _torch_layout(params["layer_0"]), np.asarray(xs, np.float64), np.zeros((4, 64)))
    np.testing.assert_allclose(np.asarray(clean), np.tanh(y0), rtol=1e-5, atol=1e-5)
    dropped = np.asarray(a) == 0
    assert 0.25 < dropped.mean() < 0.35  # 2048 units, p = 0.3: about 5 standard deviations each side
    # kept units are scaled by 1 / (1 - p) (inverted dropout, as PyTorch)
    kept_want = np.tanh(y0 / 0.7)[~dropped]
    np.testing.assert_allclose(np.asarray(a)[~dropped], kept_want, rtol=1e-5, atol=1e-5)
    _, y_step = jax.jit(cell.step)(params, cell.initial_carry((4,)), xs[:, 0])  # step never drops
    np.testing.assert_allclose(np.asarray(y_step), np.asarray(clean[:, 0]), rtol=1e-5, atol=1e-6)


def test_stack_dropout_zero_and_last_layer_never_drop():
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6, D_IN)), jnp.float32)
    # the last layer's output is never dropped: a one-layer stack with dropout is the bare cell
    one = Stack((LSTM(D_IN, H),), dropout=0.5)
    p1 = np_init(one, 3)
    y_one, _ = _unroll(one, p1, xs, key=jax.random.key(7))
    y_bare, _ = _unroll(one.cells[0], p1["layer_0"], xs)
    np.testing.assert_allclose(np.asarray(y_one), np.asarray(y_bare), rtol=1e-6, atol=1e-6)
    # dropout 0 with a key: a no-op
    two = Stack((LSTM(D_IN, H), LSTM(H, H)), dropout=0.0)
    p2 = np_init(two, 4)
    with_key, _ = _unroll(two, p2, xs, key=jax.random.key(7))
    without, _ = _unroll(two, p2, xs)
    np.testing.assert_array_equal(np.asarray(with_key), np.asarray(without))


def test_error_messages_name_the_field():
    with pytest.raises(ConfigError, match="layer 1 .*width 7 but layer 2 .*d_in=8; build layer 2 with d_in=7"):
        Stack((LSTM(D_IN, H), LSTM(H, H), LSTM(H + 1, H)))
    with pytest.raises(ConfigError, match="nonlinearity"):
        Elman(D_IN, H, nonlinearity="sigmoid")
    with pytest.raises(ConfigError, match="d_hidden"):
        GRU(D_IN, 0)
    with pytest.raises(ConfigError, match="d_in"):
        LSTM(-1, H)
    with pytest.raises(ConfigError, match="dropout"):
        Stack((LSTM(D_IN, H),), dropout=1.0)
    with pytest.raises(ConfigError, match="at least one cell"):
        Stack(())
    with pytest.raises(ConfigError, match="unknown cell kind 'transformer'"):
        make_cell("transformer", D_IN, H)
    with pytest.raises(ConfigError, match="num_layers"):
        make_cell("lstm", D_IN, H, num_layers=0)
    with pytest.raises(ConfigError, match="d_in"):
        Bidirectional(LSTM(D_IN, H), LSTM(D_IN + 1, H))
    cell = LSTM(D_IN, H)
    params = np_init(cell, 0)
    with pytest.raises(ShapeError, match="d_in=5"):
        cell.step(params, cell.initial_carry((2,)), jnp.zeros((2, D_IN + 1)))
    bi = bidirectional(cell)
    with pytest.raises(ConfigError, match="unroll"):
        bi.step(np_init(bi, 0), bi.initial_carry((2,)), jnp.zeros((2, D_IN)))


def test_make_cell_builds_the_named_cell():
    assert make_cell("rnn", D_IN, H, nonlinearity="relu") == Elman(D_IN, H, nonlinearity="relu")
    deep = make_cell("gru", D_IN, H, num_layers=3, residual=True, dropout=0.1)
    assert deep == Stack((GRU(D_IN, H), GRU(H, H), GRU(H, H)), residual=True, dropout=0.1)
    assert hash(deep) == hash(make_cell("gru", D_IN, H, num_layers=3, residual=True, dropout=0.1))
