"""A/B of two builds of jaxseq's native RNN kernels in one process: the repo's `jaxseq/native/rnn_cpu.cc`
(A) against a variant source or extra compiler flags (B), the two jitted steps timed alternately.

How RNN attempt 27's build comparisons in benchmarks/README.md were made (tanh without a division,
2 MB pages, 12-row tiles, -march=native, ...): a change to the kernel is kept only if B beats A here.

    python benchmarks/native_ab.py --variant /tmp/rnn_cpu_variant.cc
    python benchmarks/native_ab.py --flags "-march=native" --cell gru --hidden 256 --modes train

Run it once without --variant and --flags (A against an identical B) to see the noise: on the 2-core
CPU, 0.985x-1.025x at hidden 256 (LSTM and GRU training), but 0.85x at hidden 128 (GRU), where the
steps are short; attempt 27's comparisons were made at 256 and 512.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jaxseq.native_lstm as native_lstm  # noqa: E402
from _common import timed_rounds  # noqa: E402
from jaxseq import native  # noqa: E402
from jaxseq.cells import GRU, LSTM  # noqa: E402
from jaxseq.native_gru import gru_sequence_native  # noqa: E402
from jaxseq.native_lstm import lstm_sequence_native  # noqa: E402


def register_variant(source: Path, flags: list[str], prefix: str = "variant") -> None:
    """Build the library with `source` in place of the repo's rnn_cpu.cc, with the repo's flags plus
    `flags`, and register its targets as `prefix_*`."""
    out = Path(tempfile.mkdtemp()) / "variant.so"
    sources = [str(source if p.name == "rnn_cpu.cc" else p) for p in native.SOURCES]
    include = [f"-I{jax.ffi.include_dir()}", f"-I{native.HERE}"]  # kernels.h for a source outside the package
    subprocess.run(["g++", *native.FLAGS, *flags, *include, *sources, "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    for name, symbol in native.TARGETS.items():
        jax.ffi.register_ffi_target(name.replace("jaxseq", prefix, 1), jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def step(cell_kind, hidden, mode, batch, length, d_in):
    """A jitted LSTM / GRU step on the native kernels (training: gradients of params and inputs), traced now."""
    cell = (LSTM if cell_kind == "lstm" else GRU)(d_in, hidden)
    run = lstm_sequence_native if cell_kind == "lstm" else gru_sequence_native
    params = cell.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (batch, length, d_in))
    w = jax.random.normal(jax.random.key(2), (batch, length, hidden))
    mask, resets = jnp.ones((batch, length), bool), jnp.zeros((batch, length), bool)
    carry = cell.initial_carry((batch,), jnp.float32)
    if mode == "train":
        fn = jax.jit(jax.grad(lambda p, x: jnp.sum(run(p, x, mask, carry, resets)[0] * w), argnums=(0, 1)))
    else:
        fn = jax.jit(lambda p, x: run(p, x, mask, carry, resets)[0])
    jax.block_until_ready(fn(params, xs))  # traces with the current TARGET_PREFIX
    return lambda: jax.block_until_ready(fn(params, xs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", type=Path, default=native.HERE / "rnn_cpu.cc", help="B's rnn_cpu.cc (default: the repo's)")
    ap.add_argument("--flags", default="", help="extra compiler flags for B")
    ap.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    ap.add_argument("--hidden", default="256,512")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.unavailable_reason()}")
    register_variant(args.variant, args.flags.split())
    for hidden in map(int, args.hidden.split(",")):
        for mode in args.modes.split(","):
            calls = {}
            for name, prefix in (("A", "jaxseq"), ("B", "variant")):
                native_lstm.TARGET_PREFIX = prefix
                calls[name] = step(args.cell, hidden, mode, args.batch, args.length, args.d_in)
            native_lstm.TARGET_PREFIX = "jaxseq"
            (times,) = timed_rounds(calls, args.repeats)
            a, b = (statistics.median(times[k]) for k in "AB")
            print(f"{args.cell} {hidden} {mode}: A {1e3 * a:.1f} ms, B {1e3 * b:.1f} ms, B/A time {b / a:.3f}", flush=True)


if __name__ == "__main__":
    main()
