"""One dispatch table per mechanism: which implementation of the same math runs a call.

`jaxseq.unroll` asks `RECURRENCE` for each leaf cell (after `Stack` and `Bidirectional` are
split); `jaxseq.attention` asks `ATTENTION`. An `Entry` has a name, `supports(call)` (what it
can compute exactly: cell class, dtypes, shapes, masks, backend, device count), `gains(call)`
(the measured thresholds above which "auto" prefers it) and `run`. `run=None` marks the
entry point's own implementation: the reference `lax.scan` of `cell.step` in scan.py
("reference"), the dense path in attention.py on XLA ("xla", the reference) or cuDNN
("cudnn"). The first entry that supports and gains wins; the reference is always last.

The policy (`kernels=`) is part of a run's config: "auto" takes the table, "reference" the
reference path for everything. While a call is traced the entry points `record` their
choice, and `jaxseq.kernels.explain` collects it (thread-local, nestable).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxseq.cells import GRU, LSTM, Elman
from jaxseq.errors import ConfigError
from jaxseq.kernels import cpu, cudnn_lstm, fused_rnn, parallel_scan
from jaxseq.kernels.cpu import attention as cpu_attention
from jaxseq.kernels.cpu import rnn as cpu_rnn
from jaxseq.kernels.flash_attention import flash_attention
from jaxseq.linear_cells import LRU, MinGRU, MinLSTM

POLICIES = ("auto", "reference")


def check_policy(kernels) -> str:
    if kernels not in POLICIES:
        raise ConfigError(f"kernels must be one of {POLICIES} ('auto': the fastest eligible implementation, "
                          f"'reference': the reference path everywhere), got {kernels!r}.")
    return kernels


class Entry(NamedTuple):
    name: str
    rule: str  # the eligibility rule in words (printed by `describe`)
    supports: Callable[[Any], bool]
    run: Callable | None  # None: the entry point's own implementation
    gains: Callable[[Any], bool] = lambda call: True


def _always(call) -> bool:
    return True


# ------------------------------------------------------------------------------------------ recurrence


class RecurrenceCall(NamedTuple):
    """One leaf cell over xs [B, T, d_in] (forward time); mask, resets bool [B, T]."""

    cell: Any
    params: Any
    xs: Any
    mask: Any
    resets: Any


def _is(*classes):
    # Exact classes: a subclass may redefine `step`, and `StepOnly` hides the class on purpose.
    return lambda call: type(call.cell) in classes


def _elman(cell, params, xs, mask, carry0, resets, unroll):
    return fused_rnn.elman_sequence(params, xs, mask, carry0, resets, unroll, nonlinearity=cell.nonlinearity)


def _fused(cell, params, xs, mask, carry0, resets, unroll):
    if type(cell) is Elman:
        return _elman(cell, params, xs, mask, carry0, resets, unroll)
    fn = fused_rnn.lstm_sequence if type(cell) is LSTM else fused_rnn.gru_sequence
    return fn(params, xs, mask, carry0, resets, unroll)


def _native(kind):
    fn = cpu_rnn.lstm_sequence_native if kind is LSTM else cpu_rnn.gru_sequence_native
    return lambda cell, params, xs, mask, carry0, resets, unroll: fn(params, xs, mask, carry0, resets)


def _cudnn(cell, params, xs, mask, carry0, resets, unroll):
    return cudnn_lstm.lstm_sequence_cudnn(params, xs, mask, carry0, resets, unroll)


def _min_cell(cell, params, xs, mask, carry0, resets, unroll):
    return parallel_scan.min_cell_sequence(cell, params, xs, mask, carry0, resets, unroll)


def _lru(cell, params, xs, mask, carry0, resets, unroll):
    return parallel_scan.lru_sequence(cell, params, xs, mask, carry0, resets, unroll)


def _native_rule(kind):
    return lambda call: _is(kind)(call) and cpu_rnn.native_supported(call.params, call.xs)


def _native_gains(call) -> bool:
    return call.params["w_hh"].shape[0] >= cpu_rnn.MIN_HIDDEN


# Entry signature: run(cell, params, xs, mask, carry0, resets, unroll) -> (ys, final carry).
RECURRENCE: tuple[Entry, ...] = (
    Entry("cpu-native-lstm", "LSTM; one CPU device; float32; hidden % 32 == 0; B, T > 0; kernels built; "
          f"auto from hidden >= MIN_HIDDEN ({cpu_rnn.MIN_HIDDEN})", _native_rule(LSTM), _native(LSTM), _native_gains),
    Entry("cpu-native-gru", "GRU; the same rule as cpu-native-lstm", _native_rule(GRU), _native(GRU), _native_gains),
    Entry("cudnn-lstm", "LSTM; GPU backend; float32 xs and weights (cuDNN at run time when every mask row is a "
          "prefix and no reset occurs, else fused-xla, one lax.cond)",
          lambda call: _is(LSTM)(call) and cudnn_lstm.cudnn_available(call.xs, call.params), _cudnn),
    Entry("fused-xla", "Elman, LSTM or GRU (any backend, dtype, mask, resets)", _is(Elman, LSTM, GRU), _fused),
    Entry("parallel-scan", "MinGRU or MinLSTM", _is(MinGRU, MinLSTM), _min_cell),
    Entry("parallel-scan", "LRU", _is(LRU), _lru),
    Entry("reference", "always: lax.scan of cell.step (jaxseq.scan.reference_recurrence)", _always, None),
)


# ------------------------------------------------------------------------------------------- attention


class AttentionCall(NamedTuple):
    """q [B, T, H, d], k, v [B, S, Hkv, d]; mask as given to `jaxseq.attention`."""

    q: Any
    k: Any
    v: Any
    mask: Any
    causal: bool
    bias: Any


# On CPU, flash_attention (blockwise, skips the causal masked half, own backward) beats the dense XLA
# lowering, forward + backward, from this many queries and keys on when causal, and from twice as many
# without the causal mask (measured, batch 8, 4 heads of 64, one core: causal 1.35x at 256 and 2.2x at
# 512, non-causal 1.0x at 256 and 1.7x at 512, slower below 256). On GPU cuDNN stays the choice.
FLASH_MIN_LEN = 256
# The native kernel is taken on a single-device CPU from this many queries and keys on (see
# the native kernel's entry under "Measurement history", causal attention, in benchmarks/README.md).
NATIVE_MIN_LEN = 64


def blockwise_expressible(call) -> bool:
    """Causal masking and/or a key-padding mask [B, S], no bias: what the blockwise kernels take."""
    return call.bias is None and (call.mask is None or jnp.ndim(call.mask) == 2)


def _min_len(call) -> int:
    return min(call.q.shape[1], call.k.shape[1])


def _native_attention_supports(call) -> bool:
    return blockwise_expressible(call) and cpu_attention.native_eligible(call.q, call.k, call.v)


def _flash_gains(call) -> bool:
    return jax.default_backend() == "cpu" and _min_len(call) >= (FLASH_MIN_LEN if call.causal else 2 * FLASH_MIN_LEN)


def _cudnn_attention_supports(call) -> bool:
    # cuDNN's fused kernel takes only half precision; when it still rejects the shapes at trace time the
    # entry point falls through to the next entry (xla).
    return jax.default_backend() == "gpu" and call.q.dtype in (jnp.bfloat16, jnp.float16)


# Entry signature: run(q, k, v, *, causal, key_padding_mask, q_offset, scale) -> out [B, T, H, d].
ATTENTION: tuple[Entry, ...] = (
    Entry("cpu-native-flash", "one CPU device; float32; head_dim % 32 == 0; causal and/or key padding, no bias; "
          f"kernels built; auto from NATIVE_MIN_LEN ({NATIVE_MIN_LEN}) queries and keys",
          _native_attention_supports, cpu_attention.native_attention, lambda call: _min_len(call) >= NATIVE_MIN_LEN),
    Entry("flash-jax", "causal and/or key padding, no bias (any backend); auto on CPU from FLASH_MIN_LEN "
          f"({FLASH_MIN_LEN}) queries and keys, twice that when not causal",
          blockwise_expressible, flash_attention, _flash_gains),
    Entry("cudnn", "GPU; bfloat16/float16; shapes cuDNN accepts at trace time (else the next entry)",
          _cudnn_attention_supports, None),
    Entry("xla", "always: the dense jax.nn.dot_product_attention path (the reference)", _always, None),
)

TABLES = {"recurrence": RECURRENCE, "attention": ATTENTION}
_FORCED = {"xla": "xla", "cudnn": "cudnn", "flash": "flash-jax", "native": "cpu-native-flash"}


def forced_attention(call, implementation: str) -> Entry:
    """The entry `jaxseq.attention(..., implementation=)` names, or a ConfigError saying why it cannot run."""
    chosen = entry("attention", _FORCED[implementation])
    if implementation in ("flash", "native") and not blockwise_expressible(call):
        raise ConfigError(
            f"implementation={implementation!r} takes causal masking and a key-padding mask [batch, keys] only; "
            "use implementation='xla' for a bias or a [B, T, S] / [B, H, T, S] mask."
        )
    if implementation == "native" and not chosen.supports(call):
        raise ConfigError(
            "implementation='native' needs float32 q, k, v with head_dim a multiple of 32 on a single-device "
            f"CPU backend, and the native kernels built ({cpu.unavailable_reason() or 'they are'}); "
            "use implementation='flash' or 'xla'."
        )
    return chosen


def candidates(mechanism: str, call, kernels: str = "auto") -> list[Entry]:
    """The entries "auto" may take for `call`, best first; the reference alone under "reference"."""
    table = TABLES[mechanism]
    if check_policy(kernels) == "reference":
        return [table[-1]]
    return [e for e in table if e.supports(call) and e.gains(call)]


def supported(mechanism: str, call) -> list[Entry]:
    """Every entry that can compute `call` exactly (what the tests hold against the reference)."""
    return [e for e in TABLES[mechanism] if e.supports(call)]


def entry(mechanism: str, name: str) -> Entry:
    return next(e for e in TABLES[mechanism] if e.name == name)


def describe() -> str:
    """The tables in words: one line per entry, in the order they are tried."""
    return "\n".join(f"{mech:10s} {e.name:17s} {e.rule}" for mech, table in TABLES.items() for e in table)


# ------------------------------------------------------------------------------------------- recording

_local = threading.local()


def record(mechanism: str, name: str) -> None:
    """Note that `mechanism` ran `name`, in every recorder open on this thread (a no-op when none is)."""
    for rec in getattr(_local, "stack", ()):
        names = rec.setdefault(mechanism, [])
        if name not in names:
            names.append(name)


@contextlib.contextmanager
def recording():
    """Collect the choices made while tracing inside the block: yields {mechanism: [names, first first]}."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    rec: dict[str, list[str]] = {}
    stack.append(rec)
    try:
        yield rec
    finally:
        stack.remove(rec)
