"""jaxseq's native CPU kernels: C++ compiled on first use, loaded and registered as XLA FFI targets.

Written by hand because no library offers these operations on CPU: `rnn_cpu.cc` holds the LSTM's and
the GRU's recurrent loops (wrapped by `jaxseq.kernels.cpu.rnn`), `attention_cpu.cc` FlashAttention-2's
forward and backward (`jaxseq.kernels.cpu.attention`), for x86-64 CPUs with AVX-512, built from the
tiles and threads of `kernels.h` and `pool.h`. They are compiled into one library the first time a
process asks for it, with the C++ compiler in `$CXX` (default `g++`) against the XLA FFI headers that
jaxlib ships, into a cache folder (`$JAXSEQ_CACHE_DIR`, default `~/.cache/jaxseq`) under a name that
hashes the sources, the flags and the jaxlib version, so later processes load it in milliseconds.
Nothing here is needed: when the CPU lacks AVX-512, no compiler is found or the build fails,
`available()` is False (the reason is in `unavailable_reason()`), the dispatch table
(`jaxseq.kernels.dispatch`) finds the native entries ineligible and runs the XLA paths instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

HERE = Path(__file__).parent
SOURCES = [HERE / "rnn_cpu.cc", HERE / "attention_cpu.cc"]
HEADERS = [HERE / "kernels.h", HERE / "pool.h"]
# Explicit ISA flags rather than -march=native: the library may be built on one machine of a cluster
# and loaded on another; `_cpu_supported` checks these features before anything is loaded.
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512dq", "-mfma", "-mavx2", "-pthread"]
TARGETS = {
    "jaxseq_lstm_fwd": "JaxseqLstmFwd", "jaxseq_lstm_infer": "JaxseqLstmInfer", "jaxseq_lstm_bwd": "JaxseqLstmBwd",
    "jaxseq_gru_fwd": "JaxseqGruFwd", "jaxseq_gru_infer": "JaxseqGruInfer", "jaxseq_gru_bwd": "JaxseqGruBwd",
    "jaxseq_attention_fwd": "JaxseqAttentionFwd", "jaxseq_attention_bwd": "JaxseqAttentionBwd",
}
_REASON: list[str] = []
# The FFI targets' prefix, read when a call is traced (benchmarks/native_ab.py registers a variant build
# under another and switches between the two).
TARGET_PREFIX = "jaxseq"


def _cpu_supported() -> str | None:
    """None when this CPU runs the kernels, else why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the native kernels are built for x86-64 Linux (this is {platform.system()} {platform.machine()})"
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "could not read the CPU's flags from /proc/cpuinfo"
    missing = [f for f in ("avx512f", "avx512dq", "fma", "avx2") if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _cache_dir() -> Path:
    return Path(os.environ.get("JAXSEQ_CACHE_DIR") or Path.home() / ".cache" / "jaxseq") / "native"


def _build(compiler: str) -> Path:
    """Compile SOURCES (once per sources, flags and jaxlib version) and return the library's path."""
    import jaxlib

    text = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + jaxlib.__version__.encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # One compiler per source, side by side (13 -> 9 s on 2 cores), then one link.
        include = f"-I{jax.ffi.include_dir()}"
        objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        compiles = [[compiler, *FLAGS, "-c", include, str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objects)]
        logs = [open(Path(tmp) / f"{src.stem}.log", "w+") for src in SOURCES]  # files: a full pipe cannot stall a build
        procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) for cmd, log in zip(compiles, logs)]
        codes = [proc.wait() for proc in procs]  # all of them, before anything leaves this directory
        for cmd, code, log in zip(compiles, codes, logs):
            log.seek(0)
            output = log.read()
            log.close()
            if code != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-2000:]}")
        out = Path(tmp) / target.name
        link = [compiler, *FLAGS, *map(str, objects), "-o", str(out)]
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(link)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a process building beside this one finds a whole file or none
    return target


@functools.cache
def _load() -> ctypes.CDLL | None:
    if (why := _cpu_supported()) is not None:
        _REASON.append(why)
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        _REASON.append(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 -- any failure means: use the XLA path
        _REASON.append(f"building or loading {', '.join(p.name for p in SOURCES)} failed: {e}")
        warnings.warn(f"jaxseq: native kernels unavailable, using the XLA path ({_REASON[-1][:300]})", stacklevel=3)
        return None
    return lib


def on_single_cpu() -> bool:
    """Whether a program runs on the CPU backend with one device: where the kernels apply (a sharded
    program keeps XLA's ops, which XLA can partition)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def available() -> bool:
    """True when the native CPU kernels are built, loaded and registered (builds them on first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    return None if available() else _REASON[-1]


def f32(*shape) -> jax.ShapeDtypeStruct:
    """A float32 result of a kernel call."""
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def call(target: str, outs, *args, aliases=None, **attrs):
    """Call the kernel `target` (named with the "jaxseq" prefix; `TARGET_PREFIX` replaces it) on args.

    vmap runs the kernel once per example; `aliases` maps inputs to the results that reuse their buffer.
    """
    fn = jax.ffi.ffi_call(target.replace("jaxseq", TARGET_PREFIX, 1), outs, vmap_method="sequential",
                          input_output_aliases=aliases or {})
    return fn(*args, **attrs)
