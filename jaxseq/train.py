"""`train(task, model, config)`: any task through the same sharded step, checkpoints, metrics and progress bar.

    summary = train(CharLM(), None, TrainConfig())       # model None: built from the model table

The loop: prepare the task's data (or restore the run's vocabulary when resuming), build the model
for the task's spec, jit one sharded step, then for each step feed `task.batch(data, "train", step,
seed)`, log, evaluate every `eval_every` steps (the task's "val" batches), checkpoint every
`checkpoint_every`. At the end the task's own `evaluate` writes a report (bits, accuracy, ...).

Exact resume: batch s is a pure function of (seed, s) and the dropout key of step s is
`fold_in(key(seed), s)`, so a resumed run repeats an uninterrupted one bit for bit on CPU. `--kernels`
is part of the checkpointed architecture (another policy is refused); the implementations actually
chosen (`jaxseq.kernels.explain`, printed at start) are saved too, and a resume warns when they differ.

Devices: a ("data", "fsdp") mesh from `--mesh.*`; several processes join with `--dist.*` and a shared
run_dir: every process computes the same global batch and feeds its own rows; process 0 prints and
writes the run files; all take part in checkpoints, which restore onto any mesh.

Non-finite steps change nothing (see `jaxseq.steps`); `max_nonfinite_steps` of them in a row raise
NonFiniteError. SIGTERM/SIGINT save a checkpoint at the next step boundary and exit with 128 + signum
(a second SIGINT interrupts at once). `--compute-dtype bfloat16` keeps float32 params and optimizer
state and computes the forward and backward pass in bfloat16.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxseq.checkpoint import CheckpointManager
from jaxseq.config import TrainConfig, task_section, to_dict
from jaxseq.errors import ConfigError, NonFiniteError
from jaxseq.files import write_text_atomically
from jaxseq.run import MetricsLog, init_arguments, is_count_model, write_run_files
from jaxseq.sharding import check_batch_divisible, make_mesh, maybe_initialize_distributed, process_rows, shard_batch
from jaxseq.steps import (TrainState, compute_dtype_of, make_eval_step, make_optimizer, make_sharded_step,
                          task_loss_fn, with_compute_dtype)
from jaxseq.tasks import evaluate_sums, means, sum_over
from jaxseq.xla_options import compiler_options


def train(task=None, model=None, config: TrainConfig | None = None, *, data=None) -> dict:
    """Train `model` on `task` under `config`; returns a summary (steps, losses, report, speed).

    task: a task dataclass (default: the config's `--task` section); model: a linen module (default:
    built from the model table for the task's spec); data: the task's prepared data (default:
    `task.prepare()`). Returns {"steps", "train_loss", "val" (means of the last evaluation), "report"
    (`task.evaluate`), "wall_s", "items_per_s", "stopped", "run_dir"}.
    """
    config = TrainConfig() if config is None else config
    task = task_section(config) if task is None else task
    t_start = time.perf_counter()
    _check_loop_config(config)
    maybe_initialize_distributed(config.dist)  # before anything touches a JAX backend
    mesh = make_mesh(config.mesh)
    flag = f"--{config.task.replace('_', '-')}.batch-size"
    check_batch_divisible(task.batch_size, mesh, flag=flag)
    rows = process_rows(task.batch_size, flag=flag)  # this process's rows of every global batch
    lead = jax.process_index() == 0
    run_dir = Path(config.run_dir)
    with _StopSignals() as stop, CheckpointManager(run_dir, keep=config.keep_checkpoints, config=config) as ckpt:
        resuming = ckpt.latest_step() is not None
        if resuming and not config.resume:
            raise ConfigError(f"{run_dir} already holds checkpoints (newest: step {ckpt.latest_step()}); "
                              f"pass --resume to continue that run, or choose another --run-dir.")
        # The vocabulary: the run's own when resuming; a pretrained run's (--init-from) when starting from it.
        vocab_run = run_dir if resuming else (Path(config.init_from) if config.init_from else None)
        data = task.prepare(vocab_run) if data is None else data
        spec = task.model_spec(data)
        if model is None:
            from jaxseq.models import build_model

            model = build_model(config, spec)
        if lead:  # printed once the data and model are there: a bad source or size fails first, alone
            print(json.dumps(to_dict(config), indent=2), flush=True)
        log = MetricsLog(run_dir)
        if is_count_model(model):
            return _fit_count_model(task, model, data, config, ckpt, log, resuming, spec, t_start)

        def shard(batch):
            return shard_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, mesh)

        compute_dtype = compute_dtype_of(config)
        model = with_compute_dtype(model, compute_dtype)
        loss_fn = task_loss_fn(task, model, compute_dtype)
        example = task.batch(data, "train", 0, config.seed)
        init_args = [jnp.zeros(x.shape, x.dtype) for x in init_arguments(task, data)]  # [1, ...]: shapes only
        sharded = make_sharded_step(
            loss_fn, lambda: model.init(jax.random.key(config.seed), *init_args)["params"],
            make_optimizer(config.optim, config.steps), mesh, seed=config.seed,
            compiler_options=compiler_options(model, config.cpu_dots))
        used = _explain(loss_fn, sharded.abstract.params, example)
        ckpt.info = {"implementations": used, "model_spec": spec}
        if lead:
            print("kernels: " + (", ".join(f"{k}={v}" for k, v in used.items()) or "none dispatched") +
                  f" (--kernels {config.kernels})", flush=True)
        state, start = _restore_or_init(ckpt, sharded, resuming, used, log, lambda: task.save(data, run_dir))
        if config.init_from and not resuming:
            state = _init_from(state, sharded, config.init_from, run_dir, ckpt, lead)
        if lead:
            write_run_files(run_dir, config, spec)
        eval_step = make_eval_step(lambda p, b: loss_fn(p, b, None)[1], mesh=mesh,
                                   param_shardings=sharded.shardings.params,
                                   compiler_options=compiler_options(model, config.cpu_dots))
        val_batches = [shard(b) for b in task.eval_batches(data, "val", config.eval_batches)]
        loop = _Loop(config, task, sharded.step, eval_step, val_batches, ckpt, log, stop, lead)
        state, summary = loop.run(state, start, lambda i: shard(task.batch(data, "train", i, config.seed)))
        # The report runs on one device; a multi-process run's params are not all addressable here.
        variables = {"params": jax.device_get(state.params)} if jax.process_count() == 1 else None
    if variables is not None and stop.signum is None:
        summary["report"] = _report(task, model, variables, data, log, summary["steps"])
    log.close()
    if stop.signum is not None:
        raise SystemExit(128 + stop.signum)
    summary["wall_s"] = time.perf_counter() - t_start
    return summary


class _Loop:
    """The step loop proper: step, log, evaluate, checkpoint, stop on a signal or the time limit."""

    def __init__(self, config, task, step_fn, eval_step, val_batches, ckpt, log, stop, lead):
        self.c, self.task, self.step_fn, self.eval_step = config, task, step_fn, eval_step
        self.val_batches, self.ckpt, self.log, self.stop, self.lead = val_batches, ckpt, log, stop, lead

    def evaluate(self, state, step: int, t0: float) -> dict:
        val = means(sum_over(self.eval_step(state.params, b) for b in self.val_batches))
        self.log.write({"step": step, "split": "val", **val, "wall_s": round(time.perf_counter() - t0, 2)})
        return val

    def run(self, state, start: int, next_batch):
        c, t0 = self.c, time.perf_counter()
        step, last_saved, last_eval, val, stopped, m = start, (start if start else None), None, None, None, {}
        items, t_first, paused = 0, None, 0.0  # paused: seconds in eval/checkpoints, not in items/s
        batch = next_batch(start)
        bar = tqdm(total=c.steps, initial=start, disable=not (c.progress and self.lead), unit="step",
                   dynamic_ncols=True)
        try:
            for i in range(start, c.steps):
                state, metrics = self.step_fn(state, batch)
                if i + 1 < c.steps:
                    batch = next_batch(i + 1)  # host work overlaps the device step
                m = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}  # ints stay ints
                step = i + 1
                self.log.write({"step": step, "split": "train", **m})
                if t_first is None:
                    t_first = time.perf_counter()  # items/s excludes the first (compiling) step
                else:
                    items += m["count"]
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", **{f"{self.task.unit}_s": f"{_rate(items, t_first, paused):,.0f}"})
                _check_nonfinite(c, m, step, self.ckpt)
                t_pause = time.perf_counter()
                if step % c.eval_every == 0 and step < c.steps:
                    val, last_eval = self.evaluate(state, step, t0), step
                if step % c.checkpoint_every == 0:
                    self.ckpt.save(step, state, data_position=step)
                    last_saved = step
                paused += time.perf_counter() - t_pause
                if self.stop.signum is not None:
                    break
                if c.time_limit_s > 0 and time.perf_counter() - t0 > c.time_limit_s:
                    stopped = "time_limit"
                    break
        finally:
            bar.close()
        items_per_s = _rate(items, t_first, paused) if items else None
        if self.stop.signum is None and last_eval != step:
            val = self.evaluate(state, step, t0)
        if last_saved != step:
            self.ckpt.save(step, state, data_position=step)
        self.ckpt.wait_until_finished()
        if self.stop.signum is not None and self.lead:
            print(f"signal {self.stop.signum}: saved step {step} in {self.c.run_dir}; exiting with "
                  f"{128 + self.stop.signum}", flush=True)
        return state, {"steps": step, "train_loss": m.get("loss"), "val": val, "items_per_s": items_per_s,
                       "stopped": stopped, "run_dir": str(self.c.run_dir)}


def _restore_or_init(ckpt, sharded, resuming: bool, used: dict, log, save_task_files):
    """(state, first step): the newest good checkpoint, read straight into this mesh's shardings, or a fresh
    state. On resume, metrics logged after that checkpoint by the lost run are dropped."""
    lead = jax.process_index() == 0
    if not resuming:
        log.reset()
        if lead:
            save_task_files()
        return sharded.init(), 0
    state, meta = ckpt.restore(sharded.abstract)
    start = int(meta["data_position"])
    _warn_if_implementations_differ(meta, used, start)
    log.truncate(start)
    if lead:
        print(f"resumed {ckpt.run_dir} from step {start}", flush=True)
    return state, start


def _fit_count_model(task, model, data, config, ckpt, log, resuming, spec, t_start) -> dict:
    """Count-based models are fitted in one pass (`task.fit`), saved as step 0 (no optimizer state)."""
    run_dir = Path(config.run_dir)
    if jax.process_count() > 1:
        raise ConfigError(f"--model {config.model} is fitted by counting in one process; start it "
                          f"without --dist.* (got {jax.process_count()} processes).")
    if not hasattr(task, "fit"):
        raise ConfigError(f"--model {config.model} is fitted by counting, which --task {config.task} does not offer.")
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    ckpt.info = {"implementations": {}, "model_spec": spec}
    if resuming:  # the counts are already there: restore them instead of counting again
        variables = jax.eval_shape(model.init, jax.random.key(config.seed), *init_arguments(task, data))
        state, _ = ckpt.restore(TrainState(scalar, variables, (), scalar), shapes_from_checkpoint=True)
    else:
        state = TrainState(jnp.zeros((), jnp.int32), task.fit(model, data), (), jnp.zeros((), jnp.int32))
        task.save(data, run_dir)
        log.reset()
        ckpt.save(0, state, data_position=0)
    write_run_files(run_dir, config, spec)
    ckpt.wait_until_finished()
    # The same validation batches as a trained model's, then the task's report; params: the whole variables.
    val = evaluate_sums(task, model, state.params, task.eval_batches(data, "val", config.eval_batches))
    log.write({"step": 0, "split": "val", **val, "wall_s": round(time.perf_counter() - t_start, 2)})
    report = _report(task, model, state.params, data, log, 0)
    log.close()
    return {"steps": 0, "train_loss": None, "val": val, "report": report, "items_per_s": None,
            "stopped": None, "run_dir": str(run_dir), "wall_s": time.perf_counter() - t_start}


def _init_from(state, sharded, source_dir, run_dir, ckpt, lead):
    """The fresh state with the pretrained run's weights loaded (`jaxseq.finetune`), recorded in
    RUN_DIR/init_from.json and in every checkpoint's metadata. The optimizer state needs no change: Adam's
    moments start at zero whatever the parameters are."""
    from jaxseq.finetune import init_from_run

    loaded, record = init_from_run(sharded.abstract.params, source_dir)

    def place(new, initialised, sharding):  # a loaded host array onto the mesh; a fresh leaf as initialised
        if isinstance(new, jax.ShapeDtypeStruct):
            return initialised
        return jax.make_array_from_callback(new.shape, sharding, lambda index: new[index])

    params = jax.tree.map(place, loaded, state.params, sharded.shardings.params)
    ckpt.info = {**ckpt.info, "init_from": {"run_dir": record["run_dir"], "step": record["step"]}}
    if lead:
        write_text_atomically(run_dir / "init_from.json", json.dumps(record, indent=2))
        print(f"init: {record['loaded']} arrays from {source_dir} (step {record['step']}, --model "
              f"{record['model']}); fresh: {', '.join(record['fresh']) or 'none'}", flush=True)
    return state._replace(params=params)


def _report(task, model, variables, data, log, step: int) -> dict:
    """The task's own final evaluation (host side), logged as split "report" and printed."""
    report = task.evaluate(model, variables, data)
    log.write({"step": step, "split": "report", **report})
    if jax.process_index() == 0:
        print("report: " + json.dumps(report), flush=True)
    return report


def _explain(loss_fn, abstract_params, example_batch) -> dict:
    """Which implementation each dispatched mechanism takes in the step (traced once, nothing computed)."""
    from jaxseq.kernels import explain

    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), example_batch)
    return explain(lambda p, b: loss_fn(p, b, None)[0], abstract_params, batch)


def _warn_if_implementations_differ(meta: dict, used: dict, step: int) -> None:
    saved = meta.get("implementations")
    if saved is not None and saved != used:
        warnings.warn(f"checkpoint step {step} was trained with kernels {saved} but this machine chooses {used}; "
                      f"the continuation computes the same math with other rounding, so it will not repeat the "
                      f"original run bit for bit. Resume where the saved kernels are available, or pass "
                      f"--kernels reference to both runs.", stacklevel=3)


def _check_nonfinite(config, m: dict, step: int, ckpt) -> None:
    if 0 < config.max_nonfinite_steps <= m["nonfinite_count"]:
        n = int(m["nonfinite_count"])
        raise NonFiniteError(
            f"step {step}: loss or gradient norm was not finite for {n} steps in a row (steps "
            f"{step - n + 1}..{step}; params were left unchanged on those steps). Newest checkpoint: "
            f"{ckpt.latest_step()}. Lower --optim.lr, tighten --optim.grad-clip, or check the data; "
            f"--max-nonfinite-steps sets the limit."
        )


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


def _check_loop_config(config: TrainConfig) -> None:
    for name in ("steps", "eval_every", "checkpoint_every", "eval_batches", "keep_checkpoints"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}.")
    if config.init_from and not (Path(config.init_from) / "config.json").is_file():
        raise ConfigError(f"--init-from {config.init_from}: not a run directory (no config.json); pass the "
                          f"--run-dir of a run that `jaxseq train` wrote.")


def _rate(items: float, since: float | None, paused: float = 0.0) -> float:
    """Items per second of training since `since`, not counting `paused` seconds (evaluation, checkpoints)."""
    return items / max(time.perf_counter() - since - paused, 1e-9) if since is not None else 0.0
