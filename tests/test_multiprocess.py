"""Two processes on localhost train together (jax.distributed over gloo on CPU) and match one process.

Each process has 2 fake CPU devices (4 in the mesh), feeds its own half of every global batch, and both
write the same (shared) run directory, as hosts on a shared filesystem would; only process 0 writes
metrics. The single-process reference runs on 1 device. All runs are subprocesses of the driver in
test_sharding.py (pytest's own process has one device and no coordinator), each with a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_sharding as ts  # noqa: E402  (the driver, the corpus and the flags of the tiny runs)

TIMEOUT = 420  # seconds for the pair; a hung collective must fail the test, not the CI job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    # Together, on a 2 x 2 mesh: the data axis spans the processes (each feeds its half of every batch and
    # the gradients are reduced across them), the fsdp axis splits the params within each process. Its
    # step-CUT checkpoint, written by both processes, is continued below in a single process.
    def scenario(name, *extra, copy=None):
        return {"name": name, "argv": [*ts.COMMON, *ts.LSTM, "--run-dir", str(tmp_path / name), *extra],
                **({"resume_copy_of": str(tmp_path / copy)} if copy else {})}

    port = free_port()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([scenario("fsdp", "--mesh.data", "2", "--mesh.fsdp", "2")]))
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAXSEQ_")}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    for pid in range(2):
        env = {**base, "JAXSEQ_COORDINATOR": f"127.0.0.1:{port}", "JAXSEQ_NUM_PROCESSES": "2",
               "JAXSEQ_PROCESS_ID": str(pid)}
        log = open(tmp_path / f"proc{pid}.log", "w")
        cmd = [sys.executable, ts.__file__, str(spec), str(tmp_path / f"out{pid}.json"), str(tmp_path / f"cache{pid}")]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT
    try:
        for p, _ in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two processes did not finish within {TIMEOUT} s:\n" + _logs(tmp_path))
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    assert [p.returncode for p, _ in procs] == [0, 0], _logs(tmp_path)
    lead = json.loads((tmp_path / "out0.json").read_text())
    other = json.loads((tmp_path / "out1.json").read_text())
    assert lead["fsdp"]["error"] is None and other["fsdp"]["error"] is None, (lead, other)
    assert lead["fsdp"]["devices"] == 4  # both processes' devices in one mesh
    assert lead["fsdp"]["specs"]["rnn/cell/w_hh"] == [None, "fsdp"]
    assert lead["fsdp"]["shard_shapes"]["rnn/cell/w_hh"] == [32, 64]

    # One process, one device: the reference, and the FSDP run continued from the 2-process checkpoint.
    single = ts.run_devices(1, [scenario("ref"), scenario("fsdp_resumed", "--resume", copy="fsdp")], tmp_path,
                            timeout=TIMEOUT)
    ref = ts.trajectory(single["ref"])
    np.testing.assert_allclose(ts.trajectory(lead["fsdp"]), ref, rtol=1e-5)
    np.testing.assert_allclose(ts.trajectory(single["fsdp_resumed"]), ref, rtol=1e-5)


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- process {i} ---\n" + (tmp / f"proc{i}.log").read_text()[-4000:] for i in range(2))
