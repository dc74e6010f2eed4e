"""ActorCritic: a recurrent policy. Observation encoder -> any jaxseq cell (or a feed-forward core) -> logits, value.

    core = make_core("lstm", d_hidden=64)                    # rnn, lstm, gru, mingru, minlstm, lru, ff
    model = ActorCritic(num_actions=2, core=core)
    variables = model.init(key, obs, resets)                 # obs [B, T, *obs_shape], resets [B, T] bool
    logits, values, carry = model.apply(variables, obs, resets, carry)      # parallel form (learning)
    carry = model.apply(variables, B, method="init_state")
    carry, logits_t, value_t = model.apply(variables, carry, obs_t, reset_t, method="step")   # acting

`resets[b, t]` (and `reset_t`) marks the first observation of an episode: the core's carry goes back to
zeros before that step, so a rollout that spans several episodes is one sequence. The parallel form
starts from `carry` (the carry stored at the start of a training chunk; zeros when None) and runs
through `jaxseq.unroll`; stepping it one observation at a time gives the same numbers (tests/test_policy.py).

The feed-forward core ("ff") is a memoryless cell (carry `()`) of two tanh layers whose width is chosen to
match a GRU's parameter count, the comparison that tells memory apart from capacity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseq.cells import make_cell
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.linear_cells import LINEAR_CELLS, make_linear_cell
from jaxseq.nn import Recurrent

CORES = ("rnn", "lstm", "gru", "mingru", "minlstm", "lru", "ff")


@dataclasses.dataclass(frozen=True)
class FeedForward:
    """A cell without memory: y = tanh(tanh(x W1 + b1) W2 + b2). Carry: () (nothing is kept)."""

    d_in: int
    d_hidden: int
    d_ff: int

    @property
    def d_out(self) -> int:
        return self.d_hidden

    def init(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        b1, b2 = 1.0 / math.sqrt(self.d_in), 1.0 / math.sqrt(self.d_ff)  # PyTorch nn.Linear's default
        return {"w1": jax.random.uniform(k1, (self.d_in, self.d_ff), jnp.float32, -b1, b1),
                "b1": jax.random.uniform(k2, (self.d_ff,), jnp.float32, -b1, b1),
                "w2": jax.random.uniform(k3, (self.d_ff, self.d_hidden), jnp.float32, -b2, b2),
                "b2": jax.random.uniform(k4, (self.d_hidden,), jnp.float32, -b2, b2)}

    def initial_carry(self, batch_shape=(), dtype=None):
        return ()

    def step(self, params, carry, x):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return carry, jnp.tanh(h @ params["w2"] + params["b2"])


@dataclasses.dataclass(frozen=True)
class ZeroOnReset:
    """`cell` whose input carries one more feature, a reset flag (last axis): where it is > 0.5 the carry is
    zeroed before the step.

    Why not `unroll(..., resets=)`: that restarts the carry to the one the unroll began with, which for a
    training chunk is the carry stored mid-episode; a new episode must start from zeros.
    """

    cell: Any

    d_in = property(lambda self: self.cell.d_in + 1)
    d_out = property(lambda self: self.cell.d_out)

    def init(self, key):
        return self.cell.init(key)

    def initial_carry(self, batch_shape=(), dtype=None):
        return self.cell.initial_carry(batch_shape, dtype)

    def step(self, params, carry, x):
        reset = x[..., -1] > 0.5  # [*B]
        zero = self.cell.initial_carry(reset.shape)

        def pick(z, c):
            return jnp.where(reset.reshape(reset.shape + (1,) * (c.ndim - reset.ndim)), z.astype(c.dtype), c)

        return self.cell.step(params, jax.tree.map(pick, zero, carry), x[..., :-1])


def ff_width(d_in: int, d_hidden: int) -> int:
    """Hidden width of a FeedForward core with about the parameters of GRU(d_in, d_hidden)."""
    gru = 3 * (d_in * d_hidden + d_hidden * d_hidden + 2 * d_hidden)
    return max(1, round((gru - d_hidden) / (d_in + 1 + d_hidden)))


def make_core(kind: str, d_hidden: int, d_in: int | None = None):
    """The policy's core by name (one of CORES), mapping d_in (default d_hidden) -> d_hidden features."""
    d_in = d_hidden if d_in is None else d_in
    if kind == "ff":
        return FeedForward(d_in, d_hidden, ff_width(d_in, d_hidden))
    if kind in LINEAR_CELLS:
        return make_linear_cell(kind, d_in, d_hidden)
    if kind in ("rnn", "lstm", "gru"):
        return make_cell(kind, d_in, d_hidden)
    raise ConfigError(f"unknown policy core {kind!r}; choose one of {', '.join(CORES)}.")


def param_count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


class ActorCritic(nn.Module):
    """Encoder Dense(core.d_in)+tanh -> core -> actor MLP (logits [A]) and critic MLP (value []).

    __call__(obs [B, T, *obs_shape], resets [B, T] bool, carry=None) -> (logits [B, T, A], values [B, T], carry)
    init_state(batch_size) -> carry (zeros)
    step(carry, obs [B, *obs_shape], reset [B] bool) -> (carry, logits [B, A], value [B])
    """

    num_actions: int
    core: Any
    d_head: int = 64

    def setup(self):
        ortho = nn.initializers.orthogonal
        self.encoder = nn.Dense(self.core.d_in, kernel_init=ortho(math.sqrt(2)))
        # The reference `unroll` of the wrapped cell (the kernels table knows no ZeroOnReset).
        self.rnn = Recurrent(ZeroOnReset(self.core))
        self.actor_hidden = nn.Dense(self.d_head, kernel_init=ortho(math.sqrt(2)))
        self.actor_out = nn.Dense(self.num_actions, kernel_init=ortho(0.01))  # near-uniform first policy
        self.critic_hidden = nn.Dense(self.d_head, kernel_init=ortho(math.sqrt(2)))
        self.critic_out = nn.Dense(1, kernel_init=ortho(1.0))

    def _inputs(self, obs, resets, lead: int):
        if resets.shape != obs.shape[:lead]:
            raise ShapeError(f"resets has shape {tuple(resets.shape)}, expected {tuple(obs.shape[:lead])} "
                             f"(the leading axes of obs {tuple(obs.shape)}).")
        x = jnp.tanh(self.encoder(obs.reshape(*obs.shape[:lead], -1).astype(jnp.float32)))
        return jnp.concatenate([x, resets[..., None].astype(x.dtype)], axis=-1)

    def _heads(self, y):
        logits = self.actor_out(jnp.tanh(self.actor_hidden(y)))
        value = self.critic_out(jnp.tanh(self.critic_hidden(y)))[..., 0]
        return logits, value

    def __call__(self, obs, resets, carry=None):
        if obs.ndim < 3:
            raise ShapeError(f"obs must be [batch, steps, *obs_shape], got shape {tuple(obs.shape)}.")
        ys, carry = self.rnn(self._inputs(obs, resets, 2), carry=carry)
        logits, values = self._heads(ys)
        return logits, values, carry

    def init_state(self, batch_size: int):
        return self.core.initial_carry((batch_size,), jnp.float32)

    def step(self, carry, obs, reset):
        if obs.ndim < 2:
            raise ShapeError(f"obs must be [batch, *obs_shape], got shape {tuple(obs.shape)}.")
        carry, y = self.rnn.step(carry, self._inputs(obs, reset, 1))
        logits, value = self._heads(y)
        return carry, logits, value
