"""Checkpoints: Orbax's CheckpointManager over the TrainState, plus JSON metadata, checked on restore.

The checkpoints of a run directory (the other files are `jaxseq.run`'s):

    RUN_DIR/checkpoints/<step>/    state: the TrainState pytree (Orbax, async, keep-N, atomic commit)
                                   meta:  {"step", "data_position", "config", "architecture", "architecture_hash",
                                           "fingerprints": {leaf path: 16 hex digits}, "fingerprint_method"}

What counts as a checkpoint: a step directory that Orbax committed (it writes `<step>.orbax-checkpoint-tmp`
and renames it when every item is on disk) AND whose jaxseq metadata, fingerprints included, is there.
A save killed half-way leaves only the tmp directory, which is never read (and is replaced when that
step is saved again). An integer-named directory without Orbax's commit marker (empty, half-copied) is
set aside as `<step>.uncommitted`, one without jaxseq's metadata as `<step>.incomplete`.

Restores are checked, never silently wrong: a checkpoint of another architecture raises CheckpointError
naming the differing config fields; every leaf's shape and dtype must match the freshly initialised
state (the error names the leaf path); another `*dtype` setting (e.g. compute_dtype) than the one the
checkpoint was trained with is warned about. After the arrays are read, their fingerprints
(`jaxseq.fingerprints`: a checksum of each array's global values, independent of the sharding, so a
checkpoint saved on 8 devices verifies on 1) are compared with the saved ones: a changed byte in an
array file, which Orbax itself reads without complaint, is caught. If the newest step fails to read or
to verify, a warning names it and why, it is set aside as `<step>.corrupt` (never deleted), and the
previous good step is used.

Async saves: `save` returns once the arrays are copied off the device; Orbax writes them in a
background thread, and the fingerprints' device computation is only awaited there, by the metadata
writer. A failed write (e.g. a full disk) is re-raised as CheckpointError naming the directory and step
by the next `save`, `wait_until_finished` or `close` (the context manager closes, so in-flight saves
always end before the program goes on); a manager never closed still waits at interpreter exit and
prints a failure to stderr.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxseq import checkpoint_checks as checks
from jaxseq import fingerprints as fp
from jaxseq.config import TrainConfig, architecture, architecture_hash, to_dict
from jaxseq.errors import CheckpointError

# Orbax writes these into a step directory only when the step is committed.
_COMMIT_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")
# Where the JSON handler puts the "meta" item of a step.
_META_FILE = Path("meta") / "metadata"


class _MetaHandler(ocp.JsonCheckpointHandler):
    """Orbax's JSON handler, except that a callable value in the saved dict is called when the file is
    written, in the background save thread. `save` puts the fingerprints there as a `_Later`, so the
    training loop never waits for their computation."""

    async def _save_fn(self, x, directory):  # Orbax's hook that writes the file, run in the commit thread
        x = {k: (v() if callable(v) else v) for k, v in x.items()}
        return await super()._save_fn(x, directory)


# Older or newer Orbax without that hook: the fingerprints are resolved in `save` (blocking) instead.
_LAZY_META = hasattr(ocp.JsonCheckpointHandler, "_save_fn")


class _Later:
    """A value for the background metadata writer that `save` starts computing after Orbax's blocking part.

    `fill()` runs start() (which dispatches the computation and returns a function that waits for its
    result); calling the _Later waits for `fill`, then for the result. If start() failed, the call
    raises, so the save fails and is reported. Should an Orbax version ever run the writer before `save`
    returns, it computes the value itself after a while rather than wait forever.
    """

    def __init__(self, start):
        self._start, self._get = start, None
        self._lock, self._ready = threading.Lock(), threading.Event()

    def fill(self) -> None:
        with self._lock:
            if self._ready.is_set():
                return
            try:
                self._get = self._start()
            except Exception as e:  # noqa: BLE001 -- re-raised by the writer, reported as this step's failure
                def reraise(e=e):
                    raise e

                self._get = reraise
            finally:
                self._ready.set()

    def __call__(self):
        if not self._ready.wait(timeout=60):
            self.fill()
        return self._get()


# Orbax maps each args class to one handler class, so the metadata item has args classes of its own.
@ocp.args.register_with_handler(_MetaHandler, for_save=True)
class _MetaSave(ocp.args.JsonSave):
    pass


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
class _MetaRestore(ocp.args.JsonRestore):
    pass


class _DropReadOnlyNotice(logging.Filter):
    """Orbax logs warnings every time a manager is opened read-only, which `jaxseq sample` and `jaxseq eval`
    do on purpose (a run may still be training); they say nothing the user can act on."""

    NOTICES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True, setting")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


class CheckpointManager:
    """Save and restore TrainStates of one run. Use as a context manager: closing waits for in-flight saves.

        with CheckpointManager(run_dir, keep=3, config=config) as ckpt:
            ckpt.save(step, state, data_position=step)      # async; returns at once
            state, meta = ckpt.restore(template_state)      # newest good step, checked

    config: the run's TrainConfig (written into every step's metadata; restores are checked against it;
            None skips the architecture check).
    read_only: never write, rename or delete anything (for sampling/evaluating a run that may be training).
    info: more JSON metadata written with every step (the loop saves the implementations its kernels
    chose, so a resume can tell when they differ).
    """

    def __init__(self, run_dir, *, keep: int = 3, config: TrainConfig | None, read_only: bool = False,
                 info: dict | None = None):
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1 checkpoints, got {keep}.")
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / "checkpoints"
        self.config = config
        self.read_only = read_only
        self.info = dict(info or {})
        self.last_save_blocking_s = None  # seconds the newest `save` call blocked its caller
        self._in_flight = None  # the step whose async save has not been waited for yet
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            # One process renames (the others would race it on a shared directory); all wait for it.
            for step, why in _unusable_steps(self.directory) if jax.process_index() == 0 else ():
                dest = self._set_aside(step, why)
                what = "was never committed (empty or half written)" if why == "uncommitted" else \
                    "has no complete jaxseq metadata (config, data position, fingerprints)"
                warnings.warn(f"checkpoint step {step} in {self.directory} {what}; ignored and moved to "
                              f"{dest.name}.", stacklevel=2)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"jaxseq set-aside {self.directory}")
        elif not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {self.run_dir}: {self.directory} does not exist; "
                                  f"is this a run directory written by `jaxseq train`?")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=True
        )
        # Handlers named up front, so a fresh manager can read a step's metadata before any restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": _MetaHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        # A manager dropped without close() still waits for its saves at exit (and reports a failure).
        self._at_exit = weakref.finalize(self, _close_at_exit, self._mngr, str(self.directory))

    # -- saving ---------------------------------------------------------------------------------------

    def save(self, step: int, state, data_position: int) -> float:
        """Start an async save of `state` (a pytree of arrays) as `step`; returns the seconds it blocked.

        Blocks for: the previous save, if still writing (its failure is raised here, naming its step);
        Orbax copying the arrays off the device; dispatching the fingerprint computation. The files are
        written, and the fingerprints awaited, in the background.
        """
        if self.read_only:
            raise CheckpointError(f"this CheckpointManager of {self.run_dir} is read-only; it cannot save.")
        t0 = time.perf_counter()
        self.wait_until_finished()
        # The fingerprints, handed to the background metadata writer before they are computed.
        later = _Later(lambda: fp.fingerprints_async(state))
        meta = {
            "step": int(step),
            "data_position": int(data_position),
            "config": to_dict(self.config),
            "architecture": architecture(self.config),
            "architecture_hash": architecture_hash(self.config),
            "saved_at": time.time(),
            **self.info,
            "fingerprint_method": fp.METHOD,
            "fingerprints": later if _LAZY_META else fp.fingerprints(state),
        }
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=_MetaSave(meta))
        try:
            # force: Orbax would otherwise skip (silently) a step not above its newest one.
            self._mngr.save(int(step), args=args, force=True)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}; "
                                  f"resume the run (--resume) or use a new run_dir.") from e
        except Exception as e:
            raise CheckpointError(self._save_failed(step, e)) from e
        finally:
            # Dispatched only now, from the same (immutable, not yet donated) arrays: computed while
            # Orbax copied them, the checksums slowed that blocking copy by more than they cost (on CPU).
            if _LAZY_META:
                later.fill()
        self._in_flight = int(step)
        self.last_save_blocking_s = time.perf_counter() - t0
        return self.last_save_blocking_s

    def wait_until_finished(self) -> None:
        """Block until every started save is committed; a failed save raises CheckpointError naming its step."""
        step, self._in_flight = self._in_flight, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise CheckpointError(self._save_failed(step, e)) from e
        # Belt and braces: Orbax reported success, so the step must now count as a checkpoint.
        if step is not None and jax.process_index() == 0 and not _is_complete(self.directory / str(step)):
            raise CheckpointError(self._save_failed(step, RuntimeError("the step directory is not complete after "
                                                                       "the save reported success")))

    def close(self) -> None:
        """Wait for in-flight saves (re-raising their errors as CheckpointError), then release the manager."""
        self._at_exit.detach()
        try:
            if not self.read_only:
                self.wait_until_finished()
        finally:
            self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading --------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps that count (committed by Orbax, with complete jaxseq metadata), ascending."""
        return sorted(s for s in self._mngr.all_steps() if _is_complete(self.directory / str(s)))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=_MetaRestore())).meta

    def restore(self, template_state, step: int | None = None, *, shapes_from_checkpoint: bool = False):
        """Restore the newest good step (or `step`) into the structure of `template_state`.

        template_state: a freshly initialised state (arrays or jax.ShapeDtypeStruct leaves); the
        restored arrays take its structure, shapes, dtypes and shardings.
        shapes_from_checkpoint: take each leaf's shape from the checkpoint (count-based models, whose
        table sizes depend on the data); leaf paths and dtypes are still checked.
        Returns (state, meta). Raises CheckpointError on an architecture, shape or dtype mismatch, or
        when no step can be read; a step that fails to read or whose arrays do not match their
        fingerprints is reported and the previous one tried.
        """
        steps = [step] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise CheckpointError(f"no committed checkpoint in {self.directory}; train first, or check the path.")
        failures = []
        for s in steps:
            try:
                meta = self.read_meta(s)
                stored = checks.stored_leaves(self._mngr.item_metadata(s)["state"])
                saved_fps = checks.saved_fingerprints(meta)
            except Exception as e:  # unreadable metadata: a corrupt step
                failures.append(self._give_up_on(s, e))
                continue
            # A mismatch is not corruption: every step of this run would fail the same way, so stop here.
            self._check_architecture(meta, s)
            self._warn_dtype_changes(meta, s)
            target = checks.with_stored_shapes(template_state, stored) if shapes_from_checkpoint else template_state
            checks.check_leaves(stored, target, s)
            try:
                restored = self._mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
                bad = fp.mismatches(restored, saved_fps)
                if bad:
                    shown = "; ".join(bad[:5]) + (f"; ... ({len(bad)} arrays in all)" if len(bad) > 5 else "")
                    raise CheckpointError(f"fingerprint mismatch, the array files changed after they were "
                                          f"saved: {shown}")
            except Exception as e:  # unreadable or changed arrays: a corrupt step
                failures.append(self._give_up_on(s, e))
                continue
            return restored, meta
        raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))

    # -- helpers --------------------------------------------------------------------------------------

    def _save_failed(self, step, error: Exception) -> str:
        what = f"step {step}" if step is not None else "a step"
        full = "No space left on device" in str(error) or getattr(error, "errno", None) == errno.ENOSPC
        hint = "The disk is full: free space (or lower --keep-checkpoints) and resume (--resume)" if full else \
            "Check that the directory is writable and has space, then resume (--resume)"
        newest = ", ".join(str(s) for s in _complete_steps(self.directory)[-1:]) or "none"
        return (f"saving checkpoint {what} to {self.directory} failed, so that step was not committed "
                f"(newest committed step: {newest}): {type(error).__name__}: {str(error)[:500]}. {hint}.")

    def _give_up_on(self, step: int, error: Exception) -> str:
        msg = f"step {step}: {type(error).__name__}: {str(error)[:500]}"
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
        diffs = checks.dict_diff(theirs, ours)
        if diffs:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has another architecture; differing field(s): "
                + "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
                + ". Use the run's config (RUN_DIR/config.json) to resume, or start a new run_dir."
            )

    def _warn_dtype_changes(self, meta: dict, step: int) -> None:
        """Settings outside the architecture that name a dtype (compute_dtype, ...) may change on resume,
        but the run then no longer repeats the original bit for bit: never silently."""
        if self.config is None or "config" not in meta:
            return
        diffs = [d for d in checks.dict_diff(meta["config"], to_dict(self.config)) if "dtype" in d[0].rsplit(".", 1)[-1]]
        if diffs:
            warnings.warn(
                f"checkpoint step {step} was trained with another dtype setting: "
                + "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
                + ". Resuming with it; the continuation will differ from the original run's.", stacklevel=3)


# -- pure helpers -------------------------------------------------------------------------------------


def _is_committed(step_dir: Path) -> bool:
    return any((step_dir / m).exists() for m in _COMMIT_MARKERS)


def _has_meta(step_dir: Path) -> bool:
    """jaxseq's metadata is there and complete (a JSON object with the data position and fingerprints)."""
    try:
        meta = json.loads((step_dir / _META_FILE).read_text())
        return isinstance(meta, dict) and "data_position" in meta and isinstance(meta.get("fingerprints"), dict)
    except (OSError, ValueError):
        return False


def _is_complete(step_dir: Path) -> bool:
    return _is_committed(step_dir) and _has_meta(step_dir)


def _integer_dirs(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _complete_steps(directory: Path) -> list[int]:
    try:
        return [s for s in _integer_dirs(directory) if _is_complete(directory / str(s))]
    except OSError:
        return []


def _unusable_steps(directory: Path) -> list[tuple[int, str]]:
    """(step, why) for integer-named step directories that do not count: "uncommitted" or "incomplete"."""
    out = []
    for s in _integer_dirs(directory):
        if not _is_committed(directory / str(s)):
            out.append((s, "uncommitted"))
        elif not _has_meta(directory / str(s)):
            out.append((s, "incomplete"))
    return out


def _close_at_exit(mngr, where: str) -> None:
    """weakref.finalize callback of a CheckpointManager that was never closed (it holds no reference to it)."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # at interpreter exit nothing can catch it: say it loudly
        print(f"jaxseq: a checkpoint save in {where} failed and was never reported (the CheckpointManager "
              f"was not closed): {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        try:
            mngr.close()
        except Exception:  # already reported above
            pass


