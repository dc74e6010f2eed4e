"""Causal self-attention, forward + backward, against sequence length: jaxseq flash vs XLA vs PyTorch SDPA.

One attention op with q, k, v given (no projections): batch 8, 4 heads of 64 (d_model 256), lengths
256..4096. Each step computes the output and the gradients of sum(out * g) with respect to q, k, v
for a fixed random cotangent g (`jax.vjp` / `out.backward(g)`), i.e. what one layer costs in training.

  * jaxseq-flash: `jaxseq.flash_attention` (blockwise, online softmax, masked half skipped, own backward)
  * jax-xla:      `jax.nn.dot_product_attention(..., is_causal=True, implementation="xla")`
  * torch-sdpa:   `torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)` (its CPU flash
                  kernel), inputs in its native [B, H, T, d] layout

All run in one process, after warm-up, interleaved (one step of each in turn, `--repeats` rounds) so a
busy shared CPU slows them alike; we report medians, tokens/s = batch * length / step time, and ratios
to torch. Compile (first call) seconds are reported separately. Outputs and gradients are checked
against torch once per length before timing.

    python benchmarks/attention_scaling.py            # all lengths, JSON lines + results/cpu-attention.*
    python benchmarks/attention_scaling.py --quick    # 256 and 1024, fewer repeats, no files written
    python benchmarks/attention_scaling.py --flash-variants rows:256:256,pairs:256:256   # compare variants
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxseq.flash_attention import flash_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_jax_step(fn):
    """(q, k, v, g) -> (out, dq, dk, dv), jitted."""

    def step(q, k, v, g):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out,) + vjp(g)

    return jax.jit(step)


def block(xs):
    for x in xs:
        x.block_until_ready()
    return xs


def parse_variants(spec: str):
    """'rows:256:256,pairs:512:256' -> [(name, schedule, block_q, block_k)]."""
    out = []
    for item in spec.split(","):
        sched, bq, bk = item.split(":")
        name = "jaxseq-flash" if spec.count(",") == 0 else f"jaxseq-flash[{sched},{bq},{bk}]"
        out.append((name, sched, int(bq), int(bk)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds per length")
    ap.add_argument("--flash-variants", default=None, help="schedule:block_q:block_k,...; default: the library default")
    ap.add_argument("--no-xla", action="store_true", help="skip jax.nn.dot_product_attention")
    ap.add_argument("--xla-max-len", type=int, default=4096, help="skip XLA above this length (memory: T^2 scores)")
    ap.add_argument("--quick", action="store_true", help="lengths 256 and 1024, 3 rounds, write no files")
    ap.add_argument("--out", default=None, help="JSON-lines file (default results/cpu-attention.jsonl)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [256, 1024], 3
    write = not args.quick and args.flash_variants is None

    torch.manual_seed(0)
    B, H, d = args.batch, args.heads, args.head_dim
    variants = (
        parse_variants(args.flash_variants) if args.flash_variants else [("jaxseq-flash", None, None, None)]
    )
    rows = []
    print(json.dumps({"event": "start", "backend": jax.default_backend(), "jax": jax.__version__,
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                      "cpu_count": os.cpu_count(), "load": load()}), flush=True)  # fmt: skip
    for T in args.lengths:
        rng = np.random.RandomState(T)
        qn, kn, vn, gn = (rng.standard_normal((B, T, H, d)).astype(np.float32) for _ in range(4))
        q, k, v, g = (jnp.asarray(x) for x in (qn, kn, vn, gn))

        # torch, native [B, H, T, d] layout
        tq, tk, tv, tg = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (qn, kn, vn, gn))
        for t in (tq, tk, tv):
            t.requires_grad_(True)

        def torch_step():
            for t in (tq, tk, tv):
                t.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            out.backward(tg)
            return out

        impls = {}
        for name, sched, bq, bk in variants:
            kw = {} if sched is None else dict(schedule=sched, block_q=bq, block_k=bk)
            impls[name] = make_jax_step(lambda q, k, v, kw=kw: flash_attention(q, k, v, causal=True, **kw))
        if not args.no_xla and T <= args.xla_max_len:
            impls["jax-xla"] = make_jax_step(
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
            )

        # warm-up: compile (timed), then one more call each; check agreement with torch
        compile_s = {}
        t0 = time.perf_counter()
        ref = torch_step()
        compile_s["torch-sdpa"] = time.perf_counter() - t0
        ref_o = ref.detach().numpy().transpose(0, 2, 1, 3)
        ref_g = [t.grad.numpy().transpose(0, 2, 1, 3) for t in (tq, tk, tv)]
        max_err = {}
        for name, fn in impls.items():
            t0 = time.perf_counter()
            res = block(fn(q, k, v, g))
            compile_s[name] = time.perf_counter() - t0
            max_err[name] = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(res, [ref_o] + ref_g))
            block(fn(q, k, v, g))
        torch_step()

        times = {name: [] for name in ["torch-sdpa", *impls]}
        for _ in range(args.repeats):
            for name in times:
                t0 = time.perf_counter()
                if name == "torch-sdpa":
                    torch_step()
                else:
                    block(impls[name](q, k, v, g))
                times[name].append(time.perf_counter() - t0)
        med_torch = statistics.median(times["torch-sdpa"])
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {
                "bench": "attention_causal_fwd_bwd", "impl": name, "batch": B, "length": T, "heads": H,
                "head_dim": d, "compile_s": round(compile_s[name], 3), "step_ms_median": round(1e3 * med, 2),
                "step_ms_min": round(1e3 * min(ts), 2), "tokens_per_s": round(B * T / med, 1),
                "speedup_vs_torch": round(med_torch / med, 3), "max_abs_err_vs_torch": max_err.get(name, 0.0),
                "repeats": args.repeats, "load": load(),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        del impls

    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = Path(args.out) if args.out else RESULTS / "cpu-attention.jsonl"
        with open(out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        plot(rows, RESULTS / "cpu-attention.png")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(json.dumps({"event": "no_plot", "why": "matplotlib is not installed"}))
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["impl"] for r in rows):
        rs = [r for r in rows if r["impl"] == name]
        ax.plot([r["length"] for r in rs], [1e6 / r["tokens_per_s"] for r in rs], marker="o", label=name)
    r0 = rows[0]
    ax.set(
        xscale="log", yscale="log", xlabel="sequence length", ylabel="microseconds per token (fwd + bwd)",
        title=f"causal attention, batch {r0['batch']}, {r0['heads']} heads x {r0['head_dim']}, 2-core CPU",
    )  # fmt: skip
    ax.set_xticks([r["length"] for r in rows if r["impl"] == r0["impl"]])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(json.dumps({"event": "plot", "path": str(path)}))


if __name__ == "__main__":
    main()
