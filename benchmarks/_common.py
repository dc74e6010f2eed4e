"""What the benchmark scripts share: the device's name and its measured float32 matmul peak."""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp


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


def measure_peak(sizes=(1024, 2048), repeats=7, dtype=jnp.float32) -> float:
    """The best matmul GFLOP/s this device reaches: fastest of `repeats` square jnp matmuls of each size.

    The fastest run, not the median: a peak is what the hardware can do, and a shared machine only
    ever makes a run slower. With torch installed, its matmul counts too (oneDNN can beat XLA's
    Eigen on CPU), so `frac_peak` never flatters one library by using the other's slower GEMM.
    """
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
