"""GPT train step, tokens/s: jaxseq's TransformerLM vs a plain Flax GPT vs PyTorch nanoGPT (eager,
fused AdamW, torch.compile) of the same size.

nanoGPT's char-level Shakespeare config shrunk to CPU size (4 layers, 4 heads, d_model 128, d_ff 512,
context 64, batch 12, vocab 65, no dropout, tied embeddings, learned positions, tanh GELU). One step =
forward, cross-entropy, backward, AdamW update, on random tokens (speed does not depend on the data).

  * jaxseq:          `jaxseq.steps.make_train_step(lm_loss_fn(model), adamw)` jitted with the state
                     donated and jaxseq's compile options: the step `jaxseq train` runs (padding mask,
                     non-finite guard, grad norm; YNNPACK dots on CPU).
  * jaxseq-model-hand-step: jaxseq's TransformerLM (jaxseq's attention dispatch included) in a
                     hand-written jit of loss + grad + optax.adamw with XLA's defaults (no mask, no
                     metrics): what jaxseq's step bookkeeping and compile options cost.
  * flax-gpt:        a GPT on nothing of jaxseq's (`plain_flax_gpt.py`: nn.Dense, nn.LayerNorm,
                     jax.nn.dot_product_attention, optax.adamw, XLA's defaults), the same parameters.
  * torch-eager:     nanoGPT's model (F.scaled_dot_product_attention, is_causal=True) +
                     torch.optim.AdamW (its default, foreach), eager.
  * torch-eager-fused-adamw: the same with `AdamW(fused=True)` (the fused kernel; CPU since torch 2.4).
  * torch-compile:   `torch.compile(model)` (default mode, inductor) + the fused AdamW; left out, with the
                     reason in `skipped`, where inductor cannot build (no C++ compiler).
  All torch rows run with torch.set_num_threads(--torch-threads, default os.cpu_count()).

Every ratio is taken against the fastest PyTorch form of the run (`best_torch`,
`speedup_vs_best_torch`; `speedup_vs_torch_eager` beside it). The process set-up is the same for every
competitor (`_common.setup_process`: glibc keeps freed memory, as in `jaxseq train`).

All run in one process, after warm-up, interleaved (each in turn, `--repeats` rounds, at least 3, every
timed step right after an untimed one of its own: `_common.timed_rounds`), so a busy shared CPU slows
them alike. Compile (and torch.compile's) first calls are timed apart, never in the step times.
Prints one JSON line per implementation: first-call seconds, the median step ms with min, max and
interquartile range, tokens/s, GFLOP/s, `mfu` (over the GPU's datasheet peak,
`_common.DATASHEET_TFLOPS`, as papers report MFU; on CPU over the measured matmul peak),
`frac_measured_peak` (over the best matmul measured in the run, `_common.measure_peak`), `peak_mb`,
one step's peak memory in each library's own account (`_common.jax_peak_mb`: XLA's plan, state and
batch included, donated buffers counted once; `_common.torch_peak_mb`: torch's allocator), and the
machine record (`_common.run_record`: commit, device, CPU flags, threads, load average).

FLOPs: PaLM's count (6N per token + attention) with attention's T x T pairs halved for the causal mask,
T(T+1)/2, since every competitor skips the masked half (`_common.gpt_flops_per_step`); rows before
this count (no `flop_count` field) used nanoGPT's full T x T count, 4% (d 128, context 64) to 8% (d 256, context 256) higher.

Run it 3 times with the same --out (it appends): `summarize.py` then reports the median of the runs
of the latest commit, with their min-max.

    python benchmarks/gpt_step.py                 # nanoGPT's small CPU config
    python benchmarks/gpt_step.py --d-model 256 --context 256 --batch 16 \
        --out benchmarks/results/cpu-gpt-step.jsonl    # the Transformer issue's comparison size
    python benchmarks/gpt_step.py --layers 12 --heads 12 --d-model 768 --context 1024 --batch 8 \
        --vocab 50304 --compute-dtype bfloat16         # GPT-2 small on a GPU: MFU in bfloat16
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn as tnn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxseq.config import TransformerConfig  # noqa: E402
from jaxseq.losses import lm_loss_fn  # noqa: E402
from jaxseq.models.transformer import TransformerLM  # noqa: E402
from jaxseq.steps import init_train_state, make_train_step  # noqa: E402
from jaxseq.xla_options import compiler_options  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (datasheet_peak_gflops, gpt_flops_per_step, jax_peak_mb, measure_peak,  # noqa: E402
                     reset_peak_rss, rss_fields, run_record, setup_process, time_stats, timed_rounds,
                     torch_device, torch_peak_mb)
from plain_flax_gpt import PlainGPT, make_plain_step  # noqa: E402


# ---------------------------------------------------------------------------------- torch nanoGPT


class CausalSelfAttention(tnn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.c_attn = tnn.Linear(d, 3 * d)
        self.c_proj = tnn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(tnn.Module):
    def __init__(self, d, h, d_ff):
        super().__init__()
        self.ln_1, self.ln_2 = tnn.LayerNorm(d), tnn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, h)
        self.mlp = tnn.Sequential(tnn.Linear(d, d_ff), tnn.GELU(approximate="tanh"), tnn.Linear(d_ff, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(tnn.Module):
    def __init__(self, vocab, ctx, layers, d, h, d_ff):
        super().__init__()
        self.wte, self.wpe = tnn.Embedding(vocab, d), tnn.Embedding(ctx, d)
        self.h = tnn.ModuleList(Block(d, h, d_ff) for _ in range(layers))
        self.ln_f = tnn.LayerNorm(d)
        self.lm_head = tnn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for p in self.parameters():
            if p.dim() == 2:
                tnn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ---------------------------------------------------------------------------------- jaxseq


def make_jax_step(model, optimizer):
    """The plain jitted Flax + optax step (no mask, no metrics): what a user would write by hand."""

    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_jaxseq_step(model, optimizer, compute_dtype=None):
    """jaxseq's own train step (`jaxseq.steps.make_train_step` + `lm_loss_fn`), as `jaxseq train` runs it:
    padding mask, non-finite guard, grad norm and metrics included, compiled with the same options
    (`jaxseq.xla_options.compiler_options`: YNNPACK dots on CPU)."""
    step = jax.jit(make_train_step(lm_loss_fn(model, compute_dtype=compute_dtype), optimizer), donate_argnums=0,
                   compiler_options=compiler_options(model))

    def call(state, x, y):
        state, metrics = step(state, {"inputs": x, "targets": y, "mask": jnp.ones(x.shape, bool)})
        return state, metrics["loss"]

    call.jitted = step  # for tools that want the compiled program (benchmarks/op_profile.py)
    return call


def torch_adamw(torch, params, fused: bool):
    """torch.optim.AdamW with nanoGPT's betas, `fused=True` where this torch has a fused kernel for the
    device (CPU since torch 2.4); returns (optimizer, whether it is the fused one)."""
    kw = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw), True
        except (RuntimeError, TypeError, ValueError) as err:
            print(f"no fused AdamW here ({type(err).__name__}: {err}); the default (foreach) one runs", flush=True)
    return torch.optim.AdamW(params, **kw), False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30, help="interleaved timed rounds (at least 3)")
    # On a shared, oversubscribed CPU torch's OpenMP threads spin-wait; 1 thread is then fairer.
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--impls", default="", help="comma list to run a subset (names as in the output)")
    ap.add_argument("--out", default="", help="append the JSON lines to this file as well")
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="forward/backward dtype (params and AdamW stay float32; torch: autocast); MFU is "
                         "then taken against the bfloat16 matmul peak")
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep glibc's default malloc; by default the process reuses freed memory as `jaxseq "
                         "train` does (jaxseq/malloc.py), for every competitor alike")
    ap.add_argument("--rss", action="store_true",
                    help="resident-memory row: run only the --impls competitor, no peak matmul and no profiled "
                         "step, and record the process's RSS before its first call and the high-water mark after "
                         "(memory.py runs each competitor so, alone in a fresh process)")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be at least 3 (a median of fewer rounds says little)")
    if args.rss and (not args.impls or "," in args.impls):
        ap.error("--rss measures one competitor: name it with --impls")
    process = setup_process(args.system_malloc)  # before JAX's first computation
    L, H, D, T, B, V = args.layers, args.heads, args.d_model, args.context, args.batch, args.vocab
    torch.set_num_threads(args.torch_threads)
    dtype = jnp.bfloat16 if args.compute_dtype == "bfloat16" else None
    # in --rss mode the peak matmul's matrices would set the RSS high-water mark
    peak = float("nan") if args.rss else measure_peak(dtype=dtype or jnp.float32)
    # MFU against the datasheet peak where one is known (a GPU), else against the measured one (CPU)
    sheet = datasheet_peak_gflops(jax.devices()[0].device_kind, args.compute_dtype)
    tdev = torch_device(torch)  # None: no torch rows (a GPU backend without a CUDA torch)
    with_torch = tdev is not None
    tdev = tdev or "cpu"

    cfg = TransformerConfig(num_layers=L, num_heads=H, d_model=D, d_ff=4 * D, max_len=T, dropout=0.0)
    model = TransformerLM.from_config(cfg, vocab_size=V)
    plain_model = model if dtype is None else TransformerLM.from_config(cfg, vocab_size=V, dtype=dtype)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, V, (B, T + 1)) for _ in range(4)]
    jx = [(jnp.asarray(b[:, :-1], jnp.int32), jnp.asarray(b[:, 1:], jnp.int32)) for b in batches]
    tx = [tuple(torch.from_numpy(a.copy()).long().to(tdev) for a in (b[:, :-1], b[:, 1:])) for b in batches]
    optimizer = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.0)

    # Each competitor is a closure over its own state: step(i) runs one training step on batch i % 4
    # and returns the loss (already waited for).
    params = jax.jit(model.init)(jax.random.key(0), jx[0][0])["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params)) - T * D  # nanoGPT leaves positions out
    jaxseq_step = make_jaxseq_step(model, optimizer, dtype)
    plain_step = make_jax_step(plain_model, optimizer)
    plain_params = {"params": jax.tree.map(jnp.copy, params)}  # its own copy: both steps donate their state
    flax_gpt = PlainGPT(vocab=V, ctx=T, layers=L, d=D, heads=H, dtype=dtype)
    flax_params = jax.jit(flax_gpt.init)(jax.random.key(0), jx[0][0])["params"]
    n_flax = sum(x.size for x in jax.tree.leaves(flax_params)) - T * D
    assert n_flax == n_params, (n_flax, n_params)
    flax_step = make_plain_step(flax_gpt, optimizer)
    box = {"jaxseq": init_train_state(params, optimizer),
           "jaxseq-model-hand-step": (plain_params, optimizer.init(plain_params)),
           "flax-gpt": (flax_params, optimizer.init(flax_params))}

    def run_jaxseq(i):
        box["jaxseq"], loss = jaxseq_step(box["jaxseq"], *jx[i % 4])
        return float(loss)

    def jax_runner(name, step):
        def run(i):
            p, o, loss = step(*box[name], *jx[i % 4])
            box[name] = (p, o)
            return float(loss)

        return run

    def torch_runner(compiled: bool, fused: bool):
        """One nanoGPT with its own AdamW, initialised alike (seed 0); `compiled`: torch.compile of the
        model (default mode; the backward through AOTAutograd), the optimizer step eager."""
        torch.manual_seed(0)
        net = NanoGPT(V, T, L, D, H, 4 * D).to(tdev)
        n_torch = sum(p.numel() for p in net.parameters()) - T * D
        assert n_params == n_torch, (n_params, n_torch)
        opt, is_fused = torch_adamw(torch, net.parameters(), fused)
        fwd = torch.compile(net) if compiled else net

        def run(i):
            with torch.autocast(tdev, dtype=torch.bfloat16, enabled=dtype is not None):
                loss = fwd(*tx[i % 4])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        return run, is_fused

    runners = {"jaxseq": run_jaxseq, "jaxseq-model-hand-step": jax_runner("jaxseq-model-hand-step", plain_step),
               "flax-gpt": jax_runner("flax-gpt", flax_step)}
    adamw = {}  # torch rows: which AdamW ran
    if with_torch:
        for name, compiled, fused in (("torch-eager", False, False), ("torch-eager-fused-adamw", False, True),
                                      ("torch-compile", True, True)):
            runners[name], is_fused = torch_runner(compiled, fused)
            adamw[name] = "fused" if is_fused else "foreach"
    if args.impls:
        runners = {n: r for n, r in runners.items() if n in args.impls.split(",")}
    first, losses, skipped = {}, {}, {}
    rss_base = reset_peak_rss() if args.rss else None  # everything built; the first call (compile) counts
    for name, run in list(runners.items()):  # first call = compile (JAX, torch.compile) / first-step allocation
        t0 = time.perf_counter()
        try:
            run(0)
        except Exception as err:  # torch.compile needs a working C++ toolchain; the others must not fail
            if name != "torch-compile":
                raise
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"skipping {name}: {skipped[name]}", flush=True)
            del runners[name]
            continue
        first[name] = time.perf_counter() - t0
    for i in range(args.warmup):
        for run in runners.values():
            run(i)
    batch0 = {"inputs": jx[0][0], "targets": jx[0][1], "mask": jnp.ones(jx[0][0].shape, bool)}
    peak_mb = {}
    if args.rss:
        pass  # the lowering and the profiler below would count in the RSS
    elif "jaxseq" in runners:
        peak_mb["jaxseq"] = jax_peak_mb(jaxseq_step.jitted.lower(box["jaxseq"], batch0).compile())
    for name, step in (("jaxseq-model-hand-step", plain_step), ("flax-gpt", flax_step)):
        if name in runners and not args.rss:
            peak_mb[name] = jax_peak_mb(step.lower(*box[name], *jx[0]).compile())
    for name in adamw:  # one profiled step each, outside the timed rounds
        if name in runners and not args.rss:
            peak_mb[name] = torch_peak_mb(torch, lambda name=name: runners[name](0), tdev)
    # Interleaved (a busy shared CPU slows all competitors alike), each timed step after an untimed one
    # of its own (`_common.timed_rounds`); every call takes the next of the 4 batches.
    counters = {name: itertools.count() for name in runners}

    def stepper(name, run):
        def call():
            losses[name] = run(next(counters[name]))

        return call

    (times,) = timed_rounds({name: stepper(name, run) for name, run in runners.items()}, args.repeats)

    flops = gpt_flops_per_step(n_params, L, D, T, B, causal=True)
    config = dict(layers=L, heads=H, d_model=D, d_ff=4 * D, context=T, batch=B, vocab=V, params=n_params,
                  compute_dtype=args.compute_dtype)
    common = dict(bench="gpt_step", config=config, repeats=args.repeats, flop_count="palm-causal",
                  gflop_per_step=round(flops / 1e9, 4), peak_gflop_per_s=round(peak, 1),
                  datasheet_gflop_per_s=sheet, skipped=skipped,
                  **run_record(torch, torch_threads=args.torch_threads, **process))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    torch_rows = [n for n in medians if n in adamw]
    best_torch = min(torch_rows, key=medians.get) if torch_rows else None  # the faster PyTorch form
    lines = []
    for name, ts in times.items():
        med = medians[name]
        lines.append(dict(
            impl=name, compile_or_first_step_s=round(first[name], 3), **time_stats(ts),
            step_ms_iqr=[round(1e3 * q, 3) for q in statistics.quantiles(ts, n=4)[::2]],
            tokens_per_s=round(B * T / med, 1), gflops_per_s=round(flops / med / 1e9, 2),
            mfu=round(flops / med / 1e9 / (sheet or peak), 4), mfu_of="datasheet" if sheet else "measured",
            frac_measured_peak=round(flops / med / 1e9 / peak, 4), peak_mb=peak_mb.get(name),
            torch_adamw=adamw.get(name), best_torch=best_torch,
            speedup_vs_best_torch=round(medians[best_torch] / med, 3) if best_torch else None,
            speedup_vs_torch_eager=round(medians["torch-eager"] / med, 3) if "torch-eager" in medians else None,
            final_loss=round(losses[name], 4), uniform_loss=round(math.log(V), 4), **common,
            **(rss_fields(rss_base) if args.rss else {}),
        ))
    for line in lines:
        if args.rss:  # no peak was measured
            line.update(mfu=None, frac_measured_peak=None, peak_gflop_per_s=None)
        print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
