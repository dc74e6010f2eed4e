"""The LSTM and GRU on jaxseq's native CPU kernels (jaxseq/kernels/cpu): the same numbers as the XLA path.

The XLA path (`jaxseq.kernels.fused_rnn.lstm_sequence` / `gru_sequence`) is itself checked against a float64
NumPy loop and PyTorch (tests/test_fused_rnn.py, tests/test_cells.py); here the native path must match
it, outputs and the gradients of params, inputs and the initial carry, under masks with holes, resets,
batches that are not a multiple of the kernels' 8-row tiles, one thread or several, and under vmap.
Only the tests that need the built kernels are skipped without them; the fallback (native entries
ineligible: the table takes fused-xla, with the reference's numbers) is tested on every machine.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq.cells import GRU, LSTM
from jaxseq.kernels import cpu, explain_unroll
from jaxseq.kernels.cpu.rnn import gru_sequence_native, lstm_sequence_native, native_eligible
from jaxseq.kernels.fused_rnn import gru_sequence, lstm_sequence
from jaxseq.scan import StepOnly

needs_kernels = pytest.mark.skipif(not cpu.available(), reason=f"native kernels unavailable: {cpu.unavailable_reason()}")
# The compiler-fallback tests need a CPU the kernels run on (else that is the reason given, not the compiler).
needs_isa = pytest.mark.skipif(cpu._cpu_supported() is not None, reason=f"{cpu._cpu_supported()}")

# cell class, the XLA path, the native path, the custom-call target names
CELLS = {
    "lstm": (LSTM, lstm_sequence, lstm_sequence_native, "jaxseq_lstm"),
    "gru": (GRU, gru_sequence, gru_sequence_native, "jaxseq_gru"),
}


def _problem(kind, batch=12, steps=9, d_in=16, hidden=64, seed=0):
    k = jax.random.split(jax.random.key(seed), 8)
    cell = CELLS[kind][0](d_in, hidden)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(k[7], a.shape), cell.init(k[0]))
    xs = jax.random.normal(k[1], (batch, steps, d_in))
    mask = jax.random.uniform(k[2], (batch, steps)) > 0.25  # holes anywhere, whole masked rows likely
    resets = jax.random.uniform(k[3], (batch, steps)) > 0.8
    carry0 = jax.tree.map(lambda c: jax.random.normal(k[4], c.shape), cell.initial_carry((batch,), jnp.float32))
    w = jax.random.normal(k[6], (batch, steps, hidden))
    return cell, params, xs, mask, carry0, resets, w


def _values_and_grads(run, mask, resets, w):
    def loss(p, x, c):
        ys, carry = run(p, x, mask, c, resets)
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(carry))

    return jax.jit(lambda p, x, c: (run(p, x, mask, c, resets), jax.grad(loss, argnums=(0, 1, 2))(p, x, c)))


def _assert_close(got, want, tol=5e-6):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("kind", CELLS)
# input widths below, at and above a tile's 32 columns (the input projection is part of each step's matmul)
@pytest.mark.parametrize("batch, hidden, d_in", [(12, 64, 16), (8, 32, 16), (3, 96, 64), (17, 128, 96)])
def test_matches_the_xla_path_with_masks_resets_and_carry(kind, batch, hidden, d_in):
    _, params, xs, mask, carry0, resets, w = _problem(kind, batch=batch, hidden=hidden, d_in=d_in)
    _, xla, nat, _ = CELLS[kind]
    with jax.default_matmul_precision("highest"):
        got = _values_and_grads(nat, mask, resets, w)(params, xs, carry0)
        want = _values_and_grads(lambda p, x, m, c, r: xla(p, x, m, c, r), mask, resets, w)(params, xs, carry0)
    _assert_close(got, want)


@needs_kernels
@pytest.mark.parametrize("kind", CELLS)
def test_the_thread_count_changes_nothing(monkeypatch, kind):
    """Each output element is computed by one thread in one order: bit-identical for any thread count."""
    _, params, xs, mask, carry0, resets, w = _problem(kind, hidden=128, d_in=64)  # 4 groups of 32 units
    runs = []
    for threads in ("1", "2", "4"):
        monkeypatch.setenv("JAXSEQ_NATIVE_THREADS", threads)  # read by each call
        runs.append(_values_and_grads(CELLS[kind][2], mask, resets, w)(params, xs, carry0))
    for other in runs[1:]:
        for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_kernels
@pytest.mark.parametrize("kind", CELLS)
def test_unroll_takes_the_native_path_on_cpu_and_keeps_its_numbers(kind):
    cell, params, xs, mask, carry0, resets, _ = _problem(kind, hidden=128)
    xla, target = CELLS[kind][1], CELLS[kind][3]
    run = jax.jit(lambda p, x, c: jaxseq.unroll(cell, p, x, mask=mask, carry=c, resets=resets))
    assert f"{target}_infer" in run.lower(params, xs, carry0).as_text()
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxseq.unroll(cell, p, x, mask=mask)[0])))
    hlo = grad.lower(params, xs).as_text()
    assert f"{target}_fwd" in hlo and f"{target}_bwd" in hlo
    with jax.default_matmul_precision("highest"):
        _assert_close(run(params, xs, carry0), xla(params, xs, mask, carry0, resets))
    assert explain_unroll(cell, xs, mask=mask, resets=resets) == {"recurrence": f"cpu-native-{kind}"}


@needs_kernels
@pytest.mark.parametrize("kind", CELLS)
def test_vmap_runs_each_example_as_its_own_batch(kind):
    _, params, xs, mask, carry0, resets, _ = _problem(kind, batch=6)
    xla, nat = CELLS[kind][1], CELLS[kind][2]
    xs2, mask2, carry2, resets2 = jax.tree.map(lambda a: a.reshape((2, 3) + a.shape[1:]), (xs, mask, carry0, resets))
    got = jax.vmap(lambda x, m, c, r: nat(params, x, m, c, r))(xs2, mask2, carry2, resets2)
    want = [xla(params, xs2[i], mask2[i], jax.tree.map(lambda a: a[i], carry2), resets2[i]) for i in range(2)]
    want = jax.tree.map(lambda *a: jnp.stack(a), *want)
    with jax.default_matmul_precision("highest"):
        _assert_close(got, want)


@needs_kernels
def test_eligible_at_min_hidden():
    _, params, xs, *_ = _problem("lstm", hidden=128)
    assert native_eligible(params, xs)


def test_ineligible_calls():
    _, params, xs, *_ = _problem("lstm", hidden=128)
    assert not native_eligible(LSTM(16, 160 + 16).init(jax.random.key(0)), xs)  # hidden not a multiple of 32
    assert not native_eligible(LSTM(16, 64).init(jax.random.key(0)), xs)  # below MIN_HIDDEN
    assert not native_eligible(params, xs[:, :0])  # no steps
    assert not native_eligible(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), xs.astype(jnp.bfloat16))


@pytest.mark.parametrize("kind", CELLS)
def test_without_the_kernels_the_table_takes_the_fused_path_with_the_reference_numbers(monkeypatch, kind):
    """Native entries made ineligible (as on a machine without a compiler or AVX-512): fused-xla runs."""
    monkeypatch.setattr(cpu, "available", lambda: False)
    cell, params, xs, mask, carry0, resets, w = _problem(kind, hidden=128)
    assert explain_unroll(cell, xs, mask=mask, resets=resets) == {"recurrence": "fused-xla"}
    run = lambda c: lambda p, x, m, c0, r: jaxseq.unroll(c, p, x, mask=m, carry=c0, resets=r)  # noqa: E731
    assert f"{CELLS[kind][3]}_" not in jax.jit(run(cell)).lower(params, xs, mask, carry0, resets).as_text()
    with jax.default_matmul_precision("highest"):
        got = _values_and_grads(run(cell), mask, resets, w)(params, xs, carry0)
        want = _values_and_grads(run(StepOnly(cell)), mask, resets, w)(params, xs, carry0)
    _assert_close(got, want, tol=2e-5)


@needs_isa
@pytest.mark.parametrize("compiler, reason", [("no-such-compiler", "no C++ compiler"), ("false", "failed")])
def test_without_a_working_compiler_it_falls_back_with_the_reason(tmp_path, compiler, reason):
    code = "import jaxseq.kernels.cpu as n; print(n.available()); print(n.unavailable_reason())"
    env = dict(os.environ, CXX=compiler, JAXSEQ_CACHE_DIR=str(tmp_path))  # an empty cache: it must build
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.startswith("False") and reason in done.stdout
    if compiler == "false":  # a build that fails warns once (the XLA path is slower, not wrong)
        assert "native kernels unavailable, using the XLA path" in done.stderr
