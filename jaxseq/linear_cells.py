"""Linear recurrences that train with a parallel scan: minGRU, minLSTM, LRU.

Each cell follows the Cell protocol of `jaxseq.cells` (frozen dataclass; `init`,
`initial_carry`, `step`, `d_out`). Its hidden state obeys a diagonal linear recurrence
whose coefficients depend on the input only,

    h_t = a_t * h_{t-1} + b_t,        a_t, b_t = f(x_t),

and each cell exposes the pure pieces of that map (`coefficients` for minGRU/minLSTM;
`eigenvalues`, `inputs` and `readout` for the LRU), from which
`jaxseq.kernels.parallel_scan` runs the whole sequence as one associative scan when
`jaxseq.unroll` picks it. `step` is the definition (and the generation form).

Every cell takes `norm=True` to RMS-normalise its input (learned scale) before the
projections: with `Stack(residual=True)` that gives the pre-norm residual blocks
x + cell(norm(x)) in which the papers stack these layers (`make_linear_cell(block=True)`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxseq.cells import Params, stack
from jaxseq.errors import ConfigError, ShapeError


# --------------------------------------------------------------------------- shared parts


def g(x):
    """minGRU/minLSTM's candidate activation: x + 1/2 for x >= 0, sigmoid(x) below (continuous, positive)."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def log_g(x):
    """log g(x), as in the paper's log-space scan (kept for users of that form)."""
    return jnp.where(x >= 0, jnp.log(jax.nn.relu(x) + 0.5), -jax.nn.softplus(-x))


def _rms_norm(x, scale, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * scale


def _check_positive(cell, *names):
    for name in names:
        value = getattr(cell, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{type(cell).__name__}.{name} must be a positive int, got {value!r}.")


def _check_input(cell, x):
    if x.shape[-1] != cell.d_in:
        raise ShapeError(f"{type(cell).__name__} got x with last axis {x.shape[-1]}, expected d_in={cell.d_in}.")


def _flat_matmul(x, w):
    """x [..., d] @ w, flattened to 2-D first (3-D matmuls hit a slow XLA path on CPU, DESIGN.md)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


@dataclasses.dataclass(frozen=True)
class _MinCell:
    """Shared layout of minGRU and minLSTM: one input projection `w` [d_in, G*H], `b` [G*H]."""

    d_in: int
    d_hidden: int
    norm: bool = False
    dtype: Any = jnp.float32

    num_gates = 2

    def __post_init__(self):
        _check_positive(self, "d_in", "d_hidden")

    @property
    def d_out(self) -> int:
        return self.d_hidden

    def init(self, key) -> Params:
        # PyTorch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1.0 / math.sqrt(self.d_in)
        kw, kb = jax.random.split(key)
        g_width = self.num_gates * self.d_hidden
        params = {
            "w": jax.random.uniform(kw, (self.d_in, g_width), self.dtype, -bound, bound),
            "b": jax.random.uniform(kb, (g_width,), self.dtype, -bound, bound),
        }
        if self.norm:
            params["norm_scale"] = jnp.ones((self.d_in,), self.dtype)
        return params

    def initial_carry(self, batch_shape=(), dtype=None):
        # Zeros: the linear-space scan (jaxseq.kernels.parallel_scan) needs no positive h_0 (the log-space one would).
        return jnp.zeros((*batch_shape, self.d_hidden), dtype or self.dtype)

    def _project(self, params, x):
        if self.norm:
            x = _rms_norm(x, params["norm_scale"])
        return _flat_matmul(x, params["w"]) + params["b"]

    def coefficients(self, params, x):
        """(a, b) of h' = a h + b for inputs x [..., d_in]; each [..., H]."""
        raise NotImplementedError

    def step(self, params, h, x):
        """h [*B, H], x [*B, d_in] -> (h', y = h'), the sequential (generation) form."""
        _check_input(self, x)
        a, b = self.coefficients(params, x)
        h = a * h + b
        return h, h


@dataclasses.dataclass(frozen=True)
class MinGRU(_MinCell):
    """minGRU (Feng et al. 2024): z = sigmoid(W_z x), h~ = g(W_h x), h' = (1 - z) h + z h~.

    Params: w [d_in, 2H] (blocks z, h~), b [2H] (+ norm_scale [d_in] with norm=True).
    Carry: h [*B, H]; output y = h.
    """

    num_gates = 2

    def coefficients(self, params, x):
        k_z, k_h = jnp.split(self._project(params, x), 2, axis=-1)
        # 1 - sigmoid(k) = sigmoid(-k): no cancellation when z is close to 1.
        return jax.nn.sigmoid(-k_z), jax.nn.sigmoid(k_z) * g(k_h)


@dataclasses.dataclass(frozen=True)
class MinLSTM(_MinCell):
    """minLSTM (Feng et al. 2024): f, i = sigmoid(W_f x), sigmoid(W_i x), normalised to
    f' = f / (f + i), i' = i / (f + i); h~ = g(W_h x); h' = f' h + i' h~.

    f' = sigmoid(log f - log i) and i' = 1 - f' = sigmoid(log i - log f), with
    log sigmoid(k) = -softplus(-k): stable for any gate pre-activations.
    Params: w [d_in, 3H] (blocks f, i, h~), b [3H]. Carry: h [*B, H]; output y = h.
    """

    num_gates = 3

    def coefficients(self, params, x):
        k_f, k_i, k_h = jnp.split(self._project(params, x), 3, axis=-1)
        d = jax.nn.softplus(-k_i) - jax.nn.softplus(-k_f)  # log f - log i
        return jax.nn.sigmoid(d), jax.nn.sigmoid(-d) * g(k_h)


@dataclasses.dataclass(frozen=True)
class LRU:
    """Linear Recurrent Unit (Orvieto et al. 2023), one layer.

        h_t = lambda * h_{t-1} + gamma * (B x_t)      (complex, diagonal, state size N = d_hidden)
        y_t = Re(C h_t) + D * x_t                      (width d_out = d_in, the model width)

    lambda = exp(-exp(nu_log) + i exp(theta_log)) keeps |lambda| < 1 for any nu_log;
    gamma = exp(gamma_log) is initialised to sqrt(1 - |lambda|^2) so a white-noise input
    keeps unit state variance. Initialisation as in the paper: |lambda| uniform on the
    ring [r_min, r_max] (uniform in area), phase uniform in [0, max_phase];
    B ~ N(0, 1/(2 d_in)) (real and imaginary parts), C ~ N(0, 1/N), D ~ N(0, 1).
    The defaults (r_min 0.4, r_max 0.99, max_phase 2 pi) are ours: r_max < 1 keeps the
    init away from the gamma = 0 edge; the paper uses r_min near 0.9 and max_phase pi/10
    for its longest tasks.

    Carry: (re, im), two float32 arrays [*B, N], not a complex64 array, so that every
    carry in jaxseq is real (checkpoints, sharding, decoding states and the float dtype
    that `unroll` passes to `initial_carry` need no special case). Arithmetic is complex64.

    With `glu=True` the output goes through the paper's block nonlinearity,
    y = (W_a u + b_a) * sigmoid(W_g u + b_g) with u = gelu(Re(C h) + D x); without it a
    stack of LRUs is one linear map. `norm=True` RMS-normalises x first.
    """

    d_in: int
    d_hidden: int
    r_min: float = 0.4
    r_max: float = 0.99
    max_phase: float = 2 * math.pi
    norm: bool = False
    glu: bool = False
    dtype: Any = jnp.float32

    def __post_init__(self):
        _check_positive(self, "d_in", "d_hidden")
        if not 0.0 <= self.r_min < self.r_max < 1.0:
            raise ConfigError(
                f"LRU needs 0 <= r_min < r_max < 1 (eigenvalue moduli of a stable recurrence), "
                f"got r_min={self.r_min}, r_max={self.r_max}."
            )
        if not self.max_phase > 0:
            raise ConfigError(f"LRU.max_phase must be > 0, got {self.max_phase}.")

    @property
    def d_out(self) -> int:
        return self.d_in

    def init(self, key) -> Params:
        n, d = self.d_hidden, self.d_in
        k_u1, k_u2, k_bre, k_bim, k_cre, k_cim, k_d, k_glu = jax.random.split(key, 8)
        # Open interval: u1 = 0 with r_min = 0 would give |lambda| = 0 and nu_log = +inf.
        u1 = jax.random.uniform(k_u1, (n,), self.dtype, minval=1e-6)
        u2 = jax.random.uniform(k_u2, (n,), self.dtype)
        r2 = u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2  # |lambda|^2
        nu_log = jnp.log(-0.5 * jnp.log(r2))
        theta_log = jnp.log(self.max_phase * u2 + 1e-12)
        params = {
            "nu_log": nu_log,
            "theta_log": theta_log,
            "gamma_log": 0.5 * jnp.log1p(-r2),
            "B_re": jax.random.normal(k_bre, (d, n), self.dtype) / math.sqrt(2 * d),
            "B_im": jax.random.normal(k_bim, (d, n), self.dtype) / math.sqrt(2 * d),
            "C_re": jax.random.normal(k_cre, (n, d), self.dtype) / math.sqrt(n),
            "C_im": jax.random.normal(k_cim, (n, d), self.dtype) / math.sqrt(n),
            "D": jax.random.normal(k_d, (d,), self.dtype),
        }
        if self.norm:
            params["norm_scale"] = jnp.ones((d,), self.dtype)
        if self.glu:
            bound = 1.0 / math.sqrt(d)
            kw, kb = jax.random.split(k_glu)
            params["glu_w"] = jax.random.uniform(kw, (d, 2 * d), self.dtype, -bound, bound)
            params["glu_b"] = jax.random.uniform(kb, (2 * d,), self.dtype, -bound, bound)
        return params

    def initial_carry(self, batch_shape=(), dtype=None):
        zeros = jnp.zeros((*batch_shape, self.d_hidden), dtype or self.dtype)
        return (zeros, zeros)

    def eigenvalues(self, params):
        """lambda [N] complex."""
        return jnp.exp(-jnp.exp(params["nu_log"]) + 1j * jnp.exp(params["theta_log"]))

    def inputs(self, params, x):
        """gamma * (B x) [..., N] complex, from x [..., d_in]."""
        if self.norm:
            x = _rms_norm(x, params["norm_scale"])
        gamma = jnp.exp(params["gamma_log"])
        bx = jax.lax.complex(_flat_matmul(x, params["B_re"]), _flat_matmul(x, params["B_im"]))
        return bx * gamma

    def readout(self, params, h, x):
        """Re(C h) + D x [..., d_in] (then the GLU) from h [..., N] complex and x [..., d_in]."""
        # Re((C_re + i C_im) h) = C_re Re h - C_im Im h; h @ C in our [N, d] layout.
        y = _flat_matmul(h.real, params["C_re"]) - _flat_matmul(h.imag, params["C_im"]) + params["D"] * x
        if self.glu:
            u = _flat_matmul(jax.nn.gelu(y), params["glu_w"]) + params["glu_b"]
            val, gate = jnp.split(u, 2, axis=-1)
            y = val * jax.nn.sigmoid(gate)
        return y

    def step(self, params, carry, x):
        """carry (re, im) [*B, N], x [*B, d_in] -> (carry', y [*B, d_in])."""
        _check_input(self, x)
        h = jax.lax.complex(*carry)
        h = self.eigenvalues(params) * h + self.inputs(params, x)
        return (h.real, h.imag), self.readout(params, h, x)


LINEAR_CELLS = {"mingru": MinGRU, "minlstm": MinLSTM, "lru": LRU}


def make_linear_cell(kind: str, d_in: int, d_hidden: int, *, num_layers: int = 1, residual: bool = False,
                     dropout: float = 0.0, block: bool = False):
    """Build a (stacked) linear-recurrence cell by name: 'mingru', 'minlstm', 'lru'.

    minGRU/minLSTM layers map d_in -> d_hidden (then d_hidden -> d_hidden); LRU layers keep
    the width d_in and use d_hidden as the state size. `block=True` turns each layer into
    the papers' block: input RMS norm (and the GELU-GLU output for the LRU); with
    `residual=True` the stack is then x + cell(norm(x)) per layer, as in Feng et al. and
    Orvieto et al. (who also add an MLP per block, left out here).
    """
    if kind not in LINEAR_CELLS:
        raise ConfigError(f"unknown linear cell kind {kind!r}; expected one of {', '.join(map(repr, LINEAR_CELLS))}.")
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}.")
    if kind == "lru":
        cells = [LRU(d_in, d_hidden, norm=block, glu=block) for _ in range(num_layers)]
    else:
        cls = LINEAR_CELLS[kind]
        cells = [cls(d_in, d_hidden, norm=block)] + [cls(d_hidden, d_hidden, norm=block) for _ in range(num_layers - 1)]
    return cells[0] if num_layers == 1 else stack(cells, residual=residual, dropout=dropout)
