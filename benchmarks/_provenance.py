"""Which code a benchmark row measured, from git alone (summarize.py reads it without importing JAX).

`code_version(commit)` digests the code a measurement executes, so runs taken at different commits
that changed only results, docs, tests or the scripts that read results count as one series.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# What a measurement executes: the package and the benchmark scripts. The results, the docs and the
# scripts that only read results may change between runs without making them different measurements.
MEASURED_PATHS = ("jaxseq", "benchmarks")
UNMEASURED = ("benchmarks/results/", "benchmarks/summarize.py", "benchmarks/plot_scaling.py", "benchmarks/_provenance.py",
              ".md")


def code_version(commit: str | None = None, root: Path = ROOT) -> str | None:
    """A 16-hex-digit digest of the measured code (`MEASURED_PATHS` less `UNMEASURED`): the sorted
    (path, git blob id) pairs of the working tree's tracked files, or of `commit`'s tree when given.
    Runs at different commits with the same digest executed the same code. None outside git or for an
    unknown commit. `root`: the repository."""
    try:
        if commit is None:
            paths = subprocess.run(["git", "ls-files", "--", *MEASURED_PATHS], cwd=root, capture_output=True,
                                   text=True, timeout=10, check=True).stdout.split()
            paths = [p for p in paths if not _unmeasured(p) and (root / p).is_file()]
            blobs = subprocess.run(["git", "hash-object", "--stdin-paths"], cwd=root, input="\n".join(paths),
                                   capture_output=True, text=True, timeout=30, check=True).stdout.split()
            pairs = sorted(zip(paths, blobs))
        else:
            tree = subprocess.run(["git", "ls-tree", "-r", commit, "--", *MEASURED_PATHS], cwd=root,
                                  capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
            pairs = sorted((line.split("\t", 1)[1], line.split()[2]) for line in tree)
            pairs = [(p, b) for p, b in pairs if not _unmeasured(p)]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    if not pairs:
        return None
    return hashlib.sha256("\n".join(f"{p} {b}" for p, b in pairs).encode()).hexdigest()[:16]


def _unmeasured(path: str) -> bool:
    return any(path.startswith(u) or path.endswith(u) for u in UNMEASURED)
