"""A/B of two builds of jaxseq's native kernels in one process: the repo's `jaxseq/kernels/cpu/rnn_cpu.cc` or
`attention_cpu.cc` (A) against a variant of that source or extra compiler flags (B), the two jitted
steps timed alternately.

How the native kernels' build comparisons in benchmarks/README.md ("Measurement history") are made
(tanh without a division, 2 MB pages, 12-row tiles, -march=native, the attention's thread split, ...): a
change to a kernel is kept only if B beats A here.

    python benchmarks/native_ab.py --variant /tmp/rnn_cpu_variant.cc
    python benchmarks/native_ab.py --flags "-march=native" --cell gru --hidden 256 --modes train
    python benchmarks/native_ab.py --cell attention --variant /tmp/attention_cpu_variant.cc --lengths 1024,4096

Run it once without --variant and --flags (A against an identical B) to see the noise: on the 2-core
CPU, 0.985x-1.025x at hidden 256 (LSTM and GRU training), but 0.85x at hidden 128 (GRU), where the
steps are short; the RNN kernels' comparisons were made at 256 and 512.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_record, setup_process, timed_rounds  # noqa: E402
from jaxseq.cells import GRU, LSTM  # noqa: E402
from jaxseq.kernels import cpu as native  # noqa: E402
from jaxseq.kernels.cpu.attention import native_attention  # noqa: E402
from jaxseq.kernels.cpu.rnn import gru_sequence_native, lstm_sequence_native  # noqa: E402


def register_variant(source: Path, replaces: str, flags: list[str], prefix: str = "variant") -> None:
    """Build the library with `source` in place of the repo's `replaces` (a file name of native.SOURCES),
    with the repo's flags plus `flags`, and register its targets as `prefix_*`."""
    out = Path(tempfile.mkdtemp()) / "variant.so"
    sources = [str(source if p.name == replaces else p) for p in native.SOURCES]
    include = [f"-I{jax.ffi.include_dir()}", f"-I{native.HERE}"]  # kernels.h for a source outside the package
    done = subprocess.run(["g++", *native.FLAGS, *flags, *include, *sources, "-o", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"building the variant failed:\n{done.stderr[-3000:]}")
    lib = ctypes.CDLL(str(out))
    for name, symbol in native.TARGETS.items():
        jax.ffi.register_ffi_target(name.replace("jaxseq", prefix, 1), jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def attention_step(mode, batch, length, heads=4, head_dim=64):
    """A jitted causal attention call on the native kernel (training: output and gradients of q, k, v)."""
    q, k, v, g = (jax.random.normal(jax.random.key(i), (batch, length, heads, head_dim)) for i in range(4))

    def train(q, k, v, g):
        out, vjp = jax.vjp(lambda q, k, v: native_attention(q, k, v, causal=True), q, k, v)
        return (out,) + vjp(g)

    fn = jax.jit(train if mode == "train" else lambda q, k, v, g: native_attention(q, k, v, causal=True))
    jax.block_until_ready(fn(q, k, v, g))  # traces with the current TARGET_PREFIX
    return lambda: jax.block_until_ready(fn(q, k, v, g))


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
    ap.add_argument("--cell", choices=("lstm", "gru", "attention"), default="lstm")
    ap.add_argument("--variant", type=Path, default=None,
                    help="B's rnn_cpu.cc (lstm, gru) or attention_cpu.cc (attention); default: the repo's")
    ap.add_argument("--flags", default="", help="extra compiler flags for B")
    ap.add_argument("--hidden", default="256,512", help="lstm, gru")
    ap.add_argument("--lengths", default="1024,4096", help="attention (batch 8 unless --batch, 4 heads x 64, causal)")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (lstm, gru), 8 (attention)")
    ap.add_argument("--length", type=int, default=128, help="lstm, gru")
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default malloc")
    args = ap.parse_args()
    process = setup_process(args.system_malloc)  # before JAX's first computation, as every benchmark
    print(json.dumps({"bench": "native_ab", **run_record(**process)}), flush=True)
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.unavailable_reason()}")
    attention = args.cell == "attention"
    source = "attention_cpu.cc" if attention else "rnn_cpu.cc"
    register_variant(args.variant or native.HERE / source, source, args.flags.split())
    batch = args.batch or (8 if attention else 32)
    for size in map(int, (args.lengths if attention else args.hidden).split(",")):
        for mode in args.modes.split(","):
            calls = {}
            for name, prefix in (("A", "jaxseq"), ("B", "variant")):
                native.TARGET_PREFIX = prefix
                calls[name] = (attention_step(mode, batch, size) if attention
                               else step(args.cell, size, mode, batch, args.length, args.d_in))
            native.TARGET_PREFIX = "jaxseq"
            (times,) = timed_rounds(calls, args.repeats)
            a, b = (statistics.median(times[k]) for k in "AB")
            spread = ", ".join(f"{k} {1e3 * min(times[k]):.1f}-{1e3 * max(times[k]):.1f} ms" for k in "AB")
            print(f"{args.cell} {size} {mode}: A {1e3 * a:.1f} ms, B {1e3 * b:.1f} ms, B/A time {b / a:.3f} "
                  f"(min-max: {spread})", flush=True)


if __name__ == "__main__":
    main()
