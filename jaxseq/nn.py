"""Thin Flax linen modules over the pure core (cells + unroll)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.core import unfreeze
from jax import lax

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


class _Taps(nn.Module):
    """The weights of a `CausalConv`: kernel [kernel_size, d_in, features] and bias [features].

    A submodule that only returns its params, so `CausalConv.__call__` and `CausalConv.step` share
    one param subtree and either may be the first to create it (a parent that only steps still inits).
    """

    features: int
    kernel_size: int
    use_bias: bool

    @nn.compact
    def __call__(self, d_in: int):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, d_in, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,)) if self.use_bias else None
        return kernel, bias


class CausalConv(nn.Module):
    """Dilated causal 1-D convolution (WaveNet's building block), in a parallel and a recurrent form.

    `__call__(x [B, T, C_in])` -> [B, T, features]; output t reads x[:, t - j*dilation] for
    j = 0..kernel_size-1 (zeros before the start), so it depends only on x[:, :t+1].

    Recurrent form with the same params: `init_queue(batch_size, d_in)` -> [B, P, d_in] zeros with
    P = (kernel_size-1)*dilation (the inputs the next step still needs), and
    `step(queue, x_t [B, C_in])` -> (queue, y_t [B, features]). `step(queue, x_t, t=t)` treats the same
    queue as a ring buffer indexed by the step number t (0 at the first step): it reads kernel_size-1
    rows and writes one, so a step costs O(kernel_size) instead of moving all P rows (Paine et al. 2016).
    Use one convention for a whole sequence; both start from `init_queue`'s zeros.
    """

    features: int
    kernel_size: int = 2
    dilation: int = 1
    use_bias: bool = True

    def setup(self):
        if self.kernel_size < 1 or self.dilation < 1:
            raise ValueError(f"CausalConv: kernel_size ({self.kernel_size}) and dilation ({self.dilation}) must be >= 1")
        self.conv = _Taps(self.features, self.kernel_size, self.use_bias)

    @property
    def padding(self) -> int:
        """How many past inputs an output reads beyond the current one: (kernel_size-1)*dilation."""
        return (self.kernel_size - 1) * self.dilation

    def init_queue(self, batch_size: int, d_in: int, dtype=jnp.float32):
        """Zeros [batch_size, padding, d_in]: the recurrent form's state before the first input."""
        return jnp.zeros((batch_size, self.padding, d_in), dtype)

    def __call__(self, x):
        kernel, bias = self.conv(x.shape[-1])
        xp = jnp.pad(x, ((0, 0), (self.padding, 0), (0, 0)))  # left padding only: causal
        y = lax.conv_general_dilated(xp, kernel.astype(x.dtype), window_strides=(1,), padding="VALID",
                                     rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"))
        return y if bias is None else y + bias.astype(y.dtype)

    def step(self, queue, x_t, t=None):
        kernel, bias = self.conv(x_t.shape[-1])
        K, d, P = self.kernel_size, self.dilation, self.padding
        if P == 0:
            taps, new_queue = x_t[:, None], queue
        elif t is None:
            window = jnp.concatenate([queue, x_t[:, None].astype(queue.dtype)], axis=1)  # [B, P+1, C]
            taps, new_queue = window[:, ::d], window[:, 1:]  # times t-(K-1)d, ..., t-d, t
        else:
            # ring slot of time s is s mod P; slot t mod P holds time t-P until overwritten below
            idx = jnp.mod(t - d * jnp.arange(K - 1, 0, -1), P)
            past = jnp.take(queue, idx, axis=1)  # [B, K-1, C], oldest first
            taps = jnp.concatenate([past, x_t[:, None].astype(queue.dtype)], axis=1)
            new_queue = lax.dynamic_update_index_in_dim(queue, x_t.astype(queue.dtype), jnp.mod(t, P), axis=1)
        y = jnp.einsum("bkc,kcf->bf", taps, kernel.astype(taps.dtype))
        return new_queue, (y if bias is None else y + bias.astype(y.dtype))
