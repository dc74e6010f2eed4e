"""Thin Flax linen modules over the pure core (cells + unroll)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax.core import unfreeze

from jaxseq.scan import unroll


class Recurrent(nn.Module):
    """Holds a cell's parameters (one `cell` param subtree) and runs it.

    `__call__(xs [B, T, d_in], mask=, carry=, resets=, reverse=, deterministic=)` -> (ys, carry);
    `step(carry, x [B, d_in])` -> (carry, y [B, d_out]). Dropout between stacked layers draws
    from the "dropout" rng stream when `deterministic=False`. `kernels` is `unroll`'s policy
    ("auto" | "reference").
    """

    cell: Any
    kernels: str = "auto"

    def setup(self):
        self.cell_params = self.param("cell", lambda key: self.cell.init(key))

    def _params(self):
        # Flax freezes dicts kept on a module; cells get the plain dicts their `init` made (a custom_vjp,
        # as in jaxseq.kernels.fused_rnn, needs its cotangents to have the primal's pytree types).
        return unfreeze(self.cell_params)

    def __call__(self, xs, *, mask=None, carry=None, resets=None, reverse=False, deterministic=True):
        key = None if deterministic or getattr(self.cell, "dropout", 0.0) == 0.0 else self.make_rng("dropout")
        return unroll(self.cell, self._params(), xs, mask=mask, carry=carry, resets=resets, reverse=reverse, key=key,
                      kernels=self.kernels)

    def initial_carry(self, batch_shape, dtype=None):
        return self.cell.initial_carry(batch_shape, dtype)

    def step(self, carry, x):
        return self.cell.step(self._params(), carry, x)

    def memory_carry(self, memory, memory_mask=None, state=None):
        """A cell over a memory (`jaxseq.attention_cells.AttentionCell`): its first carry, with these params."""
        return self.cell.memory_carry(self._params(), memory, memory_mask, state)
