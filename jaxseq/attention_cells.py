"""Step-wise attention for RNN decoders: a cell over a memory (Bahdanau et al. 2015; Luong et al. 2015).

    cell = AttentionCell(LSTM(d_in=E + M, d_hidden=H), d_memory=M, score="bahdanau")
    params = cell.init(key)
    bound = cell.bind(params, memory, memory_mask)             # memory [B, S, M], memory_mask bool [B, S]
    carry = cell.initial_carry((B,))
    carry, y = cell.step(bound, carry, x)                      # x [B, E] -> y [B, d_out]
    ys, carry = jaxseq.unroll(cell, bound, xs, mask=mask, carry=carry)    # xs [B, T, E]: teacher forcing

`bind` adds the memory (e.g. an encoder's states, or a CNN's spatial grid), its mask and its keys,
projected once, to the params: they are constants of the recurrence, not part of its carry, so a
scan over time neither copies them at every step nor keeps one copy per step for the backward pass.
The same bound params serve `step` for decoding (a decoder keeps `memory_of(bound)` in its decoding
state, where beam search reorders it like any other leaf). `cell` is any jaxseq cell (Elman, LSTM,
GRU, a Stack); the query is the hidden state of its top layer (`hidden_of`).

score="bahdanau" (additive; RNNsearch): the context of step t comes from the previous state,
    e_tj = v . tanh(W s_{t-1} + U m_j + b),  a_t = softmax_j e_t,  c_t = sum_j a_tj m_j
    s_t = cell(s_{t-1}, [x_t; c_t]),     y_t = [s_t; c_t]                  cell.d_in = E + M, d_out = H + M
score="dot" (h . m_j, needs M == H) or "general" (h . W m_j), Luong's multiplicative attention:
    h_t = cell(h_{t-1}, [x_t; h~_{t-1}]),  a_t = softmax_j score(h_t, m_j),  c_t = sum_j a_tj m_j
    h~_t = tanh(W_c [c_t; h_t]),           y_t = h~_t                       cell.d_in = E + H, d_out = H
    (input feeding: h~_{t-1} is part of the next input; with input_feeding=False, cell.d_in = E).

The carry is {"cell": the inner cell's carry} plus, with input feeding, {"feed": h~_{t-1} [B, H]}.
Masked memory positions get exactly zero weight (their scores are -inf before the softmax), so a
padded memory gives the same outputs as the unpadded one; a row with no valid memory position gets
all-zero weights and a zero context. `return_weights=True` makes `y` the pair (y, a_t [B, S]), which
`unroll` stacks to `[B, T, S]` for plotting.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxseq.cells import Stack
from jaxseq.errors import ConfigError, ShapeError

SCORES = ("bahdanau", "dot", "general")


def hidden_of(cell, carry):
    """The hidden state a cell's carry exposes as its output: the top layer's h ([*B, H])."""
    if isinstance(cell, Stack):
        return hidden_of(cell.cells[-1], carry[-1])
    return carry[0] if isinstance(carry, tuple) else carry  # LSTM (h, c) -> h


def masked_softmax(scores, mask):
    """Softmax over the last axis with masked entries exactly 0; an all-masked row gives all zeros.

    scores float [*B, S], mask bool [*B, S].
    """
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), jax.lax.stop_gradient(peak), 0.0)
    e = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def _uniform(key, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class AttentionCell:
    """`cell` with attention over a memory `[B, S, d_memory]` (see the module docstring).

    d_attention: width of Bahdanau's scoring MLP (None: the cell's hidden width); unused by Luong.
    """

    cell: Any
    d_memory: int
    score: str = "bahdanau"
    d_attention: int | None = None
    input_feeding: bool = True
    return_weights: bool = False

    def __post_init__(self):
        if self.score not in SCORES:
            raise ConfigError(f"AttentionCell.score must be one of {', '.join(SCORES)}, got {self.score!r}.")
        if not isinstance(self.d_memory, int) or self.d_memory < 1:
            raise ConfigError(f"AttentionCell.d_memory must be a positive int, got {self.d_memory!r}.")
        if self.score == "dot" and self.d_memory != self.d_hidden:
            raise ConfigError(
                f"score='dot' compares the decoder state (width {self.d_hidden}) with memory entries "
                f"(width {self.d_memory}); make them equal, or use score='general'."
            )
        if self.d_in < 1:
            raise ConfigError(
                f"AttentionCell: the inner cell's d_in={self.cell.d_in} must exceed the width it feeds "
                f"itself ({self.cell.d_in - self.d_in}: {self._fed_what()}); build it with "
                f"d_in = d_embed + {self.cell.d_in - self.d_in}."
            )

    def _fed_what(self) -> str:
        if self.score == "bahdanau":
            return "the context, d_memory"
        return "the attentional vector h~, d_hidden" if self.input_feeding else "nothing"

    @property
    def d_hidden(self) -> int:
        return self.cell.d_out

    @property
    def d_in(self) -> int:
        """Width of the x this cell takes (the inner cell's input less what attention feeds it)."""
        if self.score == "bahdanau":
            return self.cell.d_in - self.d_memory
        return self.cell.d_in - (self.d_hidden if self.input_feeding else 0)

    @property
    def d_out(self) -> int:
        return self.d_hidden + self.d_memory if self.score == "bahdanau" else self.d_hidden

    def init(self, key):
        k_cell, k1, k2, k3 = jax.random.split(key, 4)
        H, M = self.d_hidden, self.d_memory
        dtype = jax.tree.leaves(self.cell.initial_carry(()))[0].dtype
        params = {"cell": self.cell.init(k_cell)}
        if self.score == "bahdanau":
            A = self.d_attention or H
            params.update(w_query=_uniform(k1, (H, A), H, dtype), w_key=_uniform(k2, (M, A), M, dtype),
                          b_key=jnp.zeros((A,), dtype), v=_uniform(k3, (A,), A, dtype))
        else:
            if self.score == "general":
                params["w_key"] = _uniform(k1, (M, H), M, dtype)
            params["w_out"] = _uniform(k2, (M + H, H), M + H, dtype)  # W_c over [c_t; h_t]
        return params

    def initial_carry(self, batch_shape=(), dtype=None):
        carry = {"cell": self.cell.initial_carry(batch_shape, dtype)}
        if self.score != "bahdanau" and self.input_feeding:
            leaf = jax.tree.leaves(carry["cell"])[0]
            carry["feed"] = jnp.zeros((*batch_shape, self.d_hidden), leaf.dtype)
        return carry

    def bind(self, params, memory, memory_mask=None):
        """params plus the memory it attends over: {"memory" [B, S, M], "mask" bool [B, S], "keys" [B, S, K]}.

        memory_mask None: every position is valid. The keys (U m_j + b for Bahdanau, W m_j for "general")
        are computed here, once per memory.
        """
        if memory.ndim != 3 or memory.shape[-1] != self.d_memory:
            raise ShapeError(f"memory must be [batch, length, d_memory={self.d_memory}], got shape {memory.shape}.")
        B, S, _ = memory.shape
        if memory_mask is None:
            memory_mask = jnp.ones((B, S), bool)
        elif memory_mask.shape != (B, S):
            raise ShapeError(f"memory_mask has shape {memory_mask.shape}; it must be [batch, length] = {(B, S)}.")
        keys = memory
        if self.score == "bahdanau":
            keys = memory @ params["w_key"] + params["b_key"]
        elif self.score == "general":
            keys = memory @ params["w_key"]  # so the score is h . keys_j
        return {**params, "memory": memory, "keys": keys, "mask": memory_mask.astype(bool)}

    @staticmethod
    def memory_of(bound) -> dict:
        """The per-row part of bound params, {"memory", "keys", "mask"} (leaves [B, ...]): a decoding state's."""
        return {k: bound[k] for k in ("memory", "keys", "mask")}

    @staticmethod
    def _attend(scores, params):
        weights = masked_softmax(scores, params["mask"])  # [B, S]
        context = jnp.einsum("bs,bsm->bm", weights, params["memory"])
        return weights, context

    def step(self, params, carry, x):
        if "memory" not in params:
            raise ConfigError("an AttentionCell steps with params bound to a memory: cell.bind(params, memory, mask).")
        if x.shape[-1] != self.d_in:
            raise ShapeError(f"AttentionCell.step got x with last axis {x.shape[-1]}, expected d_in={self.d_in}.")
        new = dict(carry)
        if self.score == "bahdanau":
            query = hidden_of(self.cell, carry["cell"]) @ params["w_query"]  # W s_{t-1}: [B, A]
            scores = jnp.tanh(params["keys"] + query[:, None, :]) @ params["v"]  # [B, S]
            weights, context = self._attend(scores, params)
            new["cell"], h = self.cell.step(params["cell"], carry["cell"], jnp.concatenate([x, context], -1))
            y = jnp.concatenate([h, context], -1)
        else:
            inputs = jnp.concatenate([x, carry["feed"]], -1) if self.input_feeding else x
            new["cell"], h = self.cell.step(params["cell"], carry["cell"], inputs)
            scores = jnp.einsum("bh,bsh->bs", h, params["keys"])
            weights, context = self._attend(scores, params)
            y = jnp.tanh(jnp.concatenate([context, h], -1) @ params["w_out"])
            if self.input_feeding:
                new["feed"] = y
        return new, ((y, weights) if self.return_weights else y)
