"""Where a jitted step's time goes, per XLA op: the profile behind benchmarks/README.md's measurement history.

Runs one of the benchmark cases under `jax.profiler` (XLA:CPU's thunk runtime records one trace event
per executed op, loop bodies included), then prints for the last of `--steps` traced steps:

  * the step's wall time and, per thread, the time it spent inside ops (how busy each core was), and
    the minor page faults of one untraced step;
  * the ops that took longest, summed over calls (a loop body's op is called once per iteration);
  * every matmul, grouped by output shape and contraction size, with its GFLOP/s (FLOPs from the
    compiled HLO), so a slow shape stands out against the device's peak;
  * a timeline in 20 slices of the step: time inside ops in each, and its three largest op groups.

Per-op times are wall times of events on a thread: ops run concurrently when XLA finds independent
work, so sums can exceed the step, and a library matmul's helper threads are not counted. Profiling
adds overhead (a few %); compare within one run, never against the untraced benchmarks.

    python benchmarks/op_profile.py lstm --hidden 256        # jaxseq's fused LSTM, train step
    python benchmarks/op_profile.py gru --hidden 512
    python benchmarks/op_profile.py attention --length 1024  # jaxseq.kernels.flash_attention (JAX), fwd + bwd
                                                             # (the native kernel is one op to the profiler)
    python benchmarks/op_profile.py gpt                      # GPT train step, d 256 / ctx 256 / batch 16
    python benchmarks/op_profile.py gpt --json out.json      # also write the tables as JSON
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jaxseq  # noqa: E402
from _common import setup_process  # noqa: E402
from jaxseq.xla_options import compiler_options  # noqa: E402

# Trace events that are not ops: the runtime's own spans and Python-side annotations.
_NOT_OPS = ("ThunkExecutor", "Threadpool", "SlinkyThreadPool", "$", "np.", "PjitFunction", "Common", "end: ")


# ------------------------------------------------------------------------------------------ cases
# Each returns (jitted function, its arguments): one call = one step.


def rnn_case(kind: str, args):
    B, T, D, H = args.batch, args.length, args.d_in, args.hidden
    cell = jaxseq.LSTM(D, H) if kind == "lstm" else jaxseq.GRU(D, H)
    params = cell.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    w = jax.random.normal(jax.random.key(2), (B, T, H))

    def loss(p, x):
        return jnp.sum(jaxseq.unroll(cell, p, x)[0] * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, xs)


def attention_case(args):
    from jaxseq.kernels.flash_attention import flash_attention

    B, T, H, d = args.batch, args.length, args.heads, args.head_dim
    q, k, v, g = (jax.random.normal(jax.random.key(i), (B, T, H, d)) for i in range(4))

    def step(q, k, v, g):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v)
        return (out,) + vjp(g)

    return jax.jit(step, compiler_options=compiler_options(cpu_dots="ynn")), (q, k, v, g)


def gpt_case(args):
    import optax

    from gpt_step import make_jaxseq_step
    from jaxseq.config import TransformerConfig
    from jaxseq.models.transformer import TransformerLM
    from jaxseq.steps import init_train_state

    cfg = TransformerConfig(num_layers=args.layers, num_heads=args.heads, d_model=args.d_model,
                            d_ff=4 * args.d_model, max_len=args.context, dropout=0.0)  # fmt: skip
    model = TransformerLM.from_config(cfg, vocab_size=args.vocab)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.context + 1))
    x, y = jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)
    optimizer = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.0)
    state = init_train_state(jax.jit(model.init)(jax.random.key(0), x)["params"], optimizer)
    call = make_jaxseq_step(model, optimizer)
    box = {"state": state}

    def step(x, y):  # the state is donated: keep the newest one
        box["state"], loss = call(box["state"], x, y)
        return loss

    step.lower = lambda x, y: call.jitted.lower(box["state"], {"inputs": x, "targets": y, "mask": jnp.ones(x.shape, bool)})
    return step, (x, y)


# ------------------------------------------------------------------------------------------ HLO


def matmul_flops(hlo_text: str) -> dict[str, tuple[float, str]]:
    """{op name as traced: (FLOPs, 'output shape K=contraction')} for every op that is, or fuses, a dot."""
    calls = dict(re.findall(r"^\s*%([\w.\-]+) = [^=]*? fusion\(.*?calls=%([\w.\-]+)", hlo_text, re.M))
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S)}
    shapes = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", hlo_text))

    def dims(shape):
        return [int(v) for v in re.match(r"\w+\[([\d,]*)\]", shape).group(1).split(",") if v]

    def dots_in(text):
        flops, labels = 0.0, []
        for m in re.finditer(r"= (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %[\w.\-]+\)[^\n]*?lhs_contracting_dims=\{([\d,]*)\}", text):
            out, lhs, contracting = m.groups()
            k = math.prod(dims(shapes[lhs])[int(c)] for c in contracting.split(",") if c) if lhs in shapes else 0
            flops += 2.0 * math.prod(dims(out)) * k
            labels.append(f"{out} K={k}")
        return flops, ";".join(labels)

    found = {}
    for name, comp in calls.items():
        flops, label = dots_in(bodies.get(comp, ""))
        if flops:
            found[name] = (flops, label)
    for m in re.finditer(r"^\s*%([\w.\-]+) = (\w+\[[\d,]*\])\S* dot\(", hlo_text, re.M):  # unfused dots
        flops, label = dots_in(m.group(0) + hlo_text[m.end() : hlo_text.index("\n", m.end())])
        if flops:
            found[m.group(1)] = (flops, label)
    return found


def custom_call_targets(hlo_text: str) -> dict[str, str]:
    """{op name: custom-call target} for the custom calls (the native kernels' FFI calls)."""
    return dict(re.findall(r"^\s*%([\w.\-]+) = [^\n]*? custom-call\([^\n]*?custom_call_target=\"([\w.\-]+)\"", hlo_text, re.M))


# ------------------------------------------------------------------------------------------ trace


def trace_events(fn, fn_args, steps: int) -> list[dict]:
    """The complete ("X") events of `steps` calls of fn(*fn_args) under jax.profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(steps):
            jax.block_until_ready(fn(*fn_args))
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))[-1]
        data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def summarize(events: list[dict], flops: dict, top: int, targets: dict | None = None) -> dict:
    """Tables for the last traced execution of the program; a custom call is grouped by its target."""
    targets = targets or {}

    def group_of(name):
        return targets.get(name) or re.sub(r"\.\d+$", "", name)

    runs = sorted((e for e in events if e["name"] == "ThunkExecutor::Execute (wait for completion)"), key=lambda e: e["ts"])
    if not runs:
        raise RuntimeError("no XLA execution in the trace: is this a CPU backend with the thunk runtime?")
    # The last execution: from the first op after the previous one finished (its first op may start before
    # the "wait" span does) to the end of its wait.
    t1 = runs[-1]["ts"] + runs[-1]["dur"]
    after = runs[-2]["ts"] + runs[-2]["dur"] if len(runs) > 1 else runs[-1]["ts"]
    ops = [e for e in events if after < e["ts"] <= t1 and not e["name"].startswith(_NOT_OPS)]
    t0 = min(e["ts"] for e in ops)
    leaf = [e for e in ops if not e["name"].startswith(("while", "conditional", "call"))]  # loops hold other ops
    wall_ms = (t1 - t0) / 1e3

    busy = collections.Counter()
    by_op = collections.defaultdict(lambda: [0.0, 0])
    by_shape = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for e in leaf:
        busy[e["tid"]] += e["dur"] / 1e3
        group = group_of(e["name"])
        by_op[group][0] += e["dur"] / 1e3
        by_op[group][1] += 1
        if e["name"] in flops:
            f, label = flops[e["name"]]
            # A plain `dot` thunk is XLA's Eigen matmul, which returns once its work is queued on the
            # thread pool: its event is the launch, not the matmul, so it gets no rate.
            row = by_shape[(label, e["name"].startswith("dot"))]
            row[0] += e["dur"] / 1e3
            row[1] += f
            row[2] += 1
    bins = collections.defaultdict(collections.Counter)  # 20 slices of the step: which ops ran in each
    for e in leaf:
        bins[min(19, int(20 * (e["ts"] - t0) / (t1 - t0)))][group_of(e["name"])] += e["dur"] / 1e3
    return {
        "wall_ms": round(wall_ms, 2),
        "busy_ms_per_thread": sorted((round(v, 1) for v in busy.values()), reverse=True),
        "ops": [
            {"op": k, "ms": round(v[0], 2), "calls": v[1]}
            for k, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "matmuls": [
            {"shape": label, "ms": round(v[0], 2), "calls": v[2], "gflops": round(v[1] / 1e9, 3),
             "gflop_per_s": None if launch_only else round(v[1] / v[0] / 1e6, 1)}
            for (label, launch_only), v in sorted(by_shape.items(), key=lambda kv: -kv[1][0])
        ],  # fmt: skip
        "timeline": [
            {"from_ms": round(i * wall_ms / 20, 1), "busy_ms": round(sum(bins[i].values()), 2),
             "top_ops": [[k, round(v, 2)] for k, v in bins[i].most_common(3)]}
            for i in range(20)
        ],  # fmt: skip
    }


def print_report(rep: dict, title: str):
    print(f"# {title}\nstep (traced): {rep['wall_ms']:.1f} ms; time inside ops per thread: {rep['busy_ms_per_thread']} ms\n")
    print("| op (summed over calls) | ms | calls |\n|---|---|---|")
    for r in rep["ops"]:
        print(f"| {r['op']} | {r['ms']:.2f} | {r['calls']} |")
    timed = [r for r in rep["matmuls"] if r["gflop_per_s"] is not None]
    total_ms, total_gf = sum(r["ms"] for r in timed), sum(r["gflops"] for r in timed)
    print(f"\nmatmuls with measured time: {total_ms:.1f} ms, {total_gf:.2f} GFLOP, "
          f"{total_gf / max(total_ms, 1e-9) * 1e3:.0f} GFLOP/s ('async': an Eigen matmul, only its launch is seen)")
    print("| output, contraction | ms | calls | GFLOP | GFLOP/s |\n|---|---|---|---|---|")
    for r in rep["matmuls"]:
        rate = "async" if r["gflop_per_s"] is None else f"{r['gflop_per_s']:.0f}"
        print(f"| {r['shape']} | {r['ms']:.2f} | {r['calls']} | {r['gflops']:.2f} | {rate} |")
    print("\ntimeline, in 20 slices of the step (time inside ops, all threads; the three largest op groups):")
    for r in rep["timeline"]:
        tops = ", ".join(f"{k} {v:.1f}" for k, v in r["top_ops"])
        print(f"  from {r['from_ms']:7.1f} ms: {r['busy_ms']:6.1f} ms  {tops}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", choices=("lstm", "gru", "attention", "gpt"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--length", type=int, default=None, help="rnn: 128; attention: 1024")
    ap.add_argument("--batch", type=int, default=None, help="rnn: 32; attention: 8; gpt: 16")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--steps", type=int, default=2, help="traced steps, at least 2 (the last one is reported)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", default="", help="also write the report here")
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep glibc's default malloc (by default freed memory is reused, as in `jaxseq train`)")
    args = ap.parse_args(argv)
    setup_process(args.system_malloc)  # before JAX's first computation, as every benchmark (jaxseq/malloc.py)
    if args.steps < 2:  # the last step is found as "after the previous one ended"
        ap.error("--steps must be at least 2")
    defaults = {"lstm": (128, 32), "gru": (128, 32), "attention": (1024, 8), "gpt": (None, 16)}[args.case]
    args.length = args.length or defaults[0]
    args.batch = args.batch or defaults[1]

    if args.case in ("lstm", "gru"):
        fn, fn_args = rnn_case(args.case, args)
        title = f"{args.case} train step, batch {args.batch}, length {args.length}, input {args.d_in}, hidden {args.hidden}"
    elif args.case == "attention":
        fn, fn_args = attention_case(args)
        title = f"causal flash attention fwd + bwd, batch {args.batch}, length {args.length}, {args.heads} x {args.head_dim}"
    else:
        fn, fn_args = gpt_case(args)
        title = f"GPT train step, {args.layers} layers, d {args.d_model}, context {args.context}, batch {args.batch}"
    hlo = fn.lower(*fn_args).compile().as_text()
    for _ in range(5):  # compile and warm up (the heap reaches its steady size over a few steps)
        jax.block_until_ready(fn(*fn_args))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    jax.block_until_ready(fn(*fn_args))
    untraced_ms = (time.perf_counter() - t) * 1e3
    # Minor page faults of that step: fresh pages of buffers mapped anew on every call (benchmarks/README.md,
    # "Measurement history"); they show up as slow first ops in the timeline.
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    rep = summarize(trace_events(fn, fn_args, args.steps), matmul_flops(hlo), args.top, custom_call_targets(hlo))
    rep.update(case=args.case, title=title, untraced_step_ms=round(untraced_ms, 1), page_faults=faults,
               backend=jax.default_backend())  # fmt: skip
    print_report(rep, f"{title} ({jax.devices()[0].device_kind}; one untraced step: {untraced_ms:.1f} ms, "
                      f"{faults} page faults)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
