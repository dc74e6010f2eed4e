"""A run directory: what `jaxseq train` writes besides checkpoints, and `load_run` to use it afterwards.

    RUN_DIR/config.json       the resolved TrainConfig (written at every start)
    RUN_DIR/task.json         the task's name and model spec (what `build_model` needs without the data)
    RUN_DIR/tokenizer.json    ... and whatever else the task saves (`task.save`)
    RUN_DIR/metrics.jsonl     one line per train step, validation and final report
    RUN_DIR/tensorboard/      the same metrics as TensorBoard events, when tensorboardX is installed
    RUN_DIR/checkpoints/      Orbax checkpoints (jaxseq.checkpoint)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxseq.checkpoint import CheckpointManager
from jaxseq.config import TrainConfig, from_dict, task_section, to_dict
from jaxseq.errors import CheckpointError

TASK_FILE = "task.json"


def is_count_model(model) -> bool:
    """Count-based models (the n-gram) are fitted by `task.fit(model, data)`, not by gradients."""
    return hasattr(model, "fit_variables")


def model_variables(model, params) -> dict:
    """What `model.apply` takes: {"params": params}; for count-based models `params` is already their
    whole variables dict (e.g. {"counts": ...}), which is what their checkpoints hold."""
    return params if is_count_model(model) else {"params": params}


def init_arguments(task, data) -> tuple:
    """`model.init`'s arguments after the key, as ShapeDtypeStructs: `task.example_inputs(data)`, a tuple when
    the model takes several (an encoder-decoder's source and target)."""
    inputs = task.example_inputs(data)
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def write_run_files(run_dir: Path, config: TrainConfig, spec: dict) -> None:
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    (run_dir / TASK_FILE).write_text(json.dumps({"task": config.task, "model_spec": spec}, indent=2) + "\n")


TB_QUEUE = 1000  # TensorBoard events held for the writer thread before add_scalar blocks


class MetricsLog:
    """Appends metric records to RUN_DIR/metrics.jsonl and, when tensorboardX is installed, to TensorBoard.

    Only process 0 of a multi-process run writes. `truncate(step)` drops what a killed run logged after
    its last checkpoint (and a torn last line), so a resumed run's log reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                # A queue of 10 events (the default) fills within two steps, and add_scalar then waits for
                # the writer thread, which competes with XLA's threads for the cores: the step stalls.
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), max_queue=TB_QUEUE)

    def reset(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate(self, step: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", step + 1) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            split, step = record.get("split", "train"), record["step"]
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Run(NamedTuple):
    """A trained run, loaded: its config, task, model and the newest good checkpoint's variables."""

    config: TrainConfig
    task: Any
    model: Any
    variables: dict  # what model.apply takes
    spec: dict  # the task's model spec
    step: int = 0  # the step of that checkpoint


def load_run(run_dir) -> Run:
    """Everything to sample from or evaluate a trained run; read-only (safe while the run trains on).

    Reads RUN_DIR/config.json and task.json, builds the model, and restores the newest good checkpoint's
    params (checked against the model's freshly initialised shapes and the run's architecture).
    """
    from jaxseq.models import build_model
    from jaxseq.steps import TrainState, make_optimizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; pass the --run-dir that `jaxseq train` wrote.")
    for name in ("config.json", TASK_FILE):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir / name} is missing; is {run_dir} a run directory written by `jaxseq train`?")
    config = from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
    spec = json.loads((run_dir / TASK_FILE).read_text())["model_spec"]
    task = task_section(config)
    model = build_model(config, spec)
    variables = jax.eval_shape(model.init, jax.random.key(0), *init_arguments(task, None))
    counted = is_count_model(model)
    if counted:  # the whole variables dict, no optimizer state; table sizes depend on the data
        params, opt_state = variables, ()
    else:
        params = variables["params"]
        opt_state = jax.eval_shape(make_optimizer(config.optim, config.steps).init, params)
    scalar = jax.ShapeDtypeStruct((), np.int32)
    template = TrainState(step=scalar, params=params, opt_state=opt_state, nonfinite_count=scalar)
    with CheckpointManager(run_dir, config=config, read_only=True) as ckpt:
        state, _ = ckpt.restore(template, shapes_from_checkpoint=counted)
    return Run(config, task, model, model_variables(model, state.params), spec, int(state.step))
