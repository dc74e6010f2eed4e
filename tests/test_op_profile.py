"""benchmarks/op_profile.py: the FLOPs it reads from HLO and the per-op tables it builds from a trace."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import op_profile  # noqa: E402


def _program():
    def f(a, b, c, d):
        return jnp.tanh(a @ b), jnp.einsum("nrd,nkd->nrk", c, d)

    args = (jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((4, 16, 8)), jnp.ones((4, 24, 8)))
    return jax.jit(f), args


def test_matmul_flops_reads_shapes_and_contractions():
    fn, args = _program()
    found = op_profile.matmul_flops(fn.lower(*args).compile().as_text())
    by_label = {label: flops for flops, label in found.values()}
    assert by_label == {"f32[64,48] K=32": 2 * 64 * 48 * 32, "f32[4,16,24] K=8": 2 * 4 * 16 * 24 * 8}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA:CPU's per-op trace events")
def test_summarize_finds_the_ops_of_the_last_step():
    fn, args = _program()
    flops = op_profile.matmul_flops(fn.lower(*args).compile().as_text())
    jax.block_until_ready(fn(*args))
    rep = op_profile.summarize(op_profile.trace_events(fn, args, steps=2), flops, top=10)
    assert rep["wall_ms"] > 0 and len(rep["timeline"]) == 20
    shapes = {r["shape"]: r for r in rep["matmuls"]}
    assert set(shapes) == {"f32[64,48] K=32", "f32[4,16,24] K=8"}
    assert all(r["calls"] == 1 for r in shapes.values())  # one step reported, not both
    assert sum(r["calls"] for r in rep["ops"]) >= 2
