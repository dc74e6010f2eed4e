"""WaveNet generation speed: queued recurrent steps (Paine et al. 2016) against naive recomputation.

    python benchmarks/wavenet_generation.py                 # receptive fields 257 .. 4097, batch 1
    python benchmarks/wavenet_generation.py --cycles 8,10 --reps 2

For each dilation cycle c (one block of c layers, dilations 1 .. 2**(c-1), a receptive field of 2**c + 1
samples with the input convolution) the same WaveNet generates samples by ancestral sampling in three
ways, each one jitted `lax.scan` over the steps, all in one process:

- `queue-ring`: the model's `step`, one queue per layer used as a ring buffer (a step reads and writes
  O(1) rows per layer: cost O(layers));
- `queue-shift`: the same queues shifted by one row per step (moves the whole receptive field's rows);
- `naive`: the parallel form over the last receptive-field samples, keeping only the last logits (cost
  O(layers x receptive field) per sample).

Samples per second are batch x steps over the median of `reps` timed calls after a compile call, the
methods timed in turn (round robin) so that a shared machine's noise falls on all of them alike. JSON
lines go to stdout and to `--out` (default benchmarks/results/wavenet_generation-<platform>.jsonl), and
a log-log plot of samples/s against the receptive field beside it (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run_record, setup_process  # noqa: E402

from jaxseq.models.wavenet import WaveNet, generate  # noqa: E402


@partial(jax.jit, static_argnames=("model", "num_steps"))
def naive_generate(model, variables, speaker, num_steps, key):
    """Ancestral sampling by re-running the parallel form over the last receptive_field codes each step."""
    B, R = speaker.shape[0], model.receptive_field

    def body(window, i):
        logits = model.apply(variables, window, speaker)[:, -1]
        code = jax.random.categorical(jax.random.fold_in(key, i), logits).astype(jnp.int32)
        return jnp.concatenate([window[:, 1:], code[:, None]], axis=1), code

    _, codes = jax.lax.scan(body, jnp.full((B, R), 128, jnp.int32), jnp.arange(num_steps))
    return codes.T


def _time_round_robin(fns: dict, reps: int) -> dict:
    """{name: (median_s, min_s, max_s)} of `reps` calls of each fn after a compile call, timed in turn, so that a
    shared machine's slow spells fall on every method alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile + warm-up
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(ts), min(ts), max(ts)) for name, ts in times.items()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cycles", default="8,9,10,11,12", help="dilation cycles (receptive field 2**c + 1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--skip-channels", type=int, default=64)
    p.add_argument("--queue-steps", type=int, default=2048)
    p.add_argument("--naive-work", type=int, default=1 << 16, help="naive steps x receptive field per call")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (at least 3)")
    p.add_argument("--out", default="")
    p.add_argument("--system-malloc", action="store_true", help="glibc's default malloc")
    a = p.parse_args(argv)
    if a.reps < 3:
        p.error("--reps must be at least 3 (a median of fewer rounds says little)")
    process = setup_process(a.system_malloc)  # before JAX's first computation, as every benchmark
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"wavenet_generation-{jax.default_backend()}.jsonl")
    rows = []
    speaker = jnp.zeros((a.batch,), jnp.int32)
    key = jax.random.key(0)
    for c in (int(x) for x in a.cycles.split(",")):
        model = WaveNet(num_speakers=1, channels=a.channels, skip_channels=a.skip_channels, dilation_cycle=c, repeats=1)
        R = model.receptive_field
        variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1,), jnp.int32))
        naive_steps = max(8, a.naive_work // R)
        runs = {
            "queue-ring": (a.queue_steps, lambda: generate(model, variables, speaker, a.queue_steps, key)),
            "queue-shift": (a.queue_steps, lambda: generate(model.clone(ring=False), variables, speaker,
                                                             a.queue_steps, key)),
            "naive": (naive_steps, lambda: naive_generate(model, variables, speaker, naive_steps, key)),
        }
        timed = _time_round_robin({m: fn for m, (_, fn) in runs.items()}, a.reps)
        for method, (steps, _) in runs.items():
            med, best, worst = timed[method]
            row = {"bench": "wavenet_generation", "method": method, "receptive_field": R, "layers": c,
                   "channels": a.channels, "batch": a.batch, "steps": steps, "median_s": med, "min_s": best,
                   "max_s": worst, "samples_per_s": a.batch * steps / med, **run_record(**process)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        ring = next(r for r in rows if r["receptive_field"] == R and r["method"] == "queue-ring")
        naive = next(r for r in rows if r["receptive_field"] == R and r["method"] == "naive")
        print(f"# receptive field {R}: queues {ring['samples_per_s'] / naive['samples_per_s']:.1f}x naive", flush=True)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    plot(rows, out.rsplit(".", 1)[0] + ".png")
    return rows


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, style in (("queue-ring", "o-"), ("queue-shift", "s--"), ("naive", "^-")):
        pts = sorted((r["receptive_field"], r["samples_per_s"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), style, label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("receptive field (samples)")
    ax.set_ylabel("samples / s (batch %d)" % rows[0]["batch"])
    ax.set_title(f"WaveNet generation, {rows[0]['device'].split(',')[0][:40]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
