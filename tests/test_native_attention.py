"""The native CPU attention kernel (jaxseq/kernels/cpu/attention_cpu.cc) against a float64 NumPy softmax
attention: outputs and dq, dk, dv, with causal masks, offsets (static, traced, per row, negative), key
padding, grouped-query heads and lengths that are not a multiple of the kernel's 64-row blocks; and the
routing of `jaxseq.attention` to it. Only the tests that need the built kernel are skipped without it;
the fallback (the native entry ineligible) is tested on every machine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.attention import attention
from jaxseq.errors import ConfigError
from jaxseq.kernels import cpu, explain
from jaxseq.kernels.cpu.attention import native_attention, native_eligible
from test_flash_attention import TOL, assert_close, inputs, reference

needs_kernels = pytest.mark.skipif(not cpu.available(), reason=f"native kernels unavailable: {cpu.unavailable_reason()}")


@functools.partial(jax.jit, static_argnames=("kw",))
def _with_grads(q, k, v, g, extra, *, kw):
    out, vjp = jax.vjp(lambda q, k, v: native_attention(q, k, v, **dict(kw), **extra), q, k, v)
    return (out,) + vjp(g)


def native_and_grads(q, k, v, g, *, key_padding_mask=None, q_offset=0, **kw):
    extra = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
    if isinstance(q_offset, int):
        kw["q_offset"] = q_offset
    else:
        extra["q_offset"] = q_offset  # traced
    return _with_grads(q, k, v, g, extra, kw=tuple(sorted(kw.items())))


CASES = {
    # name: (B, T, S, H, Hkv, d, options)
    "causal, T = S = 150 (3 blocks, a tail)": (2, 150, 150, 2, 2, 64, dict(causal=True)),
    "causal, padding, GQA, head_dim 32": (2, 100, 100, 4, 2, 32, dict(causal=True, pad=True)),
    "cross attention, padding, MQA": (3, 37, 70, 2, 1, 64, dict(pad=True)),
    "non-causal, head_dim 128": (1, 65, 130, 2, 2, 128, dict()),
    "decoding a chunk, static offset": (2, 20, 90, 2, 2, 32, dict(causal=True, q_offset=70)),
    "ragged traced offsets [B]": (2, 9, 140, 4, 1, 32, dict(causal=True, q_offset=np.array([3, 131], np.int32))),
    "one query": (3, 1, 77, 2, 2, 32, dict(causal=True, q_offset=76, pad=True)),
    "negative offset: the first queries see nothing": (1, 64, 80, 1, 1, 32, dict(causal=True, q_offset=-10)),
}  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    B, T, S, H, Hkv, d, opts = CASES[name]
    opts = dict(opts)
    q, k, v, g = inputs(B, T, S, H, Hkv, d, seed=11)
    kpm = None
    if opts.pop("pad", False):
        kpm = np.random.RandomState(1).rand(B, S) > 0.3
        kpm[:, 0] = True
    offset = opts.pop("q_offset", 0)
    got = native_and_grads(q, k, v, g, key_padding_mask=kpm, q_offset=offset, **opts)
    assert got[0].shape == (B, T, H, d) and got[0].dtype == jnp.float32
    want = reference(q, k, v, g, causal=opts.get("causal", False), key_padding_mask=kpm, q_offset=offset)
    assert_close(got, want)


@needs_kernels
def test_queries_that_see_nothing_give_exact_zeros_and_zero_grads():
    """Row 0 has no valid key; row 1 is left-padded, so under causal masking its first 70 queries see nothing."""
    B, T, H, d = 2, 100, 2, 32
    q, k, v, g = inputs(B, T, T, H, H, d, seed=5)
    kpm = np.ones((B, T), bool)
    kpm[0] = False
    kpm[1, :70] = False
    got = native_and_grads(q, k, v, g, causal=True, key_padding_mask=kpm)
    out, dq, dk, dv = (np.asarray(x) for x in got)
    assert all(np.isfinite(x).all() for x in (out, dq, dk, dv))
    assert (out[0] == 0).all() and (out[1, :70] == 0).all() and (out[1, 70:] != 0).all()
    assert (dq[0] == 0).all() and (dq[1, :70] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert_close(got, reference(q, k, v, g, causal=True, key_padding_mask=kpm))


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 130, 4, 2), (1, 300, 1, 1)])  # (B, T, H, Hkv); one head: split by query block
def test_threads_give_bit_identical_results(monkeypatch, shape):
    """Each unit of work (the forward's query block, the backward's kv head) is computed by one thread in
    a fixed order, so the thread count changes nothing."""
    B, T, H, Hkv = shape
    q, k, v, g = inputs(B, T, T, H, Hkv, 32, seed=2)
    assert_thread_count_changes_nothing(monkeypatch, lambda: native_and_grads(q, k, v, g, causal=True))


def assert_thread_count_changes_nothing(monkeypatch, run):
    """run() -> arrays, called with the native kernels on 1 and on 3 threads: the results must be bit-identical."""
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("JAXSEQ_NATIVE_THREADS", threads)  # read by the kernels at each call
        results.append([np.asarray(x) for x in run()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@needs_kernels
def test_vmap_runs_per_example():
    q, k, v, _ = inputs(2, 70, 70, 2, 2, 32, seed=4)
    stacked = [np.stack([x, x[::-1] * 0.5]) for x in (q, k, v)]  # [2, B, T, H, d]
    got = jax.vmap(lambda q, k, v: native_attention(q, k, v, causal=True))(*stacked)
    for i in range(2):
        want = native_attention(*(x[i] for x in stacked), causal=True)
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=0, atol=0)


@needs_kernels
def test_attention_routes_to_native_on_cpu():
    B, T, H, d = 2, 80, 2, 32
    q, k, v, g = (jnp.asarray(x) for x in inputs(B, T, T, H, H, d, seed=6))
    kpm = jnp.asarray(np.random.RandomState(7).rand(B, T) > 0.2).at[:, 0].set(True)
    assert native_eligible(q, k, v)
    hlo = jax.jit(lambda q, k, v: attention(q, k, v, mask=kpm, causal=True)).lower(q, k, v).as_text()
    assert "jaxseq_attention_fwd" in hlo  # auto: the native kernel from NATIVE_MIN_LEN queries and keys
    assert explain(lambda q, k, v: attention(q, k, v, mask=kpm, causal=True), q, k, v) == {"attention": "cpu-native-flash"}
    xla_hlo = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, implementation="xla")).lower(q, k, v).as_text()
    assert "jaxseq_attention" not in xla_hlo
    auto = attention(q, k, v, mask=kpm, causal=True)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(attention(q, k, v, mask=kpm, causal=True, implementation="native")))
    np.testing.assert_allclose(np.asarray(auto), np.asarray(attention(q, k, v, mask=kpm, causal=True, implementation="xla")), **TOL)
    # below NATIVE_MIN_LEN (one decoding step) and with a bias the dense XLA op stays
    assert "jaxseq_attention" not in jax.jit(lambda q, k, v: attention(q[:, :1], k, v, causal=True, q_offset=T - 1)).lower(q, k, v).as_text()
    assert "jaxseq_attention" not in jax.jit(lambda q, k, v: attention(q, k, v, bias=jnp.zeros((B, H, T, T)))).lower(q, k, v).as_text()


def test_ineligible_calls_explain_why():
    q, k, v, _ = inputs(1, 64, 64, 2, 2, 8)
    assert not native_eligible(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))  # head_dim 8
    with pytest.raises(ConfigError, match="head_dim a multiple of 32"):
        attention(q, k, v, implementation="native")
    q, k, v, _ = inputs(1, 64, 64, 2, 2, 32)
    with pytest.raises(ConfigError, match="implementation='xla'"):
        attention(q, k, v, bias=jnp.zeros((1, 2, 64, 64)), implementation="native")
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    assert not native_eligible(*bf)  # float32 only; bfloat16 takes the XLA path
    assert attention(*bf, causal=True).dtype == jnp.bfloat16


def test_without_the_kernel_the_table_takes_flash_or_xla_with_the_reference_numbers(monkeypatch):
    """The native entry made ineligible (as without a compiler or AVX-512): flash-jax from FLASH_MIN_LEN, else XLA."""
    monkeypatch.setattr(cpu, "available", lambda: False)
    for T, name in ((80, "xla"), (256, "flash-jax")):
        q, k, v, g = (jnp.asarray(x) for x in inputs(1, T, T, 2, 2, 32, seed=3))
        run = lambda q, k, v, kernels="auto": attention(q, k, v, causal=True, kernels=kernels)  # noqa: E731
        assert explain(run, q, k, v) == {"attention": name}
        assert "jaxseq_attention" not in jax.jit(run).lower(q, k, v).as_text()
        got = jax.vjp(run, q, k, v)
        want = jax.vjp(functools.partial(run, kernels="reference"), q, k, v)
        assert_close([got[0], *got[1](g)], [np.asarray(x) for x in (want[0], *want[1](g))])
