"""Causal self-attention, forward + backward, against sequence length: jaxseq flash vs XLA vs PyTorch SDPA.

One attention op with q, k, v given (no projections): batch 8, 4 heads of 64 (d_model 256), lengths
64..4096, float32 (`--dtype bfloat16` for the GPU's fused kernels). Each step computes the output and
the gradients of sum(out * g) with respect to q, k, v for a fixed random cotangent g (`jax.vjp` /
`out.backward(g)`): what one layer costs in training.

  * jaxseq-flash: `jaxseq.kernels.flash_attention` (blockwise, online softmax, masked half skipped, own backward),
                  jitted with `jaxseq.xla_options.compiler_options` as jaxseq's Transformer steps are
                  (YNNPACK dots on CPU; `--cpu-dots xla` for XLA's defaults)
  * jaxseq-attention (GPU only): `jaxseq.attention(..., causal=True)`, the library's entry point,
                  which takes cuDNN's fused kernel when the call is eligible (bfloat16 / float16) and
                  XLA's otherwise; on CPU it is the flash row above
  * jax-xla:      `jax.nn.dot_product_attention(..., is_causal=True, implementation="xla")`
  * torch-sdpa:   `torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)` (its CPU flash
                  kernel; on a GPU backend torch runs on CUDA, or is left out if it has no CUDA), inputs
                  in its native [B, H, T, d] layout
  * torch-sdpa-compile: the same call under `torch.compile` (default mode, one graph per length), its
                  backward through AOTAutograd; left out, with the reason in `skipped`, where inductor
                  cannot build. Each row names the faster PyTorch form (`best_torch`) and its ratio to it.

All run in one process, after warm-up, interleaved (each in turn, `--repeats` rounds; every timed step
follows an untimed one of the same implementation, `_common.timed_rounds`) so a busy shared CPU slows
them alike; we report medians with min and max, tokens/s = batch * length / step time, and the
speedup over the faster PyTorch form (its time / ours). Rows are appended to the results file with a
`run_id`: run the script 3 times and `summarize.py` reports the median over the runs, with their min-max. Compile (first call) seconds are reported separately. Outputs and gradients are checked
against torch once per length before timing (max_abs_err_vs_torch). `peak_mb`: one step's peak memory
in each library's own account (`_common.jax_peak_mb`, `_common.torch_peak_mb`).

`--single-thread` pins the process to one core, runs XLA and torch with one thread each and times with
the process CPU clock: a measure of work per core that a busy shared machine disturbs far less than
wall time (the default, which uses every core, is the number a user sees).

    python benchmarks/attention_scaling.py                  # all lengths -> results/cpu-attention.{jsonl,png}
    python benchmarks/attention_scaling.py --single-thread  # -> results/cpu-attention-1thread.{jsonl,png}
    python benchmarks/attention_scaling.py --quick          # 256 and 1024, 3 rounds, writes nothing
    python benchmarks/attention_scaling.py --lengths 1024 --flash-variants 128:128:4,256:256:2  # block sizes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="q, k, v, g and torch's tensors; bfloat16 lets a GPU use its fused kernels")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds per length (at least 3)")
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default malloc for every competitor")
    ap.add_argument("--cpu-dots", default="ynn", choices=("ynn", "xla"),
                    help="jaxseq rows: YNNPACK dots on CPU (as jaxseq's Transformer steps) or XLA's own")
    ap.add_argument("--flash-variants", default=None, help="block_q:block_k:chunk[:schedule],... (default: library defaults)")
    ap.add_argument("--no-xla", action="store_true", help="skip jax.nn.dot_product_attention")
    ap.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile form of SDPA")
    ap.add_argument("--xla-max-len", type=int, default=4096, help="skip XLA above this length (it holds B*H*T*T floats)")
    ap.add_argument("--single-thread", action="store_true", help="one core, one thread each, CPU-clock timing")
    ap.add_argument("--quick", action="store_true", help="lengths 256 and 1024, 3 rounds, write no files")
    ap.add_argument("--out", default=None, help="JSON-lines path (default results/cpu-attention[-1thread].jsonl)")
    ap.add_argument("--replot", default=None, metavar="JSONL", help="only redraw the plot of a results file")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [256, 1024], 3
    if args.repeats < 3:
        ap.error("--repeats must be at least 3 (a median of fewer rounds says little)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        lines = [json.loads(line) for line in open(args.replot)]
        rows = [r for r in lines if "impl" in r]
        plot(rows, Path(args.replot).with_suffix(".png"), rows[0]["single_thread"])
        return
    if args.single_thread:  # must happen before jax starts its thread pools
        # Eigen's own pool off; XLA:CPU sizes its intra-op pool by the cores this process may run on,
        # so the affinity mask is what makes it one thread (XLA has no flag for that pool's size).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import setup_process

    process = setup_process(args.system_malloc)  # before JAX's first computation, for every competitor
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _common import (jax_peak_mb, run_record, time_stats, timed_rounds,
                         torch_device, torch_peak_mb)
    from jaxseq.attention import attention
    from jaxseq.kernels.flash_attention import flash_attention
    from jaxseq.xla_options import compiler_options

    if args.single_thread:
        torch.set_num_threads(1)
    clock = time.process_time if args.single_thread else time.perf_counter
    write = not args.quick and args.flash_variants is None
    B, H, d = args.batch, args.heads, args.head_dim
    tdev = torch_device(torch)  # "cpu", "cuda", or None: no torch rows (a GPU backend, a CPU-only torch)
    jdtype, tdtype = (jnp.bfloat16, torch.bfloat16) if args.dtype == "bfloat16" else (jnp.float32, torch.float32)

    variants = [("jaxseq-flash", {})]
    if args.flash_variants:
        variants = []
        for item in args.flash_variants.split(","):
            bq, bk, ch, *sched = item.split(":")
            kw = dict(block_q=int(bq), block_k=int(bk), chunk=int(ch), schedule=sched[0] if sched else "rows")
            variants.append((f"jaxseq-flash[{item}]", kw))

    def jax_step(fn, options):
        def step(q, k, v, g):
            out, vjp = jax.vjp(fn, q, k, v)
            return (out,) + vjp(g)

        return jax.jit(step, compiler_options=options)

    # jaxseq's rows compile as jaxseq's Transformer steps do (YNNPACK dots on CPU, jaxseq.xla_options);
    # jax.nn.dot_product_attention compiles with XLA's defaults, as a user's own jit would.
    jaxseq_options = compiler_options(cpu_dots=args.cpu_dots)

    header = {
        "event": "start", "backend": jax.default_backend(), "jax": jax.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
        "single_thread": args.single_thread, "clock": "process_cpu" if args.single_thread else "wall",
        **run_record(torch, **process),
    }  # fmt: skip
    print(json.dumps(header), flush=True)
    def eager_sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    # PyTorch's other form: the same call under torch.compile (default mode; the backward through
    # AOTAutograd), dynamic=False so each length gets its own graph as XLA's do.
    compiled_sdpa = None if args.no_torch_compile else torch.compile(eager_sdpa, dynamic=False)
    skipped = {}
    rows = []
    for T in args.lengths:
        rng = np.random.RandomState(T)
        qn, kn, vn, gn = (rng.standard_normal((B, T, H, d)).astype(np.float32) for _ in range(4))
        q, k, v, g = (jnp.asarray(x, jdtype) for x in (qn, kn, vn, gn))
        steps, compile_s, max_err, peak_mb, want = {}, {}, {}, {}, None
        if tdev:
            tq, tk, tv, tg = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).to(tdev, tdtype) for x in (qn, kn, vn, gn))
            for t in (tq, tk, tv):
                t.requires_grad_(True)

            def torch_stepper(sdpa):
                def torch_step():
                    for t in (tq, tk, tv):
                        t.grad = None
                    out = sdpa(tq, tk, tv)
                    out.backward(tg)
                    if tdev == "cuda":
                        torch.cuda.synchronize()
                    return out

                return torch_step

            torch_forms = {"torch-sdpa": torch_stepper(eager_sdpa)}
            if compiled_sdpa is not None:
                torch_forms["torch-sdpa-compile"] = torch_stepper(compiled_sdpa)
            for name, torch_step in torch_forms.items():
                t0 = clock()
                try:
                    out = torch_step()
                except Exception as err:  # inductor needs a C++ toolchain; the eager row must not fail
                    if name == "torch-sdpa":
                        raise
                    skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    print(f"skipping {name}: {skipped[name]}", file=sys.stderr, flush=True)
                    continue
                compile_s[name] = clock() - t0
                got = [x.detach().float().cpu().numpy().transpose(0, 2, 1, 3) for x in [out] + [t.grad for t in (tq, tk, tv)]]
                if want is None:
                    want, max_err[name] = got, 0.0
                else:
                    max_err[name] = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))
                steps[name] = torch_step
        jax_fns = {name: (lambda q, k, v, kw=kw: flash_attention(q, k, v, causal=True, **kw)) for name, kw in variants}
        # The entry point: the native kernel on CPU, cuDNN's on GPU when eligible.
        jax_fns["jaxseq-attention"] = lambda q, k, v: attention(q, k, v, causal=True)
        if not args.no_xla and T <= args.xla_max_len:
            jax_fns["jax-xla"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="xla"
            )
        options = {name: jaxseq_options if name.startswith("jaxseq") else {} for name in jax_fns}
        for name, fn in jax_fns.items():
            t0 = clock()
            step = jax_step(fn, options[name]).lower(q, k, v, g).compile()
            got = jax.block_until_ready(step(q, k, v, g))  # trace + compile + one run
            compile_s[name] = clock() - t0
            if want is not None:
                max_err[name] = max(float(np.max(np.abs(np.asarray(a, np.float32) - b))) for a, b in zip(got, want))
            steps[name] = lambda step=step: jax.block_until_ready(step(q, k, v, g))
            peak_mb[name] = jax_peak_mb(step)
        for fn in steps.values():  # one more warm-up call each
            fn()
        for name in [n for n in steps if n.startswith("torch")]:  # a profiled step each, outside the timing
            peak_mb[name] = torch_peak_mb(torch, steps[name], tdev)

        (times,) = timed_rounds(steps, args.repeats, clocks=(clock,))
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        med_torch = medians.get("torch-sdpa")
        best_torch = min((n for n in medians if n.startswith("torch")), key=medians.get, default=None)
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {
                "bench": "attention_causal_fwd_bwd", "impl": name, "batch": B, "length": T, "heads": H,
                "head_dim": d, "dtype": args.dtype, "single_thread": args.single_thread,
                "compile_s": round(compile_s[name], 3),
                "step_ms_median": round(1e3 * med, 2), **time_stats(ts),
                "tokens_per_s": round(B * T / med, 1),
                "speedup_vs_torch": round(med_torch / med, 3) if med_torch else None,
                "best_torch": best_torch, "skipped": skipped,
                "speedup_vs_best_torch": round(medians[best_torch] / med, 3) if best_torch else None,
                "max_abs_err_vs_torch": max_err.get(name), "peak_mb": peak_mb[name], "repeats": args.repeats,
                "compiler_options": options.get(name, {}),
                **run_record(torch, **process),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)

    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = ("cpu" if jax.default_backend() == "cpu" else "gpu") + "-attention"
        stem += ("-bf16" if args.dtype == "bfloat16" else "") + ("-1thread" if args.single_thread else "")
        out = Path(args.out) if args.out else RESULTS / f"{stem}.jsonl"
        with open(out, "a") as f:  # appended: summarize.py takes the median over the runs of one commit
            for row in [header] + rows:
                f.write(json.dumps(row) + "\n")
        plot(rows, out.with_suffix(".png"), args.single_thread)


def plot(rows, path, single_thread):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(json.dumps({"event": "no_plot", "why": "matplotlib is not installed (pip install matplotlib)"}))
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["impl"] for r in rows):
        rs = [r for r in rows if r["impl"] == name]
        ax.plot([r["length"] for r in rs], [1e6 / r["tokens_per_s"] for r in rs], marker="o", label=name)
    r0 = rows[0]
    on_cpu = r0.get("device", "cpu").startswith("cpu")
    where = "1 core, CPU time" if single_thread else f"{os.cpu_count()}-core CPU, wall time" if on_cpu else r0["device"]
    where += ", bfloat16" if r0.get("dtype") == "bfloat16" else ""
    ax.set(
        xscale="log", yscale="log", xlabel="sequence length", ylabel="microseconds per token (fwd + bwd)",
        title=f"causal attention, batch {r0['batch']}, {r0['heads']} heads x {r0['head_dim']}, {where}",
    )  # fmt: skip
    lengths = sorted({r["length"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(json.dumps({"event": "plot", "path": str(path)}))


if __name__ == "__main__":
    main()
