"""The fast paths, each an implementation of math defined elsewhere, and their dispatch tables.

    fused_rnn        whole-sequence Elman/LSTM/GRU with a hand-written backward pass, in XLA
    cudnn_lstm       the LSTM on cuDNN (GPU)
    cpu/             native C++ kernels (AVX-512), built on first use: LSTM/GRU loops, flash attention
    flash_attention  blockwise attention in JAX with its own backward pass
    parallel_scan    the linear cells' associative-scan form
    dispatch         one table per mechanism ("recurrence", "attention"), the policy, recording

`jaxseq.unroll(..., kernels=)` and `jaxseq.attention(..., kernels=)` choose through the tables;
`explain` says what a traced function chose.
"""

from __future__ import annotations

import jax

from jaxseq.kernels.dispatch import POLICIES, check_policy, describe, recording

__all__ = ["POLICIES", "check_policy", "describe", "explain", "explain_unroll"]


def explain(fn, *args, **kwargs) -> dict[str, str]:
    """Which implementation each mechanism takes in `fn(*args, **kwargs)`: traces it once with
    `jax.eval_shape` (nothing runs) and returns e.g. {"recurrence": "cpu-native-lstm", "attention":
    "xla"}; several choices for one mechanism are joined with ", " in first-seen order, and mechanisms
    not used are absent. args may be arrays or `jax.ShapeDtypeStruct`s. A function that JAX has already
    traced under `jax.jit` with the same shapes is served from its cache and records nothing: pass the
    function un-jitted.
    """
    with recording() as rec:
        jax.eval_shape(fn, *args, **kwargs)
    return {mechanism: ", ".join(names) for mechanism, names in rec.items()}


def explain_unroll(cell, xs, *, mask=None, resets=None, kernels: str = "auto") -> dict[str, str]:
    """`explain` for `jaxseq.unroll(cell, params, xs, mask=, resets=, kernels=)` with the cell's own
    (abstract) parameters: xs [B, T, d_in] an array or a `jax.ShapeDtypeStruct`."""
    from jaxseq.scan import unroll  # scan asks this package's table: imported when called

    params = jax.eval_shape(cell.init, jax.random.key(0))
    run = lambda p, x, m, r: unroll(cell, p, x, mask=m, resets=r, kernels=kernels)  # noqa: E731
    return explain(run, params, xs, mask, resets)
