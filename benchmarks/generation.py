"""Generation speed, what a sampling or beam-search user waits for: jaxseq.decoding vs PyTorch loops and
Hugging Face `generate`, tokens/s and ms per generated token.

Cases: sampling (temperature 1, the full distribution) at batch 1 and 16, and beam search with 4 beams
at batch 1 (batch * beam rows stepped, ranked by summed log-probability, no length penalty, no end
token); a 16-token random prompt, 256 new tokens (`--prompt-len`, `--new-tokens`). One timed call is
one whole generation: prompt in, all new tokens out as host integers.

Model A, `lstm`: the character LSTM LM `jaxseq train` builds by default (`jaxseq.models.build_model`
of the default TrainConfig: embedding 64 -> LSTM 512, 1 layer -> linear, vocab 65).
  * jaxseq:           `jaxseq.decoding.sample` / `beam_search`: the whole generation (prompt tokens
                      stepped too) one jitted `lax.scan`.
  * torch-eager:      the same weights in embedding -> `torch.nn.LSTM` -> linear
                      (`torch_generation.CharLSTM`): the prompt in one nn.LSTM call, then a Python loop
                      of one nn.LSTM call per token; `torch.multinomial` samples; beam search a plain
                      PyTorch top-k over beam x vocab per token (`torch_generation.beam_loop`).
  * torch-eager-cell: the same loop with each layer as an `nn.LSTMCell` on nn.LSTM's parameters. On CPU
                      a one-token nn.LSTM call goes through oneDNN's RNN primitive and costs several
                      times the cell, so this is the faster eager form of the same loop.
  * torch-compile:    the same loop over `torch.compile` (default mode, inductor) of the per-token
                      step module (`torch_generation.LSTMCellStep`: embedding, the LSTM cell written
                      out on nn.LSTM's parameters, linear). Dynamo does not trace nn.LSTM itself
                      (`allow_rnn` is off by default; with it on, inductor keeps aten.lstm as one opaque
                      call: no faster than eager).
  The weights go to torch through `jaxseq.interop.to_torch_state_dict`.

Model B, `gpt`: jaxseq's TransformerLM (what `jaxseq train --model transformer` builds: pre-LN,
learned positions, tied embeddings, biases, tanh GELU = GPT-2's "gelu_new", LayerNorm eps 1e-5, fused
q|k|v; KV cache through the model protocol's init_state / prefill / step), default 4 layers, 4 heads,
d_model 128, d_ff 512, vocab 65, and a position table of `--context` 512 (the generated sequence,
16 + 256 = 272 tokens, must fit in it: a learned table has no position 272 at context 256).
`--gpt-size gpt2-small` takes GPT-2 small's 12 layers, 12 heads, d_model 768, context 1024, vocab 50257.
  * jaxseq:           `jaxseq.decoding.sample` (the prompt in one `prefill` call, then KV-cache steps)
                      / `beam_search` (KV-cache steps over the prompt too), one jitted `lax.scan`.
  * hf-generate:      transformers' `GPT2LMHeadModel.generate` on a `GPT2Config` of the same shape with
                      jaxseq's weights copied in (GPT-2's names and layouts are jaxseq's:
                      `jaxseq.interop_gpt2`); its KV cache on (DynamicCache), SDPA attention;
                      do_sample=True, top_k=0 to sample, num_beams=4, do_sample=False, length_penalty 0
                      for beam search, min_new_tokens = max_new_tokens, pad_token_id 0, no EOS.
  * hf-generate-compile: the same compiled, with a static KV cache. Sampling: transformers' own
                      compiled decoding, `CompileConfig(mode="default")` (torch.compile of the forward,
                      inductor), which generate applies on CPU only when asked (`_compile_all_devices`).
                      Beam search: transformers' beam search never uses that compiled forward, so a
                      second copy of the model runs with `model.forward = torch.compile(model.forward)`.
  * nanogpt-nocache:  nanoGPT's `generate` (benchmarks/gpt_step.py's NanoGPT, the same weights): every
                      new token runs the model over the whole sequence so far, no cache; the same
                      sampling and beam loops as the LSTM's. Not compiled: each token has a new length,
                      so torch.compile would recompile or go to dynamic shapes, and what the row shows is
                      the cost of having no cache.

Checks before any timing, failing loudly: every torch model's parallel logits equal jaxseq's on the
same tokens (max abs difference in `checks`); greedy generation of `--check-tokens` tokens (temperature
0; HF: do_sample=False) gives jaxseq's tokens for every competitor, up to a near tie (where they part,
the two tokens' log-probabilities under jaxseq's model lie within 1e-3: float rounding may pick either); every
beam search's best sequence has the log-probability of jaxseq's under jaxseq's model (within 1e-3 +
1e-5 * |log p|); every output keeps the prompt and has prompt + new tokens. Parameter counts agree.
Greedy and beam results are compared with jaxseq's, so an `--impls` without jaxseq checks logits,
shapes and parameter counts only; `--rss` runs no checks (they would run other competitors).

Timing (benchmarks/README.md): the process set-up of `_common.setup_process` for all; all competitors
of a case in one process, interleaved over `--repeats` rounds (at least 3), each timed call right after
an untimed call of its own (`_common.timed_rounds`); the first call (JAX's compile, torch.compile's,
or a cold first call) timed apart as `compile_or_first_s`; a torch.compile first call is shorter when
inductor's on-disk cache holds the graphs from an earlier run (TORCHINDUCTOR_FX_GRAPH_CACHE=0 turns it
off), and a new batch shape compiles again. torch runs on `--torch-threads` (default: every core), XLA
on its default pool. On a busy machine torch's OpenMP threads lose far more than XLA's (a one-token
step often 10x slower on 2 loaded cores): measure on a quiet one.

Expect the full default run to take about 10-15 minutes on 2 quiet cores, most of it nanogpt-nocache at batch
16 (every token reruns 16 x up to 272 tokens) and the hf-generate-compile compiles (about half a minute
per batch shape).

One JSON line per (model, mode, batch, impl): `bench` "generation", `model`, `mode`, `batch`, `beam`
(1 when sampling), `rows_stepped` (batch * beam), `prompt_len`, `new_tokens`, `impl`, `path` (how it
generates, in words), `torch_path` (the same, torch rows only), `step_ms`, `step_ms_min`,
`step_ms_max`, `n` (ms per whole generation call), `tokens_per_s` (batch * new_tokens / median: new
tokens delivered, beams not counted), `ms_per_token` (median / new_tokens), `best_torch` (the fastest
torch row of the case), `speedup_vs_best_torch`, `compile_or_first_s`, `checks`, `skipped`, `config`,
`temperature` (sampling), `repeats` and the machine record (`_common.run_record`); with `--rss`,
`rss_base_mb`, `rss_peak_mb`, `rss_growth_mb`.

    python benchmarks/generation.py --out benchmarks/results/cpu-generation.jsonl
    python benchmarks/generation.py --quick                       # smoke run: tiny models, 8 tokens
    python benchmarks/generation.py --models gpt --gpt-size gpt2-small --modes sample --batches 1
    python benchmarks/generation.py --rss --impls jaxseq --models lstm --modes sample --batches 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import reset_peak_rss, rss_fields, run_record, setup_process, time_stats, timed_rounds  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_generation as tg  # noqa: E402
from jaxseq import decoding  # noqa: E402
from jaxseq.config import RNNConfig, TrainConfig, TransformerConfig  # noqa: E402
from jaxseq.models import build_model  # noqa: E402

IMPLS = {"lstm": ("jaxseq", "torch-eager", "torch-eager-cell", "torch-compile"),
         "gpt": ("jaxseq", "hf-generate", "hf-generate-compile", "nanogpt-nocache")}
COMPILED = ("torch-compile", "hf-generate-compile")  # left out, saying why, where inductor cannot build
DEFAULTS = dict(batches="1,16", prompt_len=16, new_tokens=256, repeats=5, lstm_embed=64, lstm_hidden=512)
QUICK = dict(batches="1,4", prompt_len=4, new_tokens=8, repeats=3, lstm_embed=16, lstm_hidden=64,
             layers=2, heads=2, d_model=32, context=64)
GPT_SIZES = {"default": dict(layers=4, heads=4, d_model=128, context=512, vocab=65),
             "gpt2-small": dict(layers=12, heads=12, d_model=768, context=1024, vocab=50257)}


class Impl(NamedTuple):
    """One competitor: `prepare(mode, prompt [B, P] int, new_tokens)` -> a call that runs one whole
    generation and returns its tokens as numpy [B, P + new_tokens] (beam: the best sequence).
    `path`: how it generates, in words; a dict {mode: words} where the modes differ."""

    path: str | dict
    prepare: Callable

    def path_of(self, mode: str) -> str:
        return self.path.get(mode, self.path["sample"]) if isinstance(self.path, dict) else self.path


# ------------------------------------------------------------------------------------------ competitors


def jaxseq_impl(model, variables, args) -> Impl:
    key = jax.random.key(0)

    def prepare(mode, prompt, n):
        p = jnp.asarray(prompt, jnp.int32)
        if mode == "beam":
            return lambda: np.asarray(decoding.beam_search(model, variables, p, beam_size=args.beam,
                                                           max_new_tokens=n)[0][:, 0])
        temperature = 0.0 if mode == "greedy" else args.temperature
        return lambda: np.asarray(decoding.sample(model, variables, p, max_new_tokens=n, key=key,
                                                  temperature=temperature).tokens)

    if hasattr(model, "prefill"):
        path = {"sample": "decoding.sample: the prompt in one prefill call, then KV-cache steps, one jitted lax.scan",
                "beam": "decoding.beam_search: KV-cache steps over prompt and new tokens, one jitted lax.scan"}
    else:
        path = {"sample": "decoding.sample: one jitted lax.scan of the model's step over prompt and new tokens",
                "beam": "decoding.beam_search: one jitted lax.scan of the model's step over prompt and new tokens"}
    return Impl(path, prepare)


def loop_impl(dec: tg.Decoder, path: str, args) -> Impl:
    """A torch Decoder under the Python sampling / beam loops (`torch_generation`)."""

    def prepare(mode, prompt, n):
        p = torch.from_numpy(np.asarray(prompt)).long()

        def call():
            with torch.inference_mode():
                if mode == "beam":
                    return tg.beam_loop(dec, p, args.beam, n)[0].numpy()
                return tg.sample_loop(dec, p, n, 0.0 if mode == "greedy" else args.temperature).numpy()

        return call

    return Impl(path, prepare)


def hf_impl(hf, path: str, args, compile_config=None, static_cache=False) -> Impl:
    def prepare(mode, prompt, n):
        p = torch.from_numpy(np.asarray(prompt)).long()
        mask = torch.ones_like(p)
        kw = tg.hf_generate_kwargs(mode, n, args.beam, args.temperature, compile_config, static_cache)

        def call():
            with torch.inference_mode():
                return hf.generate(p, attention_mask=mask, **kw).numpy()

        return call

    return Impl(path, prepare)


def hf_compile_impl(hf, make_hf: Callable, args) -> Impl:
    """HF generate compiled. Sampling (and greedy): generate's own compiled decoding, a static cache and
    `CompileConfig(mode="default")` on `hf`. Beam search: transformers' `_beam_search` calls the model
    uncompiled whatever the config, so a second model (`make_hf()`, built at the first beam case) gets
    `model.forward = torch.compile(model.forward)` (default mode) and a static cache."""
    from transformers import CompileConfig

    cc = CompileConfig(mode="default")
    cc._compile_all_devices = True  # generate compiles on CPU only when told to
    attn = hf.config._attn_implementation
    sampler = hf_impl(hf, "", args, compile_config=cc)
    beamer = []

    def prepare(mode, prompt, n):
        if mode != "beam":
            return sampler.prepare(mode, prompt, n)
        if not beamer:
            compiled = make_hf()
            compiled.forward = torch.compile(compiled.forward)
            beamer.append(hf_impl(compiled, "", args, static_cache=True))
        return beamer[0].prepare(mode, prompt, n)

    return Impl({"sample": f"HF generate, StaticCache, its compiled decoding (CompileConfig, default mode), {attn}",
                 "beam": f"HF generate, StaticCache, model.forward = torch.compile(forward) (default mode), {attn}"},
                prepare)


def n_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def torch_n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied weights once, as in jaxseq


def build_lstm(args, names):
    """(jaxseq model, variables, {impl: Impl}, {impl: torch module for the logits check}, config)."""
    rnn = RNNConfig(d_embed=args.lstm_embed, d_hidden=args.lstm_hidden, num_layers=args.lstm_layers)
    model = build_model(dataclasses.replace(TrainConfig(), model="lstm", rnn=rnn),
                        {"interface": "lm", "vocab_size": args.vocab or 65})
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    lm = tg.lstm_from_jaxseq(model, variables["params"])
    assert torch_n_params(lm) == n_params(variables), (torch_n_params(lm), n_params(variables))
    onednn = "oneDNN" if torch.backends.mkldnn.is_available() else "ATen"
    impls, parallel = {}, {}
    for name in names:
        if name == "jaxseq":
            impls[name] = jaxseq_impl(model, variables, args)
        elif name == "torch-eager":
            impls[name] = loop_impl(tg.lstm_decoder(lm), f"python loop, nn.LSTM per token ({onednn})", args)
            parallel[name] = lm
        elif name == "torch-eager-cell":
            step = tg.LSTMCellStep(lm, use_lstm_cell=True)
            impls[name] = loop_impl(tg.lstm_cell_decoder(lm, step), "python loop, nn.LSTMCell per token", args)
        elif name == "torch-compile":
            step = torch.compile(tg.LSTMCellStep(lm))
            impls[name] = loop_impl(tg.lstm_cell_decoder(lm, step),
                                    "python loop, torch.compile'd step (LSTM cell written out, inductor)", args)
    config = dict(vocab=model.vocab_size, d_embed=rnn.d_embed, d_hidden=rnn.d_hidden, num_layers=rnn.num_layers,
                  params=n_params(variables))
    return model, variables, impls, parallel, config


def build_gpt(args, names):
    size = {**GPT_SIZES[args.gpt_size]}
    for field in ("layers", "heads", "d_model", "context", "vocab"):
        if getattr(args, field) is not None:
            size[field] = getattr(args, field)
    d_ff = args.d_ff or 4 * size["d_model"]
    cfg = TransformerConfig(num_layers=size["layers"], num_heads=size["heads"], d_model=size["d_model"], d_ff=d_ff,
                            max_len=size["context"], dropout=0.0)
    model = build_model(dataclasses.replace(TrainConfig(), model="transformer", transformer=cfg),
                        {"interface": "lm", "vocab_size": size["vocab"]})
    if args.prompt_len + args.new_tokens > model.max_len:
        raise SystemExit(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds --context "
                         f"{model.max_len}: the learned position table must cover the whole sequence")
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    impls, parallel = {}, {}
    for name in names:
        if name == "jaxseq":
            impls[name] = jaxseq_impl(model, variables, args)
        elif name in ("hf-generate", "hf-generate-compile"):
            hf = tg.hf_gpt2_from_jaxseq(model, variables["params"])  # one model each: the compiled forward stays its own
            assert torch_n_params(hf) == n_params(variables), (torch_n_params(hf), n_params(variables))
            attn = hf.config._attn_implementation
            if name == "hf-generate":
                impls[name] = hf_impl(hf, f"HF generate, DynamicCache, {attn} attention", args)
                parallel[name] = lambda x, hf=hf: hf(x, attention_mask=torch.ones_like(x)).logits
            else:
                impls[name] = hf_compile_impl(hf, lambda: tg.hf_gpt2_from_jaxseq(model, variables["params"]), args)
        elif name == "nanogpt-nocache":
            net = tg.nanogpt_from_jaxseq(model, variables["params"])
            assert torch_n_params(net) == n_params(variables), (torch_n_params(net), n_params(variables))
            impls[name] = loop_impl(tg.nocache_decoder(net, model.max_len),
                                    "python loop, nanoGPT forward over the whole sequence per token (SDPA, no cache)",
                                    args)
            parallel[name] = lambda x, net=net: tg.nanogpt_logits(net, x, last_only=False)
    config = dict(vocab=model.vocab_size, layers=model.num_layers, heads=model.num_heads, d_model=model.d_model,
                  d_ff=model.d_ff, context=model.max_len, params=n_params(variables), gpt_size=args.gpt_size)
    return model, variables, impls, parallel, config


# ------------------------------------------------------------------------------------------ checks


def logprobs(model, variables, tokens):
    """log p of each next token under jaxseq's parallel form: tokens [B, T] -> float64 [B, T - 1, V]."""
    logits = jax.jit(model.apply)(variables, jnp.asarray(tokens, jnp.int32))
    return np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1), np.float64)


def check_logits(model, variables, parallel: dict, tokens) -> dict:
    """Each torch model's logits on `tokens` [B, T] equal jaxseq's; returns {impl: max abs difference}."""
    ref = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens, jnp.int32)))
    out = {}
    for name, fn in parallel.items():
        with torch.inference_mode():
            got = fn(torch.from_numpy(tokens).long()).float().numpy()
        diff = float(np.abs(got - ref).max())
        if not diff <= 1e-3 * max(1.0, float(np.abs(ref).max())):
            raise AssertionError(f"{name}: logits differ from jaxseq's by {diff:.3g} (same weights, same tokens)")
        out[name] = round(diff, 8)
    return out


def check_output(name, out, prompt, n, vocab):
    B, P = prompt.shape
    if out.shape != (B, P + n) or not np.array_equal(out[:, :P], prompt) or out.min() < 0 or out.max() >= vocab:
        raise AssertionError(f"{name}: output of shape {out.shape} (want {(B, P + n)}) does not keep the prompt "
                             f"or holds tokens outside [0, {vocab})")


def check_greedy(model, variables, impls: dict, prompt, n: int) -> dict:
    """Greedy tokens of every competitor against jaxseq's; a disagreement must be a near tie."""
    runs = {name: impl.prepare("greedy", prompt, n)() for name, impl in impls.items()}
    ref = runs.get("jaxseq")
    if ref is None:
        return {}
    out, P = {}, prompt.shape[1]
    for name, got in runs.items():
        check_output(name, got, prompt, n, model.vocab_size)
        if np.array_equal(got, ref):
            out[name] = f"greedy: {n}/{n} tokens agree"
            continue
        row, t = min(((b, int(np.flatnonzero(got[b] != ref[b])[0])) for b in range(len(got))
                      if not np.array_equal(got[b], ref[b])), key=lambda x: x[1])
        lp = logprobs(model, variables, ref[row:row + 1, :t + 1])[0, t - 1]  # distribution of position t
        gap = abs(lp[ref[row, t]] - lp[got[row, t]])
        if gap > 1e-3:
            raise AssertionError(f"{name}: greedy token {t - P} of row {row} is {got[row, t]}, jaxseq's {ref[row, t]}, "
                                 f"log-probs {gap:.3g} apart: not a tie, so not the same computation")
        out[name] = f"greedy: {t - P}/{n} tokens agree, then a near tie (log-probs {gap:.2g} apart)"
    return out


def check_beam(model, variables, outputs: dict, P: int) -> dict:
    """Every competitor's best beam has the log-probability of jaxseq's, under jaxseq's model."""
    scores = {}
    for name, seq in outputs.items():
        lp = logprobs(model, variables, seq)
        scores[name] = np.take_along_axis(lp, seq[:, 1:, None], 2)[:, P - 1:, 0].sum(1)  # [B]
    ref = scores.get("jaxseq")
    out = {}
    for name, s in scores.items():
        if ref is not None and not np.all(np.abs(s - ref) <= 1e-3 + 1e-5 * np.abs(ref)):
            raise AssertionError(f"{name}: best beam log-prob {s.tolist()} against jaxseq's {ref.tolist()}: "
                                 f"the searches differ")
        out[name] = f"best beam log-prob {float(s[0]):.4f}" + ("" if ref is None else " (= jaxseq's)")
    return out


# ------------------------------------------------------------------------------------------ cases


def run_case(model_name, mode, batch, built, args, process, model_checks: dict, check_greedy_now: bool):
    """Time every competitor of one (model, mode, batch); returns the JSON rows. `model_checks`
    ({impl: {check: result}}) holds the model's checks so far; with `check_greedy_now` the greedy check
    runs (after this case's first calls, so that it compiles nothing they would have) and adds to it."""
    model, variables, impls, _, config = built
    P, N = args.prompt_len, args.new_tokens
    prompt = np.random.default_rng(batch).integers(0, model.vocab_size, (batch, P))
    calls, first, outputs, skipped, rss_base = {}, {}, {}, {}, None
    for name, impl in impls.items():
        call = impl.prepare(mode, prompt, N)
        if args.rss:
            rss_base = reset_peak_rss()  # everything built; this competitor's first call counts
        t0 = time.perf_counter()
        try:
            outputs[name] = call()
        except Exception as err:  # torch.compile needs a working C++ toolchain; the others must not fail
            if name not in COMPILED:
                raise
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"skipping {name}: {skipped[name]}", file=sys.stderr, flush=True)
            continue
        first[name] = time.perf_counter() - t0
        calls[name] = call
        check_output(name, outputs[name], prompt, N, model.vocab_size)
    if check_greedy_now:
        live = {n: i for n, i in impls.items() if n in calls}
        for name, what in check_greedy(model, variables, live, prompt, min(N, args.check_tokens)).items():
            model_checks.setdefault(name, {})["greedy"] = what
    checks = {name: dict(model_checks.get(name, {})) for name in calls}
    if not args.rss:
        if mode == "beam":
            for name, what in check_beam(model, variables, outputs, P).items():
                checks[name]["beam"] = what
    (times,) = timed_rounds(calls, args.repeats)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    torch_rows = [n for n in med if n != "jaxseq"]
    best_torch = min(torch_rows, key=med.get) if torch_rows else None
    beam = args.beam if mode == "beam" else 1
    record = run_record(torch, torch_threads=torch.get_num_threads(), **process)
    rows = []
    for name, ts in times.items():
        rows.append(dict(
            bench="generation", model=model_name, mode=mode, batch=batch, beam=beam, rows_stepped=batch * beam,
            prompt_len=P, new_tokens=N, impl=name, path=impls[name].path_of(mode),
            torch_path=impls[name].path_of(mode) if name != "jaxseq" else None, **time_stats(ts),
            tokens_per_s=round(batch * N / med[name], 1), ms_per_token=round(1e3 * med[name] / N, 4),
            best_torch=best_torch, speedup_vs_best_torch=round(med[best_torch] / med[name], 3) if best_torch else None,
            compile_or_first_s=round(first[name], 3), checks=checks[name], skipped=skipped, config=config,
            temperature=args.temperature if mode == "sample" else None, repeats=args.repeats,
            **record, **(rss_fields(rss_base) if args.rss else {}),
        ))
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lstm,gpt", help="comma list of lstm, gpt")
    ap.add_argument("--modes", default="sample,beam", help="comma list of sample, beam")
    ap.add_argument("--impls", default="", help="comma list of competitors (names as in the output); all by default")
    ap.add_argument("--batches", default=None, help="sampling batch sizes (default 1,16)")
    ap.add_argument("--beam-batch", type=int, default=1, help="prompts in the beam-search case")
    ap.add_argument("--beam", type=int, default=4, help="beam size")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 16")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (at least 3; default 5)")
    ap.add_argument("--check-tokens", type=int, default=64, help="greedy tokens compared before timing")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary of both models (default 65; gpt2-small 50257)")
    ap.add_argument("--lstm-embed", type=int, default=None, help="default 64")
    ap.add_argument("--lstm-hidden", type=int, default=None, help="default 512")
    ap.add_argument("--lstm-layers", type=int, default=1)
    ap.add_argument("--gpt-size", default="default", choices=sorted(GPT_SIZES),
                    help="the GPT's shape; --layers, --heads, --d-model, --context, --vocab override it")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--d-ff", type=int, default=None, help="default 4 * d_model")
    ap.add_argument("--context", type=int, default=None, help="position table; >= prompt + new tokens")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny models, 4 + 8 tokens, batches 1 and 4, 3 rounds (flags given win)")
    ap.add_argument("--rss", action="store_true",
                    help="resident-memory row: the one --impls competitor of one case (one each of --models, "
                         "--modes and --batches), no checks; RSS before its first call and its high-water mark after")
    ap.add_argument("--out", default="", help="append the JSON lines to this file as well "
                                              "(e.g. benchmarks/results/cpu-generation.jsonl)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="glibc's default malloc for every competitor (default: freed memory kept, as `jaxseq train`)")
    args = ap.parse_args(argv)
    for field, value in (QUICK if args.quick else DEFAULTS).items():  # flags given on the command line win
        if getattr(args, field) is None:
            setattr(args, field, value)
    if args.repeats < 3:
        ap.error("--repeats must be at least 3 (a median of fewer rounds says little)")
    if min(args.prompt_len, args.new_tokens, args.beam) < 1:
        ap.error("--prompt-len, --new-tokens and --beam must be at least 1")
    if args.rss and (len(args.impls.split(",")) != 1 or not args.impls or "," in args.models
                     or "," in args.modes or ("sample" in args.modes and "," in args.batches)):
        ap.error("--rss measures one competitor in one case: give one each of --impls, --models, --modes "
                 "(and --batches when sampling)")
    return args


def main(argv=None):
    args = parse_args(argv)
    process = setup_process(args.system_malloc)  # before JAX's first computation
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    wanted = set(args.impls.split(",")) if args.impls else None
    if wanted and not wanted <= set(IMPLS["lstm"]) | set(IMPLS["gpt"]):
        raise SystemExit(f"unknown --impls {sorted(wanted - set(IMPLS['lstm']) - set(IMPLS['gpt']))}")
    cases = [(mode, b) for mode in args.modes.split(",")
             for b in ([int(x) for x in args.batches.split(",")] if mode == "sample" else [args.beam_batch])]
    lines = []
    for model_name in args.models.split(","):
        names = [n for n in IMPLS[model_name] if wanted is None or n in wanted]
        if not names:
            continue
        built = (build_lstm if model_name == "lstm" else build_gpt)(args, names)
        model, variables, _, parallel, config = built
        logits_checks = {}
        if not args.rss:
            T = args.prompt_len + args.new_tokens  # the whole generated length: every position used
            tokens = np.random.default_rng(7).integers(0, model.vocab_size, (2, T))
            logits_checks = check_logits(model, variables, parallel, tokens)
        model_checks = {name: {"logits_max_abs_diff": d} for name, d in logits_checks.items()}
        for i, (mode, batch) in enumerate(cases):
            rows = run_case(model_name, mode, batch, built, args, process, model_checks,
                            check_greedy_now=i == 0 and not args.rss)
            for row in rows:
                print(json.dumps(row), flush=True)
            lines += rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return lines


if __name__ == "__main__":
    main()
