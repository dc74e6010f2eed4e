"""benchmarks/gpu_suite.sh, the prepared run for a GPU machine, in its smoke mode on this backend.

A GPU run is short and unattended, so the script must work the first time it meets one:
this runs every stage at tiny sizes (the GPU tests skip themselves off a GPU) and checks that each
stage exits cleanly and leaves the JSON lines of every competitor under $OUT, where they are collected.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _impls(path: Path) -> set[str]:
    return {json.loads(line)["impl"] for line in path.read_text().splitlines() if '"impl"' in line}


@pytest.mark.slow  # every stage of the suite, benchmarks included, end to end: minutes on 2 cores
@pytest.mark.skipif(not os.path.exists("/usr/bin/timeout"), reason="needs coreutils' timeout")
def test_gpu_suite_runs_every_stage_in_smoke_mode(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, GPU_SUITE_SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    log = (tmp_path / "suite.log").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("tests", "gpt2-small-bf16", "attention-bf16", "rnn-layers", "gpt2-small-bf16-torch-compile"):
        assert f"== {stage}: exit 0" in log, (stage, log[-3000:])
    assert "== done" in log
    assert {"jaxseq", "jaxseq-model-hand-step", "flax-gpt", "torch-eager", "torch-eager-fused-adamw"} <= _impls(
        tmp_path / "gpu-gpt-step.jsonl")
    assert {"jaxseq", "torch-eager-fused-adamw"} <= _impls(tmp_path / "gpu-gpt-step-compile.jsonl")
    assert {"jaxseq-flash", "jax-xla", "torch-sdpa"} <= _impls(tmp_path / "gpu-attention-bf16.jsonl")
    assert {"jaxseq", "jaxseq-scan", "torch"} <= _impls(tmp_path / "gpu-rnn-layers.jsonl")
    tests_log = (tmp_path / "tests.log").read_text()  # tests/test_gpu.py imported and collected, then skipped
    assert " skipped" in tests_log and "error" not in tests_log.lower() and "failed" not in tests_log, tests_log
