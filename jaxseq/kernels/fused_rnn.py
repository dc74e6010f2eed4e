"""Whole-sequence LSTM, GRU and Elman recurrences with a hand-written backward pass.

`lstm_sequence`, `gru_sequence` and `elman_sequence` compute what
`jaxseq.scan.reference_recurrence` computes for the matching cell (the plain `lax.scan`
of `cell.step`), to float32 rounding: batch-major `xs [B, T, d_in]`, `mask [B, T]`
(False: carry held, output zero), `resets [B, T]` (True: carry := carry0 before step
t), returning `(ys [B, T, H], final carry)`. `jaxseq.unroll` reaches them through the
dispatch table's "fused-xla" entry; reversal is done by `unroll` before the call.

Why by hand (every choice below was measured on a 2-core CPU; figures and the
losing variants are in benchmarks/README.md): autodiff of a scan saves and replays
every per-step op. Here

- the input projection is one `[B*T, d_in] @ [d_in, G]` matmul before the loop
  (G = gates * H; the bias is added in the loop), written into a buffer `buf` that
  is then reused in place: the
  forward loop overwrites step t's projection with its activated gates, the backward
  loop overwrites those with the gate cotangents dZ. One buffer instead of three
  keeps page faults (a large part of the time on CPU) down;
- the four LSTM gates are one `tanh`: sigmoid(x) = 0.5 tanh(x / 2) + 0.5, so
  `gates = a * tanh(a * z) + b` with per-gate constants (XLA's sigmoid is a
  division, about twice the cost of a tanh); the GRU's r and z gates use the same form;
- the reverse loop does only `dZ_t W_hh^T` and elementwise gate derivatives, from the
  saved activations (no transcendental function but LSTM's tanh(c));
- `dW_hh = H_prev^T dZ`, `dW_ih = X^T dZ`, `db` and `dX = dZ W_ih^T` are each one
  large matmul (or reduction) after the loop;
- the backward loop reads step t-1's activations right after writing step t's
  cotangents (a one-step software pipeline), so that XLA updates the buffer in place
  instead of copying all of it every step;
- two layouts, chosen by size (`_feature_major`): batch-major buffers `[B, T, F]`
  with the state `h [B, H]`, or feature-major buffers `[F, T, B]` with `h^T [H, B]`,
  where every matmul has the weights on the left (`W_hh^T h^T`, `W_hh dZ^T`). XLA's
  CPU matmul ran those 20-40% faster at hidden 512, but the transposes in and out
  cost more than that gains at hidden <= 256.

Gradients flow to `xs`, every parameter and `carry0` (through the initial carry and
through every reset); `mask` and `resets` get none. Reverse mode only: no `jax.jvp`
or `jax.jacfwd` through these functions, and no second derivatives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Feature-major from these hidden sizes up (measured at batch 32, see benchmarks/README.md):
# training (forward + backward) and inference (forward only, projection inside the loop).
FEATURE_MAJOR_MIN_HIDDEN = 512
FEATURE_MAJOR_MIN_HIDDEN_INFERENCE = 256


def _feature_major(cell, hidden: int, training: bool = True) -> bool:
    if training:  # a cell may move its switch up (cell.feature_major_scale x the threshold)
        return hidden >= FEATURE_MAJOR_MIN_HIDDEN * cell.feature_major_scale
    return hidden >= FEATURE_MAJOR_MIN_HIDDEN_INFERENCE


# ----------------------------------------------------------------------------- layouts


class _Layout:
    """Where the feature axis lives. Buffers are [B, T, F] (batch-major) or [F, T, B]
    (feature-major): time is axis 1 in both, so a step's slice is `a[:, t]`, and a
    step slice is [B, F] or [F, B]."""

    def __init__(self, feature_major: bool):
        self.fm = feature_major

    # whole arrays
    def to_buf(self, a):
        """[B, T, F] -> buffer layout (and back: the transpose is its own inverse)."""
        return jnp.transpose(a, (2, 1, 0)) if self.fm else a

    def carry(self, c):
        """[B, H] <-> step layout."""
        return jax.tree.map(jnp.transpose, c) if self.fm else c

    def flat(self, a):
        """Buffer -> 2-D: [B*T, F] or [F, T*B]."""
        return a.reshape(a.shape[0], -1) if self.fm else a.reshape(-1, a.shape[-1])

    def unflat(self, a, steps):
        return a.reshape(a.shape[0], steps, -1) if self.fm else a.reshape(-1, steps, a.shape[-1])

    def step_out(self, a):
        """A step slice as a batch-major [B, F] row block (the layout of ys and dys), and back."""
        return a.T if self.fm else a

    # step slices
    def width(self, a):
        return a.shape[0] if self.fm else a.shape[-1]

    def rows(self, a, lo, hi):
        """Features lo:hi of a step slice."""
        return a[lo:hi] if self.fm else a[:, lo:hi]

    def cat(self, parts):
        return jnp.concatenate(parts, 0 if self.fm else -1)

    def vec(self, v):
        """A per-feature vector [F], shaped to broadcast over a step slice."""
        return v[:, None] if self.fm else v

    def flag(self, a, t):
        """Per-row flag of step t, [B, T] -> [1, B] or [B, 1]."""
        f = lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False)
        return f[None, :] if self.fm else f[:, None]

    # matmuls: `w` is prepared once outside the loop, so the per-step product needs no transpose
    def prep(self, w, transposed: bool):
        """`w` for a step product v @ w (batch-major), or w^T for w^T @ v (feature-major)."""
        return w if transposed == self.fm else w.T

    def apply(self, w, v):
        return w @ v if self.fm else v @ w

    def project(self, x2, w_ih):
        """The input projection of all steps: x2 is `flat(to_buf(xs))`."""
        return w_ih.T @ x2 if self.fm else x2 @ w_ih

    def wgrad(self, a2, dz2):
        """sum over steps and rows of a^T dz: [F_a, G] from flat buffers."""
        if self.fm:
            return lax.dot_general(a2, dz2, (((1,), (1,)), ((), ())))
        return a2.T @ dz2

    def bsum(self, dz2):
        return dz2.sum(1 if self.fm else 0)

    def dx(self, dz2, w_ih):
        return w_ih @ dz2 if self.fm else dz2 @ w_ih.T


def _at(a, t):
    """a[:, t]: step t of a buffer."""
    return lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False)


def _put(a, v, t):
    """a[:, t] = v (in place when XLA can)."""
    return lax.dynamic_update_index_in_dim(a, v, t, axis=1)


def _select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _cast_like(tree, like):
    return jax.tree.map(lambda a, ref: a.astype(ref.dtype), tree, like)


def _sigmoid(x):
    """sigmoid(x) as 0.5 tanh(x / 2) + 0.5: XLA's sigmoid is a division, about twice a tanh's cost (the
    GRU's training step at hidden 256 ran 1.09x faster this way; benchmarks/README.md, "Measurement history")."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def _h(carry):
    """The part of a carry that is the step's output."""
    return carry[0] if isinstance(carry, tuple) else carry


# ----------------------------------------------------------------------------- cells
#
# Each cell supplies, for one step on [B, F] (or [F, B]) slices, in layout L:
#   x_bias(params) -> [G] bias added to the input projection.
#   prep(L, params) -> the forward loop's weights, transposed as L needs them.
#   fwd(L, w, carry, xp_t) -> (new_carry, acts, saves)
#       xp_t: the step's slice of the projection buffer; acts: tuple written in place
#       over the in-place buffers (the first is the projection buffer); saves: tuple
#       kept for the backward pass (saves[0] = the h that entered the step).
#   bwd(L, w_hh, acts, saves, d_new) -> (cts, d_prev)
#       w_hh: prepared for the backward product; d_new: cotangent of new_carry (the
#       output's included); cts: tuple written over the in-place buffers (cts[0] =
#       dZ_x, the cotangent of the projection); d_prev: cotangent of the carry that
#       entered the step.
#   hh_grads(L, h_prev, dzx, dzx_sum, bufs) -> (dW_hh, db_hh), after the loop, from the flat entering
#       states h_prev, the flat projection cotangents dzx (= bufs[0]) and their sum over rows.


def _hh_grads_as_input(L, h_prev, dzx, dzx_sum, bufs):
    """dW_hh, db_hh of a cell whose h W_hh + b_hh enters the gates beside x W_ih + b_ih (same cotangent)."""
    return L.wgrad(h_prev, dzx), dzx_sum


class _LSTM:
    extra_bufs = 0  # in-place buffers besides the projection
    # Inference at small hidden: project all steps before the loop (measured at hidden 64: 1.3x faster
    # than projecting inside the loop; the GRU measured 2.4x slower that way, so it keeps the loop form).
    hoist_inference = True
    feature_major_scale = 1

    @staticmethod
    def x_bias(params):
        return params["b_ih"] + params["b_hh"]

    @staticmethod
    def prep(L, params):
        hid = params["w_hh"].shape[0]
        half, one, zero = (jnp.full((hid,), v, params["w_hh"].dtype) for v in (0.5, 1.0, 0.0))
        a = L.vec(jnp.concatenate([half, half, one, half]))
        b = L.vec(jnp.concatenate([half, half, zero, half]))
        return L.prep(params["w_hh"], transposed=False), a, b

    @staticmethod
    def fwd(L, w, carry, xp_t):
        w_hh, a, b = w
        h, c = carry
        hid = L.width(h)
        gates = a * jnp.tanh(a * (xp_t + L.apply(w_hh, h))) + b  # i, f, g, o activated
        i, f, g, o = (L.rows(gates, k * hid, (k + 1) * hid) for k in range(4))
        c_new = f * c + i * g
        return (o * jnp.tanh(c_new), c_new), (gates,), (h, c)

    @staticmethod
    def bwd(L, w_hh, acts, saves, d_new):
        (gates,), (_, c) = acts, saves
        dh, dc = d_new
        hid = L.width(dh)
        i, f, g, o = (L.rows(gates, k * hid, (k + 1) * hid) for k in range(4))
        tc = jnp.tanh(f * c + i * g)  # recomputed: cheaper than saving it
        dc = dc + dh * o * (1.0 - tc * tc)
        dz = L.cat([dc * g * i * (1.0 - i), dc * c * f * (1.0 - f), dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)])
        return (dz,), (L.apply(w_hh, dz), dc * f)

    hh_grads = staticmethod(_hh_grads_as_input)


class _GRU:
    extra_bufs = 1  # hn = h W_hn + b_hn, later its cotangent
    hoist_inference = False
    # Training stays batch-major at hidden 512 (measured, batch 32: 1.16-1.27x PyTorch and 1.22-1.30x
    # Flax's GRUCell, against 1.05-1.10x / 1.11x feature-major), so the switch is at 1024.
    feature_major_scale = 2

    @staticmethod
    def x_bias(params):
        return params["b_ih"]

    @staticmethod
    def prep(L, params):
        return L.prep(params["w_hh"], transposed=False), L.vec(params["b_hh"])

    @staticmethod
    def fwd(L, w, h, xp_t):
        w_hh, b_hh = w
        hid = L.width(h)
        gh = L.apply(w_hh, h) + b_hh
        rz = _sigmoid(L.rows(xp_t, 0, 2 * hid) + L.rows(gh, 0, 2 * hid))
        r, z = L.rows(rz, 0, hid), L.rows(rz, hid, 2 * hid)
        hn = L.rows(gh, 2 * hid, 3 * hid)
        n = jnp.tanh(L.rows(xp_t, 2 * hid, 3 * hid) + r * hn)
        return (1.0 - z) * n + z * h, (L.cat([rz, n]), hn), (h,)

    @staticmethod
    def bwd(L, w_hh, acts, saves, dh):
        (rzn, hn), (h,) = acts, saves
        hid = L.width(dh)
        r, z, n = (L.rows(rzn, k * hid, (k + 1) * hid) for k in range(3))
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dr = dn * hn * r * (1.0 - r)
        dz = dh * (h - n) * z * (1.0 - z)
        dhn = dn * r
        d_prev = L.apply(w_hh, L.cat([dr, dz, dhn])) + dh * z
        return (L.cat([dr, dz, dn]), dhn), d_prev

    @staticmethod
    def hh_grads(L, h_prev, dzx, dzx_sum, bufs):
        """The r, z columns of dW_hh are those of H^T dZ_x; the n columns come from dhn (bufs[1]).

        Why not one matmul on [dZ_rz | dhn]: that concatenation is a [B*T, 3H] temporary (12.6 MB at
        hidden 256, batch 32, length 128) which took the step's temporaries past glibc's 32 MB mmap
        threshold, so they were mapped afresh, and faulted in, on every call (11k page faults, ~16 ms
        a step). Computing H^T dZ_x's n columns and dropping them costs less (1.20x faster at hidden 256;
        benchmarks/README.md, "Measurement history")."""
        hid = L.width(bufs[1])
        dhn = L.flat(bufs[1])
        dw_rz = L.wgrad(h_prev, dzx)[:, : 2 * hid]
        return jnp.concatenate([dw_rz, L.wgrad(h_prev, dhn)], 1), jnp.concatenate([dzx_sum[: 2 * hid], L.bsum(dhn)])


def _elman(nonlinearity):
    class _Elman:
        extra_bufs = 0
        hoist_inference = False  # the loop form; the hoisted one is not measured for Elman
        feature_major_scale = 1

        @staticmethod
        def x_bias(params):
            return params["b_ih"] + params["b_hh"]

        @staticmethod
        def prep(L, params):
            return L.prep(params["w_hh"], transposed=False)

        @staticmethod
        def fwd(L, w_hh, h, xp_t):
            z = xp_t + L.apply(w_hh, h)
            h_new = jnp.tanh(z) if nonlinearity == "tanh" else jax.nn.relu(z)
            return h_new, (h_new,), (h,)

        @staticmethod
        def bwd(L, w_hh, acts, saves, dh):
            (h_new,) = acts
            grad = 1.0 - h_new * h_new if nonlinearity == "tanh" else (h_new > 0).astype(h_new.dtype)
            dz = dh * grad
            return (dz,), L.apply(w_hh, dz)

        hh_grads = staticmethod(_hh_grads_as_input)

    return _Elman


_ELMAN = {"tanh": _elman("tanh"), "relu": _elman("relu")}


# ----------------------------------------------------------------------------- loops


def _forward(cell, L, params, xs, mask, resets, carry0, unroll, save):
    """The forward loop. xs [B, T, D]; carry0 batch-major.

    Returns (ys [B, T, H], carry) and, when `save`, the residuals (x2, bufs, saves, carry0).
    Without `save` (inference) nothing is saved; see `_forward_inference` for where it projects.
    """
    steps = xs.shape[1]
    carry0 = L.carry(carry0)
    hid, dtype = L.width(_h(carry0)), _h(carry0).dtype
    w = cell.prep(L, params)
    if not save:
        return _forward_inference(cell, L, params, w, xs, mask, resets, carry0, unroll), None
    x2 = L.flat(L.to_buf(xs))
    # No bias here: added inside the loop (fused with the gates), the matmul's output is
    # the buffer itself; a separate "+ bias" pass wrote a second 16 MB array (measured).
    xp = L.unflat(L.project(x2, params["w_ih"]), steps)
    bias = L.vec(cell.x_bias(params))

    def empty():
        shape = (hid, steps, xs.shape[0]) if L.fm else (xs.shape[0], steps, hid)
        return jnp.zeros(shape, dtype)

    # ys stays batch-major in both layouts: a small per-step transpose beats a [B, T, H]
    # transpose after the loop (another big temporary; measured).
    ys = jnp.zeros((xs.shape[0], steps, hid), dtype)
    bufs = (xp,) + tuple(empty() for _ in range(cell.extra_bufs))
    saves = tuple(empty() for _ in jax.tree.leaves(carry0))

    def body(t, state):
        carry, bufs, saves, ys, xp_t = state
        m, r = L.flag(mask, t), L.flag(resets, t)
        carry = _select(r, carry0, carry)
        new, acts, step_saves = cell.fwd(L, w, carry, xp_t + bias)
        ys = _put(ys, L.step_out(jnp.where(m, _h(new), 0.0)), t)
        bufs = tuple(_put(b, a, t) for b, a in zip(bufs, acts))
        saves = tuple(_put(s, v, t) for s, v in zip(saves, step_saves))
        # Read step t+1's projection after writing step t (see _backward on why).
        return _select(m, new, carry), bufs, saves, ys, _at(bufs[0], jnp.minimum(t + 1, steps - 1))

    state = (carry0, bufs, saves, ys, _at(xp, 0))
    carry, bufs, saves, ys, _ = lax.fori_loop(0, steps, body, state, unroll=unroll)
    return (ys, L.carry(carry)), (x2, bufs, saves, carry0)


def _forward_inference(cell, L, params, w, xs, mask, resets, carry0, unroll):
    """Forward only, nothing saved: the input projection inside the loop, or (`cell.hoist_inference`,
    batch-major layout) one projection matmul for all steps before it."""
    steps = xs.shape[1]
    bias = L.vec(cell.x_bias(params))
    if L.fm or not cell.hoist_inference:
        x_buf, w_ih = L.to_buf(xs), L.prep(params["w_ih"], transposed=False)
        project = lambda t: L.apply(w_ih, _at(x_buf, t))  # noqa: E731
    else:
        xp = L.unflat(L.project(L.flat(L.to_buf(xs)), params["w_ih"]), steps)
        project = lambda t: _at(xp, t)  # noqa: E731

    def body(carry, t):
        m, r = L.flag(mask, t), L.flag(resets, t)
        carry = _select(r, carry0, carry)
        new, _, _ = cell.fwd(L, w, carry, project(t) + bias)
        return _select(m, new, carry), jnp.where(m, _h(new), 0.0)

    carry, ys = lax.scan(body, carry0, jnp.arange(xs.shape[1]), unroll=unroll)  # ys: [T, ...step slice]
    ys = jnp.transpose(ys, (2, 0, 1) if L.fm else (1, 0, 2))  # -> [B, T, H]
    return ys, L.carry(carry)


def _backward(cell, L, params, mask, resets, residuals, dys, dcarry, unroll):
    """The reverse loop and the after-the-loop matmuls. Returns (dparams, dxs, dcarry0)."""
    x2, bufs, saves, carry0 = residuals
    steps = mask.shape[1]
    dcarry = L.carry(dcarry)
    w_hh = L.prep(params["w_hh"], transposed=True)  # made contiguous once, outside the loop

    def body(k, state):
        t = steps - 1 - k
        d, d0, bufs, acts = state
        m, r = L.flag(mask, t), L.flag(resets, t)
        d_new = jax.tree.map(lambda a: jnp.where(m, a, 0.0), d)
        dy = jnp.where(m, L.step_out(_at(dys, t)), 0.0)
        d_new = (d_new[0] + dy,) + d_new[1:] if isinstance(d_new, tuple) else d_new + dy
        cts, d_prev = cell.bwd(L, w_hh, acts, tuple(_at(s, t) for s in saves), d_new)
        # A masked step passed the carry through unchanged; a reset step took carry0.
        d_prev = jax.tree.map(lambda a, b: a + jnp.where(m, 0.0, b), d_prev, d)
        d0 = jax.tree.map(lambda a, b: a + jnp.where(r, b, 0.0), d0, d_prev)
        d_prev = jax.tree.map(lambda a: jnp.where(r, 0.0, a), d_prev)
        bufs = tuple(_put(b, c, t) for b, c in zip(bufs, cts))
        # Read step t-1's activations only now, after the write: XLA then updates the
        # buffers in place (read earlier, by several fusions, XLA copied the whole
        # buffer every step).
        acts = tuple(_at(b, jnp.maximum(t - 1, 0)) for b in bufs)
        return d_prev, d0, bufs, acts

    zeros = jax.tree.map(jnp.zeros_like, dcarry)
    acts0 = tuple(_at(b, steps - 1) for b in bufs)
    d, d0, bufs, _ = lax.fori_loop(0, steps, body, (dcarry, zeros, bufs, acts0), unroll=unroll)
    dcarry0 = L.carry(jax.tree.map(jnp.add, d0, d))

    dzx, h_prev = L.flat(bufs[0]), L.flat(saves[0])
    dzx_sum = L.bsum(dzx)
    dw_hh, db_hh = cell.hh_grads(L, h_prev, dzx, dzx_sum, bufs)
    grads = {"w_ih": L.wgrad(x2, dzx), "w_hh": dw_hh, "b_ih": dzx_sum, "b_hh": db_hh}
    dxs = L.to_buf(L.unflat(L.dx(dzx, params["w_ih"]), steps))
    return grads, dxs, dcarry0


def _make_sequence_fn(cell, doc):
    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def run(params, xs, mask, carry0, resets, unroll=1):
        L = _Layout(_feature_major(cell, params["w_hh"].shape[0], training=False))
        return _forward(cell, L, params, xs, mask, resets, carry0, unroll, save=False)[0]

    def fwd(params, xs, mask, carry0, resets, unroll):
        L = _Layout(_feature_major(cell, params["w_hh"].shape[0]))
        out, residuals = _forward(cell, L, params, xs, mask, resets, carry0, unroll, save=True)
        return out, (params, xs, mask, resets, carry0, residuals)

    def bwd(unroll, res, cts):
        params, xs, mask, resets, carry0, residuals = res
        L = _Layout(_feature_major(cell, params["w_hh"].shape[0]))
        dys, dcarry = cts
        grads, dxs, dcarry0 = _backward(cell, L, params, mask, resets, residuals, dys, dcarry, unroll)
        return _cast_like(grads, params), dxs.astype(xs.dtype), None, _cast_like(dcarry0, carry0), None

    run.defvjp(fwd, bwd)

    def sequence(params, xs, mask, carry0, resets, unroll=1):
        if xs.shape[1] == 0:  # no steps: nothing to loop over (the loops index step T-1)
            return jnp.zeros(xs.shape[:2] + (_h(carry0).shape[-1],), xs.dtype), carry0
        return run(params, xs, mask.astype(bool), carry0, resets.astype(bool), unroll)

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
