"""`unroll`: the one place where `jax.lax.scan` runs over time.

Semantics (shared by every model, so masking, resets and reversal mean one thing):

- `xs` is batch-major `[B, T, d_in]`; outputs are `[B, T, d_out]`.
- `mask[b, t] == True` marks a valid step. On a masked step the carry is held and
  the output is zero, so a padded row gives the same outputs and final carry on its
  valid part as the unpadded row, and a row of length 0 returns its initial carry
  with zero gradient.
- `resets[b, t] == True` restarts the carry (to the initial carry) before step t:
  packed sequences, episode boundaries.
- `reverse=True` runs each row backwards over its valid steps only (for a
  right-padded row of length L: L-1, ..., 0), so the backward half of a
  bidirectional layer sees the same thing with or without padding. Resets keep
  marking segment starts in forward time; the reverse pass restarts at segment ends.
- `Stack` cells are unrolled layer by layer (same numbers as stepping the stack,
  bigger matmuls), which is where dropout between layers applies when a `key` is given.
- `Bidirectional` cells run a forward and a reverse pass and concatenate.

`reference_recurrence` (the `lax.scan` of `cell.step`) is the reference; each leaf cell's
whole-sequence run is chosen from `jaxseq.kernels.dispatch.RECURRENCE` under the `kernels`
policy, and every fast path there implements these semantics exactly (tests/test_kernels.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxseq.cells import Bidirectional, Stack
from jaxseq.checks import check_features, check_mask
from jaxseq.errors import ShapeError
from jaxseq.kernels import dispatch


def _select(pred, on_true, on_false):
    """Per-row tree select; pred: [B]."""
    def pick(a, b):
        p = pred.reshape(pred.shape + (1,) * (a.ndim - pred.ndim))
        return jnp.where(p, a, b)
    return jax.tree.map(pick, on_true, on_false)


def _scan_cell(cell, params, xs, mask, carry0, resets, unroll, kernels):
    """Forward pass of a single (non-stack) cell. xs [B, T, d]; mask, resets [B, T] bool.

    The dispatch table (`jaxseq.kernels.dispatch.RECURRENCE`) may hold a faster whole-sequence form
    of the same cell with the same semantics (a fused backward pass, cuDNN, a CPU kernel, a parallel
    scan); the last entry, always eligible, is `reference_recurrence`.
    """
    call = dispatch.RecurrenceCall(cell, params, xs, mask, resets)
    entry = dispatch.candidates("recurrence", call, kernels)[0]
    dispatch.record("recurrence", entry.name)
    if entry.run is None:
        return reference_recurrence(cell, params, xs, mask, carry0, resets, unroll)
    return entry.run(cell, params, xs, mask, carry0, resets, unroll)


@dataclasses.dataclass(frozen=True)
class StepOnly:
    """`cell` seen only through the Cell protocol: the dispatch table knows concrete cell classes only, so
    `unroll(StepOnly(cell), ...)` runs the reference `lax.scan` of `step`, the path every user-defined
    cell takes. Use it to hold a cell's fast paths (fused, parallel scan) against its definition."""

    cell: Any

    d_in = property(lambda self: self.cell.d_in)
    d_out = property(lambda self: self.cell.d_out)

    def init(self, key):
        return self.cell.init(key)

    def initial_carry(self, batch_shape=(), dtype=None):
        return self.cell.initial_carry(batch_shape, dtype)

    def step(self, params, carry, x):
        return self.cell.step(params, carry, x)


def reference_recurrence(cell, params, xs, mask, carry0, resets, unroll=1):
    """The reference recurrence: `lax.scan` of `cell.step` with held carry and zero output on masked steps.

    A step's output may be a pytree of `[B, ...]` arrays (an `AttentionCell` can return its weights);
    each leaf is stacked to `[B, T, ...]`.
    """
    def body(carry, inputs):
        x, m, r = inputs
        carry = _select(r, carry0, carry)
        new_carry, y = cell.step(params, carry, x)
        carry = _select(m, new_carry, carry)
        y = _select(m, y, jax.tree.map(jnp.zeros_like, y))  # y may be a pytree (e.g. attention weights)
        return carry, y

    time_major = (jnp.swapaxes(xs, 0, 1), mask.T, resets.T)
    carry, ys = jax.lax.scan(body, carry0, time_major, unroll=unroll)
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), ys), carry


def _reverse_order(mask):
    """Per-row permutation putting valid steps last-first, then the masked ones. [B, T] int32."""
    t = jnp.arange(mask.shape[1])
    keys = jnp.where(mask, -t, mask.shape[1] + t)
    return jnp.argsort(keys, axis=1, stable=True)


def _gather_time(a, order):
    idx = order.reshape(order.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=1)


def _scatter_time(a, order):
    inverse = jnp.argsort(order, axis=1)
    return _gather_time(a, inverse)


def _run(cell, params, xs, mask, carry0, resets, reverse, unroll, key, kernels):
    if isinstance(cell, Bidirectional):
        cf, cb = carry0
        kf, kb = jax.random.split(key) if key is not None else (None, None)
        yf, cf = _run(cell.forward, params["forward"], xs, mask, cf, resets, reverse, unroll, kf, kernels)
        yb, cb = _run(cell.backward, params["backward"], xs, mask, cb, resets, not reverse, unroll, kb, kernels)
        return jnp.concatenate([yf, yb], axis=-1), (cf, cb)
    if isinstance(cell, Stack):
        carries = []
        for i, (layer, c0) in enumerate(zip(cell.cells, carry0)):
            ys, c = _run(layer, params[f"layer_{i}"], xs, mask, c0, resets, reverse, unroll, None, kernels)
            carries.append(c)
            ys = xs + ys if cell.uses_residual(i) else ys
            if key is not None and cell.dropout > 0 and i < len(cell.cells) - 1:
                keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - cell.dropout, ys.shape)
                ys = jnp.where(keep, ys / (1.0 - cell.dropout), 0.0)
            xs = ys
        return xs, tuple(carries)
    if reverse:
        order = _reverse_order(mask)
        # In reverse time a segment restarts where the next forward step starts a new one.
        next_resets = jnp.concatenate([resets[:, 1:], jnp.zeros_like(resets[:, :1])], axis=1)
        ys, carry = _scan_cell(cell, params, _gather_time(xs, order), _gather_time(mask, order), carry0,
                               _gather_time(next_resets, order), unroll, kernels)
        return _scatter_time(ys, order), carry
    return _scan_cell(cell, params, xs, mask, carry0, resets, unroll, kernels)


def unroll(cell, params, xs, *, mask=None, carry=None, resets=None, reverse: bool = False, unroll: int = 1, key=None,
           kernels: str = "auto"):
    """Run `cell` over `xs: [B, T, d_in]`; returns `(ys [B, T, d_out], final carry)`.

    mask, resets: bool `[B, T]` (see the module docstring). carry: the initial carry
    (default zeros). key: PRNG key enabling dropout between the layers of a `Stack`.
    unroll: passed to `lax.scan` (measured: > 1 did not help training on CPU).
    kernels: "auto" (each leaf cell takes the first eligible entry of the dispatch table) or
    "reference" (the `lax.scan` of `step` everywhere).
    """
    dispatch.check_policy(kernels)
    check_features(xs, cell.d_in, name="xs")
    batch, steps = xs.shape[:2]
    if mask is None:
        mask = jnp.ones((batch, steps), bool)
    else:
        mask = check_mask(mask, (batch, steps), name="mask")
        # Zero the padding: a masked step's output is discarded, but its backward pass still
        # multiplies a zero cotangent by the step's derivatives, and 0 * NaN (from NaN/inf
        # garbage in padding) would poison every weight gradient.
        xs = jnp.where(mask[..., None], xs, jnp.zeros((), xs.dtype))
    resets = jnp.zeros((batch, steps), bool) if resets is None else check_mask(resets, (batch, steps), name="resets")
    if carry is None:
        carry = cell.initial_carry((batch,), xs.dtype)
    else:
        expected = jax.tree.map(jnp.shape, cell.initial_carry((batch,), xs.dtype))
        got = jax.tree.map(jnp.shape, carry)
        if expected != got:
            raise ShapeError(f"carry has shapes {got} but {type(cell).__name__} with batch {batch} expects {expected}.")
    return _run(cell, params, xs, mask, carry, resets, reverse, unroll, key, kernels)
