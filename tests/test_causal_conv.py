"""nn.CausalConv: parallel form against a float64 NumPy loop, recurrent forms against the parallel one,
causality through gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.nn import CausalConv

B, T, C_IN, F = 2, 19, 3, 5  # odd sizes: a transposed kernel would not broadcast silently
CONFIGS = [(2, 1), (2, 4), (3, 2), (1, 1), (4, 3)]  # (kernel_size, dilation)


def _setup(kernel_size, dilation, seed=0, use_bias=True):
    conv = CausalConv(F, kernel_size=kernel_size, dilation=dilation, use_bias=use_bias)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, C_IN)), jnp.float32)
    variables = conv.init(jax.random.key(seed), x)
    if use_bias:  # a nonzero bias, so a dropped bias would show
        variables = jax.tree.map(lambda v: v + 0.1 if v.ndim == 1 else v, variables)
    return conv, variables, x


def _numpy_causal_conv(x, kernel, bias, dilation):
    """y[b, t] = bias + sum_k x[b, t - (K-1-k)*dilation] @ kernel[k], zeros before the start (float64)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    K = kernel.shape[0]
    y = np.zeros(x.shape[:2] + (kernel.shape[2],))
    for t in range(x.shape[1]):
        for k in range(K):
            s = t - (K - 1 - k) * dilation
            if s >= 0:
                y[:, t] += x[:, s] @ kernel[k]
    return y + (0.0 if bias is None else np.asarray(bias, np.float64))


def _run_steps(conv, variables, x, ring):
    def body(queue, xt_t):
        x_t, t = xt_t
        return conv.apply(variables, queue, x_t, t if ring else None, method="step")

    queue = conv.init_queue(x.shape[0], x.shape[-1])
    _, ys = jax.lax.scan(body, queue, (jnp.swapaxes(x, 0, 1), jnp.arange(x.shape[1])))
    return jnp.swapaxes(ys, 0, 1)


@pytest.mark.parametrize("kernel_size,dilation", CONFIGS)
def test_parallel_form_matches_numpy_loop(kernel_size, dilation):
    conv, variables, x = _setup(kernel_size, dilation)
    p = variables["params"]["conv"]
    assert p["kernel"].shape == (kernel_size, C_IN, F)
    ref = _numpy_causal_conv(x, p["kernel"], p["bias"], dilation)
    np.testing.assert_allclose(conv.apply(variables, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ring", [False, True], ids=["shift", "ring"])
@pytest.mark.parametrize("kernel_size,dilation", CONFIGS)
def test_step_reproduces_parallel_form_at_every_position(kernel_size, dilation, ring):
    conv, variables, x = _setup(kernel_size, dilation, seed=kernel_size * 10 + dilation)
    queue = conv.init_queue(B, C_IN)
    assert queue.shape == (B, (kernel_size - 1) * dilation, C_IN) and not np.any(np.asarray(queue))
    np.testing.assert_allclose(_run_steps(conv, variables, x, ring), conv.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_no_bias():
    conv, variables, x = _setup(2, 2, use_bias=False)
    assert "bias" not in variables["params"]["conv"]
    ref = _numpy_causal_conv(x, variables["params"]["conv"]["kernel"], None, 2)
    np.testing.assert_allclose(conv.apply(variables, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run_steps(conv, variables, x, ring=True), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size,dilation", [(2, 3), (3, 2)])
def test_output_t_has_zero_gradient_wrt_later_inputs(kernel_size, dilation):
    conv, variables, x = _setup(kernel_size, dilation)
    # jac[t, s] = d sum(y[:, t]) / d x[:, s], summed over channels and batch
    jac = jax.jacrev(lambda xx: conv.apply(variables, xx).sum(axis=(0, 2)))(x)  # [T, B, T, C_IN]
    dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [T(out), T(in)]
    later = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(dep[later] == 0.0)
    # and it does read exactly the taps t, t-d, ..., t-(K-1)d
    for t in range(T):
        taps = {t - j * dilation for j in range(kernel_size) if t - j * dilation >= 0}
        assert set(np.flatnonzero(dep[t])) == taps


class _Stack(nn.Module):
    """A parent that holds two CausalConvs and steps them itself (as a WaveNet layer does)."""

    def setup(self):
        self.a, self.b = CausalConv(4, dilation=1), CausalConv(4, dilation=2)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))

    def step_all(self, queues, x_t, t):
        qa, h = self.a.step(queues[0], x_t, t)
        qb, y = self.b.step(queues[1], jnp.tanh(h), t)
        return (qa, qb), y


class _StepOnly(nn.Module):
    def setup(self):
        self.conv = CausalConv(F, kernel_size=3, dilation=2)

    def __call__(self, queue, x_t):
        return self.conv.step(queue, x_t)


def test_parent_module_steps_and_step_only_init():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(B, 9, C_IN)), jnp.float32)
    model = _Stack()
    variables = model.init(jax.random.key(0), x)
    queues = (CausalConv(4, dilation=1).init_queue(B, C_IN), CausalConv(4, dilation=2).init_queue(B, 4))
    ys = []
    for t in range(x.shape[1]):
        queues, y = model.apply(variables, queues, x[:, t], t, method="step_all")
        ys.append(y)
    np.testing.assert_allclose(jnp.stack(ys, 1), model.apply(variables, x), rtol=1e-5, atol=1e-5)

    # params created through `step` alone have the same layout as through `__call__`
    q = CausalConv(F, kernel_size=3, dilation=2).init_queue(B, C_IN)
    v = _StepOnly().init(jax.random.key(0), q, x[:, 0])
    assert v["params"]["conv"]["conv"]["kernel"].shape == (3, C_IN, F)
