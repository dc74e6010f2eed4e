"""A Transformer's dense layers and LayerNorms on the native CPU kernels (`jaxseq/native/dense_cpu.cc`,
`layernorm_cpu.cc`), and the `Dense` and `LayerNorm` modules that use them.

`native_dense(x, kernel, bias, gelu)` computes `act(x @ kernel + bias)` for float32 x [M, K] and kernel
[K, N] (K and N multiples of 32) as one XLA FFI call, its backward (dx, dkernel, dbias, through the
GELU) as another. The GELU is the tanh approximation (GPT-2's "gelu_new", `jax.nn.gelu(approximate=
True)`). `native_layer_norm(x, scale, bias, eps)` normalises float32 x [M, D] (D a multiple of 16) over
its last axis, forward and backward likewise. Both are tested against float64 NumPy references,
gradients included (tests/test_native_layers.py).

`Dense` and `LayerNorm` are drop-ins for `flax.linen.Dense` and `flax.linen.LayerNorm` (the same
parameters, "kernel" [K, N] and "bias" [N], "scale" and "bias" [D], and initialisers; `Dense` adds an
optional fused activation). They run the native kernels when eligible (a single-device CPU, float32, the
sizes above, at least NATIVE_MIN_ROWS rows once the leading axes are flattened) and XLA otherwise, with
the same numbers to float32 rounding. The Transformers' layers use them. Like the native attention
kernel, the native path differentiates in reverse mode only (custom VJPs): forward-mode AD (`jax.jvp`,
`jax.hessian`) through a Transformer on CPU needs `JAXSEQ_NATIVE=0`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import native
from jaxseq.errors import ConfigError

# Fewer rows than this (a decoding step's batch, say) stay in XLA: there the dense kernel, which packs
# the whole weight matrix on every call, and XLA's matmul were about even (0.85x-1.56x at 16-128 rows,
# forward + backward, K and N 128-512; noisy), and XLA keeps the decoding loop's ops in one program.
NATIVE_MIN_ROWS = 128
ACTIVATIONS = (None, "gelu_tanh")


def dense_eligible(x, kernel) -> bool:
    """Static conditions for the native kernel: the CPU backend with one device (a sharded program keeps
    XLA's matmul, which XLA can partition), float32 x [M, K] and kernel [K, N] with K and N multiples of
    32 and M >= NATIVE_MIN_ROWS, and the kernels built."""
    if not native.on_single_cpu():
        return False
    if x.ndim != 2 or kernel.ndim != 2 or x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        return False
    M, K = x.shape
    return M >= NATIVE_MIN_ROWS and K % 32 == 0 and kernel.shape[1] % 32 == 0 and native.available()


def _dense_call(x, kernel, bias, gelu, keep_pre):
    """y, or (y, pre) with keep_pre: the GELU's input, which only its backward needs."""
    shape = native.f32(x.shape[0], kernel.shape[1])
    if keep_pre:
        return native.call("jaxseq_dense_fwd_train", (shape, shape), x, kernel, bias, gelu=gelu)
    return native.call("jaxseq_dense_fwd", shape, x, kernel, bias, gelu=gelu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense(x, kernel, bias, gelu):
    return _dense_call(x, kernel, bias, gelu, keep_pre=False)


def _dense_fwd(x, kernel, bias, gelu):
    if not gelu:
        return _dense_call(x, kernel, bias, gelu, keep_pre=False), (x, kernel, None)
    y, pre = _dense_call(x, kernel, bias, gelu, keep_pre=True)
    return y, (x, kernel, pre)


def _dense_bwd(gelu, res, dy):
    x, kernel, pre = res
    dy = dy.astype(jnp.float32)
    outs = (native.f32(*x.shape), native.f32(*kernel.shape), native.f32(kernel.shape[1]))
    # Without the GELU the kernel never reads `pre`; dy stands in, so y need not outlive the forward.
    dx, dkernel, dbias = native.call("jaxseq_dense_bwd", outs, x, kernel, dy if pre is None else pre, dy, gelu=gelu)
    return dx, dkernel, dbias


_dense.defvjp(_dense_fwd, _dense_bwd)


def native_dense(x, kernel, bias=None, *, gelu: bool = False):
    """act(x @ kernel + bias) on the native CPU kernel (check `dense_eligible` first).

    Args:
      x: [M, K] float32.  kernel: [K, N] float32, K and N multiples of 32.  bias: [N] or None.
      gelu: apply the tanh-approximate GELU to the result.

    Returns:
      [M, N] float32.
    """
    if not native.available():
        raise RuntimeError(f"jaxseq's native dense kernel is unavailable: {native.unavailable_reason()}")
    if x.ndim != 2 or kernel.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(f"native_dense needs x [M, K] and kernel [K, N]; got x {x.shape}, kernel {kernel.shape}.")
    if x.shape[1] % 32 or kernel.shape[1] % 32:
        raise ValueError(f"native_dense needs K and N to be multiples of 32; got kernel {kernel.shape}.")
    b = jnp.zeros((kernel.shape[1],), jnp.float32) if bias is None else bias
    return _dense(x, kernel, b, bool(gelu))


class Dense(nn.Module):
    """`flax.linen.Dense` with an optional fused activation, on the native CPU kernel when eligible.

    x [..., K] -> [..., features]; the matmul runs on x flattened to [prod(...), K] (on 3-D inputs XLA
    sent the weight-gradient matmul down a slow path; flattening first was +67% on a small GPT train
    step on CPU, DESIGN.md). activation: None or "gelu_tanh".
    """

    features: int
    use_bias: bool = True
    activation: str | None = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"Dense activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        gelu = self.activation == "gelu_tanh"
        if dense_eligible(x2, kernel):
            y = native_dense(x2, kernel, bias, gelu=gelu)
        else:
            y = x2 @ kernel
            if bias is not None:
                y = y + bias
            if gelu:
                y = jax.nn.gelu(y, approximate=True)
        return y.reshape(*lead, self.features)


def layer_norm_eligible(x) -> bool:
    """Static conditions for the native LayerNorm: a single-device CPU, float32 x [M, D] with D a multiple
    of 16 and M >= NATIVE_MIN_ROWS, and the kernels built."""
    if not native.on_single_cpu() or x.ndim != 2 or x.dtype != jnp.float32:
        return False
    return x.shape[0] >= NATIVE_MIN_ROWS and x.shape[1] % 16 == 0 and native.available()


def _layer_norm_call(x, scale, bias, eps):
    M = x.shape[0]
    return native.call("jaxseq_layernorm_fwd", (native.f32(*x.shape), native.f32(M), native.f32(M)), x, scale, bias,
                       eps=eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
    return _layer_norm_call(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    y, mean, rstd = _layer_norm_call(x, scale, bias, eps)
    return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, res, dy):
    x, scale, mean, rstd = res
    outs = (native.f32(*x.shape), native.f32(*scale.shape), native.f32(*scale.shape))
    return native.call("jaxseq_layernorm_bwd", outs, x, scale, mean, rstd, dy.astype(jnp.float32))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def native_layer_norm(x, scale, bias, *, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, on the native CPU kernel.

    Args:
      x: [M, D] float32, D a multiple of 16.  scale, bias: [D] float32.
      eps: added to the (biased, two-pass) variance.

    Returns:
      [M, D] float32.
    """
    if not native.available():
        raise RuntimeError(f"jaxseq's native LayerNorm kernel is unavailable: {native.unavailable_reason()}")
    if x.ndim != 2 or x.shape[1] % 16 or scale.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
        raise ValueError(f"native_layer_norm needs x [M, D] with D a multiple of 16 and scale, bias [D]; "
                         f"got x {x.shape}, scale {scale.shape}, bias {bias.shape}.")
    return _layer_norm(x, scale, bias, np.float32(eps))


class LayerNorm(nn.Module):
    """`flax.linen.LayerNorm` over the last axis (scale and bias), on the native CPU kernel when eligible.

    x [..., D] -> [..., D]. The variance is the two-pass mean((x - mean)^2) on both paths (Flax's
    default is the one-pass E[x^2] - E[x]^2, which loses digits when |mean| >> std).
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        D = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (D,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (D,), self.param_dtype)
        x, scale, bias = nn.dtypes.promote_dtype(x, scale, bias, dtype=self.dtype)
        x2 = x.reshape(-1, D)
        if layer_norm_eligible(x2) and scale.dtype == jnp.float32:
            y = native_layer_norm(x2, scale, bias, eps=self.epsilon)
        else:
            # Statistics in float32 at least, as Flax computes them.
            xf = x2.astype(jnp.promote_types(x2.dtype, jnp.float32))
            mean = xf.mean(-1, keepdims=True)
            var = jnp.square(xf - mean).mean(-1, keepdims=True)
            y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).astype(x2.dtype) * scale + bias
        return y.reshape(x.shape)
