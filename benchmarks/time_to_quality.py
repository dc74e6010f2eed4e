"""Time to quality on tinyshakespeare: wall seconds from process start to the first evaluation whose
validation loss is at or below a target, for `jaxseq train` against PyTorch training scripts run back to
back on the same machine, each as a user would run it (its own process, imports, data loading, compile
and evaluations all counted).

Two races, every competitor a subprocess started by this driver:

1. Transformer, nanoGPT's small CPU configuration (its README: `python train.py
   config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
   --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
   --lr_decay_iters=2000 --dropout=0.0`): 4 layers, 4 heads, width 128 (MLP 512), context 64, batch 12,
   2000 steps, dropout 0, AdamW lr 1e-3 (betas 0.9, 0.99, weight decay 0.1 on matrices and embeddings,
   none on vectors), gradient clipping at global norm 1, warm-up 100 steps then a cosine to 1e-4 at step
   2000, an evaluation every 250 steps on 20 batches.
   * `jaxseq`: `jaxseq train --task char_lm --model transformer` with flags for all of the above
     (`transformer_jaxseq_argv`).
   * `nanogpt`: nanoGPT's own train.py from a checkout the user made (`--nanogpt DIR`), with the README's
     command and `--dtype=float32` (on CPU nanoGPT computes in float32 whatever --dtype says; the flag
     keeps its float16 GradScaler from being built). The checkout is copied to a temporary folder, the
     corpus put at data/shakespeare_char/input.txt (so its prepare.py does not download), prepare.py run
     once (not timed: `prepare_s`), then train.py.
   * `nanogpt-compile`: the same with `--compile=True` (nanoGPT's default: torch.compile of the model).
2. LSTM, jaxseq's default run (`jaxseq train --char-lm.source FILE`, every default: embedding 64, one
   LSTM layer of 512, untied head; batch 32 x 128 characters, 1500 steps, AdamW lr 3e-3, betas 0.9,
   0.99, no weight decay, clipping at 1, warm-up 100 then cosine to 0.1 lr; 16 validation batches every
   250 steps), against `torch_char_lstm.py` given the same values (read from jaxseq's config defaults):
   `torch-char-lstm` (eager) and `torch-char-lstm-compile` (torch.compile). Before anything is timed
   `check_lstm_matches_jaxseq` fails loudly unless the two agree on the ids, the training batches (the
   same windows in the same order), the validation windows, the learning rate of every step, the logits
   of the same weights, and the weights after three AdamW steps with weight decay and clipping.

What each reports and how it is read:
  * nanoGPT and torch_char_lstm.py print `step N: train loss X, val loss Y` after each evaluation and
    `iter N: loss X, ...` after each step; their stdout is read line by line (unbuffered) and each line
    stamped with the wall time it arrived. jaxseq writes its evaluations and steps to RUN_DIR/metrics.jsonl
    (stdout has only the config, the kernels and the final report); the driver polls that file every
    25 ms and stamps each new line on arrival (so jaxseq's stamps run up to 25 ms late).
  * Evaluation schedule: every 250 steps for all. nanoGPT also evaluates at step 0 (before training);
    jaxseq and torch_char_lstm.py do not, and evaluate after the last step. Step N = after N optimizer
    steps for all. nanoGPT runs iterations 0..max_iters, so it takes one step more than the others,
    after its last evaluation (in its wall_s, not in any time to target).
  * Validation estimates differ: jaxseq (and torch_char_lstm.py, which copies it) evaluates the same
    fixed windows every time (non-overlapping windows of the context length spread evenly over the
    validation text, 20 x 12 = 240 windows for the Transformer), nanoGPT 20 freshly drawn random batches
    of 12 windows each time, so its curve is noisier and its first crossing of the target can come an
    evaluation early or late by chance (`--repeats` shows the spread); it also estimates the training loss
    on 20 more batches at every evaluation, which doubles its evaluation cost (`eval_s` reports each
    one's total). Both split at int(0.9 n) with the same 65-character vocabulary; the driver checks
    nanoGPT's train.bin / val.bin against jaxseq's ids.
  * The models differ as the two libraries build them: nanoGPT (train.py's default bias=False) has no
    biases in its Linear and LayerNorm layers and uses the exact (erf) GELU; jaxseq's TransformerLM has
    biases and the tanh GELU (GPT-2's): 809,856 parameters against nanoGPT's 804,096. Both tie the
    embeddings, learn positions and init N(0, 0.02) (jaxseq's position table N(0, 0.01), as GPT-2), the
    residual projections scaled by 1/sqrt(2 * layers). Rows carry `n_params` (jaxseq, torch_char_lstm.py)
    or nanoGPT's own printed count, without the position table (`n_params_reported_M`).
  * Both write checkpoints: jaxseq every 250 steps and at the end (its default, asynchronous), nanoGPT
    when the validation loss improves at an evaluation, torch_char_lstm.py every 250 steps and at the end.
    jaxseq's wall_s also holds its final report, a loss over the whole validation text (`report_val_loss`).
  * Compile: torch.compile rows get an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a fresh folder
    per run), as jaxseq keeps no persistent XLA cache: every row pays its compile.
  * Process settings: every child runs under the same malloc settings (`--malloc`): "keep-freed" (the
    default, `jaxseq.malloc.keep_freed_memory`, which `jaxseq train` applies itself; the PyTorch scripts
    get it from a short prelude that runs them with runpy) or "system" (glibc's defaults for all:
    JAXSEQ_MALLOC=system). Threads: each library's default (all cores); the same environment for all.

Each JSON line (one per run, appended to --out as soon as it ends): bench "time_to_quality", model,
impl, repeat, target, time_to_target_s (None when never reached), step_at_target, final_val_loss
(the last evaluation, at the last step), steps (optimizer steps taken), wall_s (process start to exit),
steps_per_s (steps / wall_s), train_steps_per_s (from step 5 to the last step, evaluations taken out),
first_step_s (process start to the first finished step: imports, data, build, compile), eval_s,
val_curve [[step, wall_s, val_loss], ...], rss_peak_mb (the child's peak resident memory: ru_maxrss from
wait4, the largest of it and its own waited-for children, e.g. inductor's compile workers; a small
launcher starts each child, so that the driver's own memory is not inherited as a high-water mark; its
start-up (`python -S`, a fraction of a second) is inside every row's times alike), n_params, config
(the race's settings, `argv`, `malloc`), returncode, `error` (a failed run's last lines), and the machine
record of `_common.run_record` (taken as the run starts). After each repeat, one line per model with
bench "time_to_quality_summary": every impl's time_to_target_s, final_val_loss and wall_s, `best_torch`
(the faster PyTorch row, eager or compiled) and jaxseq's `speedup_vs_best_torch` (its time to target over
jaxseq's) and `wall_speedup_vs_best_torch`.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python benchmarks/time_to_quality.py --nanogpt /tmp/nanoGPT --out benchmarks/results/cpu-time-to-quality.jsonl
    python benchmarks/time_to_quality.py --nanogpt /tmp/nanoGPT --repeats 3 --out ...   # alternating order
    python benchmarks/time_to_quality.py --nanogpt /tmp/nanoGPT --quick                  # smoke: 20 steps
    python benchmarks/time_to_quality.py --models lstm --impls jaxseq,torch-char-lstm
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import run_record, setup_process  # noqa: E402

IMPLS = {"transformer": ("jaxseq", "nanogpt", "nanogpt-compile"),
         "lstm": ("jaxseq", "torch-char-lstm", "torch-char-lstm-compile")}
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
JAXSEQ_CLI = "import sys; from jaxseq.cli import main; sys.exit(main())"  # what the `jaxseq` script runs
# Runs a PyTorch script (argv[1]) under jaxseq's malloc settings without importing jaxseq (or JAX).
MALLOC_PRELUDE = """import importlib.util, os, runpy, sys
spec = importlib.util.spec_from_file_location("_malloc", {path!r}); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m); m.keep_freed_memory()
sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# Starts argv[2:] and writes its peak RSS (KiB) to argv[1]. A child forked straight from this driver
# would report the driver's RSS at the fork (1+ GB, with JAX and torch loaded) as its own peak: Linux
# keeps the old memory's high-water mark across exec. The launcher is small, so its child's mark is its own.
LAUNCHER = """import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""
POLL_S = 0.025
WARM_STEP = 5  # train_steps_per_s counts from here: the first steps compile


# ---------------------------------------------------------------------------------- settings


def transformer_settings(quick: bool) -> dict:
    """nanoGPT's small CPU configuration (README), in neutral names."""
    s = dict(layers=4, heads=4, d_model=128, d_ff=512, context=64, batch=12, steps=2000, lr=1e-3, min_lr=1e-4,
             warmup=100, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0, dropout=0.0, eval_every=250,
             eval_batches=20, val_fraction=0.1, seed=0)
    return {**s, "steps": 20, "warmup": 5, "eval_every": 10, "eval_batches": 2} if quick else s


def lstm_settings(quick: bool) -> dict:
    """`jaxseq train`'s defaults for the LSTM on a char_lm source (jaxseq/config.py)."""
    from jaxseq.config import TrainConfig

    c = TrainConfig()
    r, d, o = c.rnn, c.char_lm, c.optim
    s = dict(d_embed=r.d_embed, d_hidden=r.d_hidden, num_layers=r.num_layers, dropout=r.dropout,
             context=d.seq_len, batch=d.batch_size, val_fraction=d.val_fraction, steps=c.steps,
             eval_every=c.eval_every, eval_batches=c.eval_batches, checkpoint_every=c.checkpoint_every,
             lr=o.lr, min_lr_ratio=o.min_lr_ratio, warmup=o.warmup_steps, weight_decay=o.weight_decay,
             grad_clip=o.grad_clip, b1=o.b1, b2=o.b2, seed=c.seed)
    return {**s, "steps": 20, "warmup": 5, "eval_every": 10, "eval_batches": 2} if quick else s


def transformer_jaxseq_argv(s: dict, source: str, run_dir: str) -> list[str]:
    a = dict(task="char_lm", model="transformer", steps=s["steps"], eval_every=s["eval_every"],
             eval_batches=s["eval_batches"], seed=s["seed"], run_dir=run_dir)
    a.update({"char-lm.source": source, "char-lm.seq-len": s["context"], "char-lm.batch-size": s["batch"],
              "char-lm.val-fraction": s["val_fraction"], "transformer.num-layers": s["layers"],
              "transformer.num-heads": s["heads"], "transformer.d-model": s["d_model"],
              "transformer.d-ff": s["d_ff"], "transformer.max-len": s["context"],
              "transformer.dropout": s["dropout"], "optim.lr": s["lr"], "optim.min-lr-ratio": s["min_lr"] / s["lr"],
              "optim.warmup-steps": s["warmup"], "optim.weight-decay": s["weight_decay"],
              "optim.grad-clip": s["grad_clip"], "optim.b1": s["b1"], "optim.b2": s["b2"]})
    return ["train", *(x for k, v in a.items() for x in (f"--{k.replace('_', '-')}", str(v))), "--no-progress"]


def lstm_jaxseq_argv(s: dict, source: str, run_dir: str, quick: bool) -> list[str]:
    """The default run; --quick shortens it (steps, evaluations, warm-up) and nothing else."""
    argv = ["train", "--char-lm.source", source, "--run-dir", run_dir, "--no-progress"]
    if quick:
        argv += ["--steps", str(s["steps"]), "--eval-every", str(s["eval_every"]),
                 "--eval-batches", str(s["eval_batches"]), "--optim.warmup-steps", str(s["warmup"])]
    return argv


def nanogpt_argv(s: dict, compile_: bool, out_dir: str) -> list[str]:
    """The README's CPU command (plus --dtype=float32 and --out_dir); --quick's shortening as flags too."""
    argv = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", f"--compile={compile_}",
            f"--eval_iters={s['eval_batches']}", "--log_interval=1", f"--block_size={s['context']}",
            f"--batch_size={s['batch']}", f"--n_layer={s['layers']}", f"--n_head={s['heads']}",
            f"--n_embd={s['d_model']}", f"--max_iters={s['steps']}", f"--lr_decay_iters={s['steps']}",
            f"--dropout={s['dropout']}", "--dtype=float32", f"--out_dir={out_dir}"]
    if s["eval_every"] != 250 or s["warmup"] != 100:  # --quick: the config file says 250 and 100
        argv += [f"--eval_interval={s['eval_every']}", f"--warmup_iters={s['warmup']}"]
    return argv


def torch_lstm_argv(s: dict, source: str, compile_: bool, out_dir: str) -> list[str]:
    a = {"source": source, "val-fraction": s["val_fraction"], "seq-len": s["context"], "batch-size": s["batch"],
         "d-embed": s["d_embed"], "d-hidden": s["d_hidden"], "num-layers": s["num_layers"], "dropout": s["dropout"],
         "steps": s["steps"], "eval-every": s["eval_every"], "eval-batches": s["eval_batches"],
         "checkpoint-every": s["checkpoint_every"], "lr": s["lr"], "min-lr-ratio": s["min_lr_ratio"],
         "warmup-steps": s["warmup"], "weight-decay": s["weight_decay"], "grad-clip": s["grad_clip"],
         "b1": s["b1"], "b2": s["b2"], "seed": s["seed"], "out-dir": out_dir}
    return [str(ROOT / "benchmarks" / "torch_char_lstm.py"), *(x for k, v in a.items() for x in (f"--{k}", str(v))),
            *(["--compile"] if compile_ else [])]


# ---------------------------------------------------------------------------------- checks


class Mismatch(RuntimeError):
    """Two competitors would not do the same work."""


def require(ok, what: str):
    if not ok:
        raise Mismatch(what)


def check_nanogpt_data(data_dir: Path, source: str, val_fraction: float) -> dict:
    """nanoGPT's prepared train.bin / val.bin / meta.pkl hold jaxseq's vocabulary, ids and split."""
    from jaxseq.tasks.char_lm import CharLM

    data = CharLM(source=source, val_fraction=val_fraction).prepare()
    with open(data_dir / "meta.pkl", "rb") as f:
        meta = pickle.load(f)  # written a moment ago by the checkout's prepare.py
    chars = tuple(meta["itos"][i] for i in range(meta["vocab_size"]))
    require(chars == data.tokenizer.chars, f"nanoGPT's vocabulary ({len(chars)}) differs from jaxseq's "
            f"({data.tokenizer.vocab_size})")
    for split, ids in (("train", data.train_ids), ("val", data.val_ids)):
        theirs = np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16)
        require(np.array_equal(theirs, ids), f"nanoGPT's {split}.bin ({len(theirs)} ids) differs from jaxseq's "
                f"{split} split ({len(ids)} ids)")
    return {"vocab_size": len(chars), "train_tokens": len(data.train_ids), "val_tokens": len(data.val_ids)}


def _as_torch_names(params) -> dict:
    """A jaxseq RecurrentLM's params (one LSTM layer) as torch_char_lstm.CharLSTM's state dict (NumPy)."""
    cell = params["rnn"]["cell"]
    pairs = {"embed.weight": params["embed"]["embedding"], "lstm.weight_ih_l0": cell["w_ih"].T,
             "lstm.weight_hh_l0": cell["w_hh"].T, "lstm.bias_ih_l0": cell["b_ih"], "lstm.bias_hh_l0": cell["b_hh"],
             "head.weight": params["head"]["kernel"].T, "head.bias": params["head"]["bias"]}
    return {k: np.array(v, dtype=np.float32) for k, v in pairs.items()}


def _from_torch_names(arrays: dict) -> dict:
    """The inverse of `_as_torch_names`: a dict in torch's names back into a jaxseq params tree."""
    return {"embed": {"embedding": arrays["embed.weight"]},
            "rnn": {"cell": {"w_ih": arrays["lstm.weight_ih_l0"].T, "w_hh": arrays["lstm.weight_hh_l0"].T,
                             "b_ih": arrays["lstm.bias_ih_l0"], "b_hh": arrays["lstm.bias_hh_l0"]}},
            "head": {"kernel": arrays["head.weight"].T, "bias": arrays["head.bias"]}}


def _max_param_diff(tmodel, params) -> float:
    theirs = dict(tmodel.named_parameters())
    return max(float(np.abs(v - theirs[k].detach().numpy()).max()) for k, v in _as_torch_names(params).items())


def check_lstm_matches_jaxseq(source: str, s: dict) -> dict:
    """Fail loudly unless torch_char_lstm.py and `jaxseq train`'s LSTM do the same work on `source` under
    settings `s`: ids, training batches, validation windows, every step's learning rate, logits of the same
    weights, and weights after 3 AdamW steps (weight decay 0.1 and clipping on, to test the decay mask)."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    import torch_char_lstm as T
    from jaxseq.config import OptimConfig, TrainConfig
    from jaxseq.data import eval_batches, lm_batch
    from jaxseq.losses import lm_loss_fn
    from jaxseq.models import build_model
    from jaxseq.steps import make_optimizer, make_schedule

    require(s["num_layers"] == 1, "the check maps one LSTM layer's weights")
    c = TrainConfig()
    c = replace(c, char_lm=replace(c.char_lm, source=source), steps=s["steps"],
                optim=replace(c.optim, warmup_steps=s["warmup"]))
    data = c.char_lm.prepare()
    chars, train_ids, val_ids = T.load_corpus(source, s["val_fraction"])
    require(tuple(chars) == data.tokenizer.chars, "vocabularies differ")
    require(np.array_equal(train_ids, data.train_ids) and np.array_equal(val_ids, data.val_ids), "ids or split differ")
    B, L = s["batch"], s["context"]
    for i in (0, 1, s["steps"] - 1):
        x, y = T.train_batch(train_ids, B, L, s["seed"], i)
        b = lm_batch(data.train_ids, batch_size=B, seq_len=L, seed=s["seed"], index=i)
        require(np.array_equal(x, b["inputs"]) and np.array_equal(y, b["targets"]), f"training batch {i} differs")
    theirs = eval_batches(data.val_ids, batch_size=B, seq_len=L, max_batches=s["eval_batches"])
    ours = T.eval_batches(val_ids, B, L, s["eval_batches"])
    require(len(ours) == len(theirs) and all(
        np.array_equal(x, t["inputs"]) and np.array_equal(y, t["targets"]) and np.array_equal(v, t["mask"][:, 0])
        for (x, y, v), t in zip(ours, theirs)), "validation batches differ")
    sched = np.asarray(jax.vmap(make_schedule(c.optim, s["steps"]))(jnp.arange(s["steps"])))
    mine = np.array([T.lr_at(i, s["lr"], s["warmup"], s["steps"], s["min_lr_ratio"]) for i in range(s["steps"])])
    require(np.allclose(sched, mine, rtol=1e-5, atol=0), f"learning rates differ by up to {np.abs(sched - mine).max():.3g}")

    vocab = len(chars)
    model = build_model(c, {"interface": "lm", "vocab_size": vocab})
    params = model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"]
    tmodel = T.CharLSTM(vocab, s["d_embed"], s["d_hidden"], s["num_layers"], s["dropout"])
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in _as_torch_names(params).items()}, strict=True)
    b = lm_batch(data.train_ids, batch_size=4, seq_len=L, seed=s["seed"], index=0)
    want = np.asarray(model.apply({"params": params}, b["inputs"]))
    with torch.no_grad():
        got = tmodel.logits(torch.from_numpy(b["inputs"].astype(np.int64))).numpy()
    logits_err = float(np.abs(want - got).max())
    require(logits_err < 1e-4, f"logits of the same weights differ by {logits_err:.3g}")

    # The gradients of the same weights on the same batch, then three steps of each optimizer fed the same
    # gradients (torch's): Adam's first steps amplify float noise in gradients near eps, so the optimizer
    # math is compared on identical inputs. Weight decay 0.5 and clipping at 0.1 make both matter.
    optim = OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.5, min_lr_ratio=0.1, grad_clip=0.1, b1=s["b1"], b2=s["b2"])
    opt = make_optimizer(optim, 3)
    loss_fn = lm_loss_fn(model)
    grad = jax.jit(jax.grad(lambda p, batch: loss_fn(p, batch, None)[0]))
    state = opt.init(params)
    topt = T.make_optimizer(tmodel, optim.lr, optim.b1, optim.b2, optim.weight_decay, "fused")
    grad_err = None
    for i in range(3):
        x, y = (torch.from_numpy(t) for t in T.train_batch(train_ids, B, L, s["seed"], i))
        T.backward(tmodel, topt, x, y)
        tgrads = {k: p.grad.numpy().copy() for k, p in tmodel.named_parameters()}
        if i == 0:
            b = lm_batch(data.train_ids, batch_size=B, seq_len=L, seed=s["seed"], index=i)
            jgrads = _as_torch_names(grad(params, b))
            grad_err = max(float(np.abs(v - tgrads[k]).max()) for k, v in jgrads.items())
            require(grad_err < 1e-6, f"gradients of the same weights differ by {grad_err:.3g}")
        g = jax.tree.map(jnp.asarray, _from_torch_names(tgrads))
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
        T.update(tmodel, topt, T.lr_at(i, optim.lr, optim.warmup_steps, 3, optim.min_lr_ratio), optim.grad_clip)
    step_err = _max_param_diff(tmodel, params)
    require(step_err < 1e-6, f"weights after 3 AdamW steps differ by {step_err:.3g} (updates are ~1e-2)")
    return {"logits_max_abs_err": logits_err, "grads_max_abs_err": grad_err, "params_after_3_steps_max_abs_err": step_err}


def jaxseq_n_params(argv: list[str], vocab: int) -> int:
    """Parameter count of the model `jaxseq train argv` builds (shapes only, nothing computed)."""
    import jax
    import tyro

    from jaxseq.config import TrainConfig
    from jaxseq.models import build_model

    c = tyro.cli(TrainConfig, args=argv[1:])
    model = build_model(c, {"interface": "lm", "vocab_size": vocab})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, c.char_lm.seq_len), "int32"))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


# ---------------------------------------------------------------------------------- running


class Run:
    """One child process's record: lines stamped on arrival, its exit, its rusage."""

    def __init__(self):
        self.val_curve: list[list] = []  # [step, wall_s, val_loss]
        self.step_times: dict[int, float] = {}  # steps done -> wall_s when that step's line arrived
        self.evals: list[tuple[int, float]] = []  # (step, seconds the evaluation took)
        self.extra: dict = {}
        self.log: list[str] = []


ITER = re.compile(r"^iter (\d+): loss (\S+),")
EVAL = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)")


def _parse_torch_line(run: Run, line: str, t: float):
    """A nanoGPT / torch_char_lstm.py stdout line, arrived at wall time t."""
    if m := ITER.match(line):
        run.step_times[int(m.group(1)) + 1] = t
    elif m := EVAL.match(line):
        step = int(m.group(1))
        run.val_curve.append([step, round(t, 3), float(m.group(3))])
        if step in run.step_times:  # the gap from the step's line to the evaluation's
            run.evals.append((step, t - run.step_times[step]))
        elif step == 0:
            run.evals.append((0, t - run.extra.get("_t_before_eval0", t)))
    elif m := re.match(r"number of parameters: ([\d.]+)M", line):  # nanoGPT (non-embedding, in millions)
        run.extra["n_params_reported_M"] = float(m.group(1))
    elif m := re.match(r"parameters: (\d+)", line):  # torch_char_lstm.py
        run.extra["n_params"] = int(m.group(1))
    elif m := re.match(r"found vocab_size = (\d+)", line):
        run.extra["vocab_size"] = int(m.group(1))
    elif line.startswith("compiling the model") or line.startswith("using fused AdamW"):
        run.extra["_t_before_eval0"] = t  # nanoGPT's last line before its step-0 evaluation


def _parse_jaxseq_row(run: Run, row: dict, t: float):
    """A RUN_DIR/metrics.jsonl row, seen at wall time t."""
    if row.get("split") == "train":
        run.step_times[row["step"]] = t
    elif row.get("split") == "val":
        run.val_curve.append([row["step"], round(t, 3), row["loss"]])
        if row["step"] in run.step_times:
            run.evals.append((row["step"], t - run.step_times[row["step"]]))
    elif row.get("split") == "report":
        run.extra["report_val_loss"] = row.get("loss")


def _tail_metrics(path: Path, run: Run, t0: float, done: threading.Event):
    """Poll `path` every POLL_S and parse each complete new line, stamped when first seen."""
    pos, buf = 0, ""
    while True:
        finished = done.is_set()  # read once more after the process ended
        if path.exists():
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            t = time.perf_counter() - t0
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                if line.strip():
                    _parse_jaxseq_row(run, json.loads(line), t)
        if finished:
            return
        time.sleep(POLL_S)


def run_child(argv: list[str], cwd: Path, env: dict, log_path: Path, metrics: Path | None) -> Run:
    """Start `argv`, stamp what it reports (its stdout, or `metrics` for jaxseq), wait for it."""
    run = Run()
    rss_file = log_path.with_suffix(".maxrss")
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(rss_file), *argv], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        done = threading.Event()
        tail = threading.Thread(target=_tail_metrics, args=(metrics, run, t0, done)) if metrics else None
        if tail:
            tail.start()
        for line in proc.stdout:  # ends when the child closes its stdout (exits)
            t = time.perf_counter() - t0
            log.write(line)
            run.log.append(line.rstrip("\n"))
            if not metrics:
                _parse_torch_line(run, line.strip(), t)
        run.returncode = proc.wait()
        run.wall_s = time.perf_counter() - t0
        run.rss_peak_mb = round(int(rss_file.read_text()) / 1024, 1) if rss_file.is_file() else None
        if tail:
            done.set()
            tail.join()
    return run


def summarize(run: Run, target: float) -> dict:
    """The row's measured fields from a finished run."""
    hit = next((v for v in run.val_curve if v[2] <= target), None)
    steps = max(run.step_times, default=0)
    trained = [s for s in sorted(run.step_times) if s >= WARM_STEP]
    rate = None
    if len(trained) >= 2:
        s0, s1 = trained[0], trained[-1]
        evals_between = sum(dt for step, dt in run.evals if s0 <= step < s1)
        rate = round((s1 - s0) / max(run.step_times[s1] - run.step_times[s0] - evals_between, 1e-9), 3)
    return {"time_to_target_s": hit[1] if hit else None, "step_at_target": hit[0] if hit else None,
            "final_val_loss": run.val_curve[-1][2] if run.val_curve else None, "steps": steps,
            "wall_s": round(run.wall_s, 3), "steps_per_s": round(steps / run.wall_s, 3) if run.wall_s else None,
            "train_steps_per_s": rate, "first_step_s": round(run.step_times[1], 3) if 1 in run.step_times else None,
            "eval_s": round(sum(dt for _, dt in run.evals), 3), "n_evals": len(run.val_curve), "val_curve": run.val_curve,
            "rss_peak_mb": run.rss_peak_mb, "returncode": run.returncode}


def write_line(row: dict, out: str):
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def summary_row(model: str, repeat: int, target: float, rows: list[dict]) -> dict:
    """One repeat's race in a line (bench "time_to_quality_summary"): each impl's time to target, the
    faster PyTorch row (`best_torch`: eager or compiled, by time to target, then by wall time) and
    jaxseq's speed-up over it (> 1: jaxseq reached the target sooner)."""
    ok = [x for x in rows if x["returncode"] == 0]
    ttq = {x["impl"]: x["time_to_target_s"] for x in ok}
    torch_rows = [x for x in ok if x["impl"] != "jaxseq"]
    best = min(torch_rows, key=lambda x: (x["time_to_target_s"] is None, x["time_to_target_s"] or 0, x["wall_s"]),
               default=None)
    ours = next((x for x in ok if x["impl"] == "jaxseq"), None)

    def ratio(key):
        if best is None or ours is None or best[key] is None or ours[key] is None:
            return None
        return round(best[key] / ours[key], 3)

    return {"bench": "time_to_quality_summary", "model": model, "repeat": repeat, "target": target,
            "time_to_target_s": ttq, "final_val_loss": {x["impl"]: x["final_val_loss"] for x in ok},
            "wall_s": {x["impl"]: x["wall_s"] for x in ok}, "best_torch": best["impl"] if best else None,
            "speedup_vs_best_torch": ratio("time_to_target_s"), "wall_speedup_vs_best_torch": ratio("wall_s"),
            "failed": [x["impl"] for x in rows if x["returncode"] != 0]}


# ---------------------------------------------------------------------------------- driver


class Driver:
    def __init__(self, args, tmp: Path):
        self.a, self.tmp = args, tmp
        self.source = str(Path(args.source).resolve())
        self.process = setup_process(args.malloc == "system")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if args.malloc == "system":
            env["JAXSEQ_MALLOC"] = "system"
        self.env = env
        self.settings = {"transformer": transformer_settings(args.quick), "lstm": lstm_settings(args.quick)}
        self.nanogpt_dir = None
        self.checks: dict = {}
        self.n_params: dict = {}
        self.failed = 0

    def torch_argv(self, script_argv: list[str]) -> list[str]:
        """A PyTorch script's command: under jaxseq's malloc settings unless --malloc system."""
        if self.a.malloc == "system":
            return [sys.executable, *script_argv]
        return [sys.executable, "-c", MALLOC_PRELUDE.format(path=str(ROOT / "jaxseq" / "malloc.py")), *script_argv]

    def prepare_nanogpt(self):
        """Copy the user's checkout, put the corpus where prepare.py looks, run prepare.py, check its output."""
        src = Path(self.a.nanogpt).expanduser().resolve()
        for f in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                  "data/shakespeare_char/prepare.py"):
            if not (src / f).is_file():
                raise SystemExit(f"--nanogpt {src}: no {f}; pass a checkout of https://github.com/karpathy/nanoGPT")
        dst = self.tmp / "nanoGPT"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pkl"))
        data_dir = dst / "data" / "shakespeare_char"
        shutil.copyfile(self.source, data_dir / "input.txt")
        t = time.perf_counter()
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=dst, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        self.checks["nanogpt_prepare_s"] = round(time.perf_counter() - t, 3)
        self.checks["nanogpt_data"] = check_nanogpt_data(data_dir, self.source, self.settings["transformer"]["val_fraction"])
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True)
        self.checks["nanogpt_commit"] = commit.stdout.strip() or None
        self.nanogpt_dir = dst
        print(f"nanoGPT data: {self.checks['nanogpt_data']} (same as jaxseq's)", flush=True)

    def command(self, model: str, impl: str, work: Path) -> tuple[list[str], Path, Path | None, dict]:
        """(argv, cwd, metrics file or None, extra env) of one run."""
        s, compile_ = self.settings[model], impl.endswith("-compile")
        extra_env = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")} if compile_ else {}
        if impl == "jaxseq":
            run_dir = str(work / "run")
            args = (transformer_jaxseq_argv(s, self.source, run_dir) if model == "transformer"
                    else lstm_jaxseq_argv(s, self.source, run_dir, self.a.quick))
            return [sys.executable, "-c", JAXSEQ_CLI, *args], work, work / "run" / "metrics.jsonl", extra_env
        if model == "transformer":
            return self.torch_argv(nanogpt_argv(s, compile_, str(work / "out"))), self.nanogpt_dir, None, extra_env
        return self.torch_argv(torch_lstm_argv(s, self.source, compile_, str(work / "out"))), work, None, extra_env

    def run(self, model: str, impl: str, repeat: int, out) -> dict:
        import torch

        work = Path(tempfile.mkdtemp(prefix=f"{model}-{impl}-", dir=self.tmp))
        argv, cwd, metrics, extra_env = self.command(model, impl, work)
        shown = argv[3:] if argv[1] == "-c" else argv[1:]
        how = {JAXSEQ_CLI: "jaxseq"}.get(argv[2], "python <malloc prelude>") if argv[1] == "-c" else "python"
        print(f"[{model} {impl} repeat {repeat}] {how} {' '.join(shown)}", flush=True)
        record = run_record(torch, **self.process)
        run = run_child(argv, cwd, {**self.env, **extra_env}, work / "stdout.log", metrics)
        row = {"bench": "time_to_quality", "model": model, "impl": impl, "repeat": repeat, "target": self.a.target,
               **summarize(run, self.a.target)}
        extras = {k: v for k, v in run.extra.items() if not k.startswith("_")}
        if impl == "jaxseq":
            extras["n_params"] = self.n_params.get(model)
            cfg_file = work / "run" / "config.json"
            if cfg_file.is_file():  # what jaxseq says it ran
                c = json.loads(cfg_file.read_text())
                section = "transformer" if c["model"] == "transformer" else "rnn"
                keys = ("task", "model", "steps", "eval_every", "eval_batches", "checkpoint_every", "seed", "optim",
                        "char_lm", section)
                extras["jaxseq_config"] = {k: c[k] for k in keys}
        if impl.startswith("nanogpt"):
            extras["prepare_s"] = self.checks.get("nanogpt_prepare_s")
            extras["nanogpt_commit"] = self.checks.get("nanogpt_commit")
        if run.returncode != 0:
            row["error"] = "\n".join(run.log[-30:])
            self.failed += 1
            print(f"FAILED ({run.returncode}):\n{row['error']}", flush=True)
        row.update(extras)
        row["config"] = {**self.settings[model], "argv": shown,
                         "malloc": self.a.malloc, "checks": self.checks.get(model)}
        row.update(record)
        write_line(row, out)
        if not self.a.keep_tmp:
            shutil.rmtree(work, ignore_errors=True)
        return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="the corpus (tinyshakespeare.txt)")
    ap.add_argument("--nanogpt", default="", help="a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT)")
    ap.add_argument("--target", type=float, default=1.88, help="validation loss (nats per character) to reach")
    ap.add_argument("--models", default="transformer,lstm")
    ap.add_argument("--impls", default="", help="comma list (default all): " + ", ".join(sorted({i for v in IMPLS.values() for i in v})))
    ap.add_argument("--repeats", type=int, default=1, help="run the whole set this many times, order reversed every other time")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, evaluations every 10 on 2 batches")
    ap.add_argument("--malloc", choices=("keep-freed", "system"), default="keep-freed",
                    help="glibc malloc settings of every child (see the docstring)")
    ap.add_argument("--out", default="", help="append the JSON lines here")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the run folders (logs, checkpoints)")
    a = ap.parse_args()

    models = [m for m in a.models.split(",") if m]
    wanted = set(filter(None, a.impls.split(",")))
    unknown = wanted - {i for v in IMPLS.values() for i in v} or set(models) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown model or impl: {sorted(unknown)}")
    runs = [(m, i) for m in models for i in IMPLS[m] if not wanted or i in wanted]
    if any(i.startswith("nanogpt") for _, i in runs) and not a.nanogpt:
        raise SystemExit("the nanogpt rows need --nanogpt DIR (git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)

    tmp, d = Path(tempfile.mkdtemp(prefix="time-to-quality-")), None
    try:
        d = Driver(a, tmp)
        if any(i.startswith("nanogpt") for _, i in runs):
            d.prepare_nanogpt()
            d.checks["transformer"] = {"data": d.checks["nanogpt_data"]}
        if any(m == "lstm" and i.startswith("torch") for m, i in runs):
            d.checks["lstm"] = check_lstm_matches_jaxseq(d.source, d.settings["lstm"])
            print(f"torch_char_lstm.py matches jaxseq's LSTM: {d.checks['lstm']}", flush=True)
        vocab = len(set(Path(d.source).read_text(encoding="utf-8")))
        d.n_params = {m: jaxseq_n_params(transformer_jaxseq_argv(d.settings[m], d.source, "x") if m == "transformer"
                                         else lstm_jaxseq_argv(d.settings[m], d.source, "x", a.quick), vocab)
                      for m in models}
        for r in range(a.repeats):
            rows = [d.run(model, impl, r, a.out) for model, impl in (runs if r % 2 == 0 else runs[::-1])]
            for model in models:
                write_line(summary_row(model, r, a.target, [x for x in rows if x["model"] == model]), a.out)
    finally:
        if not a.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"run folders kept in {tmp}", flush=True)
    if d is not None and d.failed:
        raise SystemExit(f"{d.failed} run(s) failed; their rows carry `error`")


if __name__ == "__main__":
    main()
