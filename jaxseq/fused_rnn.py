"""Whole-sequence LSTM, GRU and Elman recurrences with a hand-written backward pass.

`lstm_sequence`, `gru_sequence` and `elman_sequence` compute what
`jaxseq.scan._lax_scan_cell` computes for the matching cell (the plain `lax.scan` of
`cell.step`), to float32 rounding: batch-major `xs [B, T, d_in]`, `mask [B, T]`
(False: carry held, output zero), `resets [B, T]` (True: carry := carry0 before step
t), returning `(ys [B, T, H], final carry)`. `jaxseq.unroll` reaches them through
`cell.sequence_unroll`; reversal is done by `unroll` before the call.

Why by hand (every choice below was measured on a 2-core CPU; figures and the
losing variants are in benchmarks/README.md): autodiff of a scan saves and replays
every per-step op. Here

- the input projection is one `[B*T, d_in] @ [d_in, G*H]` matmul before the loop,
  written into a buffer `buf [B, T, G*H]` that is then reused in place: the forward
  loop overwrites step t's projection with its activated gates, the backward loop
  overwrites those with the gate cotangents dZ. One buffer instead of three keeps
  page faults (a large part of the time on CPU) down;
- the four LSTM gates are one `tanh`: sigmoid(x) = 0.5 tanh(x / 2) + 0.5, so
  `gates = a * tanh(a * z) + b` with per-column constants (XLA's sigmoid is a
  division, about twice the cost of a tanh);
- the reverse loop does only `dZ_t @ W_hh^T` and elementwise gate derivatives
  (from the saved activations, so no transcendental except LSTM's tanh(c));
- `dW_hh = H_prev^T dZ`, `dW_ih = X^T dZ`, `db` and `dX = dZ W_ih^T` are each one
  large matmul (or reduction) after the loop;
- the loops are `fori_loop`s over batch-major buffers (no [B, T] <-> [T, B]
  transposes). The backward loop reads step t-1's activations right after writing
  step t's cotangents (a one-step software pipeline), so that XLA can update the
  buffer in place instead of copying it every step.

Gradients flow to `xs`, every parameter and `carry0` (through the initial carry and
through every reset); `mask` and `resets` get none. Not differentiable twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# ----------------------------------------------------------------------------- helpers


def _at(a, t):
    """a[:, t] for a batch-major [B, T, ...] array."""
    return lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False)


def _put(a, v, t):
    """a[:, t] = v (in place when XLA can)."""
    return lax.dynamic_update_index_in_dim(a, v, t, axis=1)


def _flag(a, t):
    """Per-row flag of step t as a [B, 1] column that broadcasts over features."""
    return _at(a, t)[:, None]


def _select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _project(xs, w, b):
    """xs [B, T, D] @ w [D, G] + b -> [B, T, G], flattened to 2-D (XLA's fast matmul path)."""
    batch, steps, d = xs.shape
    return (xs.reshape(batch * steps, d) @ w + b).reshape(batch, steps, w.shape[1])


def _gate_affine(hid, dtype):
    """Per-column (a, b) with sigmoid(z) = a tanh(a z) + b on the i, f, o blocks and tanh(z) on g."""
    half, one, zero = (jnp.full((hid,), v, dtype) for v in (0.5, 1.0, 0.0))
    return jnp.concatenate([half, half, one, half]), jnp.concatenate([half, half, zero, half])


def _cast_like(tree, like):
    return jax.tree.map(lambda a, ref: a.astype(ref.dtype), tree, like)


# ----------------------------------------------------------------------------- cells
#
# Each cell supplies, for one step on [B, ...] slices:
#   fwd(params, carry, xp_t) -> (new_carry, y, acts, saves)
#       xp_t: the step's slice of the projection buffer; acts: tuple written in place
#       over the in-place buffers (the first one is the projection buffer); saves:
#       tuple stored for the backward pass (the post-reset carry at least).
#   bwd(params_t, acts, saves, d_new) -> (cts, d_prev)
#       d_new: cotangent of new_carry, the output y's included; cts: tuple written over
#       the in-place buffers (cts[0] = dZ_x, the cotangent of the projection);
#       d_prev: cotangent of the carry fed into the step.
#   dz_h(bufs) -> dZ_h, the cotangent of h_prev @ W_hh (+ b_hh), after the loop.
#   h_prev(saves) -> the saved [B, T, H] inputs of W_hh.


class _LSTM:
    extra_bufs = 0  # in-place buffers besides the projection

    @staticmethod
    def project(params, xs):
        return _project(xs, params["w_ih"], params["b_ih"] + params["b_hh"])

    @staticmethod
    def fwd(params, carry, xp_t):
        h, c = carry
        hid = h.shape[-1]
        a, b = _gate_affine(hid, h.dtype)
        z = xp_t + h @ params["w_hh"]
        gates = a * jnp.tanh(a * z) + b  # i, f, g, o activated, [B, 4H]
        i, f, g, o = (gates[:, k * hid:(k + 1) * hid] for k in range(4))
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        return (h_new, c_new), h_new, (gates,), (h, c)

    @staticmethod
    def bwd(w_hh_t, acts, saves, d_new):
        (gates,), (_, c) = acts, saves
        dh, dc = d_new
        hid = dh.shape[-1]
        i, f, g, o = (gates[:, k * hid:(k + 1) * hid] for k in range(4))
        tc = jnp.tanh(f * c + i * g)  # recomputed: cheaper than saving it
        dc = dc + dh * o * (1.0 - tc * tc)
        dz = jnp.concatenate(
            [dc * g * i * (1.0 - i), dc * c * f * (1.0 - f), dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)], -1
        )
        return (dz,), (dz @ w_hh_t, dc * f)

    @staticmethod
    def dz_h(bufs):
        return bufs[0]

    @staticmethod
    def h_prev(saves):
        return saves[0]


class _GRU:
    extra_bufs = 1  # hn = W_hn h + b_hn, then its cotangent

    @staticmethod
    def project(params, xs):
        return _project(xs, params["w_ih"], params["b_ih"])

    @staticmethod
    def fwd(params, h, xp_t):
        hid = h.shape[-1]
        gh = h @ params["w_hh"] + params["b_hh"]
        rz = jax.nn.sigmoid(xp_t[:, :2 * hid] + gh[:, :2 * hid])
        r, z = rz[:, :hid], rz[:, hid:]
        hn = gh[:, 2 * hid:]
        n = jnp.tanh(xp_t[:, 2 * hid:] + r * hn)
        h_new = (1.0 - z) * n + z * h
        return h_new, h_new, (jnp.concatenate([rz, n], -1), hn), (h,)

    @staticmethod
    def bwd(w_hh_t, acts, saves, dh):
        (rzn, hn), (h,) = acts, saves
        hid = dh.shape[-1]
        r, z, n = (rzn[:, k * hid:(k + 1) * hid] for k in range(3))
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dr = dn * hn * r * (1.0 - r)
        dz = dh * (h - n) * z * (1.0 - z)
        dhn = dn * r
        d_prev = jnp.concatenate([dr, dz, dhn], -1) @ w_hh_t + dh * z
        return (jnp.concatenate([dr, dz, dn], -1), dhn), d_prev

    @staticmethod
    def dz_h(bufs):
        hid = bufs[1].shape[-1]
        return jnp.concatenate([bufs[0][..., :2 * hid], bufs[1]], -1)

    @staticmethod
    def h_prev(saves):
        return saves[0]


def _elman(nonlinearity):
    class _Elman:
        extra_bufs = 0

        @staticmethod
        def project(params, xs):
            return _project(xs, params["w_ih"], params["b_ih"] + params["b_hh"])

        @staticmethod
        def fwd(params, h, xp_t):
            z = xp_t + h @ params["w_hh"]
            h_new = jnp.tanh(z) if nonlinearity == "tanh" else jax.nn.relu(z)
            return h_new, h_new, (h_new,), (h,)

        @staticmethod
        def bwd(w_hh_t, acts, saves, dh):
            (h_new,) = acts
            grad = 1.0 - h_new * h_new if nonlinearity == "tanh" else (h_new > 0).astype(h_new.dtype)
            dz = dh * grad
            return (dz,), dz @ w_hh_t

        @staticmethod
        def dz_h(bufs):
            return bufs[0]

        @staticmethod
        def h_prev(saves):
            return saves[0]

    return _Elman


_ELMAN = {"tanh": _elman("tanh"), "relu": _elman("relu")}


def _output_of(carry):
    """The part of a carry that is also the step's output (h)."""
    return carry[0] if isinstance(carry, tuple) else carry


# ----------------------------------------------------------------------------- loops


def _forward(cell, params, xs, mask, resets, carry0, unroll, save):
    """The forward loop. Returns ((ys, carry), bufs, saves); bufs/saves are None unless save."""
    batch, steps = mask.shape
    hid = _output_of(carry0).shape[-1]
    dtype = _output_of(carry0).dtype
    xp = cell.project(params, xs)
    ys = jnp.zeros((batch, steps, hid), dtype)
    if save:
        bufs = (xp,) + tuple(jnp.zeros((batch, steps, hid), dtype) for _ in range(cell.extra_bufs))
        saves = jax.tree.map(lambda a: jnp.zeros((batch, steps) + a.shape[1:], a.dtype), carry0)
        saves = tuple(jax.tree.leaves(saves))
    else:
        bufs, saves = (xp,), ()

    def body(t, state):
        carry, bufs, saves, ys, xp_t = state
        m, r = _flag(mask, t), _flag(resets, t)
        carry = _select(r, carry0, carry)
        new, y, acts, step_saves = cell.fwd(params, carry, xp_t)
        ys = _put(ys, jnp.where(m, y, 0.0), t)
        if save:
            bufs = tuple(_put(b, a, t) for b, a in zip(bufs, acts))
            saves = tuple(_put(s, v, t) for s, v in zip(saves, step_saves))
        # Read step t+1's projection after writing step t (see _backward on why).
        return _select(m, new, carry), bufs, saves, ys, _at(bufs[0], jnp.minimum(t + 1, steps - 1))

    state = (carry0, bufs, saves, ys, _at(xp, 0))
    carry, bufs, saves, ys, _ = lax.fori_loop(0, steps, body, state, unroll=unroll)
    return (ys, carry), (bufs if save else None), (saves if save else None)


def _backward(cell, params, xs, mask, resets, carry0, bufs, saves, dys, dcarry, unroll):
    """The reverse loop and the after-the-loop matmuls. Returns (dparams, dxs, dcarry0)."""
    batch, steps, d_in = xs.shape
    w_hh_t = params["w_hh"].T  # made contiguous once, outside the loop

    def body(k, state):
        t = steps - 1 - k
        d, d0, bufs, acts = state
        m, r = _flag(mask, t), _flag(resets, t)
        d_new = jax.tree.map(lambda a: jnp.where(m, a, 0.0), d)
        if isinstance(d_new, tuple):
            d_new = (d_new[0] + jnp.where(m, _at(dys, t), 0.0),) + d_new[1:]
        else:
            d_new = d_new + jnp.where(m, _at(dys, t), 0.0)
        cts, d_prev = cell.bwd(w_hh_t, acts, tuple(_at(s, t) for s in saves), d_new)
        # A masked step passed the carry through unchanged; a reset step took carry0.
        d_prev = jax.tree.map(lambda a, b: a + jnp.where(m, 0.0, b), d_prev, d)
        d0 = jax.tree.map(lambda a, b: a + jnp.where(r, b, 0.0), d0, d_prev)
        d_prev = jax.tree.map(lambda a: jnp.where(r, 0.0, a), d_prev)
        bufs = tuple(_put(b, c, t) for b, c in zip(bufs, cts))
        # Read step t-1's activations only now, after the write: XLA then updates the
        # buffers in place (reading them earlier, from several fusions, made it copy
        # the whole buffer every step).
        acts = tuple(_at(b, jnp.maximum(t - 1, 0)) for b in bufs)
        return d_prev, d0, bufs, acts

    zeros = jax.tree.map(jnp.zeros_like, dcarry)
    acts0 = tuple(_at(b, steps - 1) for b in bufs)
    d, d0, bufs, _ = lax.fori_loop(0, steps, body, (dcarry, zeros, bufs, acts0), unroll=unroll)
    dcarry0 = jax.tree.map(jnp.add, d0, d)

    dzx = bufs[0].reshape(batch * steps, -1)
    dzh = cell.dz_h(bufs).reshape(batch * steps, -1)
    h_prev = cell.h_prev(saves).reshape(batch * steps, -1)
    x2 = xs.reshape(batch * steps, d_in)
    dzx_sum = dzx.sum(0)
    grads = {
        "w_ih": x2.T @ dzx,
        "w_hh": h_prev.T @ dzh,
        "b_ih": dzx_sum,
        "b_hh": dzx_sum if dzh is dzx else dzh.sum(0),
    }
    dxs = (dzx @ params["w_ih"].T).reshape(batch, steps, d_in)
    return grads, dxs, dcarry0


def _make_sequence_fn(cell, doc):
    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def run(params, xs, mask, carry0, resets, unroll=1):
        (ys, carry), _, _ = _forward(cell, params, xs, mask, resets, carry0, unroll, save=False)
        return ys, carry

    def fwd(params, xs, mask, carry0, resets, unroll):
        out, bufs, saves = _forward(cell, params, xs, mask, resets, carry0, unroll, save=True)
        return out, (params, xs, mask, resets, carry0, bufs, saves)

    def bwd(unroll, res, cts):
        params, xs, mask, resets, carry0, bufs, saves = res
        dys, dcarry = cts
        grads, dxs, dcarry0 = _backward(cell, params, xs, mask, resets, carry0, bufs, saves, dys, dcarry, unroll)
        return _cast_like(grads, params), dxs.astype(xs.dtype), None, _cast_like(dcarry0, carry0), None

    run.defvjp(fwd, bwd)

    def sequence(params, xs, mask, carry0, resets, unroll=1):
        if xs.shape[1] == 0:  # no steps: nothing to loop over (the loops index step T-1)
            return jnp.zeros(xs.shape[:2] + (_output_of(carry0).shape[-1],), xs.dtype), carry0
        # dict(): inside a Flax module params arrive as a FrozenDict, and the custom_vjp's cotangents
        # (built as plain dicts) must have the primal's pytree type.
        return run(dict(params), xs, mask.astype(bool), carry0, resets.astype(bool), unroll)

    sequence.__doc__ = doc
    return sequence


lstm_sequence = _make_sequence_fn(
    _LSTM, "LSTM over xs [B, T, d_in] with carry0 (h, c) -> (ys [B, T, H], (h, c)); see the module docstring."
)
gru_sequence = _make_sequence_fn(
    _GRU, "GRU over xs [B, T, d_in] with carry0 h -> (ys [B, T, H], h); see the module docstring."
)
_ELMAN_FNS = {
    name: _make_sequence_fn(cell, f"Elman ({name}) over xs [B, T, d_in] -> (ys, h).") for name, cell in _ELMAN.items()
}


def elman_sequence(params, xs, mask, carry0, resets, unroll=1, nonlinearity="tanh"):
    """Elman RNN over xs [B, T, d_in] with carry0 h -> (ys [B, T, H], h); see the module docstring."""
    return _ELMAN_FNS[nonlinearity](params, xs, mask, carry0, resets, unroll)
