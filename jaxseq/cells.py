"""Recurrent cells as pure functions.

A cell is a frozen, hashable dataclass whose fields are its hyperparameters, so it
doubles as config and can be a static argument of `jit`:

    cell = LSTM(d_in=64, d_hidden=256)
    params = cell.init(key)                          # plain dict of arrays
    carry = cell.initial_carry(batch_shape=(B,))
    carry, y = cell.step(params, carry, x)           # x: [*B, d_in] -> y: [*B, d_out]

Weights follow PyTorch's `nn.RNN` / `nn.LSTM` / `nn.GRU` (gate order LSTM i, f, g, o;
GRU r, z, n with the reset gate applied to `W_hn h + b_hn`), stored transposed so the
hot matmul is `x @ w`: `w_ih = weight_ih_l0.T` ([d_in, G*H]), `w_hh = weight_hh_l0.T`
([H, G*H]), `b_ih`, `b_hh` ([G*H]). The initialisation is PyTorch's too:
U(-1/sqrt(H), 1/sqrt(H)) for every tensor.

Combinators take cells and return cells: `Stack` (layers, optional residual
connections and dropout between layers) and `Bidirectional` (which can be unrolled
but not stepped: its backward half needs the future).

`step` is each cell's definition; faster whole-sequence forms of the same math live in
`jaxseq.kernels` and `jaxseq.unroll` chooses among them (this module imports none).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxseq.errors import ConfigError, ShapeError

Params = dict[str, Any]


def _uniform(key, shape, bound, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class _GatedCell:
    """Shared parameter layout of Elman, LSTM and GRU: `num_gates` blocks of width d_hidden."""

    d_in: int
    d_hidden: int
    dtype: Any = jnp.float32

    num_gates = 1

    def __post_init__(self):
        for name in ("d_in", "d_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}.")

    @property
    def d_out(self) -> int:
        return self.d_hidden

    def init(self, key) -> Params:
        g = self.num_gates * self.d_hidden
        bound = 1.0 / math.sqrt(self.d_hidden)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        return {
            "w_ih": _uniform(k1, (self.d_in, g), bound, self.dtype),
            "w_hh": _uniform(k2, (self.d_hidden, g), bound, self.dtype),
            "b_ih": _uniform(k3, (g,), bound, self.dtype),
            "b_hh": _uniform(k4, (g,), bound, self.dtype),
        }

    def initial_carry(self, batch_shape=(), dtype=None):
        return jnp.zeros((*batch_shape, self.d_hidden), dtype or self.dtype)

    def _check_input(self, x):
        if x.shape[-1] != self.d_in:
            raise ShapeError(
                f"{type(self).__name__}.step got x with last axis {x.shape[-1]}, expected d_in={self.d_in}."
            )


@dataclasses.dataclass(frozen=True)
class Elman(_GatedCell):
    """Elman RNN: h' = act(x W_ih + b_ih + h W_hh + b_hh). Carry: h [*B, H]."""

    nonlinearity: Literal["tanh", "relu"] = "tanh"

    def __post_init__(self):
        super().__post_init__()
        if self.nonlinearity not in ("tanh", "relu"):
            raise ConfigError(f"Elman.nonlinearity must be 'tanh' or 'relu', got {self.nonlinearity!r}.")

    def step(self, params, h, x):
        self._check_input(x)
        z = x @ params["w_ih"] + params["b_ih"] + h @ params["w_hh"] + params["b_hh"]
        h = jnp.tanh(z) if self.nonlinearity == "tanh" else jax.nn.relu(z)
        return h, h


@dataclasses.dataclass(frozen=True)
class LSTM(_GatedCell):
    """LSTM with PyTorch's gate order i, f, g, o. Carry: (h, c), each [*B, H]; output h."""

    num_gates = 4

    def initial_carry(self, batch_shape=(), dtype=None):
        h = super().initial_carry(batch_shape, dtype)
        return (h, h)

    def step(self, params, carry, x):
        self._check_input(x)
        h, c = carry
        z = x @ params["w_ih"] + params["b_ih"] + h @ params["w_hh"] + params["b_hh"]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h


@dataclasses.dataclass(frozen=True)
class GRU(_GatedCell):
    """GRU as in PyTorch: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) n + z h."""

    num_gates = 3

    def step(self, params, h, x):
        self._check_input(x)
        gx = x @ params["w_ih"] + params["b_ih"]
        gh = h @ params["w_hh"] + params["b_hh"]
        xr, xz, xn = jnp.split(gx, 3, axis=-1)
        hr, hz, hn = jnp.split(gh, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return h, h


@dataclasses.dataclass(frozen=True)
class Stack:
    """Layers applied in order at every step. Carry: tuple of the layers' carries.

    `residual=True` adds each layer's input to its output where the widths agree.
    `dropout` is applied to the outputs of every layer but the last (as in PyTorch's
    `num_layers > 1`); it acts only in `unroll(..., key=...)` (training), which runs
    the stack layer by layer; `step` is the inference form and never drops.
    """

    cells: tuple
    residual: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if not self.cells:
            raise ConfigError("Stack needs at least one cell.")
        for i, (below, above) in enumerate(zip(self.cells, self.cells[1:])):
            if below.d_out != above.d_in:
                raise ConfigError(
                    f"Stack: layer {i} ({type(below).__name__}) outputs width {below.d_out} but layer {i + 1} "
                    f"({type(above).__name__}) has d_in={above.d_in}; build layer {i + 1} with d_in={below.d_out}."
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Stack.dropout must be in [0, 1), got {self.dropout}.")

    @property
    def d_in(self) -> int:
        return self.cells[0].d_in

    @property
    def d_out(self) -> int:
        return self.cells[-1].d_out

    def init(self, key) -> Params:
        keys = jax.random.split(key, len(self.cells))
        return {f"layer_{i}": cell.init(k) for i, (cell, k) in enumerate(zip(self.cells, keys))}

    def initial_carry(self, batch_shape=(), dtype=None):
        return tuple(cell.initial_carry(batch_shape, dtype) for cell in self.cells)

    def uses_residual(self, i: int) -> bool:
        cell = self.cells[i]
        return self.residual and cell.d_in == cell.d_out

    def step(self, params, carry, x):
        new_carry = []
        for i, (cell, c) in enumerate(zip(self.cells, carry)):
            c, y = cell.step(params[f"layer_{i}"], c, x)
            x = x + y if self.uses_residual(i) else y
            new_carry.append(c)
        return tuple(new_carry), x


@dataclasses.dataclass(frozen=True)
class Bidirectional:
    """A forward and a backward cell over the same input; outputs concatenated [fwd, bwd].

    Carry: (forward carry, backward carry). With a right-padded mask the backward
    cell runs over each row's valid part only (see `jaxseq.unroll`).
    """

    forward: Any
    backward: Any

    def __post_init__(self):
        if self.forward.d_in != self.backward.d_in:
            raise ConfigError("Bidirectional: forward and backward cells must share d_in.")

    @property
    def d_in(self) -> int:
        return self.forward.d_in

    @property
    def d_out(self) -> int:
        return self.forward.d_out + self.backward.d_out

    def init(self, key) -> Params:
        kf, kb = jax.random.split(key)
        return {"forward": self.forward.init(kf), "backward": self.backward.init(kb)}

    def initial_carry(self, batch_shape=(), dtype=None):
        return (self.forward.initial_carry(batch_shape, dtype), self.backward.initial_carry(batch_shape, dtype))

    def step(self, params, carry, x):
        raise ConfigError(
            "A Bidirectional cell cannot be stepped one token at a time: its backward half reads the "
            "future. Run it over whole sequences with jaxseq.unroll."
        )


def stack(cells, *, residual: bool = False, dropout: float = 0.0) -> Stack:
    """Stack cells into one cell (see `Stack`)."""
    return Stack(tuple(cells), residual=residual, dropout=dropout)


def bidirectional(forward, backward=None) -> Bidirectional:
    """Bidirectional wrapper; `backward` defaults to a copy of `forward` (own parameters)."""
    return Bidirectional(forward, backward if backward is not None else forward)


def make_cell(kind: str, d_in: int, d_hidden: int, *, num_layers: int = 1, residual: bool = False,
              dropout: float = 0.0, nonlinearity: str = "tanh"):
    """Build a (stacked) cell by name: 'rnn' (Elman), 'lstm', 'gru'."""
    def one(d):
        if kind == "rnn":
            return Elman(d, d_hidden, nonlinearity=nonlinearity)
        if kind == "lstm":
            return LSTM(d, d_hidden)
        if kind == "gru":
            return GRU(d, d_hidden)
        raise ConfigError(f"unknown cell kind {kind!r}; expected one of 'rnn', 'lstm', 'gru'.")

    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}.")
    cells = [one(d_in)] + [one(d_hidden) for _ in range(num_layers - 1)]
    return cells[0] if num_layers == 1 else stack(cells, residual=residual, dropout=dropout)
