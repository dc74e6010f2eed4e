"""XLA compile options for jaxseq's jitted steps: which library runs the matmuls on CPU.

Why: XLA:CPU (jax 0.10) runs a batched matmul, an einsum with a batch axis such as attention's per-head
q k^T and p v, on one thread, inside loops and out, whatever the batch. Its experimental YNNPACK dot
fusion runs the same matmuls on every core. Measured on the 2-core CPU (benchmarks/README.md,
"Measurement history"): a loop of per-head attention matmuls runs 2.9x faster, and the GPT train step at d 256 /
context 256 runs 1.46x faster. The fused recurrences lose with it as a whole (the LSTM's training step
at hidden 256: 47.9k -> 38.7k tokens/s), although a bare loop of their per-step matmul gains. So the
choice is made per model: a model class that sets `batched_matmuls = True` (the Transformers) gets
YNNPACK dots, others keep XLA's own. (XLA's default already runs single, unbatched matmuls in YNNPACK; adding those and its
reductions to the list lost for attention, 22k against 35k tokens/s at length 1024.)
Since the native attention kernel (`jaxseq.kernels.cpu.attention`) took attention's per-head matmuls out of
XLA on a single-device CPU, the GPT step runs 1-3% faster with XLA's own dots, which is inside the
noise (benchmarks/README.md, "Measurement history"). The choice stands, for the programs where attention
still runs in XLA (sharded steps, other dtypes, head sizes the kernel does not take).

The option goes to `jax.jit(..., compiler_options=...)`, so it applies to that one program and
nothing else in the process. On GPU and TPU these functions return {}.

    step = jax.jit(step_fn, compiler_options=compiler_options(model))
"""

from __future__ import annotations

import functools
from typing import get_args

import jax
import jax.numpy as jnp

from jaxseq.config import CpuDots
from jaxseq.errors import ConfigError

CPU_DOTS = get_args(CpuDots)
YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def ynn_dots_available() -> bool:
    """Does this XLA accept the YNNPACK dot option? (An older or newer XLA may lack or rename it.)"""
    try:
        jax.jit(lambda x: x @ x, compiler_options=YNN_DOTS).lower(jnp.ones((2, 2), jnp.float32)).compile()
    except Exception:  # XLA rejects an unknown option or enum value with a runtime error at compile
        return False
    return True


def compiler_options(model=None, cpu_dots: CpuDots = "auto") -> dict:
    """`compiler_options` for jitting `model`'s train or eval step.

    cpu_dots: "auto" uses YNNPACK dots on CPU when `model` sets `batched_matmuls = True`; "ynn" uses them
    for any model; "xla" keeps XLA's defaults (batched matmuls in its own emitter). Off CPU the result is
    always {}.
    """
    if cpu_dots not in CPU_DOTS:
        raise ConfigError(f"cpu_dots must be one of {CPU_DOTS}, got {cpu_dots!r}.")
    if jax.default_backend() != "cpu" or cpu_dots == "xla":
        return {}
    if cpu_dots == "auto" and not getattr(model, "batched_matmuls", False):
        return {}
    if not ynn_dots_available():
        if cpu_dots == "ynn":
            raise ConfigError(
                f"cpu_dots='ynn', but this XLA (jax {jax.__version__}) rejects {YNN_DOTS}; use cpu_dots='auto' or 'xla'."
            )
        return {}
    return dict(YNN_DOTS)
