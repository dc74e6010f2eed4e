"""Peak resident memory (RSS, as the operating system counts it) of each training and generation row,
every competitor measured the same way: alone, in a fresh process.

A process keeps memory that another library freed, so two competitors in one process would share
one high-water mark. Each row here runs one competitor of a benchmark script (`--impls NAME --rss`)
in its own child process. The child imports both JAX and torch, as every script does, builds its
inputs, resets Linux's high-water mark (`_common.reset_peak_rss`), then builds and compiles the
competitor and runs its warm-up and timed calls. Each row records:

  * `rss_base_mb`: resident memory at the reset (interpreter, both libraries, the inputs);
  * `rss_peak_mb`: the high-water mark after it: what the process needed at its worst;
  * `rss_growth_mb`: their difference: what the competitor's build, compile and calls took;
  * `process_peak_mb`: the child's lifetime maximum (`ru_maxrss` from `os.wait4`), the same thing
    counted by the kernel without the reset.

    python benchmarks/memory.py --out benchmarks/results/cpu-memory.jsonl      # every row (~10 minutes)
    python benchmarks/memory.py --cases "GPT d128" --runs 3                    # cases whose label contains it

Generation rows run `generation.py`'s default sizes at batch 16; training rows run the RNN layers at
hidden 256 and the GPT step at both of `gpt_step.py`'s sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import run_record  # noqa: E402

GPT_IMPLS = ["jaxseq", "flax-gpt", "torch-eager", "torch-eager-fused-adamw", "torch-compile"]
# (script, case label, the script's arguments for that case, its competitors)
CASES = [
    ("rnn_layers.py", "LSTM layer train, hidden 256", ["--layers", "lstm", "--hidden", "256", "--modes", "train"],
     ["jaxseq", "flax-optimized-lstm", "torch"]),
    ("rnn_layers.py", "GRU layer train, hidden 256", ["--layers", "gru", "--hidden", "256", "--modes", "train"],
     ["jaxseq", "flax-gru", "torch", "torch-compile-cell"]),
    ("gpt_step.py", "GPT step d128 ctx64 b12", [], GPT_IMPLS),
    ("gpt_step.py", "GPT step d256 ctx256 b16", ["--d-model", "256", "--context", "256", "--batch", "16"], GPT_IMPLS),
    ("generation.py", "LSTM sampling, batch 16", ["--models", "lstm", "--modes", "sample", "--batches", "16"],
     ["jaxseq", "torch-eager", "torch-eager-cell", "torch-compile"]),
    ("generation.py", "GPT sampling, batch 16", ["--models", "gpt", "--modes", "sample", "--batches", "16"],
     ["jaxseq", "hf-generate", "hf-generate-compile", "nanogpt-nocache"]),
]


def run_child(script: str, args: list[str], impl: str, repeats: int) -> dict:
    """Run one competitor alone; its JSON row with `process_peak_mb` added. Raises with the child's
    output tail if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "rows.jsonl", Path(tmp) / "log.txt"
        cmd = [sys.executable, str(HERE / script), *args, "--impls", impl, "--rss", "--repeats", str(repeats),
               "--out", str(out)]
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
        rows = [r for r in rows if r.get("impl") == impl]
        if proc.returncode != 0 or not rows:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return {**rows[-1], "process_peak_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss: KiB on Linux


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="", help="only the cases whose label contains this text")
    ap.add_argument("--impls", default="", help="comma list: only these competitors")
    ap.add_argument("--runs", type=int, default=1, help="runs of every row, alternating (RSS varies little)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls in each child (at least 3)")
    ap.add_argument("--out", default="", help="append the rows to this file")
    args = ap.parse_args(argv)
    wanted = set(args.impls.split(",")) if args.impls else None
    record = run_record()
    for _ in range(args.runs):
        for script, label, script_args, impls in CASES:
            if args.cases not in label:
                continue
            for impl in impls:
                if wanted and impl not in wanted:
                    continue
                try:
                    child = run_child(script, script_args, impl, args.repeats)
                except RuntimeError as err:  # e.g. inductor without a C++ compiler: the row says so
                    if "compile" not in impl:
                        raise
                    print(f"skipping {label} / {impl}: {err}", file=sys.stderr, flush=True)
                    continue
                row = {"bench": "memory", "script": script, "case": label, "impl": impl,
                       **{k: child.get(k) for k in ("rss_base_mb", "rss_peak_mb", "rss_growth_mb", "process_peak_mb",
                                                    "step_ms", "torch_path")},
                       "child_commit": child.get("commit"), **record, "load_avg": child.get("load_avg")}
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
