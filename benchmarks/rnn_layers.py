"""LSTM / GRU layers, tokens/s: jaxseq (fused) vs jaxseq's plain scan vs Flax vs PyTorch.

One layer, batch 32, length 128, input 128, hidden 64 / 256 / 512, float32, on this machine's CPU.

  * jaxseq:          `jaxseq.unroll(LSTM|GRU(...), params, xs)`: the fused whole-sequence form
                     (`jaxseq.kernels.fused_rnn`, hand-written backward pass); on CPU jaxseq's native
                     kernels when they are built (`jaxseq.kernels.cpu.rnn`), the LSTM on GPU cuDNN.
  * jaxseq-scan:     the same cell through the reference path, `lax.scan` of `cell.step` with
                     JAX's autodiff (`unroll(..., kernels="reference")`).
  * flax-*:          `flax.linen.RNN(OptimizedLSTMCell | LSTMCell | GRUCell)`.
  * torch:           `torch.nn.LSTM` / `torch.nn.GRU` (batch_first), eager, `torch.set_num_threads` left
                     at its default unless --threads is given. On CPU the LSTM runs PyTorch's oneDNN
                     RNN kernel where oneDNN is built in; the GRU has no oneDNN path and runs ATen's
                     generic per-step loop (`torch_path` in each row says which).
  * torch-compile-cell (GRU): the stronger PyTorch form of the GRU: the input projection of the whole
                     sequence as one matmul, then a Python loop over a `torch.compile`d cell step
                     (default mode, inductor: h @ W_hh and the gates fused), on nn.GRU's parameters.
                     Left out, with the reason printed, where inductor cannot build.
  * jaxseq-fused:    jaxseq's fused recurrence in XLA, without the dispatch that the `jaxseq` row
                     goes through: jaxseq's native kernels on CPU (`jaxseq.kernels.cpu.rnn`; the row
                     is there when they are built), cuDNN for the LSTM on a GPU.
  * GPU only (LSTM): `jax-experimental-rnn`, JAX's cuDNN LSTM (`rnn.lstm` on jaxseq's packed
                     weights, `jaxseq.kernels.cudnn_lstm.lstm_cudnn`).

Modes: `train` = forward + backward of loss = sum(outputs * W) with W a fixed random [B, T, H]
array, gradients of every parameter and of the input; `infer` = forward only (torch under
`inference_mode`). JAX functions are jitted once (compile seconds reported apart); every
competitor is warmed up, then all of a case's competitors run in one process, in turn for `--repeats`
rounds, each timed call right after an untimed call of its own (`_common.timed_rounds`: another
library's spinning threads would otherwise slow it), so a busy shared CPU slows them alike; medians
are reported.

FLOPs count the matmuls only: forward 2*B*T*(d_in + H)*G*H (G = 4 gates for LSTM, 3 for GRU),
training 3x that. `frac_peak` divides the achieved FLOP/s by the peak measured in the same run: the
fastest float32 matmul of jnp and torch at 1024^2 and 2048^2 (`_common.measure_peak`). Each line
names the device and the load average (the CPU is shared). `peak_mb` is one step's peak memory in each
library's own account (`_common.jax_peak_mb`: XLA's plan of arguments, outputs and temporaries;
`_common.torch_peak_mb`: torch's allocator, from its profiler on CPU), inputs and parameters included.
Each row has the median step time with its min and max over the rounds, and the machine record
(`_common.run_record`: commit, device, CPU flags, threads, load average). Every competitor runs under
the same process set-up (`_common.setup_process`: glibc keeps freed memory, as `jaxseq train` does;
`--system-malloc` for glibc's defaults).

    python benchmarks/rnn_layers.py                # full table, appended to benchmarks/results/cpu.jsonl (+ .png)
    python benchmarks/rnn_layers.py --replot benchmarks/results/cpu-rnn-layers.jsonl   # the plot only
    python benchmarks/rnn_layers.py --quick        # hidden 256 only, few repeats (~2 min)
    python benchmarks/rnn_layers.py --threads 1    # one thread for XLA and torch (less noise)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="hidden 256 only, 5 repeats")
    p.add_argument("--layers", default="lstm,gru")
    p.add_argument("--hidden", default="64,256,512")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds (at least 3)")
    p.add_argument("--system-malloc", action="store_true", help="glibc's default malloc for every competitor")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: libraries' defaults; N: XLA and torch on N threads")
    p.add_argument("--impls", default="", help="comma list to run a subset (names as in the output)")
    p.add_argument("--rss", action="store_true",
                   help="resident-memory row: run only the --impls competitor(s), no peak matmul, and record the "
                        "process's RSS before the first call and its high-water mark after (memory.py runs each "
                        "competitor so, alone in a fresh process)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu.jsonl"),
                   help="append the rows to this file (summarize.py takes the median over runs of one commit)")
    p.add_argument("--replot", default=None, metavar="JSONL", help="only redraw the plot (.png beside it) of a results file")
    return p.parse_args()


ARGS = _parse()
if ARGS.threads == 1:  # must be set before jax starts its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxseq  # noqa: E402
from jaxseq.kernels import cpu as native  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (device_name, jax_peak_mb, measure_peak, reset_peak_rss, rss_fields,  # noqa: E402
                     run_record, setup_process, time_stats, timed_rounds, torch_device, torch_peak_mb)

PROCESS = setup_process(ARGS.system_malloc)  # before JAX's first computation, the same for every competitor
if ARGS.threads:
    torch.set_num_threads(ARGS.threads)


DEVICE = device_name()


def _block(tree):
    return jax.block_until_ready(tree)


# ----------------------------------------------------------------------------- competitors
# Each maker returns (call, compile_s, peak_mb): `call()` runs one step and waits for it; peak_mb is None
# where it is measured after warm-up (torch).


def _jax_case(apply, params, xs, w, mode):
    """apply(params, xs) -> ys [B, T, H]; train: grads of every param and of xs."""
    if mode == "train":
        def loss(p, x):
            return jnp.sum(apply(p, x) * w)
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    else:
        fn = jax.jit(apply)
    t = time.perf_counter()
    compiled = fn.lower(params, xs).compile()
    compile_s = time.perf_counter() - t
    return (lambda: _block(compiled(params, xs))), compile_s, jax_peak_mb(compiled)


def make_jaxseq(kind, hidden, xs, w, mode, fused):
    d_in = xs.shape[-1]
    cell = jaxseq.LSTM(d_in, hidden) if kind == "lstm" else jaxseq.GRU(d_in, hidden)
    params = cell.init(jax.random.key(0))
    kernels = "auto" if fused else "reference"

    def apply(p, x):
        return jaxseq.unroll(cell, p, x, kernels=kernels)[0]
    return _jax_case(apply, params, xs, w, mode)


def make_undispatched(kind, hidden, xs, w, mode, cudnn):
    """jax.experimental.rnn's cuDNN LSTM (cudnn=True, GPU) or jaxseq's fused XLA path without the dispatch."""
    from jaxseq.kernels.cudnn_lstm import lstm_cudnn
    from jaxseq.kernels.fused_rnn import gru_sequence, lstm_sequence

    cell = (jaxseq.LSTM if kind == "lstm" else jaxseq.GRU)(xs.shape[-1], hidden)
    params = cell.init(jax.random.key(0))

    def apply(p, x):
        b, t = x.shape[:2]
        mask, carry0 = jnp.ones((b, t), bool), cell.initial_carry((b,), x.dtype)
        if cudnn:
            return lstm_cudnn(p, x, mask, carry0)[0]
        xla = lstm_sequence if kind == "lstm" else gru_sequence
        return xla(p, x, mask, carry0, jnp.zeros((b, t), bool))[0]

    return _jax_case(apply, params, xs, w, mode)


def make_flax(cell_cls, hidden, xs, w, mode):
    model = fnn.RNN(cell_cls(features=hidden))
    params = model.init(jax.random.key(0), xs)
    return _jax_case(model.apply, params, xs, w, mode)


def make_torch(kind, hidden, xs, w, mode):
    torch.manual_seed(0)
    dev = torch_device(torch)
    module = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(xs.shape[-1], hidden, batch_first=True).to(dev)
    x = torch.from_numpy(np.asarray(xs)).to(dev).requires_grad_(mode == "train")
    tw = torch.from_numpy(np.asarray(w)).to(dev)
    if mode == "train":
        def call():
            for p in module.parameters():
                p.grad = None
            x.grad = None
            y, _ = module(x)
            (y * tw).sum().backward()
            if dev == "cuda":
                torch.cuda.synchronize()
    else:
        def call():
            with torch.inference_mode():
                module(x)
            if dev == "cuda":
                torch.cuda.synchronize()
    return call, None, None


def make_torch_compiled_gru(hidden, xs, w, mode):
    """The GRU as a loop over a torch.compile'd cell step (nn.GRU's gate order r, z, n and its
    parameters): gi = x W_ih^T + b_ih for the whole sequence at once, then per step
    h = (1 - z) * n + z * h from gi_t and h W_hh^T + b_hh."""
    torch.manual_seed(0)
    dev = torch_device(torch)
    module = torch.nn.GRU(xs.shape[-1], hidden, batch_first=True).to(dev)
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0

    @torch.compile
    def cell(gi_t, h, w_hh, b_hh):
        gh = torch.nn.functional.linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi_t.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h

    x = torch.from_numpy(np.array(xs)).to(dev).requires_grad_(mode == "train")
    tw = torch.from_numpy(np.array(w)).to(dev)

    def forward():
        gi = torch.nn.functional.linear(x, w_ih, b_ih)
        h = x.new_zeros(x.shape[0], hidden)
        ys = []
        for t in range(x.shape[1]):
            h = cell(gi[:, t], h, w_hh, b_hh)
            ys.append(h)
        return torch.stack(ys, 1)

    if mode == "train":
        def call():
            for p in module.parameters():
                p.grad = None
            x.grad = None
            (forward() * tw).sum().backward()
            if dev == "cuda":
                torch.cuda.synchronize()
    else:
        def call():
            with torch.inference_mode():
                forward()
            if dev == "cuda":
                torch.cuda.synchronize()
    t = time.perf_counter()
    call()  # compiles; reported as its compile seconds
    with torch.no_grad():  # the same function as nn.GRU: checked once, before any timing
        ref, _ = module(x)
        got = forward()
    if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"compiled GRU loop differs from nn.GRU by {(ref - got).abs().max():.2e}")
    return call, time.perf_counter() - t, None


def torch_path(kind) -> str | None:
    """Which PyTorch RNN implementation runs: oneDNN's kernel (LSTM on CPU when torch has oneDNN),
    cuDNN on a GPU, or ATen's generic loop (the GRU on CPU: PyTorch has no oneDNN GRU)."""
    dev = torch_device(torch)
    if dev is None:
        return None
    if dev == "cuda":
        return "cudnn"
    return "onednn" if kind == "lstm" and torch.backends.mkldnn.is_available() else "generic"


def competitors(kind):
    both = {"jaxseq": None, "jaxseq-scan": None}
    flax = {"flax-optimized-lstm": fnn.OptimizedLSTMCell, "flax-lstm": fnn.LSTMCell} if kind == "lstm" else {
        "flax-gru": fnn.GRUCell}
    gpu = ["jax-experimental-rnn"] if kind == "lstm" and jax.default_backend() == "gpu" else []
    # the `jaxseq` row dispatches (cuDNN on a GPU, the native kernels on CPU); this is the XLA path
    dispatched = gpu or (jax.default_backend() == "cpu" and native.available())
    fused = ["jaxseq-fused"] if dispatched else []
    torch_rows = ["torch"] + (["torch-compile-cell"] if kind == "gru" else []) if torch_device(torch) else []
    return list(both) + gpu + fused + list(flax) + torch_rows, flax


def run_case(kind, hidden, mode, peak):
    b, t, d = ARGS.batch, ARGS.length, ARGS.d_in
    xs = jax.random.normal(jax.random.key(1), (b, t, d), jnp.float32)
    w = jax.random.normal(jax.random.key(2), (b, t, hidden), jnp.float32)
    names, flax = competitors(kind)
    if ARGS.impls:
        names = [n for n in names if n in ARGS.impls.split(",")]
    calls, compile_s, peak_mb, skipped = {}, {}, {}, {}
    rss_base = reset_peak_rss() if ARGS.rss else None  # inputs built; the competitor's compile counts
    for name in names:
        if name == "torch-compile-cell":
            try:
                calls[name], compile_s[name], peak_mb[name] = make_torch_compiled_gru(hidden, xs, w, mode)
            except Exception as err:  # inductor needs a C++ toolchain; the row is then left out, saying why
                skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                print(f"skipping {name}: {skipped[name]}", file=sys.stderr, flush=True)
            continue
        if name == "jaxseq":
            made = make_jaxseq(kind, hidden, xs, w, mode, fused=True)
        elif name == "jaxseq-scan":
            made = make_jaxseq(kind, hidden, xs, w, mode, fused=False)
        elif name == "torch":
            made = make_torch(kind, hidden, xs, w, mode)
        elif name in ("jax-experimental-rnn", "jaxseq-fused"):
            made = make_undispatched(kind, hidden, xs, w, mode, cudnn=name == "jax-experimental-rnn")
        else:
            made = make_flax(flax[name], hidden, xs, w, mode)
        calls[name], compile_s[name], peak_mb[name] = made
    for call in calls.values():
        for _ in range(ARGS.warmup):
            call()
    for name in ("torch", "torch-compile-cell"):  # one profiled step each, outside the timed rounds
        if name in calls and not ARGS.rss:  # the profiler's own memory is no part of the step
            peak_mb[name] = torch_peak_mb(torch, calls[name], torch_device(torch))
    load_before = os.getloadavg()
    wall, cpu = timed_rounds(calls, ARGS.repeats, clocks=(time.perf_counter, time.process_time))
    load_after = os.getloadavg()

    gates = 4 if kind == "lstm" else 3
    fwd_flops = 2 * b * t * (d + hidden) * gates * hidden
    flops = fwd_flops * (3 if mode == "train" else 1)
    step = {n: statistics.median(v) for n, v in wall.items()}
    flax_best = min((step[n] for n in step if n.startswith("flax")), default=None)
    torch_best = min((n for n in step if n.startswith("torch")), key=step.get, default=None)
    record = run_record(torch, **PROCESS)
    rows = []
    for name in calls:
        row = {
            "bench": "rnn_layers", "layer": kind, "mode": mode, "impl": name,
            "batch": b, "length": t, "d_in": d, "hidden": hidden, **time_stats(wall[name]),
            "cpu_ms": round(1e3 * statistics.median(cpu[name]), 3),
            "tokens_per_s": round(b * t / step[name], 1),
            "compile_s": None if compile_s[name] is None else round(compile_s[name], 3),
            "gflop_per_step": round(flops / 1e9, 4),
            "gflop_per_s": round(flops / step[name] / 1e9, 2),
            "frac_peak": round(flops / step[name] / 1e9 / peak, 4) if peak else None,
            "peak_gflop_per_s": round(peak, 1) if peak else None,
            "peak_mb": peak_mb[name],
            "ratio_vs_torch": round(step["torch"] / step[name], 3) if "torch" in step else None,
            "torch_path": torch_path(kind) if name == "torch" else None,
            "best_torch": torch_best,
            "ratio_vs_best_torch": round(step[torch_best] / step[name], 3) if torch_best else None,
            "skipped": skipped,
            "ratio_vs_best_flax": round(flax_best / step[name], 3) if flax_best else None,
            "repeats": ARGS.repeats, "threads_arg": ARGS.threads or "default",
            "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
            "flax": __import__("flax").__version__, **record,
            **(rss_fields(rss_base) if ARGS.rss else {}),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(rows, path):
    """Bars per (layer, hidden): each implementation's speed relative to PyTorch (the dashed line at 1),
    training and inference side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    rows = [r for r in rows if r.get("ratio_vs_torch")]
    if not rows:
        return
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    impls = [n for n in dict.fromkeys(r["impl"] for r in rows) if n != "torch"]
    ratio = {(r["layer"], r["hidden"], r["mode"], r["impl"]): r["ratio_vs_torch"] for r in rows}
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.4), squeeze=False, sharey=True)
    width = 0.8 / len(impls)
    for ax, mode in zip(axes[0], modes):
        cases = list(dict.fromkeys((r["layer"], r["hidden"]) for r in rows if r["mode"] == mode))
        for i, impl in enumerate(impls):
            xs = [c + (i + 0.5) * width - 0.4 for c in range(len(cases))]
            ax.bar(xs, [ratio.get((layer, h, mode, impl), float("nan")) for layer, h in cases], width, label=impl)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_xticks(range(len(cases)), [f"{layer.upper()} {h}" for layer, h in cases])
        ax.set(title=mode, ylabel="tokens/s relative to PyTorch (dashed: PyTorch)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"one RNN layer, batch {r0['batch']}, length {r0['length']}, input {r0['d_in']}, float32, {r0['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def main():
    if ARGS.replot:
        plot([json.loads(line) for line in open(ARGS.replot) if line.strip()], Path(ARGS.replot).with_suffix(".png"))
        return
    if ARGS.quick:
        ARGS.hidden, ARGS.repeats, ARGS.warmup = "256", 5, 1
    if ARGS.repeats < 3:
        raise SystemExit("--repeats must be at least 3 (a median of fewer rounds says little)")
    if ARGS.rss and (not ARGS.impls or "," in ARGS.layers + ARGS.hidden + ARGS.modes):
        raise SystemExit("--rss measures one case of the competitors in --impls: give --impls and one each of "
                         "--layers, --hidden, --modes")
    peak = None if ARGS.rss else measure_peak()  # its matrices would set the RSS high-water mark
    print(json.dumps({"bench": "rnn_layers", "peak_gflop_per_s": peak and round(peak, 1),
                      **run_record(torch, **PROCESS)}), flush=True)
    rows = []
    for kind in ARGS.layers.split(","):
        for hidden in (int(h) for h in ARGS.hidden.split(",")):
            for mode in ARGS.modes.split(","):
                rows += run_case(kind, hidden, mode, peak)
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"appended {len(rows)} lines to {out}", file=sys.stderr)
    if not ARGS.rss:
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
