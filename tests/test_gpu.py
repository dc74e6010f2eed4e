"""Checks that need an NVIDIA GPU: `pytest -m gpu tests/test_gpu.py` (skipped on other backends).

What the CPU suite cannot reach: cuDNN's LSTM kernel behind `jaxseq.kernels.cudnn_lstm`, cuDNN's fused attention behind `jaxseq.attention`, and `jaxseq.train`'s
step and checkpoints on a GPU backend. `benchmarks/gpu_suite.sh` runs this file first.

Tolerances: the references run with `jax.default_matmul_precision("highest")` (full float32). cuDNN's
float32 LSTM may still use TF32 tensor cores inside (it takes no precision argument), so it is held to
5e-3, which a wrong weight layout, gate order or length handling misses by orders of magnitude.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.attention import attention
from jaxseq.cells import LSTM
from jaxseq.config import OptimConfig, RNNConfig, TrainConfig, TransformerConfig
from jaxseq.kernels.cudnn_lstm import cudnn_available, lstm_cudnn
from jaxseq.kernels.flash_attention import flash_attention
from jaxseq.scan import reference_recurrence, unroll
from jaxseq.tasks import CharLM
from jaxseq.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU backend"),
]


def _lstm_problem(batch=8, steps=24, d_in=32, hidden=64, lengths=(24, 0, 7, 1, 24, 13, 24, 2)):
    k = jax.random.split(jax.random.key(0), 5)
    cell = LSTM(d_in, hidden)
    params = cell.init(k[0])
    xs = jax.random.normal(k[1], (batch, steps, d_in))
    mask = jnp.asarray(np.arange(steps)[None] < np.asarray(lengths)[:, None])
    carry0 = (jax.random.normal(k[2], (batch, hidden)), jax.random.normal(k[3], (batch, hidden)))
    w = jax.random.normal(k[4], (batch, steps, hidden))
    return cell, params, xs, mask, carry0, w


def _values_and_grads(run, w):
    """jit of (run's outputs, gradients of a loss over outputs and final carry wrt params, xs, carry0)."""

    def loss(p, x, c):
        ys, (h, cc) = run(p, x, c)
        return jnp.sum(ys * w) + jnp.sum(jnp.sin(h)) + jnp.sum(jnp.cos(cc))

    return jax.jit(lambda p, x, c: (run(p, x, c), jax.grad(loss, argnums=(0, 1, 2))(p, x, c)))


def _assert_trees_close(got, want, tol):
    worst = 0.0
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(e, np.float64), rtol=tol, atol=tol)
        worst = max(worst, float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(e, np.float64)), initial=0.0)))
    print(f"max abs difference {worst:.2e}")


def test_cudnn_lstm_kernel_matches_the_step_scan_outputs_and_gradients():
    cell, params, xs, mask, carry0, w = _lstm_problem()
    assert cudnn_available(xs, params)
    resets = jnp.zeros(mask.shape, bool)
    with jax.default_matmul_precision("highest"):
        want = _values_and_grads(lambda p, x, c: reference_recurrence(cell, p, x, mask, c, resets, 1), w)(params, xs, carry0)
    got = _values_and_grads(lambda p, x, c: lstm_cudnn(p, x, mask, c), w)(params, xs, carry0)
    _assert_trees_close(got, want, 5e-3)


@pytest.mark.parametrize("kind", ["prefix", "holes", "resets"])
def test_unroll_dispatch_keeps_jaxseq_semantics(kind):
    """`unroll` takes cuDNN for prefix masks and jaxseq's fused path for holes and resets: all equal the scan."""
    cell, params, xs, mask, carry0, w = _lstm_problem()
    resets = jnp.zeros(mask.shape, bool)
    if kind == "holes":
        mask = mask.at[:, 3].set(False)
    if kind == "resets":
        resets = resets.at[:, 5].set(True)

    def run_unroll(p, x, c):
        return unroll(cell, p, x, mask=mask, carry=c, resets=resets)

    with jax.default_matmul_precision("highest"):
        want = _values_and_grads(lambda p, x, c: reference_recurrence(cell, p, x, mask, c, resets, 1), w)(params, xs, carry0)
        got = _values_and_grads(run_unroll, w)(params, xs, carry0)
    # the fused path honours the precision setting; cuDNN (prefix masks) may use TF32
    _assert_trees_close(got, want, 5e-3 if kind == "prefix" else 2e-5)


def _qkv(dtype, batch=2, length=512, heads=4, head_dim=64):
    k = jax.random.split(jax.random.key(1), 4)
    shape = (batch, length, heads, head_dim)
    return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in k]


def test_attention_takes_cudnn_in_bfloat16_and_matches_float32_xla():
    q, k, v, g = _qkv(jnp.bfloat16)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention(q, k, v, causal=True, implementation=impl).astype(jnp.float32) * g)

    auto = jax.jit(jax.value_and_grad(loss(None), argnums=(0, 1, 2)))
    hlo = auto.lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower(), "jaxseq.attention did not lower to cuDNN's fused attention for bfloat16"
    got = auto(q, k, v)
    up = [a.astype(jnp.float32) for a in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        want = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(*up)
    # bfloat16 inputs and outputs: compare gradients relative to their scale
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= 3e-2 * np.max(np.abs(b)), np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert abs(float(got[0]) - float(want[0])) <= 2e-2 * abs(float(want[0])) + 1.0


def test_flash_attention_on_gpu_matches_xla_in_float32():
    q, k, v, g = _qkv(jnp.float32, length=384)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v, causal=True) * g), argnums=(0, 1, 2)))(q, k, v)
        want = jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(attention(q, k, v, causal=True, implementation="xla") * g), argnums=(0, 1, 2)))(q, k, v)
    _assert_trees_close(got, want, 1e-4)


def _gpu_config(tmp_path, model, **kw):
    return TrainConfig(
        model=model, rnn=RNNConfig(d_embed=64, d_hidden=256), transformer=TransformerConfig(num_layers=2, d_model=128, d_ff=512),
        char_lm=CharLM(seq_len=64, batch_size=32), optim=OptimConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=1.0),  # constant after warm-up: a
        # 40-step run and its resumption follow the 80-step run's schedule
        steps=80, eval_every=40, eval_batches=4, checkpoint_every=40, progress=False, run_dir=str(tmp_path / model), **kw,
    )


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.parametrize("model", ["lstm", "transformer", "mingru"])
def test_train_learns_and_resumes_on_gpu(tmp_path, model):
    """`jaxseq train`'s step on the GPU: the loss falls below the unigram level, and a run stopped at its
    step-40 checkpoint and resumed reproduces the uninterrupted run's later losses."""
    full = train(None, None, _gpu_config(tmp_path / "full", model))
    assert np.isfinite(full["val"]["loss"]) and full["val"]["loss"] < 3.0, full  # ln(vocab ~ 90) = 4.5; unigram ~ 3.3
    train(None, None, dataclasses.replace(_gpu_config(tmp_path / "split", model), steps=40))
    train(None, None, _gpu_config(tmp_path / "split", model, resume=True))
    a, b = _losses(tmp_path / "full" / model), _losses(tmp_path / "split" / model)
    later = [s for s in a if s > 40]
    assert later and all(s in b for s in later)
    diff = max(abs(a[s] - b[s]) for s in later)
    print(f"{model}: val loss {full['val']['loss']:.3f}, max |loss difference| after resume {diff:.1e}")
    assert diff <= 1e-4 * max(abs(a[s]) for s in later), diff
