"""What the benchmark scripts share: the process set-up, the record of the machine every row carries,
the device's name, its matmul peaks, FLOP counts, timing and peak memory."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _provenance import code_version  # noqa: E402  (git only)
from jaxseq.malloc import keep_freed_memory  # noqa: E402  (imports no JAX: safe before set-up)

import jax
import jax.numpy as jnp


# ------------------------------------------------------------------------------------------ process


def setup_process(system_malloc: bool = False) -> dict:
    """The process settings every competitor of every script runs under; call it first thing, before
    JAX's first computation (and before torch allocates).

    glibc's malloc keeps the memory a step frees (`jaxseq.malloc.keep_freed_memory`), as `jaxseq train`
    does, unless `system_malloc` or JAXSEQ_MALLOC=system. The setting is process-wide, so JAX and
    torch run under the same allocator. Returns what was set, for the rows' record."""
    applied = False if system_malloc else keep_freed_memory()
    return {"malloc": "keep-freed" if applied else "system"}


def cpu_flags() -> dict:
    """What /proc/cpuinfo says the CPU can do, as far as the kernels care: `avx512` (any avx512* flag;
    jaxseq's native CPU kernels need avx512f), `avx512f`, `avx2`, `fma`, `amx` (any amx* flag).
    All None where /proc/cpuinfo is unreadable (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return {"avx512": None, "avx512f": None, "avx2": None, "fma": None, "amx": None}
    return {"avx512": any(x.startswith("avx512") for x in flags), "avx512f": "avx512f" in flags,
            "avx2": "avx2" in flags, "fma": "fma" in flags, "amx": any(x.startswith("amx") for x in flags)}


def git_commit() -> str | None:
    """The repository's HEAD commit, with "+dirty" when tracked files other than the results differ from it;
    None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        # results files change as runs append to them; they are not the code being measured
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


# One id per process: the rows of one invocation of a script form one run (summarize.py takes the
# median over runs).
RUN_ID = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"


@functools.cache
def _process_code_version() -> str | None:
    """The working tree's code version, read once: a process runs the code it imported at its start,
    and scripts call `run_record` for every row."""
    return code_version()


def run_record(torch=None, **extra) -> dict:
    """What each JSON line records about where and how it was measured: `run_id` (`RUN_ID`, the same for
    every row of one invocation), `commit` (str or None), `code_version` (the working tree's
    `_provenance.code_version()`, exact for a dirty tree too),
    `device` (`device_name()`), `cpu_flags` (`cpu_flags()`), `threads` (cores this process may use,
    os.cpu_count(), torch's intra-op threads when `torch` is given, XLA_FLAGS), `load_avg` (1, 5, 15
    minutes, when the record is taken), `time` (UTC), the library versions; `extra` is merged in
    (e.g. the `setup_process()` result)."""
    import jax

    threads = {"affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
               "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    versions = {"jax": jax.__version__}
    if torch is not None:
        threads["torch"] = torch.get_num_threads()
        versions["torch"] = torch.__version__
    return {"run_id": RUN_ID, "commit": git_commit(), "code_version": _process_code_version(), "device": device_name(), "cpu_flags": cpu_flags(), "threads": threads,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **versions, **extra}


def time_stats(seconds: list[float]) -> dict:
    """`step_ms` (median), `step_ms_min`, `step_ms_max` and `n` of a list of step times in seconds."""
    return {"step_ms": round(1e3 * statistics.median(seconds), 3), "step_ms_min": round(1e3 * min(seconds), 3),
            "step_ms_max": round(1e3 * max(seconds), 3), "n": len(seconds)}


# ------------------------------------------------------------------------------------------ device


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def torch_device(torch) -> str | None:
    """Where torch runs beside JAX: "cpu" on a CPU backend, "cuda" on a GPU backend when torch has CUDA,
    None otherwise (skip torch: a CPU torch against a GPU JAX compares nothing)."""
    if jax.default_backend() == "cpu":
        return "cpu"
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else None


def device_name() -> str:
    """'cpu: <model> (N cores), cpu' on CPU; the accelerator's kind (e.g. 'NVIDIA H100 80GB HBM3') otherwise."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"cpu: {cpu_name()} ({os.cpu_count()} cores), cpu"
    return f"{dev.platform}: {dev.device_kind}"


# Dense (no sparsity) matmul peaks from NVIDIA's datasheets, TFLOP/s, for MFU as papers report it
# (PaLM's definition: achieved model FLOP/s over the hardware's peak). float32 is the TF32 tensor-core
# peak, which XLA and cuDNN use for float32 matmuls at JAX's default precision.
DATASHEET_TFLOPS = {
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.4, "float32": 494.7},  # SXM; the H200 has the same compute
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def datasheet_peak_gflops(device_kind: str, dtype: str) -> float | None:
    """The datasheet peak for a GPU's `device_kind` (e.g. 'NVIDIA H100 80GB HBM3') and 'bfloat16' /
    'float32', in GFLOP/s; None for a device not in `DATASHEET_TFLOPS` (CPUs among them)."""
    for name, peaks in DATASHEET_TFLOPS.items():  # "H100 PCIe" before "H100": first match wins
        if name in device_kind:
            return 1e3 * peaks[dtype]
    return None


def measure_peak(sizes=None, repeats=7, dtype=jnp.float32) -> float:
    """The best matmul GFLOP/s this device reaches: fastest of `repeats` square jnp matmuls of each size.

    sizes: default (1024, 2048) on CPU and (4096, 8192) on an accelerator, whose smaller products are
    too short to reach its peak.

    The fastest run, not the median: a peak is what the hardware can do, and a shared machine only
    ever makes a run slower. With torch installed, its matmul counts too (oneDNN can beat XLA's
    Eigen on CPU), so `frac_peak` never flatters one library by using the other's slower GEMM.
    """
    if sizes is None:
        sizes = (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192)
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda a, b: a @ b)
        f(a, a).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    if jax.devices()[0].platform == "cpu" and dtype == jnp.float32:
        try:
            import torch
        except ImportError:
            return best
        for n in sizes:
            a = torch.ones(n, n)
            a @ a
            for _ in range(repeats):
                t = time.perf_counter()
                a @ a
                best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


# ------------------------------------------------------------------------------------------ FLOPs


def gpt_flops_per_step(n_params_no_pos: int, layers: int, d: int, ctx: int, batch: int, causal: bool = True) -> float:
    """Training FLOPs of one GPT step (forward + backward = 3x forward), PaLM's appendix B count:
    6N per token for the weight matmuls (N without the position table) plus attention's scores (q.k)
    and weighted sum (p.v): 2 FLOPs x d per query-key pair each, 4d per pair forward, 12d in training.
    PaLM (and nanoGPT) count T pairs per query, 12 * L * d * T per token. Under a causal mask query t
    meets t + 1 keys, T(T + 1)/2 pairs per sequence, and both jaxseq's attention and PyTorch's SDPA skip
    the masked half, so `causal=True` (the default) counts 12 * L * d * (T + 1) / 2 per token.
    Example: N = 0, L = 1, d = 2, T = 3, batch 1: 12 * 1 * 2 * 2 * 3 = 144 (full T x T: 216)."""
    pairs_per_token = (ctx + 1) / 2 if causal else ctx
    return (6 * n_params_no_pos + 12 * layers * d * pairs_per_token) * ctx * batch


# ------------------------------------------------------------------------------------------ timing


def timed_rounds(calls: dict, rounds: int, clocks=(time.perf_counter,), lead_in: int = 1) -> list[dict]:
    """Time every `calls[name]()` `rounds` times, the implementations interleaved: in each round each one
    runs `lead_in` untimed calls, then one timed call. Returns, per clock, {name: [seconds per call]}.

    Interleaving makes a busy shared machine slow every competitor alike. The untimed call in front is
    there because a library's worker threads keep spinning for a while after its call returns: a call
    timed right after another library's pays for that library's threads (on 2 cores a 4.4 ms jaxseq GRU
    call took 5.1 ms right after a PyTorch call, whose OpenMP threads spin on), while a call after its
    own library's finds that library's threads awake, as in a training loop.
    """
    out = [{name: [] for name in calls} for _ in clocks]
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(lead_in):
                call()
            start = [clock() for clock in clocks]
            call()
            for times, clock, t0 in zip(out, clocks, start):
                times[name].append(clock() - t0)
    return out


# ------------------------------------------------------------------------------------------ memory
# Each library's own account of one step's peak, in MiB: the arrays the step reads (parameters,
# inputs, optimizer state), the ones it returns, and its temporaries at their high point.


def jax_peak_mb(compiled) -> float | None:
    """Peak memory of one call of a compiled JAX program, as XLA plans it (`compiled` is
    `jax.jit(f).lower(*args).compile()`): arguments + outputs + the one block of temporaries XLA
    allocates per call, less the outputs that reuse a donated argument's buffer. None when the backend
    gives no memory analysis. A library fusion's own scratch (a YNNPACK matmul fused with its
    neighbours on CPU) is outside XLA's plan and not counted."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return round(total / 2**20, 2)


def torch_peak_mb(torch, call, device: str) -> float | None:
    """Peak memory of one `call()` on torch's allocator, counting the tensors it uses that existed
    before (parameters, inputs, optimizer state), as `jax_peak_mb` counts arguments.

    CUDA: `max_memory_allocated` after a reset (every live torch tensor on the device counts).
    CPU: the profiler's memory timeline (`profile_memory=True`), the only CPU account torch keeps:
    sizes of every tensor alive, by category, at each allocation; we take the largest total. None if
    this torch cannot build one (the timeline API is marked deprecated in torch 2.13)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / 2**20, 2)
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            call()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            path = os.path.join(tmp, "timeline.json")
            prof.export_memory_timeline(path, device="cpu")
            with open(path) as f:
                _, sizes = json.load(f)  # [times], [[bytes per category] per time]
    except Exception as err:  # an API change must not cost the timing run; the row says why
        print(f"torch_peak_mb: no CPU memory timeline ({type(err).__name__}: {err})", flush=True)
        return None
    return round(max(sum(row) for row in sizes) / 2**20, 2) if sizes else None


# Resident memory as the operating system sees it, the same account for every library: Linux's
# VmRSS (now) and VmHWM (the high-water mark, which writing "5" to /proc/self/clear_refs resets).
# A process keeps memory another competitor freed, so each RSS row runs one competitor alone in a
# fresh process (`memory.py`); within it, the mark is reset once everything is built, so the peak
# covers that competitor's calls, on top of what importing both libraries and building took.


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """The process's resident memory now, in MiB (None off Linux)."""
    return _proc_status_mb("VmRSS")


def reset_peak_rss() -> float | None:
    """Restart the high-water mark of resident memory at the current RSS; returns that RSS in MiB.
    Call it right before a competitor's first call. None where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return rss_mb()


def peak_rss_mb() -> float | None:
    """The most resident memory since `reset_peak_rss()` (or since the process started), in MiB."""
    return _proc_status_mb("VmHWM")


def rss_fields(base_mb: float | None) -> dict:
    """What an RSS row records: `rss_base_mb` (after imports and building, before the first call),
    `rss_peak_mb` (the high-water mark since) and `rss_growth_mb` (their difference: what the calls took)."""
    peak = peak_rss_mb()
    growth = round(peak - base_mb, 1) if peak is not None and base_mb is not None else None
    return {"rss_base_mb": base_mb, "rss_peak_mb": peak, "rss_growth_mb": growth}
