"""Faults: runs killed (SIGKILL, mid-step or mid-save) or stopped (SIGTERM) resume bit for bit; changed bytes,
empty or half-written step directories and full disks are caught and reported, never restored or swallowed.

The kill tests run the real command (`python -m jaxseq.cli train`) in subprocesses on a tiny additive
model; one module fixture starts the reference run, then the three faulty runs at once, then their
resumes at once (2 cores), sharing a JAX compilation cache so each compiles only once.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization as orbax_serialization

from jaxseq.checkpoint import CheckpointManager
from jaxseq.config import OptimConfig, TrainConfig
from jaxseq.data import CharTokenizer, DataBundle
from jaxseq.data.corpus import stdlib_cache_path
from jaxseq.errors import CheckpointError
from jaxseq.tasks import CharLM
from jaxseq.fingerprints import fingerprints

STEPS, EVERY = 40, 5
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 24


def cli_args(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--model", "additive", "--additive.d-embed", "16", "--char-lm.source", "stdlib",
            "--char-lm.seq-len", "16", "--char-lm.batch-size", "4", "--optim.warmup-steps", "5", "--steps", str(STEPS),
            "--eval-every", "20", "--eval-batches", "2", "--checkpoint-every", str(EVERY), "--no-progress",
            "--run-dir", str(run_dir), *extra]


# Runs `jaxseq.cli train` with one fault injected into the Orbax save path (test code, not library code):
#   kill_in_save=K  the array writes of step K hang; once `save(K)` has returned (the async write under
#                   way, its tmp directory on disk) the process SIGKILLs itself.
#   shard_check=DIR,NPZ  with 8 fake devices: fingerprint NPZ's arrays under several shardings, save them
#                   sharded to DIR and restore them into another sharding.
DRIVER = r'''
import asyncio, json, os, signal, sys, time
from pathlib import Path
mode, arg = sys.argv[1].split("=", 1)
if mode == "kill_in_save":
    from orbax.checkpoint._src.serialization import serialization as S
    import jaxseq.checkpoint as C
    K, real_save = int(arg), C.CheckpointManager.save

    async def hanging_write(*a, **k):
        await asyncio.sleep(3600)

    def save(self, step, *a, **k):
        if step == K:
            S.async_serialize_from_host = hanging_write
        out = real_save(self, step, *a, **k)
        if step == K:
            tmp = Path(self.directory, f"{K}.orbax-checkpoint-tmp")
            for _ in range(500):
                if tmp.exists():
                    break
                time.sleep(0.01)
            print(f"killing myself during the save of step {K}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    C.CheckpointManager.save = save
    from jaxseq.cli import main
    main(sys.argv[2:])
elif mode == "shard_check":
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxseq.checkpoint import CheckpointManager
    from jaxseq.config import TrainConfig
    from jaxseq.fingerprints import fingerprints
    run_dir, arrays = arg.split(",")
    tree = dict(np.load(arrays))
    tree["h"] = tree["h"].view(jnp.bfloat16)  # npz has no bfloat16: it travels as its uint16 bits
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    out = {}
    for spec in [P(), P("fsdp"), P("data", "fsdp"), P(("data", "fsdp")), P(None, "data")]:
        placed = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec if x.ndim == 2 else P())), tree)
        out[str(spec)] = fingerprints(placed)
    with CheckpointManager(run_dir, config=TrainConfig()) as ckpt:
        ckpt.save(3, placed, data_position=3)
    # Read back into another sharding on this mesh: the fingerprints verify (a mismatch would warn).
    import warnings
    other = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, P("fsdp") if x.ndim == 2 else P())), tree)
    with CheckpointManager(run_dir, config=TrainConfig(), read_only=True) as ckpt, warnings.catch_warnings():
        warnings.simplefilter("error")
        back, _ = ckpt.restore(other)
    same = all(np.array_equal(np.asarray(back[k]), np.asarray(tree[k])) and back[k].sharding.spec == other[k].sharding.spec
               for k in tree)
    print(json.dumps({"devices": len(jax.devices()), "fingerprints": out, "resharded_restore_equal": same}))
'''


def env_for(tmp: Path, **extra) -> dict:
    """The subprocesses' environment: a persistent compilation cache, so that every process after the first
    loads the train step instead of compiling it, and TEXT as the "stdlib" corpus (its cache file), so that
    no process spends seconds importing HF datasets (and torch) to read a 2 KB file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXSEQ_", "XLA_FLAGS"))}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXSEQ_CACHE", str(tmp / "jaxseq_cache"))
        corpus = stdlib_cache_path()
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text(TEXT)
    # A size limit turns on JAX's file lock around cache reads and writes: processes running at the same
    # time then never read an entry another one is half-way through writing.
    # PYTHONFAULTHANDLER: a child that hangs prints every thread's stack on SIGABRT (see `finish`).
    env.update(JAX_PLATFORMS="cpu", PYTHONFAULTHANDLER="1", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_COMPILATION_CACHE_MAX_SIZE=str(2**30),
               JAXSEQ_CACHE=str(tmp / "jaxseq_cache"), **extra)
    return env


LIVE: list[subprocess.Popen] = []  # started by the fixture; killed if it fails half-way


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=f, stderr=subprocess.STDOUT)
    LIVE.append(proc)
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Once in a CI run (2026-12-01) a child hung in its step-10 save; the stacks say where, next time.
        proc.send_signal(signal.SIGABRT)  # the faulthandler prints every thread's stack, then the child dies
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise AssertionError(f"{proc.args} did not finish in {timeout} s:\n{log.read_text()[-12000:]}")
    return rc, log.read_text()


def complete_steps(run_dir: Path) -> list[int]:
    """Steps a resume may use, read from the directory as an outsider sees it (no manager, nothing moved)."""
    with CheckpointManager(run_dir, config=None, read_only=True) as ckpt:
        return ckpt.all_steps()


def signal_when_committed(targets: list[tuple[subprocess.Popen, Path, int]], min_step: int = 2 * EVERY) -> None:
    """Send each (proc, run_dir, signal) its signal as soon as its step `min_step` is committed with its
    metadata: the run is then mid-training. Polls all of them together (they run at the same time)."""
    pending, deadline = list(targets), time.monotonic() + 300
    while pending:
        for proc, run_dir, sig in list(pending):
            if (run_dir / "checkpoints" / str(min_step) / "meta" / "metadata").exists():
                os.kill(proc.pid, sig)
                pending.remove((proc, run_dir, sig))
            elif proc.poll() is not None:
                log = Path(f"{run_dir}.log").read_text()[-3000:]
                raise AssertionError(f"{run_dir.name} ended (rc {proc.returncode}) before step {min_step} was saved:\n{log}")
        assert time.monotonic() < deadline, f"step {min_step} was never saved in {[t[1] for t in pending]}"
        time.sleep(0.01)


def metrics(run_dir: Path) -> tuple[dict, dict]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [{k: v for k, v in r.items() if k != "wall_s"} for r in lines]  # the one field that may differ
    return ({r["step"]: r for r in lines if r["split"] == "train"}, {r["step"]: r for r in lines if r["split"] == "val"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    try:
        yield _runs(tmp_path_factory.mktemp("faults"))
    finally:
        for proc in LIVE:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        LIVE.clear()


def _runs(tmp: Path) -> dict:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    env = env_for(tmp)
    cli = ["-m", "jaxseq.cli"]
    out = {"tmp": tmp}

    rc, log = finish(start(cli + cli_args(tmp / "reference"), env, tmp / "reference.log"), tmp / "reference.log")
    assert rc == 0, log[-3000:]
    out["reference"] = metrics(tmp / "reference")

    # Three faulty runs at once.
    procs = {
        "sigkill": start(cli + cli_args(tmp / "sigkill"), env, tmp / "sigkill.log"),
        "in_save": start([str(driver), f"kill_in_save={3 * EVERY}"] + cli_args(tmp / "in_save"), env,
                         tmp / "in_save.log"),
        "sigterm": start(cli + cli_args(tmp / "sigterm"), env, tmp / "sigterm.log"),
    }
    signal_when_committed([(procs["sigkill"], tmp / "sigkill", signal.SIGKILL),
                           (procs["sigterm"], tmp / "sigterm", signal.SIGTERM)])
    for name, proc in procs.items():
        rc, log = finish(proc, tmp / f"{name}.log")
        out[name] = {"rc": rc, "log": log, "steps": complete_steps(tmp / name),
                     "dirs": sorted(p.name for p in (tmp / name / "checkpoints").iterdir()),
                     "metrics": metrics(tmp / name)}

    # Their resumes at once, each with the plain command.
    procs = {name: start(cli + cli_args(tmp / name, "--resume"), env, tmp / f"{name}.resume.log")
             for name in ("sigkill", "in_save", "sigterm")}
    for name, proc in procs.items():
        rc, log = finish(proc, tmp / f"{name}.resume.log")
        assert rc == 0, f"resuming {name} failed:\n{log[-3000:]}"
        out[name].update(resume_log=log, resumed=metrics(tmp / name))
    return out


def assert_same_run(resumed: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    """Every train and validation line equal, bit for bit (the floats compared with ==)."""
    (train, val), (ref_train, ref_val) = resumed, reference
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(val) == sorted(ref_val) == [20, 40]
    for s in ref_train:
        assert train[s] == ref_train[s], (s, train[s], ref_train[s])
    for s in ref_val:
        assert val[s] == ref_val[s], (s, val[s], ref_val[s])


def test_sigkill_mid_training_resumes_from_the_last_committed_step_bit_for_bit(runs):
    r = runs["sigkill"]
    assert r["rc"] == -signal.SIGKILL
    assert r["steps"] and r["steps"][-1] >= 2 * EVERY and all(s % EVERY == 0 for s in r["steps"])
    last_logged = max(r["metrics"][0])
    assert last_logged < STEPS, "the kill came after training ended"
    assert f"from step {r['steps'][-1]}\n" in r["resume_log"]
    assert_same_run(r["resumed"], runs["reference"])


def test_sigkill_during_an_async_save_resumes_from_the_previous_step(runs):
    r, k = runs["in_save"], 3 * EVERY
    assert r["rc"] == -signal.SIGKILL and f"killing myself during the save of step {k}" in r["log"]
    # Step K's save was under way (its tmp directory is there) but never committed: K - EVERY is the newest.
    assert f"{k}.orbax-checkpoint-tmp" in r["dirs"] and str(k) not in r["dirs"]
    assert r["steps"][-1] == k - EVERY
    assert f"from step {k - EVERY}\n" in r["resume_log"]
    assert_same_run(r["resumed"], runs["reference"])


def test_sigterm_saves_exits_143_and_resumes_bit_for_bit(runs):
    r = runs["sigterm"]
    assert r["rc"] == 128 + signal.SIGTERM, r["log"][-2000:]
    saved = r["steps"][-1]
    assert f"signal {int(signal.SIGTERM)}: saved step {saved} " in r["log"]
    assert saved == max(r["metrics"][0]) < STEPS  # saved exactly where it stopped, before the end
    assert f"from step {saved}\n" in r["resume_log"]
    assert_same_run(r["resumed"], runs["reference"])


# -- corrupt and incomplete steps (in process) ------------------------------------------------------------


CONFIG = TrainConfig(model="additive")


def random_state(seed: int) -> dict:
    """Incompressible values (so Orbax stores the chunk raw and a flipped byte reads back without error)."""
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16)},
            "step": jnp.int32(seed)}


def same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).dtype == np.asarray(y).dtype and
                                      np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def save_steps(run_dir: Path, steps) -> dict:
    states = {s: random_state(s) for s in steps}
    with CheckpointManager(run_dir, keep=5, config=CONFIG) as ckpt:
        for s in steps:
            ckpt.save(s, states[s], data_position=s)
    return states


def flip_one_byte(step_dir: Path) -> tuple[Path, bytes]:
    """Flip one bit in the middle of the step's largest array file; returns the file and its new bytes."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    big = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x04
    big.write_bytes(bytes(data))
    return big, bytes(data)


def test_flipped_byte_is_caught_by_fingerprints_step_set_aside_and_previous_restored(tmp_path):
    states = save_steps(tmp_path, [1, 2])
    big, corrupted = flip_one_byte(tmp_path / "checkpoints" / "2")
    (tmp_path / "checkpoints" / "3").mkdir()  # an empty step directory (e.g. a copy that died)
    with pytest.warns(UserWarning, match=r"step 3 .* never committed"):
        ckpt = CheckpointManager(tmp_path, config=CONFIG)
    with ckpt:
        assert ckpt.all_steps() == [1, 2]  # the flip is not visible until the arrays are read
        with pytest.warns(UserWarning, match=r"step 2: CheckpointError: fingerprint mismatch.*params/w: saved "
                                             r"[0-9a-f]{16}, read [0-9a-f]{16}.*moved to 2\.corrupt"):
            state, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
        assert meta["step"] == 1 and same_bits(state, states[1])
        assert ckpt.all_steps() == [1]
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["1", "2.corrupt", "3.uncommitted"], names
    # Moved aside, not deleted: the corrupted bytes are kept for a post-mortem.
    kept = tmp_path / "checkpoints" / "2.corrupt" / big.relative_to(tmp_path / "checkpoints" / "2")
    assert kept.read_bytes() == corrupted


def test_committed_step_without_jaxseq_metadata_does_not_count(tmp_path):
    states = save_steps(tmp_path, [1, 2, 3])
    (tmp_path / "checkpoints" / "3" / "meta" / "metadata").unlink()  # half-copied: Orbax's marker, no metadata
    meta2 = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta2.write_text(json.dumps({k: v for k, v in json.loads(meta2.read_text()).items() if k != "fingerprints"}))
    assert complete_steps(tmp_path) == [1]  # read-only: ignored, left where they are
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]
    with pytest.warns(UserWarning, match="no complete jaxseq metadata"):
        ckpt = CheckpointManager(tmp_path, config=CONFIG)
    with ckpt:
        state, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
    assert meta["step"] == 1 and same_bits(state, states[1])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.incomplete", "3.incomplete"]


def test_another_dtype_setting_is_not_silent(tmp_path):
    import dataclasses

    states = save_steps(tmp_path, [1])
    other = dataclasses.replace(CONFIG, compute_dtype="bfloat16")
    with CheckpointManager(tmp_path, config=other, read_only=True) as ckpt:
        with pytest.warns(UserWarning, match=r"compute_dtype: checkpoint 'float32', config 'bfloat16'"):
            state, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
    assert same_bits(state, states[1])
    with CheckpointManager(tmp_path, config=CONFIG, read_only=True) as ckpt, warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: no warning at all
        ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))


# -- full disks and failed async saves ---------------------------------------------------------------------


async def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_an_async_save_is_raised_naming_the_step(tmp_path, monkeypatch):
    states = save_steps(tmp_path, [1])
    ckpt = CheckpointManager(tmp_path, keep=5, config=CONFIG)
    monkeypatch.setattr(orbax_serialization, "async_serialize_from_host", _disk_full)
    ckpt.save(2, states[1], data_position=2)  # returns: the write fails later, in the background
    with pytest.raises(CheckpointError, match=rf"saving checkpoint step 2 to {re.escape(str(tmp_path))}/checkpoints failed.*"
                                              r"newest committed step: 1.*No space left on device.*The disk is full"):
        ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1]
    # The next save reports the failure of the one before it, under that one's step number.
    ckpt.save(3, states[1], data_position=3)
    with pytest.raises(CheckpointError, match="saving checkpoint step 3 .* No space left on device"):
        ckpt.save(4, states[1], data_position=4)
    # So does leaving the `with` block (closing): an in-flight failure is never lost.
    ckpt.save(5, states[1], data_position=5)
    with pytest.raises(CheckpointError, match="saving checkpoint step 5 .* No space left on device"):
        ckpt.close()
    monkeypatch.undo()  # space again: the same step numbers save normally
    with CheckpointManager(tmp_path, keep=5, config=CONFIG) as ckpt:
        assert ckpt.all_steps() == [1]
        ckpt.save(2, states[1], data_position=2)
    assert complete_steps(tmp_path) == [1, 2]


class TinyLM(nn.Module):
    vocab_size: int

    @nn.compact
    def __call__(self, tokens, mask=None, deterministic: bool = True):
        return nn.Dense(self.vocab_size)(nn.Embed(self.vocab_size, 8)(tokens))


def test_disk_full_stops_train_with_an_error_naming_the_checkpoint(tmp_path, monkeypatch):
    from jaxseq.train import train

    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    data = DataBundle(tok, ids[:1500], ids[1500:])
    config = TrainConfig(char_lm=CharLM(seq_len=16, batch_size=4), optim=OptimConfig(warmup_steps=2), steps=12,
                         eval_every=100, eval_batches=1, checkpoint_every=4, progress=False, run_dir=str(tmp_path))
    real_save = CheckpointManager.save

    def save_then_fill_the_disk(self, step, *args, **kw):  # step 4 is written; from step 8 on the disk is full
        if step == 8:
            monkeypatch.setattr(orbax_serialization, "async_serialize_from_host", _disk_full)
        return real_save(self, step, *args, **kw)

    monkeypatch.setattr(CheckpointManager, "save", save_then_fill_the_disk)
    with pytest.raises(CheckpointError, match=rf"step 8 to {re.escape(str(tmp_path))}/checkpoints failed.*No space left"):
        train(None, TinyLM(tok.vocab_size), config, data=data)
    assert complete_steps(tmp_path) == [4]


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a tiny tmpfs needs root on Linux")
def test_really_full_tmpfs_is_reported(tmp_path):
    """The real thing where we may mount: a 128 KiB tmpfs, a 200 KB state; TensorStore's own ENOSPC surfaces."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        state = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(50_000,)), jnp.float32)}
        with pytest.raises(CheckpointError, match=r"saving checkpoint step 1 .*No space left on device"):
            with CheckpointManager(small / "run", config=CONFIG) as ckpt:
                ckpt.save(1, state, data_position=1)
        assert complete_steps(small / "run") == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_manager_never_closed_still_finishes_its_save(tmp_path, capfd, monkeypatch):
    state = random_state(1)
    ckpt = CheckpointManager(tmp_path, config=CONFIG)
    ckpt.save(1, state, data_position=1)
    del ckpt
    gc.collect()  # the same finaliser runs at interpreter exit for a manager still alive then
    assert complete_steps(tmp_path) == [1]
    monkeypatch.setattr(orbax_serialization, "async_serialize_from_host", _disk_full)
    ckpt = CheckpointManager(tmp_path, config=CONFIG)
    ckpt.save(2, state, data_position=2)
    del ckpt
    gc.collect()
    assert "checkpoint save in" in capfd.readouterr().err and complete_steps(tmp_path) == [1]


# -- fingerprints ------------------------------------------------------------------------------------------


def numpy_fingerprint(x) -> str:
    """An independent float-free NumPy implementation of the documented formula, over the flat global array."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    w = np.ascontiguousarray(x).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
    w = w.astype(np.uint32).reshape(-1)
    u = np.uint32

    def fmix(h):
        h = h ^ (h >> u(16))
        h = h * u(0x85EBCA6B)
        h = h ^ (h >> u(13))
        h = h * u(0xC2B2AE35)
        return h ^ (h >> u(16))

    k = np.arange(w.size, dtype=np.uint32) * u(0x9E3779B1)
    a = fmix(w ^ k)
    b = fmix(a ^ (k + u(0x7F4A7C15)))
    return f"{int(a.sum(dtype=np.uint32)):08x}{int(b.sum(dtype=np.uint32)):08x}"


def shard_tree() -> dict:
    rng = np.random.default_rng(7)
    return {"w": rng.normal(size=(16, 8)).astype(np.float32), "i": rng.integers(-9, 9, (8, 4)).astype(np.int32),
            "h": np.asarray(jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)), "s": np.float32(2.5)}


def test_fingerprints_match_numpy_and_see_every_single_bit(tmp_path):
    rng = np.random.default_rng(0)
    tree = {**shard_tree(), "b": rng.random((3, 5)) < 0.5, "i8": rng.integers(-128, 127, (7,)).astype(np.int8)}
    fps = fingerprints(tree)
    assert fps == {k: numpy_fingerprint(v) for k, v in tree.items()}
    w = tree["w"].view(np.uint32).copy()
    seen = {fps["w"]}
    for flat in range(0, w.size, 13):  # one flipped bit anywhere changes the fingerprint
        flipped = w.copy().reshape(-1)
        flipped[flat] ^= np.uint32(1 << (flat % 32))
        seen.add(fingerprints({"w": flipped.reshape(w.shape).view(np.float32)})["w"])
    assert len(seen) == 1 + len(range(0, w.size, 13))
    swapped = tree["w"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values in other places
    assert fingerprints({"w": swapped})["w"] != fps["w"]


def test_fingerprints_do_not_depend_on_the_sharding_and_verify_on_one_device(tmp_path):
    """8 fake devices fingerprint a state under 5 shardings, save it, and restore it into another sharding;
    this 1-device process restores and verifies it too."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = env_for(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    tree = shard_tree()
    np.savez(tmp_path / "tree.npz", **{**tree, "h": tree["h"].view(np.uint16)})
    proc = subprocess.run([sys.executable, str(driver), f"shard_check={tmp_path / 'run'},{tmp_path / 'tree.npz'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {k: numpy_fingerprint(v) for k, v in tree.items()}
    assert report["devices"] == 8 and len(report["fingerprints"]) == 5 and report["resharded_restore_equal"]
    for spec, fps in report["fingerprints"].items():
        assert fps == expected, spec
    with CheckpointManager(tmp_path / "run", config=TrainConfig(), read_only=True) as ckpt, warnings.catch_warnings():
        warnings.simplefilter("error")  # a fingerprint mismatch would warn (and fall back)
        state, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, tree))
    assert meta["fingerprints"] == expected and same_bits(state, tree)


def test_fingerprints_resolved_in_save_when_orbax_lacks_the_hook(tmp_path, monkeypatch):
    """The fallback for an Orbax without the JSON writer hook: fingerprints computed in `save`, same result."""
    import jaxseq.checkpoint as C

    monkeypatch.setattr(C, "_LAZY_META", False)
    states = save_steps(tmp_path, [1])
    with CheckpointManager(tmp_path, config=CONFIG, read_only=True) as ckpt:
        state, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, states[1]))
    assert same_bits(state, states[1]) and meta["fingerprints"] == fingerprints(states[1])


def test_a_failed_fingerprint_computation_fails_that_save_loudly(tmp_path, monkeypatch):
    import jaxseq.fingerprints

    def broken(tree):
        raise RuntimeError("device lost while checksumming")

    monkeypatch.setattr(jaxseq.fingerprints, "fingerprints_async", broken)
    with pytest.raises(CheckpointError, match="saving checkpoint step 1 .*device lost while checksumming"):
        with CheckpointManager(tmp_path, config=CONFIG) as ckpt:
            ckpt.save(1, random_state(1), data_position=1)  # returns; the background writer then fails
    assert complete_steps(tmp_path) == []
