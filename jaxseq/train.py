"""Training: TrainState, the optimizer, one pure train step, evaluation, and `train()`, a loop you can read.

    optimizer = make_optimizer(config.optim, total_steps=config.steps)
    state = init_train_state(params, optimizer)
    step_fn = jax.jit(make_train_step(lm_loss_fn(model), optimizer, seed=config.seed))
    state, metrics = step_fn(state, batch)          # metrics: loss, grad_norm, lr, nonfinite, ...

`train()` jits the same step with `compiler_options=jaxseq.xla_options.compiler_options(model)`, which on
CPU gives Transformers YNNPACK dots (attention's per-head matmuls on every core); pass it too.

Determinism: the dropout key of step s is `fold_in(key(seed), s)` (the seed is baked into the step
function's closure; the step number comes from the state) and training batch s is
`jaxseq.data.lm_batch(..., seed=seed, index=s)`, so a resumed run repeats an uninterrupted one bit for bit.

Non-finite steps: a step whose loss or gradient global norm is inf/NaN leaves params and optimizer state
bit-for-bit unchanged (so one bad batch cannot poison Adam's moments), still advances `step` (the data
moves on), and counts in `nonfinite_count` (reset by the next good step). `train()` raises
NonFiniteError after `max_nonfinite_steps` of them in a row, without saving a new checkpoint.

Devices: `train()` builds a ("data", "fsdp") mesh from `--mesh.*` (default: data parallel over every
device) and runs `make_sharded_step`: the state created sharded (FSDP by shape with --mesh.fsdp > 1),
each global batch split over all devices, the step jitted once with the state donated. The same code
runs on one CPU, on 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), a GPU, or
several processes: start the same command in each with --dist.coordinator HOST:PORT --dist.num-processes
P --dist.process-id I (or JAXSEQ_COORDINATOR / JAXSEQ_NUM_PROCESSES / JAXSEQ_PROCESS_ID) and a run_dir
on a filesystem they share. Every process computes the same global batch and feeds its own rows; only
process 0 prints and writes config, tokenizer and metrics; all take part in checkpoints (Orbax). A
checkpoint restores onto any mesh (it is read straight into the new shardings), so losses continue
equal (float32 tolerance) when a run moves between 1 and 8 devices.

Mixed precision: `--compute-dtype bfloat16` keeps params and optimizer state float32 (checkpoints are the
same either way) and runs the forward and backward pass in bfloat16; logits and loss are float32.

Signals: during `train()`, SIGTERM and SIGINT set a flag; at the next step boundary the run saves a
checkpoint, waits for it, and exits with `SystemExit(128 + signum)`: 143 for SIGTERM, 130 for SIGINT
(the shell's convention). A second SIGINT while stopping interrupts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxseq.checkpoint import CheckpointManager
from jaxseq.config import CpuDots, OptimConfig, TrainConfig, to_dict
from jaxseq.errors import ConfigError, DataError, NonFiniteError
from jaxseq.losses import lm_loss_fn, token_nll
from jaxseq.sharding import (batch_sharding, check_batch_divisible, make_mesh, maybe_initialize_distributed,
                             process_rows, replicated, shard_batch, state_shardings)
from jaxseq.xla_options import compiler_options


class TrainState(NamedTuple):
    """Everything that changes during training; arrays only, so Orbax saves it as it is.

    step: int32 [] (number of steps taken, good or not; also the data position);
    params, opt_state: pytrees; nonfinite_count: int32 [] (consecutive non-finite steps).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_count: jax.Array


def init_train_state(params, optimizer) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.zeros((), jnp.int32))


# -- optimizer ------------------------------------------------------------------------------------------


def make_schedule(optim: OptimConfig, total_steps: int):
    """Linear warm-up from lr/(warmup+1) to lr over `warmup_steps`, then cosine decay to lr*min_lr_ratio at total_steps.

    Starting at lr/(warmup+1), not 0, so that the first step is not wasted (nanoGPT's (it+1)/(warmup+1)).
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=optim.lr / (optim.warmup_steps + 1),
        peak_value=optim.lr,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(total_steps, optim.warmup_steps + 1),  # optax counts the warm-up in decay_steps
        end_value=optim.lr * optim.min_lr_ratio,
    )


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW on the warm-up-cosine schedule.

    grad_clip <= 0 disables clipping. Weight decay applies to matrices only (ndim >= 2), not to biases,
    LayerNorm scales or other vectors (as nanoGPT and most LM recipes). The learning rate is injected
    as a hyperparameter, so the one actually used is in the optimizer state (reported as `lr`).
    """
    if not optim.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {optim.lr}.")
    if optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}.")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (end lr = lr * ratio), got {optim.min_lr_ratio}.")

    def build(learning_rate):
        decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)  # noqa: E731
        return optax.chain(
            optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
            optax.adamw(learning_rate, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask),
        )

    return optax.inject_hyperparams(build)(learning_rate=make_schedule(optim, total_steps))


# -- steps ----------------------------------------------------------------------------------------------


def make_train_step(loss_fn, optimizer, *, seed: int = 0):
    """A pure `step_fn(state, batch) -> (state, metrics)`; jit it once.

    loss_fn(params, batch, rng) -> (loss, aux) (see `jaxseq.losses.lm_loss_fn`); rng is the dropout key
    `fold_in(key(seed), state.step)`. metrics: loss, grad_norm (before clipping), lr (used this step),
    nonfinite (1 if the step was skipped), nonfinite_count, tokens (valid targets, if aux has num_tokens).
    """
    base_key = jax.random.key(seed)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(base_key, state.step)
        (loss, aux), grads = grad_fn(state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            params, opt_state = operands
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # cond, not where: on a bad step the optimizer never sees the NaN gradients, and the old
        # params/opt_state are returned as they are (bit for bit).
        params, opt_state = jax.lax.cond(ok, update, lambda operands: operands, (state.params, state.opt_state))
        count = jnp.where(ok, 0, state.nonfinite_count + 1).astype(jnp.int32)
        new_state = TrainState(state.step + 1, params, opt_state, count)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": _current_lr(opt_state),
            "nonfinite": (~ok).astype(jnp.int32),
            "nonfinite_count": count,
            "tokens": aux.get("num_tokens", jnp.zeros((), jnp.int32)) if isinstance(aux, dict) else 0,
        }
        return new_state, metrics

    return step_fn


class ShardedStep(NamedTuple):
    """A run's state and step on a mesh (see `make_sharded_step`)."""

    init: Any  # () -> TrainState, created already sharded
    step: Any  # (state, batch) -> (state, metrics); jitted once, state donated
    shardings: Any  # the TrainState's NamedShardings
    abstract: Any  # the TrainState's ShapeDtypeStructs with those shardings (a restore template)


def make_sharded_step(
    model, optimizer, mesh, *, seq_len: int, seed: int = 0, compute_dtype=None, cpu_dots: CpuDots = "auto"
) -> ShardedStep:
    """Init and train step of `model` on `mesh`, the same code on one CPU, 8 fake CPUs, a GPU or many hosts.

    Params and optimizer state get `jaxseq.sharding.state_shardings` (replicated, or split along their
    largest axis that --mesh.fsdp divides); batches are split over every device (`batch_sharding`);
    metrics come back replicated. `init` runs `model.init` under jit with those out_shardings, so no
    device ever holds more than its shard of a big model. seq_len: the init tokens' length (shapes only).
    cpu_dots: which library runs the step's matmuls on CPU (`jaxseq.xla_options.compiler_options`).
    """

    def init_state():  # traced: the tokens only give init its shapes
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        return init_train_state(model.init(jax.random.key(seed), tokens)["params"], optimizer)

    abstract = jax.eval_shape(init_state)
    shardings = state_shardings(mesh, abstract)
    step = jax.jit(
        make_train_step(lm_loss_fn(model, compute_dtype=compute_dtype), optimizer, seed=seed),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(model, cpu_dots),
    )
    template = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return ShardedStep(jax.jit(init_state, out_shardings=shardings), step, shardings, template)


def _current_lr(opt_state):
    hyperparams = getattr(opt_state, "hyperparams", None)
    if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
        return jnp.asarray(hyperparams["learning_rate"], jnp.float32)
    return jnp.full((), jnp.nan, jnp.float32)


def is_count_model(model) -> bool:
    """Count-based models (the n-gram) are fitted by `model.fit_variables(train_ids)`, not by gradients."""
    return hasattr(model, "fit_variables")


def model_variables(model, params) -> dict:
    """What `model.apply` takes: {"params": params}; for count-based models `params` is already their
    whole variables dict (e.g. {"counts": ...}), which is what their checkpoints and `load_run` hold."""
    return params if is_count_model(model) else {"params": params}


def make_eval_step(model, *, mesh=None, param_shardings=None, cpu_dots: CpuDots = "auto"):
    """Jitted `(params, batch) -> (sum_nll, count)`: summed next-token NLL (nats) and valid targets, no dropout.

    mesh, param_shardings: compile for params with these shardings and a batch split over `mesh`
    (as `train()` feeds it); the sums come back replicated, readable by every process.
    cpu_dots: as in `make_sharded_step`.
    """

    def eval_step(params, batch):
        logits = model.apply(model_variables(model, params), batch["inputs"], mask=batch["mask"], deterministic=True)
        return token_nll(logits, batch["targets"], batch["mask"])

    options = compiler_options(model, cpu_dots)
    if mesh is None:
        return jax.jit(eval_step, compiler_options=options)
    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=replicated(mesh),
                   compiler_options=options)


def evaluate(eval_step, params, batches) -> dict:
    """Mean next-token loss over all valid targets of `batches`: {"loss" (nats), "bits" (per token), "tokens"}.

    Sums are accumulated in float64 on the host, so the mean is over tokens, not a mean of batch means.
    """
    results = [eval_step(params, b) for b in batches]  # dispatch all, then wait once
    sums = jax.device_get(results)
    total = float(sum(np.float64(s) for s, _ in sums))
    count = int(sum(int(n) for _, n in sums))
    if count == 0:
        raise DataError(f"evaluation saw no valid target in {len(batches)} batch(es); check the validation split and masks.")
    loss = total / count
    return {"loss": loss, "bits": loss / math.log(2), "tokens": count}


# -- the loop -------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, model=None, data=None) -> dict:
    """Train `config.model` on `config.data` and return a summary; see the module docstring.

    model, data: inject a linen module / a data bundle (`.tokenizer`, `.train_ids`, `.val_ids`) instead
    of building them from the config (tests, notebooks). Writes RUN_DIR/{config.json, tokenizer.json,
    metrics.jsonl, checkpoints/}. Returns {"steps", "train_loss", "val_loss", "val_bits", "wall_s",
    "tokens_per_s", "stopped"} where stopped is None, "time_limit" (or the run exits on a signal).
    """
    from jaxseq import data as D  # imported here: the data package is heavy (datasets) and optional for tests

    t_start = time.perf_counter()
    _check_loop_config(config)
    # Before anything touches a JAX backend (jax.devices(), Orbax, arrays): joins the other processes, if any.
    maybe_initialize_distributed(config.dist)
    mesh = make_mesh(config.mesh)
    check_batch_divisible(config.data.batch_size, mesh)
    rows = process_rows(config.data.batch_size)  # this process's rows of every global batch
    lead = jax.process_index() == 0  # only process 0 prints and writes config, tokenizer and metrics
    compute_dtype = _compute_dtype(config)
    run_dir = Path(config.run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if lead:
        print(json.dumps(to_dict(config), indent=2), flush=True)
    with _StopSignals() as stop, CheckpointManager(run_dir, keep=config.keep_checkpoints, config=config) as ckpt:
        resuming = ckpt.latest_step() is not None
        if resuming and not config.resume:
            raise ConfigError(f"{run_dir} already holds checkpoints (newest: step {ckpt.latest_step()}); "
                              f"pass --resume to continue that run, or choose another --run-dir.")
        if data is None:
            saved = run_dir / "tokenizer.json"
            data = D.prepare_data(config.data, tokenizer=D.CharTokenizer.load(saved) if resuming else None)
        vocab_size = data.tokenizer.vocab_size
        if model is None:
            from jaxseq.models import build_model

            model = build_model(config, vocab_size)
        dc = config.data
        val_batches = D.eval_batches(data.val_ids, batch_size=dc.batch_size, seq_len=dc.seq_len, max_batches=config.eval_batches)
        for b in val_batches:
            D.validate_batch(b, vocab_size)

        def train_batch(i):
            # The global batch is a pure function of (seed, i) whatever the mesh; each process feeds its rows.
            batch = D.lm_batch(data.train_ids, batch_size=dc.batch_size, seq_len=dc.seq_len, seed=config.seed, index=i)
            batch = D.validate_batch(batch, vocab_size)
            return shard_batch({k: v[rows] for k, v in batch.items()}, mesh)

        if is_count_model(model):
            if jax.process_count() > 1:
                raise ConfigError(f"--model {config.model} is fitted by counting in one process; start it "
                                  f"without --dist.* (got {jax.process_count()} processes).")
            return _fit_count_model(config, model, data, val_batches, ckpt, resuming, t_start)

        model = _with_compute_dtype(model, compute_dtype)
        optimizer = make_optimizer(config.optim, config.steps)
        sharded = make_sharded_step(model, optimizer, mesh, seed=config.seed, seq_len=dc.seq_len,
                                    compute_dtype=compute_dtype, cpu_dots=config.cpu_dots)
        start = 0
        if resuming:  # restored straight into this mesh's shardings, whatever mesh saved it
            state, meta = ckpt.restore(sharded.abstract)
            start = int(meta["data_position"])
            if lead:
                _truncate_metrics(metrics_path, start)  # drop lines logged after the checkpoint by the lost run
                print(f"resumed {run_dir} from step {start}", flush=True)
        else:
            state = sharded.init()
            if lead:
                metrics_path.unlink(missing_ok=True)
                data.tokenizer.save(run_dir / "tokenizer.json")
        if lead:
            (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")

        step_fn = sharded.step
        eval_step = make_eval_step(model, mesh=mesh, param_shardings=sharded.shardings.params, cpu_dots=config.cpu_dots)
        val_batches = [shard_batch({k: v[rows] for k, v in b.items()}, mesh) for b in val_batches]
        step, last_saved, last_eval, val, stopped = start, (start if resuming else None), None, None, None
        tokens, t_first, paused, m = 0, None, 0.0, {}  # paused: seconds in eval/checkpoints, not in tokens/s
        batch = train_batch(start)
        bar = tqdm(total=config.steps, initial=start, disable=not (config.progress and lead), unit="step",
                   dynamic_ncols=True)
        t_loop = time.perf_counter()
        try:
            for i in range(start, config.steps):
                state, metrics = step_fn(state, batch)
                if i + 1 < config.steps:
                    batch = train_batch(i + 1)  # host work overlaps the device step
                m = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}  # ints stay ints
                step = i + 1
                _append(metrics_path, {"step": step, "split": "train", **m})
                if t_first is None:
                    t_first = time.perf_counter()  # tokens/s excludes the first (compiling) step
                else:
                    tokens += m["tokens"]
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{_rate(tokens, t_first, paused):,.0f}")
                if 0 < config.max_nonfinite_steps <= m["nonfinite_count"]:
                    n = int(m["nonfinite_count"])
                    raise NonFiniteError(
                        f"step {step}: loss or gradient norm was not finite for {n} steps in a row (steps "
                        f"{step - n + 1}..{step}; params were left unchanged on those steps). Newest checkpoint: "
                        f"{ckpt.latest_step()}. Lower --optim.lr, tighten --optim.grad-clip, or check the data; "
                        f"--max-nonfinite-steps sets the limit."
                    )
                t_pause = time.perf_counter()
                if step % config.eval_every == 0 and step < config.steps:
                    val, last_eval = _log_eval(metrics_path, step, evaluate(eval_step, state.params, val_batches), time.perf_counter() - t_start), step
                if step % config.checkpoint_every == 0:
                    ckpt.save(step, state, data_position=step)
                    last_saved = step
                paused += time.perf_counter() - t_pause
                if stop.signum is not None:
                    break
                if config.time_limit_s > 0 and time.perf_counter() - t_loop > config.time_limit_s:
                    stopped = "time_limit"
                    break
        finally:
            bar.close()
        tokens_per_s = _rate(tokens, t_first, paused) if tokens else None  # not counting the final eval and save
        if stop.signum is None and last_eval != step:
            val = _log_eval(metrics_path, step, evaluate(eval_step, state.params, val_batches), time.perf_counter() - t_start)
        if last_saved != step:
            ckpt.save(step, state, data_position=step)
        ckpt.wait_until_finished()
        if stop.signum is not None:
            if lead:
                print(f"signal {stop.signum}: saved step {step} in {run_dir}; exiting with {128 + stop.signum}", flush=True)
            raise SystemExit(128 + stop.signum)
    return {
        "steps": step,
        "train_loss": m.get("loss"),
        "val_loss": None if val is None else val["loss"],
        "val_bits": None if val is None else val["bits"],
        "wall_s": time.perf_counter() - t_start,
        "tokens_per_s": tokens_per_s,
        "stopped": stopped,
        "run_dir": str(run_dir),
    }


def _fit_count_model(config, model, data, val_batches, ckpt, resuming, t_start) -> dict:
    """Count-based models (the n-gram) are fitted in one pass over the training ids, not trained by gradients.

    The checkpoint (step 0) holds the whole variables dict as `params` and no optimizer state.
    """
    run_dir = Path(config.run_dir)
    if resuming:  # the counts are already there: restore them instead of counting again
        variables = jax.eval_shape(model.init, jax.random.key(config.seed), jnp.asarray(val_batches[0]["inputs"][:1]))
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        state, _ = ckpt.restore(TrainState(scalar, variables, (), scalar), shapes_from_checkpoint=True)
    else:
        state = TrainState(jnp.zeros((), jnp.int32), model.fit_variables(np.asarray(data.train_ids)), (), jnp.zeros((), jnp.int32))
        data.tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        ckpt.save(0, state, data_position=0)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    val = _log_eval(run_dir / "metrics.jsonl", 0, evaluate(make_eval_step(model), state.params, val_batches),
                    time.perf_counter() - t_start)
    ckpt.wait_until_finished()
    return {"steps": 0, "train_loss": None, "val_loss": val["loss"], "val_bits": val["bits"],
            "wall_s": time.perf_counter() - t_start, "tokens_per_s": None, "stopped": None, "run_dir": str(run_dir)}


# -- small helpers --------------------------------------------------------------------------------------


class _StopSignals:
    """SIGTERM/SIGINT -> a flag read at step boundaries. Installed only in the main thread (Python's rule)."""

    def __enter__(self):
        self.signum, self._old = None, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _compute_dtype(config: TrainConfig):
    """None for float32 (nothing to cast), else the jnp dtype of `config.compute_dtype`."""
    if config.compute_dtype == "float32":
        return None
    if config.compute_dtype != "bfloat16":
        raise ConfigError(f"compute_dtype must be 'float32' or 'bfloat16', got {config.compute_dtype!r}.")
    if config.model == "lru":
        raise ConfigError("--model lru needs --compute-dtype float32: its complex eigenvalues have no bfloat16 form.")
    return jnp.bfloat16


def _with_compute_dtype(model, dtype):
    """A module whose own `dtype` (compute dtype, e.g. TransformerLM's) is `dtype`; others as they are.

    Modules built from cells and dtype-less Flax layers compute in their params' dtype, which the loss casts.
    """
    if dtype is None or not hasattr(model, "dtype"):
        return model
    return model.clone(dtype=dtype)


def _check_loop_config(config: TrainConfig) -> None:
    for name in ("steps", "eval_every", "checkpoint_every", "eval_batches", "keep_checkpoints"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}.")


def _log_eval(path: Path, step: int, result: dict, wall_s: float) -> dict:
    """Log a validation result; wall_s: seconds since this process started the run (restarts on resume)."""
    _append(path, {"step": step, "split": "val", "loss": result["loss"], "bits": result["bits"],
                   "wall_s": round(wall_s, 2)})
    return result


def _append(path: Path, record: dict) -> None:
    if jax.process_index() != 0:  # in a multi-process run only process 0 writes metrics
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines logged up to `step`; a killed run may also have left a torn last line, dropped here."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", step + 1) <= step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))


def _rate(tokens: float, since: float | None, paused: float = 0.0) -> float:
    """Tokens per second of training since `since`, not counting `paused` seconds (evaluation, checkpoints)."""
    return tokens / max(time.perf_counter() - since - paused, 1e-9) if since is not None else 0.0
