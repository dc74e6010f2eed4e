"""`unroll` semantics: masks (padding, holes, empty rows), resets, reverse, bidirectional, errors.

The reference for each property is the plain thing it must equal: a row run alone and
unpadded, segments run separately, a flipped row run forwards, PyTorch's packed sequences.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.cells import GRU, LSTM, Bidirectional, Elman, Stack
from jaxseq.errors import ShapeError
from jaxseq.scan import StepOnly, unroll

# unroll jitted once per (cell, shapes): eager unroll would recompile its scan on every call
_unroll = jax.jit(unroll, static_argnames=("cell", "reverse", "unroll"))

D_IN, H = 5, 7


def np_init(cell, seed=0):
    """Params of `cell`'s layout drawn with NumPy: `cell.init` compiles a threefry kernel per
    weight shape (seconds each on a busy CPU), which would dominate these tests' run time."""
    shapes = jax.eval_shape(cell.init, jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.4, 0.4, s.shape), s.dtype), shapes)
CELL = LSTM(D_IN, H)  # tuple carry: exercises the tree handling of held / reset carries
PARAMS = np_init(CELL, 0)


def _lengths_mask(lengths, steps):
    return np.arange(steps)[None, :] < np.asarray(lengths)[:, None]


def _padded(lengths, steps, seed=0, garbage=100.0):
    """xs [B, T, D_IN] float32 whose masked part is large random garbage; and the bool mask."""
    rng = np.random.default_rng(seed)
    mask = _lengths_mask(lengths, steps)
    xs = rng.normal(size=(len(lengths), steps, D_IN))
    xs[~mask] = garbage * rng.normal(size=(int((~mask).sum()), D_IN))
    return jnp.asarray(xs, jnp.float32), jnp.asarray(mask)


def _random_carry(cell, batch, seed=1):
    """A non-zero initial carry, so 'held' and 'restarted' are distinguishable from zeros."""
    rng = np.random.default_rng(seed)
    template = cell.initial_carry((batch,))
    return jax.tree.map(lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), jnp.float32), template)


def _row(tree, b):
    return jax.tree.map(lambda a: a[b:b + 1], tree)


def _close(got, want, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol),
                 got, want)


# --- masks -----------------------------------------------------------------------------------


def test_padding_invariance():
    lengths, steps = [6, 3, 1], 6
    xs, mask = _padded(lengths, steps)
    carry0 = _random_carry(CELL, 3)
    ys, carry = _unroll(CELL, PARAMS, xs, mask=mask, carry=carry0)
    for b, length in enumerate(lengths):
        ys_alone, carry_alone = _unroll(CELL, PARAMS, xs[b:b + 1, :length], carry=_row(carry0, b))
        _close(ys[b:b + 1, :length], ys_alone)
        _close(_row(carry, b), carry_alone)
        assert np.all(np.asarray(ys[b, length:]) == 0.0), "outputs on masked steps must be exactly zero"


def test_mask_with_holes_holds_the_carry():
    valid = np.array([1, 0, 0, 1, 1, 0, 1, 1], bool)
    xs, _ = _padded([8], 8)
    xs = xs.at[0, ~valid].set(1e3)  # garbage in the holes
    carry0 = _random_carry(CELL, 1)
    ys, carry = _unroll(CELL, PARAMS, xs, mask=jnp.asarray(valid[None]), carry=carry0)
    ys_compact, carry_compact = _unroll(CELL, PARAMS, xs[:, valid], carry=carry0)  # the holes removed
    _close(ys[:, valid], ys_compact)
    _close(carry, carry_compact)
    assert np.all(np.asarray(ys[:, ~valid]) == 0.0)


def test_integer_mask_is_accepted_and_float_mask_rejected():
    xs, mask = _padded([4, 2], 4)
    ys_bool, _ = _unroll(CELL, PARAMS, xs, mask=mask)
    ys_int, _ = _unroll(CELL, PARAMS, xs, mask=mask.astype(jnp.int32))
    np.testing.assert_array_equal(np.asarray(ys_bool), np.asarray(ys_int))
    with pytest.raises(ShapeError, match="mask must be boolean"):
        unroll(CELL, PARAMS, xs, mask=mask.astype(jnp.float32))


def test_empty_row_returns_initial_carry_and_zero_gradient():
    # Bidirectional: both the forward and the reverse pass must leave the empty row alone.
    cell = Bidirectional(LSTM(D_IN, H), GRU(D_IN, H))
    params = np_init(cell, 2)
    xs, mask = _padded([5, 0, 3], 5)
    xs = xs.at[1].set(jnp.nan)  # even NaN padding must not leak into values or gradients
    carry0 = _random_carry(cell, 3)
    rng = np.random.default_rng(3)
    out_w = jnp.asarray(rng.normal(size=(5, 2 * H)), jnp.float32)
    carry_w = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape[1:]), jnp.float32), carry0)

    def row_loss(params, xs, carry0, row):
        ys, carry = unroll(cell, params, xs, mask=mask, carry=carry0)
        state = sum(jnp.sum(c[row] * w) for c, w in zip(jax.tree.leaves(carry), jax.tree.leaves(carry_w)))
        return jnp.sum(ys[row] * out_w) + state, (ys, carry)

    grad_fn = jax.jit(jax.grad(row_loss, argnums=(0, 1, 2), has_aux=True))  # row traced: one compile
    (g_params, g_xs, g_carry), (ys, carry) = grad_fn(params, xs, carry0, 1)
    assert np.all(np.asarray(ys[1]) == 0.0)
    jax.tree.map(lambda c, c0: np.testing.assert_array_equal(np.asarray(c[1]), np.asarray(c0[1])), carry, carry0)
    for leaf in jax.tree.leaves(g_params):
        assert np.all(np.asarray(leaf) == 0.0)
    assert np.all(np.asarray(g_xs) == 0.0)
    # the carry passes straight through: d loss / d carry0[1] is the loss weight itself
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g[1]), np.asarray(w)), g_carry, carry_w)

    # a valid row's gradients are finite although row 1 is NaN, and equal those with zero padding
    (g_params0, g_xs0, _), _ = grad_fn(params, xs, carry0, 0)
    (g_params_clean, g_xs_clean, _), _ = grad_fn(params, xs.at[1].set(0.0), carry0, 0)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(g_params0))
    _close(g_params0, g_params_clean, rtol=0, atol=0)
    _close(g_xs0, g_xs_clean, rtol=0, atol=0)
    assert np.all(np.asarray(g_xs0[0]) != 0.0) and np.all(np.asarray(g_xs0[2, 3:]) == 0.0)


@pytest.mark.parametrize("reverse", [False, True])
def test_zero_length_sequences(reverse):
    cell = Stack((Bidirectional(GRU(D_IN, H), Elman(D_IN, H)), LSTM(2 * H, H)))
    params = np_init(cell, 4)
    carry0 = _random_carry(cell, 2)
    ys, carry = _unroll(cell, params, jnp.zeros((2, 0, D_IN)), carry=carry0, reverse=reverse)
    assert ys.shape == (2, 0, H)
    jax.tree.map(lambda c, c0: np.testing.assert_array_equal(np.asarray(c), np.asarray(c0)), carry, carry0)
    ys, carry = _unroll(cell, params, jnp.zeros((2, 0, D_IN)))  # default carry: zeros
    assert all(not np.asarray(c).any() for c in jax.tree.leaves(carry))


# --- resets ----------------------------------------------------------------------------------

# one row packing seqA (3 steps) and seqB (4 steps), then 2 steps of padding
A, B, T_PACKED = 3, 4, 9


def _packed():
    xs, mask = _padded([A + B, A + B], T_PACKED, seed=5)
    resets = np.zeros((2, T_PACKED), bool)
    resets[0, A] = True  # row 0: seqB starts at step A
    resets[1, 0] = True  # row 1: a reset on the first step is a no-op
    return xs, mask, jnp.asarray(resets)


def test_resets_split_a_packed_row_and_restart_to_the_given_carry():
    xs, mask, resets = _packed()
    carry0 = _random_carry(CELL, 2)
    ys, carry = _unroll(CELL, PARAMS, xs, mask=mask, resets=resets, carry=carry0)

    c0 = _row(carry0, 0)
    ys_a, _ = _unroll(CELL, PARAMS, xs[:1, :A], carry=c0)
    ys_b, carry_b = _unroll(CELL, PARAMS, xs[:1, A:A + B], carry=c0)  # restarts to the given carry
    _close(ys[:1, :A], ys_a)
    _close(ys[:1, A:A + B], ys_b)
    _close(_row(carry, 0), carry_b)

    ys_whole, carry_whole = _unroll(CELL, PARAMS, xs[1:, :A + B], carry=_row(carry0, 1))
    _close(ys[1:, :A + B], ys_whole)
    _close(_row(carry, 1), carry_whole)
    assert np.all(np.asarray(ys[:, A + B:]) == 0.0)


# --- reverse ---------------------------------------------------------------------------------


def test_reverse_runs_each_row_backwards_over_its_valid_part():
    lengths, steps = [6, 4], 6
    xs, mask = _padded(lengths, steps, seed=6)
    carry0 = _random_carry(CELL, 2)
    ys, carry = _unroll(CELL, PARAMS, xs, mask=mask, carry=carry0, reverse=True)
    for b, length in enumerate(lengths):
        ys_ref, carry_ref = _unroll(CELL, PARAMS, jnp.flip(xs[b:b + 1, :length], axis=1), carry=_row(carry0, b))
        _close(ys[b:b + 1, :length], jnp.flip(ys_ref, axis=1))
        _close(_row(carry, b), carry_ref)
        assert np.all(np.asarray(ys[b, length:]) == 0.0)


def test_reverse_with_resets_reverses_each_segment_separately():
    xs, mask, resets = _packed()
    carry0 = _random_carry(CELL, 2)
    ys, carry = _unroll(CELL, PARAMS, xs, mask=mask, resets=resets, carry=carry0, reverse=True)
    c0 = _row(carry0, 0)
    ys_a, carry_a = _unroll(CELL, PARAMS, jnp.flip(xs[:1, :A], axis=1), carry=c0)
    ys_b, _ = _unroll(CELL, PARAMS, jnp.flip(xs[:1, A:A + B], axis=1), carry=c0)
    _close(ys[:1, :A], jnp.flip(ys_a, axis=1))
    _close(ys[:1, A:A + B], jnp.flip(ys_b, axis=1))
    _close(_row(carry, 0), carry_a)  # seqA's first step is the last one the reverse pass sees
    assert np.all(np.asarray(ys[:, A + B:]) == 0.0)


def test_bidirectional_is_forward_plus_flipped_backward():
    cell = Bidirectional(GRU(D_IN, H), GRU(D_IN, H))
    params = np_init(cell, 7)
    lengths, steps = [5, 3], 5
    xs, mask = _padded(lengths, steps, seed=8)
    ys, (carry_f, carry_b) = _unroll(cell, params, xs, mask=mask)
    assert ys.shape == (2, steps, 2 * H)
    ys_f, carry_f_ref = _unroll(cell.forward, params["forward"], xs, mask=mask)
    _close(ys[..., :H], ys_f)
    _close(carry_f, carry_f_ref)
    for b, length in enumerate(lengths):
        ys_b, carry_b_ref = _unroll(cell.backward, params["backward"], jnp.flip(xs[b:b + 1, :length], axis=1))
        _close(ys[b:b + 1, :length, H:], jnp.flip(ys_b, axis=1))
        _close(carry_b[b:b + 1], carry_b_ref)
        assert np.all(np.asarray(ys[b, length:]) == 0.0)


def test_bidirectional_matches_torch_packed_sequences():
    """2-layer bidirectional LSTM on unsorted padded rows vs torch's pack_padded_sequence:
    outputs, final states and gradients (inputs, initial states, every weight)."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from jaxseq.interop import carry_from_torch, carry_to_torch, from_torch, to_torch_state_dict

    torch.manual_seed(0)
    module = torch.nn.LSTM(D_IN, H, num_layers=2, bidirectional=True, batch_first=True)
    cell, params = from_torch(module)
    lengths, steps = [5, 2, 4], 5
    xs_j, mask = _padded(lengths, steps, seed=9)
    gen = torch.Generator().manual_seed(1)
    x = torch.tensor(np.asarray(xs_j), requires_grad=True)
    h0 = (0.5 * torch.randn(4, 3, H, generator=gen)).requires_grad_()
    c0 = (0.5 * torch.randn(4, 3, H, generator=gen)).requires_grad_()
    out_w = torch.randn(3, steps, 2 * H, generator=gen)
    h_w, c_w = torch.randn(4, 3, H, generator=gen), torch.randn(4, 3, H, generator=gen)

    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    out_packed, (hn, cn) = module(packed, (h0, c0))
    out, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=steps)
    loss = (out * out_w).sum() + (hn * h_w).sum() + (cn * c_w).sum()
    loss.backward()

    state_w = carry_from_torch(cell, h_w, c_w)

    @jax.jit
    def jloss(params, xs, carry0):
        ys, carry = unroll(cell, params, xs, mask=mask, carry=carry0)
        state = sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(carry), jax.tree.leaves(state_w)))
        return jnp.sum(ys * jnp.asarray(out_w.numpy())) + state, (ys, carry)

    (_, (ys, carry)), (g_params, g_xs, g_carry) = jax.value_and_grad(jloss, argnums=(0, 1, 2), has_aux=True)(
        params, xs_j, carry_from_torch(cell, h0, c0)
    )
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ys), out.detach().numpy(), **tol)
    hn_j, cn_j = carry_to_torch(cell, carry)
    np.testing.assert_allclose(hn_j.numpy(), hn.detach().numpy(), **tol)
    np.testing.assert_allclose(cn_j.numpy(), cn.detach().numpy(), **tol)
    np.testing.assert_allclose(np.asarray(g_xs), x.grad.numpy(), **tol)  # zero on padding in both
    gh, gc = carry_to_torch(cell, g_carry)
    np.testing.assert_allclose(gh.numpy(), h0.grad.numpy(), **tol)
    np.testing.assert_allclose(gc.numpy(), c0.grad.numpy(), **tol)
    torch_params = dict(module.named_parameters())
    for name, g in to_torch_state_dict(cell, g_params).items():
        np.testing.assert_allclose(g.numpy(), torch_params[name].grad.numpy(), err_msg=name, **tol)


# --- the generic path ------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
def test_generic_scan_path_matches_the_cells_own_sequence_form(reverse):
    """Masks with holes, an empty row, resets and a given carry: the lax.scan of `step` and
    the cell's fast path (the dispatch table's choice) give the same outputs, carries and gradients."""
    xs, _ = _padded([9, 9, 9], T_PACKED, seed=14)
    mask = np.ones((3, T_PACKED), bool)
    mask[0, A + B:] = False  # row 0: packed [seqA, seqB] + padding
    mask[1, [1, 2, 5]] = False  # row 1: holes
    mask[2] = False  # row 2: empty
    resets = np.zeros((3, T_PACKED), bool)
    resets[0, A] = resets[1, 4] = True
    carry0 = _random_carry(CELL, 3)
    out_w = jnp.asarray(np.random.default_rng(15).normal(size=(3, T_PACKED, H)), jnp.float32)

    def run(cell):
        def loss(params, xs, carry0):
            ys, carry = unroll(cell, params, xs, mask=mask, resets=resets, carry=carry0, reverse=reverse)
            return jnp.sum(ys * out_w) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry)), (ys, carry)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(PARAMS, xs, carry0)

    _close(run(StepOnly(CELL)), run(CELL), rtol=1e-5, atol=1e-5)


# --- transformations -------------------------------------------------------------------------


def test_jit_matches_eager_with_everything_on():
    xs, mask, resets = _packed()
    carry0 = _random_carry(CELL, 2)
    for reverse in (False, True):
        eager = unroll(CELL, PARAMS, xs, mask=mask, resets=resets, carry=carry0, reverse=reverse)
        jitted = _unroll(CELL, PARAMS, xs, mask=mask, resets=resets, carry=carry0, reverse=reverse)
        _close(jitted, eager, rtol=1e-6, atol=1e-7)


def test_gradients_match_finite_differences_in_float64():
    """jax.grad through masks, resets and the reverse gather, against central differences
    along random directions (float64, so the differences are accurate to ~1e-9)."""
    with jax.enable_x64(True):
        cell = Bidirectional(GRU(3, 4, dtype=jnp.float64), LSTM(3, 4, dtype=jnp.float64))
        params = np_init(cell, 10)
        rng = np.random.default_rng(11)
        xs = rng.normal(size=(2, 5, 3))
        mask = jnp.asarray(_lengths_mask([5, 3], 5))
        resets = jnp.zeros((2, 5), bool).at[0, 2].set(True)
        weights = rng.normal(size=(2, 5, 8))

        @jax.jit
        def loss(args):
            params, xs = args
            ys, carry = unroll(cell, params, xs, mask=mask, resets=resets)
            return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

        # perturb in NumPy: eager jnp ops would each compile once more under x64
        args = jax.tree.map(np.asarray, (params, xs))
        grads = jax.tree.leaves(jax.jit(jax.grad(loss))(args))
        leaves, tree = jax.tree.flatten(args)
        rng, eps = np.random.default_rng(13), 1e-5
        for _ in range(3):
            direction = [rng.normal(size=a.shape) for a in leaves]
            plus = jax.tree.unflatten(tree, [a + eps * d for a, d in zip(leaves, direction)])
            minus = jax.tree.unflatten(tree, [a - eps * d for a, d in zip(leaves, direction)])
            numeric = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
            analytic = sum(float(np.vdot(np.asarray(g), d)) for g, d in zip(grads, direction))
            np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-7)


# --- errors name the argument ----------------------------------------------------------------


def test_errors_name_the_argument():
    xs, mask = _padded([3, 2], 3)
    with pytest.raises(ShapeError, match="xs must have rank 3"):
        unroll(CELL, PARAMS, xs[0])
    with pytest.raises(ShapeError, match="xs has 4 features .* d_in=5"):
        unroll(CELL, PARAMS, xs[..., :4])
    with pytest.raises(ShapeError, match="xs must be floating point"):
        unroll(CELL, PARAMS, xs.astype(jnp.int32))
    with pytest.raises(ShapeError, match=r"mask has shape \(2, 2\) but the data has shape \(2, 3\)"):
        unroll(CELL, PARAMS, xs, mask=mask[:, :2])
    with pytest.raises(ShapeError, match=r"resets has shape \(3,\)"):
        unroll(CELL, PARAMS, xs, resets=jnp.zeros((3,), bool))
    with pytest.raises(ShapeError, match="resets must be boolean"):
        unroll(CELL, PARAMS, xs, resets=jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ShapeError, match="carry has shapes .* batch 2"):
        unroll(CELL, PARAMS, xs, carry=CELL.initial_carry((3,)))
    with pytest.raises(ShapeError, match="carry has shapes"):
        unroll(CELL, PARAMS, xs, carry=jnp.zeros((2, H)))  # an LSTM carry is (h, c)
