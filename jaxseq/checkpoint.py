"""Checkpoints: Orbax's CheckpointManager over the TrainState, plus JSON metadata, checked on restore.

A run directory holds everything `jaxseq sample RUN_DIR` / `jaxseq eval RUN_DIR` need:

    RUN_DIR/config.json            the resolved TrainConfig (written at every start)
    RUN_DIR/tokenizer.json         the tokenizer (written once)
    RUN_DIR/metrics.jsonl          train and validation lines
    RUN_DIR/checkpoints/<step>/    state: the TrainState pytree (Orbax, async, keep-N, atomic commit)
                                   meta:  {"step", "data_position", "config", "architecture", "architecture_hash"}

Restores are checked, never silently wrong: a checkpoint of another architecture raises CheckpointError
naming the differing config fields; every leaf's shape and dtype must match the freshly initialised
state (the error names the leaf path). Only committed steps count: an integer-named step directory
without Orbax's commit marker (empty, half-copied) is set aside as `<step>.uncommitted`. If the newest
step fails to read, a warning names it, it is set aside as `<step>.corrupt`, and the previous good step
is used.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxseq.config import TrainConfig, architecture, architecture_hash, from_dict, to_dict
from jaxseq.errors import CheckpointError

# Orbax writes these into a step directory only when the step is committed.
_COMMIT_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")


class CheckpointManager:
    """Save and restore TrainStates of one run. Use as a context manager: closing waits for in-flight saves.

        with CheckpointManager(run_dir, keep=3, config=config) as ckpt:
            ckpt.save(step, state, data_position=step)      # async; returns at once
            state, meta = ckpt.restore(template_state)      # newest good step, checked

    config: the run's TrainConfig (written into every step's metadata; restores are checked against it;
            None skips the architecture check).
    read_only: never write, rename or delete anything (for sampling/evaluating a run that may be training).
    """

    def __init__(self, run_dir, *, keep: int = 3, config: TrainConfig | None, read_only: bool = False):
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1 checkpoints, got {keep}.")
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / "checkpoints"
        self.config = config
        self.read_only = read_only
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            for step in _uncommitted_steps(self.directory):
                dest = self._set_aside(step, "uncommitted")
                warnings.warn(f"checkpoint step {step} in {self.directory} was never committed (empty or half "
                              f"written); ignored and moved to {dest.name}.", stacklevel=2)
        elif not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {self.run_dir}: {self.directory} does not exist; "
                                  f"is this a run directory written by `jaxseq train`?")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=True
        )
        # Handlers named up front, so a fresh manager can read a step's metadata before any restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- saving ---------------------------------------------------------------------------------------

    def save(self, step: int, state, data_position: int) -> None:
        """Start an async save of `state` (a pytree of arrays) as `step`. Returns before the write ends."""
        if self.read_only:
            raise CheckpointError(f"this CheckpointManager of {self.run_dir} is read-only; it cannot save.")
        meta = {
            "step": int(step),
            "data_position": int(data_position),
            "config": to_dict(self.config),
            "architecture": architecture(self.config),
            "architecture_hash": architecture_hash(self.config),
            "saved_at": time.time(),
        }
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            # force: Orbax would otherwise skip (silently) a step not above its newest one.
            self._mngr.save(int(step), args=args, force=True)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}; "
                                  f"resume the run (--resume) or use a new run_dir.") from e

    def wait_until_finished(self) -> None:
        """Block until every started save is committed; re-raises a failed save's error."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for in-flight saves (re-raising their errors), then release the manager."""
        try:
            if not self.read_only:
                self._mngr.wait_until_finished()
        finally:
            self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading --------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(s for s in self._mngr.all_steps() if _is_committed(self.directory / str(s)))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, template_state, step: int | None = None, *, shapes_from_checkpoint: bool = False):
        """Restore the newest good step (or `step`) into the structure of `template_state`.

        template_state: a freshly initialised state (arrays or jax.ShapeDtypeStruct leaves); the
        restored arrays take its structure, shapes, dtypes and shardings.
        shapes_from_checkpoint: take each leaf's shape from the checkpoint (count-based models, whose
        table sizes depend on the data); leaf paths and dtypes are still checked.
        Returns (state, meta). Raises CheckpointError on an architecture, shape or dtype mismatch, or
        when no step can be read; a step that fails to read is reported and the previous one tried.
        """
        steps = [step] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise CheckpointError(f"no committed checkpoint in {self.directory}; train first, or check the path.")
        failures = []
        for s in steps:
            try:
                meta = self.read_meta(s)
                stored = _stored_leaves(self._mngr.item_metadata(s)["state"])
            except Exception as e:  # unreadable metadata: a corrupt step
                failures.append(self._give_up_on(s, e))
                continue
            # A mismatch is not corruption: every step of this run would fail the same way, so stop here.
            self._check_architecture(meta, s)
            target = _with_stored_shapes(template_state, stored) if shapes_from_checkpoint else template_state
            _check_leaves(stored, target, s)
            try:
                restored = self._mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
            except Exception as e:  # unreadable arrays: a corrupt step
                failures.append(self._give_up_on(s, e))
                continue
            return restored, meta
        raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))

    # -- helpers --------------------------------------------------------------------------------------

    def _give_up_on(self, step: int, error: Exception) -> str:
        msg = f"step {step}: {type(error).__name__}: {str(error)[:300]}"
        where = ""
        if not self.read_only and self.latest_step() == step:
            # Set aside so later saves of this step number are possible (and the bytes kept for a post-mortem).
            where = f"; moved to {self._set_aside(step, 'corrupt').name}"
            self._mngr.reload()
        warnings.warn(f"checkpoint {msg} could not be restored{where}; trying the previous step.", stacklevel=3)
        return msg

    def _set_aside(self, step: int, why: str) -> Path:
        src = self.directory / str(step)
        dest = self.directory / f"{step}.{why}"
        n = 1
        while dest.exists():
            dest, n = self.directory / f"{step}.{why}{n}", n + 1
        src.rename(dest)
        return dest

    def _check_architecture(self, meta: dict, step: int) -> None:
        if self.config is None:
            return
        ours, theirs = architecture(self.config), meta.get("architecture", {})
        diffs = _dict_diff(theirs, ours)
        if diffs:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has another architecture; differing field(s): "
                + "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
                + ". Use the run's config (RUN_DIR/config.json) to resume, or start a new run_dir."
            )


def load_run(run_dir):
    """Everything to sample from or evaluate a trained run: (config, tokenizer, params).

    `jaxseq.train.model_variables(model, params)` turns params into what `model.apply` takes:
    {"params": params}, or params itself for count-based models (their whole variables dict). Reads RUN_DIR/config.json and RUN_DIR/tokenizer.json, builds the model, and restores the newest
    good checkpoint's params (checked against the model's freshly initialised shapes). Read-only.
    """
    from jaxseq.data import CharTokenizer
    from jaxseq.models import build_model
    from jaxseq.train import TrainState, is_count_model, make_optimizer

    run_dir = Path(run_dir)
    for name in ("config.json", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir / name} is missing; is {run_dir} a run directory written by `jaxseq train`?")
    config = from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
    tokenizer = CharTokenizer.load(run_dir / "tokenizer.json")
    model = build_model(config, tokenizer.vocab_size)
    tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), np.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
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
    return config, tokenizer, state.params


# -- pure helpers -------------------------------------------------------------------------------------


def _is_committed(step_dir: Path) -> bool:
    return any((step_dir / m).exists() for m in _COMMIT_MARKERS)


def _uncommitted_steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and not _is_committed(p))


def _path_str(path) -> str:
    """'params/Dense_0/kernel' from a jax key path (NamedTuple fields, dict keys and sequence indices alike)."""
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _stored_leaves(tree_metadata) -> dict:
    tree = getattr(tree_metadata, "tree", tree_metadata)
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves}


def _with_stored_shapes(template, stored: dict):
    """`template` with every leaf that the checkpoint holds replaced by ShapeDtypeStruct(stored shape, template dtype)."""

    def leaf(path, x):
        key = _path_str(path)
        return jax.ShapeDtypeStruct(stored[key][0], x.dtype) if key in stored else x

    return jax.tree_util.tree_map_with_path(leaf, template)


def _check_leaves(stored: dict, template, step: int) -> None:
    """Every template leaf must be stored with the same shape and dtype, and nothing else stored."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(template)
    expected = {_path_str(p): (tuple(np.shape(x)), np.dtype(x.dtype)) for p, x in leaves}
    problems = []
    for path, (shape, dtype) in expected.items():
        if path not in stored:
            problems.append(f"{path}: missing from the checkpoint")
        elif stored[path] != (shape, dtype):
            s_shape, s_dtype = stored[path]
            problems.append(f"{path}: checkpoint {s_dtype}{list(s_shape)}, model {dtype}{list(shape)}")
    problems += [f"{path}: in the checkpoint but not in the model" for path in stored if path not in expected]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise CheckpointError(
            f"checkpoint step {step} does not fit the freshly initialised state: {shown}. The vocabulary "
            f"(tokenizer/corpus) or the model code changed since it was saved; resume with the run's data and "
            f"config, or start a new run_dir."
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _dict_diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    fa, fb = _flatten(a), _flatten(b)
    missing = object()
    diffs = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, missing), fb.get(k, missing)
        if va != vb:
            diffs.append((k, "(absent)" if va is missing else va, "(absent)" if vb is missing else vb))
    return diffs
