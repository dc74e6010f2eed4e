"""jaxseq's GPT train step with the native dense and LayerNorm kernels against the same step with XLA's ops
for those layers (attention on the native kernel in both), in one process, alternating.

The figures of benchmarks/README.md, GPT attempts 13 and 16 ("native layers against XLA's"). The XLA
variant is traced with `jaxseq.native_layers.NATIVE_MIN_ROWS` out of reach; the ratio is XLA's median
step time over the native one (> 1: the kernels win).

    python benchmarks/native_layers_ab.py                                   # d 128, context 64, batch 12
    python benchmarks/native_layers_ab.py --d-model 256 --context 256 --batch 16 --repeats 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from jaxseq.malloc import keep_freed_memory  # noqa: E402

keep_freed_memory()  # before JAX's first computation, as `jaxseq train` does

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxseq.native_layers as native_layers  # noqa: E402
from gpt_step import make_jaxseq_step  # noqa: E402
from jaxseq.config import TransformerConfig  # noqa: E402
from jaxseq.models.transformer import TransformerLM  # noqa: E402
from jaxseq.train import init_train_state  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    D, T, B = args.d_model, args.context, args.batch
    cfg = TransformerConfig(num_layers=4, num_heads=4, d_model=D, d_ff=4 * D, max_len=T, dropout=0.0)
    model = TransformerLM.from_config(cfg, vocab_size=65)
    tokens = np.random.default_rng(0).integers(0, 65, (B, T + 1))
    x, y = jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)
    optimizer = optax.adamw(1e-3)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    steps, states = {}, {}
    default_rows = native_layers.NATIVE_MIN_ROWS
    for name, rows in (("native layers", default_rows), ("XLA layers", 10**9)):
        native_layers.NATIVE_MIN_ROWS = rows  # read when the step is traced, below
        steps[name] = make_jaxseq_step(model, optimizer)
        states[name] = init_train_state(jax.tree.map(jnp.copy, params), optimizer)
        for _ in range(4):  # compile and warm up
            states[name], loss = steps[name](states[name], x, y)
            float(loss)
    native_layers.NATIVE_MIN_ROWS = default_rows
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name in steps:  # each timed step after an untimed one of its own
            states[name], loss = steps[name](states[name], x, y)
            float(loss)
            t = time.perf_counter()
            states[name], loss = steps[name](states[name], x, y)
            float(loss)
            times[name].append(time.perf_counter() - t)
    native_ms, xla_ms = (statistics.median(times[name]) * 1e3 for name in steps)
    print(f"d {D}, context {T}, batch {B}: native layers {native_ms:.1f} ms, XLA layers {xla_ms:.1f} ms, "
          f"ratio {xla_ms / native_ms:.2f}")


if __name__ == "__main__":
    main()
