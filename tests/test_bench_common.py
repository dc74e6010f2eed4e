"""benchmarks/_common.py: the peak memory each benchmark row reports (JAX: XLA's plan; torch: its allocator),
and the timing rounds."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import jax_peak_mb, timed_rounds, torch_peak_mb  # noqa: E402

MiB = 2**20


def test_jax_peak_counts_arguments_outputs_and_temporaries():
    x = jnp.ones((1024, 256), jnp.float32)  # 1 MiB

    def f(x):  # the sort works in a 1 MiB temporary (x itself is not donated); 8 floats come out
        return jnp.sort((x * 2.0).ravel())[:8]

    assert jax_peak_mb(jax.jit(f).lower(x).compile()) == pytest.approx(2.0, abs=0.01)


def test_jax_peak_subtracts_donated_outputs():
    x = jnp.ones((1024, 256), jnp.float32)  # 1 MiB
    plain = jax_peak_mb(jax.jit(lambda x: x + 1).lower(x).compile())
    donated = jax_peak_mb(jax.jit(lambda x: x + 1, donate_argnums=0).lower(x).compile())
    assert plain == pytest.approx(2.0, abs=0.01)
    assert donated == pytest.approx(1.0, abs=0.01)


def test_torch_peak_on_cpu_sees_a_temporary_and_the_inputs():
    torch = pytest.importorskip("torch")
    x = torch.ones(256, 1024)  # 1 MiB, alive before the call

    def call():
        tmp = torch.empty(8 * 256, 1024)  # 8 MiB, freed when the call returns
        tmp.fill_(2.0)
        return float((tmp[:256] * x).sum())

    peak = torch_peak_mb(torch, call, "cpu")
    assert peak is not None, "torch's profiler gave no memory timeline"
    assert 9.0 <= peak < 11.0


def test_timed_rounds_interleaves_and_times_only_the_call_after_its_own():
    log = []
    calls = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    (times,) = timed_rounds(calls, rounds=2, clocks=(lambda: len(log),), lead_in=1)
    assert log == ["a", "a", "b", "b"] * 2  # each timed call right after an untimed one of its own
    assert times == {"a": [1, 1], "b": [1, 1]}  # a window holds exactly one call
