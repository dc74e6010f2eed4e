"""Keep the memory a process frees for its next step, instead of handing it back to the OS (glibc only).

Why: XLA:CPU allocates a step's buffers afresh on every call. Under glibc's defaults the large ones
(and all of them on XLA's worker threads, whose malloc arenas hold at most 64 MB) are mapped anew each
time and returned to the OS when freed, so every page is faulted in and zeroed again on every step: at
the GPT train step of benchmarks/gpt_step.py (d 256, context 256, batch 16) that was ~71k page faults,
~280 MB, ~100 ms of a ~790 ms step (benchmarks/README.md, "Measurement history"). With one arena, a 1 GB
mmap threshold and a 2 GB trim threshold, the heap keeps what a step frees and the next step reuses it:
no faults after the first few steps (glibc still maps a buffer afresh now and then).

The price: the process holds on to its peak heap (up to 2 GB of free memory) rather than giving it back
between steps, which a training run reaches on every step anyway. The setting is process-wide and only
applies to arenas a thread picks afterwards, so it must run before JAX's first computation; `jaxseq
train`, `sample` and `eval` call it first thing, unless JAXSEQ_MALLOC=system is set.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 1 << 30  # requests below this come from the heap, so they are reused
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top returns to the OS only beyond this (int max)


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory across steps; True when applied.

    Does nothing (False) off glibc or when JAXSEQ_MALLOC=system. Call it before JAX runs anything: a
    thread that has already allocated keeps its own arena.
    """
    if os.environ.get("JAXSEQ_MALLOC", "") == "system" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(mallopt(param, value) == 1 for param, value in settings)
