"""The native CPU dense and LayerNorm kernels (jaxseq/native/dense_cpu.cc, layernorm_cpu.cc) against
float64 NumPy references: y = act(x W + b) and dx, dW, db, with and without the tanh GELU, for row
counts that are not a multiple of the kernel's 8-row tiles and both ways of splitting dW; LayerNorm's
y, dx, dscale, dbias; the `Dense` and `LayerNorm` modules' routing; and the malloc setting that lets a
step reuse its buffers (jaxseq/malloc.py)."""

import functools
import importlib
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import native
from jaxseq.errors import ConfigError
from jaxseq.native_layers import (
    NATIVE_MIN_ROWS,
    Dense,
    LayerNorm,
    dense_eligible,
    layer_norm_eligible,
    native_dense,
    native_layer_norm,
)
from test_native_attention import assert_thread_count_changes_nothing

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")

TOL = dict(rtol=2e-5, atol=2e-5)  # float32 rounding on O(1) values (sums of up to 300 products)


def reference(x, w, b, dy, gelu):
    """float64 forward and backward of act(x w + b): (y, dx, dw, db)."""
    x, w, b, dy = (np.asarray(a, np.float64) for a in (x, w, b, dy))
    pre = x @ w + b
    if gelu:
        c = math.sqrt(2 / math.pi)
        t = np.tanh(c * (pre + 0.044715 * pre**3))
        y = 0.5 * pre * (1 + t)
        g = dy * (0.5 * (1 + t) + 0.5 * pre * (1 - t**2) * c * (1 + 3 * 0.044715 * pre**2))
    else:
        y, g = pre, dy
    return y, g @ w.T, x.T @ g, g.sum(0)


def inputs(M, K, N, seed=0):
    r = np.random.RandomState(seed)
    f = lambda *s: r.randn(*s).astype(np.float32)  # noqa: E731
    # Weights scaled so that x W is O(1): the GELU's curved part, not its linear tails, gets tested.
    return f(M, K), f(K, N) / np.sqrt(K), f(N), f(M, N)


@functools.partial(jax.jit, static_argnames="gelu")
def _with_grads(x, w, b, dy, gelu):
    y, vjp = jax.vjp(lambda x, w, b: native_dense(x, w, b, gelu=gelu), x, w, b)
    return (y,) + vjp(dy)


SHAPES = {
    # name: (M, K, N)
    "rows a multiple of 8, N > K (dW split by column panels)": (96, 64, 160),
    "37 rows: a partial tile": (37, 32, 32),
    "K > N (dW split by row strips), 300 rows (chunks of 256 and a tail)": (300, 128, 32),
    "one row": (1, 32, 64),
}


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_float64_reference(name, gelu):
    x, w, b, dy = inputs(*SHAPES[name], seed=3)
    got = _with_grads(x, w, b, dy, gelu=gelu)
    for label, a, want in zip(("y", "dx", "dw", "db"), got, reference(x, w, b, dy, gelu)):
        scale = max(1.0, float(np.abs(want).max()))  # db and dw are sums over rows: compare relative to their size
        np.testing.assert_allclose(np.asarray(a) / scale, want / scale, **TOL, err_msg=label)


def test_no_rows_gives_zero_gradients():
    x, w, b, dy = inputs(0, 32, 64)
    y, dx, dw, db = _with_grads(x, w, b, dy, gelu=True)
    assert y.shape == (0, 64) and dx.shape == (0, 32)
    np.testing.assert_array_equal(np.asarray(dw), 0.0)
    np.testing.assert_array_equal(np.asarray(db), 0.0)


@pytest.mark.parametrize("shape", [(200, 64, 96), (300, 128, 32)])
def test_threads_give_bit_identical_results(monkeypatch, shape):
    """Every output is a sum in an order set by the shapes alone (dW in chunks of rows, whichever thread
    owns them), so the thread count changes nothing."""
    x, w, b, dy = inputs(*shape, seed=5)
    assert_thread_count_changes_nothing(monkeypatch, lambda: _with_grads(x, w, b, dy, gelu=True))


def test_errors_name_the_fix():
    x, w, b, _ = inputs(8, 32, 48)
    with pytest.raises(ValueError, match="multiples of 32"):
        native_dense(x, w, b)
    with pytest.raises(ValueError, match=r"x \[M, K\] and kernel \[K, N\]"):
        native_dense(x, w.T, b)
    with pytest.raises(ConfigError, match="activation must be one of"):
        Dense(32, activation="relu").init(jax.random.key(0), x)


def test_dense_module_routes_to_native_with_flax_parameters():
    """`Dense` has nn.Dense's parameters (names, shapes, initial values), runs the kernel on eligible
    calls and agrees with XLA's matmul on ineligible ones."""
    x = jnp.asarray(np.random.RandomState(0).randn(2, NATIVE_MIN_ROWS // 2, 64), jnp.float32)  # 128 rows once flattened
    ours, flax_dense = Dense(96, activation="gelu_tanh"), nn.Dense(96)
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_dense.init(jax.random.key(1), x))
    np.testing.assert_array_equal(params["params"]["kernel"], flax_dense.init(jax.random.key(1), x)["params"]["kernel"])
    assert dense_eligible(x.reshape(-1, 64), params["params"]["kernel"])
    hlo = jax.jit(ours.apply).lower(params, x).as_text()
    assert "jaxseq_dense_fwd" in hlo
    want = jax.nn.gelu(flax_dense.apply(params, x), approximate=True)
    np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(want), **TOL)
    # Ineligible: fewer rows than NATIVE_MIN_ROWS (a decoding step), bfloat16, a width that is no multiple of 32
    assert "jaxseq_dense" not in jax.jit(ours.apply).lower(params, x[:, :3]).as_text()
    bf = Dense(96, dtype=jnp.bfloat16)
    assert "jaxseq_dense" not in jax.jit(bf.apply).lower(params, x).as_text()
    odd = Dense(65)
    odd_params = odd.init(jax.random.key(2), x)
    assert "jaxseq_dense" not in jax.jit(odd.apply).lower(odd_params, x).as_text()
    np.testing.assert_allclose(np.asarray(odd.apply(odd_params, x)), np.asarray(nn.Dense(65).apply(odd_params, x)), **TOL)


def layer_norm_reference(x, scale, bias, dy, eps):
    """float64 LayerNorm over the last axis and its backward: (y, dx, dscale, dbias)."""
    x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return xhat * scale + bias, dx, (dy * xhat).sum(0), dy.sum(0)


@functools.partial(jax.jit, static_argnames="eps")
def _layer_norm_with_grads(x, scale, bias, dy, eps):
    y, vjp = jax.vjp(lambda x, s, b: native_layer_norm(x, s, b, eps=eps), x, scale, bias)
    return (y,) + vjp(dy)


@pytest.mark.parametrize("shape", [(300, 64), (37, 16), (1, 48), (0, 32)])
def test_layer_norm_matches_float64_reference(shape):
    r = np.random.RandomState(4)
    M, D = shape
    x = (r.randn(M, D) * 3 + 5).astype(np.float32)  # a mean far from 0: the two-pass variance matters
    scale, bias, dy = r.randn(D).astype(np.float32), r.randn(D).astype(np.float32), r.randn(M, D).astype(np.float32)
    got = _layer_norm_with_grads(x, scale, bias, dy, eps=1e-5)
    for label, a, want in zip(("y", "dx", "dscale", "dbias"), got, layer_norm_reference(x, scale, bias, dy, 1e-5)):
        size = max(1.0, float(np.abs(want).max())) if want.size else 1.0
        np.testing.assert_allclose(np.asarray(a) / size, want / size, **TOL, err_msg=label)


def test_layer_norm_threads_give_bit_identical_results(monkeypatch):
    r = np.random.RandomState(6)
    x, dy = r.randn(1000, 64).astype(np.float32), r.randn(1000, 64).astype(np.float32)
    scale, bias = r.randn(64).astype(np.float32), r.randn(64).astype(np.float32)
    assert_thread_count_changes_nothing(monkeypatch, lambda: _layer_norm_with_grads(x, scale, bias, dy, eps=1e-5))


def test_layer_norm_module_matches_flax_and_routes_to_native():
    x = jnp.asarray(np.random.RandomState(8).randn(2, NATIVE_MIN_ROWS // 2, 64), jnp.float32)
    ours, theirs = LayerNorm(epsilon=1e-5), nn.LayerNorm(epsilon=1e-5)
    params = ours.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jnp.linspace(-0.5, 0.5, p.size).reshape(p.shape), params)  # not the identity
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x))
    assert layer_norm_eligible(x.reshape(-1, 64))
    assert "jaxseq_layernorm_fwd" in jax.jit(ours.apply).lower(params, x).as_text()
    np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(theirs.apply(params, x)), **TOL)
    few = x[:, :3]  # a decoding step: XLA's ops, the same numbers
    assert "jaxseq_layernorm" not in jax.jit(ours.apply).lower(params, few).as_text()
    np.testing.assert_allclose(np.asarray(ours.apply(params, few)), np.asarray(theirs.apply(params, few)), **TOL)
    with pytest.raises(ValueError, match="multiple of 16"):
        native_layer_norm(jnp.ones((4, 20)), jnp.ones(20), jnp.zeros(20))


def test_transformer_gradients_match_the_xla_path(monkeypatch):
    """A whole TransformerLM (dense, LayerNorm and attention kernels, padding mask) gives the loss and
    the gradients of XLA's ops, to float32 precision."""
    attention_module = importlib.import_module("jaxseq.attention")  # (jaxseq.attention is also a function)
    import jaxseq.native_layers as layers
    from jaxseq.losses import token_nll
    from jaxseq.models.transformer import TransformerLM

    B, T, V = 4, 65, 50  # inputs of 64 tokens, 256 rows: every kernel is eligible
    r = np.random.RandomState(9)
    tokens = jnp.asarray(r.randint(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(np.arange(T)[None, :] < np.array([[65], [40], [64], [17]]))
    kw = dict(vocab_size=V, d_model=64, num_heads=2, num_layers=2, d_ff=256, max_len=T)

    def loss_and_grads(model):
        params = model.init(jax.random.key(0), tokens)["params"]

        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1], mask=mask[:, :-1])
            total, count = token_nll(logits, tokens[:, 1:], mask[:, 1:])
            return total / count

        step = jax.jit(jax.value_and_grad(loss))
        return step.lower(params).as_text(), step(params)

    hlo, (native_loss, native_grads) = loss_and_grads(TransformerLM(**kw))
    assert all(t in hlo for t in ("jaxseq_dense_bwd", "jaxseq_layernorm_bwd", "jaxseq_attention_bwd"))
    monkeypatch.setattr(layers, "NATIVE_MIN_ROWS", 10**9)
    monkeypatch.setattr(attention_module, "NATIVE_MIN_LEN", 10**9)  # 64 < FLASH_MIN_LEN: XLA's attention
    hlo, (xla_loss, xla_grads) = loss_and_grads(TransformerLM(**kw))
    assert "jaxseq_" not in hlo
    np.testing.assert_allclose(float(native_loss), float(xla_loss), rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(native_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


_FAULTS = """
import resource
import jax, jax.numpy as jnp, numpy as np, optax
from jaxseq.malloc import keep_freed_memory
applied = keep_freed_memory()  # before JAX's first computation
from jaxseq.config import TransformerConfig
from jaxseq.losses import lm_loss_fn
from jaxseq.models.transformer import TransformerLM
from jaxseq.train import init_train_state, make_train_step
model = TransformerLM.from_config(TransformerConfig(num_layers=2, d_model=128, max_len=128, dropout=0.0), vocab_size=65)
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (16, 128)), jnp.int32)
batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones(tokens.shape, bool)}
optimizer = optax.adamw(1e-3)
state = init_train_state(jax.jit(model.init)(jax.random.key(0), tokens)["params"], optimizer)
step = jax.jit(make_train_step(lm_loss_fn(model), optimizer), donate_argnums=0)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, " ".join(map(str, faults[5:])))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_page_faults_between_steps():
    """A Transformer train step, with glibc's defaults, maps ~40 MB of buffers afresh on every step and
    faults each page in again; with keep_freed_memory() the steps reuse the heap (jaxseq/malloc.py)."""
    procs = {  # side by side: page faults are counted per process
        mode: subprocess.Popen([sys.executable, "-c", _FAULTS], env=dict(os.environ, JAXSEQ_MALLOC=mode),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for mode in ("system", "jaxseq")
    }
    runs = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        applied, *faults = out.split()
        runs[mode] = (applied == "True", sorted(map(int, faults)))
    assert runs["system"][0] is False and runs["jaxseq"][0] is True
    assert runs["system"][1][0] > 5000, runs  # every step: 20 MB of fresh pages or more
    assert runs["jaxseq"][1][2] < 100, runs  # most steps: none (glibc still maps one afresh now and then)
