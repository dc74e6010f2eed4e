"""Training-step time of the linear recurrences: parallel (associative scan) vs sequential vs LSTM.

    python benchmarks/linear_scan.py                       # batch 8, hidden 256, T = 64 .. 4096
    python benchmarks/linear_scan.py --lengths 64,256 --reps 5

For each length T and each model, times one jitted forward + backward pass (gradient of
mean(ys^2) w.r.t. the cell parameters) of:

- `parallel`: MinGRU / MinLSTM / LRU through `jaxseq.unroll`, i.e. the dispatch table's
  "parallel-scan" entry (`jax.lax.associative_scan`, O(log T) depth);
- `sequential`: the same cell and parameters through the `lax.scan` of `step` (the
  reference, `StepOnly`);
- `lstm`: `jaxseq.LSTM` through unroll, the non-linear baseline.

All in one process, so ratios are comparable even on a shared, noisy CPU. Compile time
is measured separately (`lower().compile()` and the first call, never in a step time); step
times are the median (with min and max) of `reps` calls, timed round-robin over the configs of
one length so that a shared machine's noise falls on all of them alike, each timed call right
after an untimed call of its own (`_common.timed_rounds`). Every config runs under the same
process set-up (`_common.setup_process`) and each row carries the machine record
(`_common.run_record`: commit, device, CPU flags, threads, load average). XLA's temporary-buffer size from
`compiled.memory_analysis()` stands in for peak memory. JSON lines go to stdout and to
`--out` (default benchmarks/results/<platform>-linear-scan.jsonl); each row carries
`speedup_vs_sequential` (parallel rows) and `speedup_vs_lstm` (step-time ratios, > 1 = faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_record, setup_process, time_stats, timed_rounds  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxseq.cells import LSTM  # noqa: E402
from jaxseq.linear_cells import LRU, MinGRU, MinLSTM  # noqa: E402
from jaxseq.scan import StepOnly, unroll  # noqa: E402


def configs(hidden: int):
    linear = {"mingru": MinGRU(hidden, hidden), "minlstm": MinLSTM(hidden, hidden), "lru": LRU(hidden, hidden)}
    for name, cell in linear.items():
        yield name, "parallel", cell
        yield name, "sequential", StepOnly(cell)
    yield "lstm", "sequential", LSTM(hidden, hidden)


def compile_one(cell, batch: int, length: int):
    """(compiled value_and_grad, its arguments, compile seconds, XLA temp bytes)."""
    params = jax.jit(cell.init)(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (batch, length, cell.d_in), jnp.float32)

    def loss(p, x):
        ys, _ = unroll(cell, p, x)
        return jnp.mean(ys**2)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, xs).compile()
    compile_s = time.perf_counter() - t0
    try:
        temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        temp_bytes = None
    jax.block_until_ready(compiled(params, xs))  # warm-up: the first call's one-off costs stay out of the timings
    return compiled, (params, xs), compile_s, temp_bytes


def time_round_robin(programs, reps: int, budget_s: float):
    """Time each program once per round, `reps` rounds (at least 3, fewer past budget_s), each timed
    call after an untimed one of its own (`_common.timed_rounds`): interleaving spreads the noise of a
    shared machine evenly over the configs compared. Returns one list of seconds per program."""
    calls = {i: (lambda c=compiled, a=args: jax.block_until_ready(c(*a))) for i, (compiled, args) in enumerate(programs)}
    times = [[] for _ in programs]
    start = time.perf_counter()
    for r in range(reps):
        if r >= 3 and time.perf_counter() - start > budget_s:
            break
        (one,) = timed_rounds(calls, rounds=1)
        for i, ts in enumerate(times):
            ts += one[i]
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lengths", default="64,256,1024,4096")
    parser.add_argument("--reps", type=int, default=15, help="timed rounds over all configs (fewer past --budget-s)")
    parser.add_argument("--budget-s", type=float, default=90.0,
                        help="per length: no new round after this many seconds (at least 3 rounds)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--system-malloc", action="store_true", help="glibc's default malloc")
    args = parser.parse_args()
    if args.reps < 3:
        parser.error("--reps must be at least 3 (a median of fewer rounds says little)")
    process = setup_process(args.system_malloc)  # before JAX's first computation

    backend = jax.default_backend()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{backend}-linear-scan.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = {"backend": backend, "device_kind": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
           "machine": platform.machine()}
    with open(out, "w") as f:
        for length in (int(t) for t in args.lengths.split(",")):
            names = list(configs(args.hidden))
            built = [compile_one(cell, args.batch, length) for _, _, cell in names]
            times = time_round_robin([(c, a) for c, a, _, _ in built], args.reps, args.budget_s)
            rows, record = [], run_record(**process)
            for (model, form, _), (_, _, compile_s, temp_bytes), ts in zip(names, built, times):
                median = statistics.median(ts)
                rows.append({
                    "bench": "linear_scan", "model": model, "form": form, "batch": args.batch, "hidden": args.hidden,
                    "length": length, "compile_s": round(compile_s, 3), **time_stats(ts), "reps": len(ts),
                    "tokens_per_s": round(args.batch * length / median, 1), "temp_bytes": temp_bytes, **env, **record,
                })
            del built
            step = {(r["model"], r["form"]): r["step_ms"] for r in rows}
            for r in rows:
                if r["form"] == "parallel":
                    r["speedup_vs_sequential"] = round(step[(r["model"], "sequential")] / r["step_ms"], 3)
                r["speedup_vs_lstm"] = round(step[("lstm", "sequential")] / r["step_ms"], 3)
                line = json.dumps(r)
                print(line, flush=True)
                f.write(line + "\n")
                f.flush()


if __name__ == "__main__":
    main()
