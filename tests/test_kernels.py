"""The dispatch tables (jaxseq.kernels.dispatch): every implementation the table can choose on this machine
agrees with the reference (outputs, carries and gradients; masks with holes, an empty row and resets for
the recurrence; causal, key padding, offsets and grouped heads for attention), `explain` names the
choice, and the policy is checked.

The kernels' own edge cases live beside them (test_fused_rnn, test_native_rnn, test_flash_attention,
test_native_attention, test_linear_cells); here each is reached through its table entry.
"""

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq.attention import attention
from jaxseq.cells import GRU, LSTM, Elman, stack
from jaxseq.errors import ConfigError
from jaxseq.kernels import POLICIES, cpu, dispatch, explain, explain_unroll
from jaxseq.linear_cells import LRU, MinGRU, MinLSTM
from jaxseq.models.rnn_lm import RecurrentLM
from jaxseq.nn import Recurrent
from jaxseq.models.transformer import TransformerLM
from jaxseq.scan import StepOnly, reference_recurrence, unroll

B, T = 5, 7

# ------------------------------------------------------------------------------------------ recurrence

CELLS = {
    "elman-tanh": Elman(8, 32),
    "elman-relu": Elman(8, 32, nonlinearity="relu"),
    "lstm-128": LSTM(16, 128),  # hidden % 32 == 0: the native kernels can run it
    "gru-128": GRU(16, 128),
    "lstm-24": LSTM(8, 24),
    "gru-24": GRU(8, 24),
    "mingru": MinGRU(8, 16),
    "minlstm": MinLSTM(8, 16, norm=True),
    "lru": LRU(8, 16, glu=True),
}


def _recurrence_call(cell):
    params = jax.eval_shape(cell.init, jax.random.key(0))
    xs = jax.ShapeDtypeStruct((B, T, cell.d_in), jnp.float32)
    return dispatch.RecurrenceCall(cell, params, xs, None, None)


RECURRENCE_PAIRS = [
    pytest.param(case, e.name, id=f"{case}-{e.name}")
    for case, cell in CELLS.items()
    for e in dispatch.supported("recurrence", _recurrence_call(cell))
    if e.run is not None
]


def _recurrence_problem(cell, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    params = cell.init(k[0])
    xs = jax.random.normal(k[1], (B, T, cell.d_in))
    mask = np.array(jax.random.uniform(k[2], (B, T)) > 0.25)
    mask[1] = False  # an empty row
    mask[2] = np.arange(T) < 4  # right padding
    resets = jnp.asarray(jax.random.uniform(k[3], (B, T)) > 0.8)
    carry0 = jax.tree.map(lambda c: jax.random.normal(k[4], c.shape), cell.initial_carry((B,), jnp.float32))
    w = jax.random.normal(k[5], (B, T, cell.d_out))
    return params, xs, jnp.asarray(mask), resets, carry0, w


def _values_and_grads(run, w):
    def loss(p, x, c):
        ys, carry = run(p, x, c)
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(carry))

    return jax.jit(lambda p, x, c: (run(p, x, c), jax.grad(loss, argnums=(0, 1, 2))(p, x, c)))


def _close(got, want, tol=2e-5):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=tol, atol=tol)


def test_every_recurrent_cell_class_has_a_fast_path_here():
    assert {name for case, name in (p.values for p in RECURRENCE_PAIRS)} >= {"fused-xla", "parallel-scan"}


@pytest.mark.parametrize("case, name", RECURRENCE_PAIRS)
def test_recurrence_entry_matches_the_reference(case, name):
    cell = CELLS[case]
    params, xs, mask, resets, carry0, w = _recurrence_problem(cell)
    entry = next(e for e in dispatch.supported("recurrence", _recurrence_call(cell)) if e.name == name)
    with jax.default_matmul_precision("highest"):
        got = _values_and_grads(lambda p, x, c: entry.run(cell, p, x, mask, c, resets, 1), w)(params, xs, carry0)
        want = _values_and_grads(lambda p, x, c: reference_recurrence(cell, p, x, mask, c, resets, 1), w)(
            params, xs, carry0)
    _close(got, want)


@pytest.mark.parametrize("case", ["lstm-128", "gru-24", "lru"])
def test_unroll_auto_matches_reference_in_reverse(case):
    """Through `unroll` (the reverse permutation happens before the table's choice)."""
    cell = CELLS[case]
    params, xs, mask, resets, carry0, w = _recurrence_problem(cell, seed=1)

    def run(kernels):
        return lambda p, x, c: unroll(cell, p, x, mask=mask, carry=c, resets=resets, reverse=True, kernels=kernels)

    with jax.default_matmul_precision("highest"):
        _close(_values_and_grads(run("auto"), w)(params, xs, carry0), _values_and_grads(run("reference"), w)(
            params, xs, carry0))


# ------------------------------------------------------------------------------------------- attention

FORCE = {"cpu-native-flash": "native", "flash-jax": "flash", "cudnn": "cudnn"}
ATTENTION_CASES = {
    # name: (T, S, H, Hkv, d, causal, padding, q_offset)
    "causal": (80, 80, 2, 2, 32, True, False, 0),
    "causal, padding, GQA": (70, 70, 4, 2, 32, True, True, 0),
    "cross, padding": (33, 65, 2, 1, 32, False, True, 0),
    "causal, per-row offsets": (9, 72, 2, 2, 32, True, False, np.array([40, 63], np.int32)),
}


def _attention_problem(case, seed=0):
    T, S, H, Hkv, d, causal, padding, q_offset = ATTENTION_CASES[case]
    rng = np.random.RandomState(seed)
    q, g = (jnp.asarray(rng.standard_normal((2, T, H, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((2, S, Hkv, d)), jnp.float32) for _ in range(2))
    mask = None
    if padding:
        mask = rng.rand(2, S) > 0.3
        mask[:, 0], mask[1, :] = True, mask[1, :] & (np.arange(S) < S // 2)
        mask = jnp.asarray(mask)
    return q, k, v, g, mask, causal, q_offset


def _attention_call(case):
    q, k, v, _, mask, causal, _ = _attention_problem(case)
    return dispatch.AttentionCall(q, k, v, mask, causal, None)


ATTENTION_PAIRS = [
    pytest.param(case, e.name, id=f"{case}-{e.name}")
    for case in ATTENTION_CASES
    for e in dispatch.supported("attention", _attention_call(case))
    if e.name != "xla"
]


@pytest.mark.parametrize("case, name", ATTENTION_PAIRS)
def test_attention_entry_matches_the_reference(case, name):
    q, k, v, g, mask, causal, q_offset = _attention_problem(case)

    def run(**kw):
        fn = lambda q, k, v: attention(q, k, v, mask=mask, causal=causal, q_offset=q_offset, **kw)  # noqa: E731
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    with jax.default_matmul_precision("highest"):
        _close(run(implementation=FORCE[name]), run(kernels="reference"))


def test_every_attention_case_has_a_blockwise_path_here():
    assert all(name == "flash-jax" or name in FORCE for _, name in (p.values for p in ATTENTION_PAIRS))
    assert {name for _, name in (p.values for p in ATTENTION_PAIRS)} >= {"flash-jax"}


# --------------------------------------------------------------------------------------------- explain

X = jax.ShapeDtypeStruct((4, 16, 32), jnp.float32)


def test_explain_lstm_256_takes_the_native_kernels_when_built_else_fused():
    want = "cpu-native-lstm" if cpu.available() and jax.device_count() == 1 else "fused-xla"
    assert explain_unroll(LSTM(32, 256), X) == {"recurrence": want}


def test_explain_gru_64_is_fused_under_min_hidden():
    assert explain_unroll(GRU(32, 64), X) == {"recurrence": "fused-xla"}


@pytest.mark.parametrize("cell", [LSTM(32, 256), GRU(32, 64), MinGRU(32, 64), Elman(32, 8)])
def test_explain_reference_policy(cell):
    assert explain_unroll(cell, X, kernels="reference") == {"recurrence": "reference"}
    assert explain_unroll(StepOnly(cell), X) == {"recurrence": "reference"}


def test_explain_joins_several_choices_in_first_seen_order():
    cell = stack([GRU(32, 64), MinGRU(64, 64), GRU(64, 64)])
    assert explain_unroll(cell, X, mask=jnp.ones((4, 16), bool)) == {"recurrence": "fused-xla, parallel-scan"}
    assert explain(lambda x: x * 2, X) == {}


def test_explain_through_model_apply_and_grad():
    tokens = jnp.zeros((2, 16), jnp.int32)
    rnn = RecurrentLM(vocab_size=11, cell=GRU(8, 64), d_embed=8)
    variables = jax.eval_shape(rnn.init, jax.random.key(0), tokens)

    def loss(model):
        return lambda v, t: jax.grad(lambda v: jnp.sum(model.apply(v, t)))(v)

    assert explain(loss(rnn), variables, tokens) == {"recurrence": "fused-xla"}
    assert explain(loss(rnn.clone(kernels="reference")), variables, tokens) == {"recurrence": "reference"}
    gpt = TransformerLM(vocab_size=11, num_layers=1, num_heads=2, d_model=64, d_ff=64, max_len=16)
    gvars = jax.eval_shape(gpt.init, jax.random.key(0), tokens)
    assert explain(loss(gpt), gvars, tokens) == {"attention": "xla"}  # 16 tokens: below every threshold
    assert explain(loss(gpt.clone(kernels="reference")), gvars, tokens) == {"attention": "xla"}


def test_recording_nests_and_is_thread_local():
    seen = {}
    with dispatch.recording() as outer:
        inner = explain_unroll(GRU(32, 64), X)
        thread = threading.Thread(target=lambda: seen.update(explain_unroll(MinGRU(32, 64), X)))
        thread.start()
        thread.join()
    assert inner == {"recurrence": "fused-xla"} and outer == {"recurrence": ["fused-xla"]}
    assert seen == {"recurrence": "parallel-scan"}


# ---------------------------------------------------------------------------------------------- policy


def test_policies_and_bad_policy_raise_config_error():
    assert POLICIES == ("auto", "reference")
    cell = GRU(4, 8)
    params = cell.init(jax.random.key(0))
    with pytest.raises(ConfigError, match="kernels must be one of"):
        unroll(cell, params, jnp.ones((1, 3, 4)), kernels="fast")
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ConfigError, match="kernels must be one of"):
        attention(q, q, q, kernels="cudnn")
    with pytest.raises(ConfigError, match="contradicts implementation='flash'"):
        attention(q, q, q, kernels="reference", implementation="flash")
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ConfigError, match="kernels"):
        RecurrentLM(vocab_size=5, cell=cell, d_embed=4, kernels="Auto").init(jax.random.key(0), tokens)
    with pytest.raises(ConfigError, match="kernels"):
        TransformerLM(vocab_size=5, num_layers=1, num_heads=1, d_model=8, d_ff=8, kernels="x").init(
            jax.random.key(0), tokens)


def test_recurrent_module_passes_the_policy():
    xs = jnp.ones((2, 3, 4))
    module = Recurrent(GRU(4, 8), kernels="reference")
    variables = module.init(jax.random.key(0), xs)
    assert explain(lambda v: module.apply(v, xs), variables) == {"recurrence": "reference"}
    assert isinstance(module, nn.Module)


def test_no_import_cycles_in_jaxseq():
    """Top-level and function-level imports between jaxseq's modules form no cycle (a module's implicit
    import of its parent package is not an edge: it runs first and cannot close a loop by itself)."""
    import ast
    from pathlib import Path

    root = Path(jaxseq.__file__).resolve().parents[1]
    mods = {}
    for p in (root / "jaxseq").rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m:
                    graph[m].add(n)

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    assert not [m for m in graph if reaches(m, m, set())]
    # The cores ask the tables; cells and models import no backend.
    assert graph["jaxseq.scan"] & {m for m in mods if m.startswith("jaxseq.kernels")} == {"jaxseq.kernels.dispatch"}
    for m in ("jaxseq.cells", "jaxseq.linear_cells", "jaxseq.nn", "jaxseq.models.transformer", "jaxseq.models.encdec",
              "jaxseq.models.rnn_lm"):
        assert not any(n.startswith("jaxseq.kernels") for n in graph[m]), m
