"""flash_attention against a float64 NumPy softmax attention and PyTorch's SDPA: outputs and dq, dk, dv."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sys
from jaxseq.attention import attention
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.kernels.flash_attention import _Plan, flash_attention

TOL = dict(rtol=2e-5, atol=2e-5)  # float32 precision on O(1) values


def reference(q, k, v, g, *, causal=False, key_padding_mask=None, q_offset=0, scale=None):
    """float64 softmax attention and the gradients of sum(out * g): (out, dq, dk, dv), [B, T, H, d] layout."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    B, T, H, d = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    ke, ve = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # query head h uses kv head h // G
    allowed = np.ones((B, 1, T, S), bool)
    if key_padding_mask is not None:
        allowed &= np.asarray(key_padding_mask, bool)[:, None, None, :]
    if causal:
        q_pos = np.broadcast_to(np.asarray(q_offset), (B,))[:, None] + np.arange(T)  # [B, T]
        allowed &= (np.arange(S)[None, None, :] <= q_pos[:, :, None])[:, None]
    s = np.where(allowed, np.einsum("bthd,bshd->bhts", q, ke) * scale, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    z = e.sum(-1, keepdims=True)
    p = np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0)  # a row that sees nothing: p = 0, out = 0
    out = np.einsum("bhts,bshd->bthd", p, ve)
    dp = np.einsum("bthd,bshd->bhts", g, ve)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", ds, ke) * scale
    dk = (np.einsum("bhts,bthd->bshd", ds, q) * scale).reshape(B, S, Hkv, G, d).sum(3)
    dv = np.einsum("bhts,bthd->bshd", p, g).reshape(B, S, Hkv, G, d).sum(3)
    return out, dq, dk, dv


@functools.partial(jax.jit, static_argnames=("fn", "kw"))
def _with_grads(q, k, v, g, extra, *, fn, kw):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **dict(kw), **extra), q, k, v)
    return (out,) + vjp(g)


def flash_and_grads(q, k, v, g, *, key_padding_mask=None, q_offset=0, **kw):
    extra = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
    if isinstance(q_offset, int):
        kw["q_offset"] = q_offset  # static: hidden block pairs are skipped
    else:
        extra["q_offset"] = q_offset
    return _with_grads(q, k, v, g, extra, fn=flash_attention, kw=tuple(sorted(kw.items())))


def inputs(B, T, S, H, Hkv, d, seed=0):
    rng = np.random.RandomState(seed)
    q = rng.standard_normal((B, T, H, d)).astype(np.float32)
    k = rng.standard_normal((B, S, Hkv, d)).astype(np.float32)
    v = rng.standard_normal((B, S, Hkv, d)).astype(np.float32)
    g = rng.standard_normal((B, T, H, d)).astype(np.float32)
    return q, k, v, g


def assert_close(got, want, **tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(a), b, err_msg=name, **(tol or TOL))


CASES = {
    # name: (B, T, S, H, Hkv, d, options); small blocks so every case spans several blocks
    "causal, T not a multiple of the block": (2, 40, 40, 2, 2, 16, dict(causal=True, block_q=16, block_k=16)),
    "causal, padding, GQA, uneven blocks": (2, 37, 37, 4, 2, 16, dict(causal=True, pad=True, block_q=16, block_k=8)),
    "cross attention, padding, MQA": (2, 11, 29, 3, 1, 8, dict(pad=True, block_q=8, block_k=8)),
    "decoding a chunk, static offset": (2, 7, 20, 2, 2, 8, dict(causal=True, q_offset=5, block_q=8, block_k=8)),
    "ragged offsets [B]": (2, 4, 16, 2, 1, 8, dict(causal=True, q_offset=np.array([3, 12]), block_k=8)),
    "T = S = 1": (3, 1, 1, 2, 2, 8, dict(causal=True)),
    "one query, static offset": (2, 1, 19, 4, 2, 8, dict(causal=True, q_offset=18, block_k=8)),
    "pairs schedule, chunk 1": (
        2, 37, 37, 4, 2, 16, dict(causal=True, pad=True, block_q=16, block_k=8, schedule="pairs", chunk=1)
    ),
    # chunks of (batch, kv head) slices: 2 of 4 kv heads at a time; 2 batch rows of all heads
    "chunk within the heads": (2, 33, 33, 8, 4, 8, dict(causal=True, pad=True, block_q=16, block_k=16, chunk=2)),
    "chunk across batch rows": (4, 21, 30, 2, 2, 8, dict(pad=True, block_q=8, block_k=8, chunk=4)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    B, T, S, H, Hkv, d, opts = CASES[name]
    opts = dict(opts)
    q, k, v, g = inputs(B, T, S, H, Hkv, d)
    kpm = None
    if opts.pop("pad", False):
        kpm = np.random.RandomState(1).rand(B, S) > 0.3
        kpm[:, 0] = True  # rows with nothing to see are tested below
    offset = opts.pop("q_offset", 0)
    got = flash_and_grads(q, k, v, g, key_padding_mask=kpm, q_offset=offset, **opts)
    assert got[0].shape == (B, T, H, d) and got[0].dtype == jnp.float32
    want = reference(q, k, v, g, causal=opts.get("causal", False), key_padding_mask=kpm, q_offset=offset)
    assert_close(got, want)


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("causal", [True, False])
def test_matches_torch_sdpa(causal):
    """Against torch.nn.functional.scaled_dot_product_attention: GQA with causal mask, or key padding."""
    B, T, H, Hkv, d = 2, 45, 4, 2, 16
    q, k, v, g = inputs(B, T, T, H, Hkv, d, seed=3)
    kpm = None if causal else np.random.RandomState(4).rand(B, T) > 0.4
    if kpm is not None:
        kpm[:, -1] = True
    tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
    mask = None if kpm is None else torch.tensor(kpm)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, is_causal=causal, enable_gqa=True)
    out.backward(torch.tensor(g.transpose(0, 2, 1, 3)))
    want = [x.detach().numpy().transpose(0, 2, 1, 3) for x in (out, tq.grad, tk.grad, tv.grad)]
    got = flash_and_grads(q, k, v, g, causal=causal, key_padding_mask=kpm, block_q=16, block_k=16)
    assert_close(got, want)


def test_queries_that_see_nothing_give_zeros_and_zero_grads():
    """Row 0 has no valid key; row 1 is left-padded, so under causal masking its first queries see nothing."""
    B, T, H, d = 2, 20, 2, 8
    q, k, v, g = inputs(B, T, T, H, H, d, seed=5)
    kpm = np.ones((B, T), bool)
    kpm[0] = False
    kpm[1, :11] = False
    got = flash_and_grads(q, k, v, g, causal=True, key_padding_mask=kpm, block_q=8, block_k=8)
    out, dq = np.asarray(got[0]), np.asarray(got[1])
    assert all(np.isfinite(np.asarray(x)).all() for x in got)
    assert (out[0] == 0).all() and (out[1, :11] == 0).all() and (out[1, 11:] != 0).all()
    assert (dq[0] == 0).all() and (dq[1, :11] == 0).all()
    assert (np.asarray(got[2])[0] == 0).all() and (np.asarray(got[3])[0] == 0).all()
    assert_close(got, reference(q, k, v, g, causal=True, key_padding_mask=kpm))


def test_causal_visits_only_the_lower_triangle_of_block_pairs():
    plan = _Plan(
        T=512, S=512, G=1, bq=128, bk=128, nq=4, nk=4, chunk=1, causal=True, static_offset=0,
        key_mask=False, has_padding_mask=False, schedule="rows",
    )  # fmt: skip
    free, masked = plan.pairs()
    assert masked == [(0, 0), (1, 1), (2, 2), (3, 3)]  # only the diagonal needs a mask
    assert len(free) == 6  # 10 of 16 block pairs are computed
    n_free, n_vis = plan.row_counts()
    assert n_free.tolist() == [0, 1, 2, 3] and n_vis.tolist() == [1, 2, 3, 4]
    # decoding 64 new queries after 448 cached keys: every block is visible, only the last one masked
    dec = plan.__class__(**{**plan.__dict__, "T": 64, "bq": 64, "nq": 1, "static_offset": 448})
    assert dec.pairs() == ([(0, 0), (0, 1), (0, 2)], [(0, 3)])


def test_attention_routes_to_flash(monkeypatch):
    B, T, H, d = 2, 24, 2, 8
    q, k, v, g = (jnp.asarray(x) for x in inputs(B, T, T, H, H, d, seed=6))
    kpm = jnp.asarray(np.random.RandomState(7).rand(B, T) > 0.2)
    want = _with_grads(q, k, v, g, {"mask": kpm}, fn=attention, kw=(("causal", True), ("implementation", "xla")))
    got = _with_grads(q, k, v, g, {"mask": kpm}, fn=attention, kw=(("causal", True), ("implementation", "flash")))
    assert_close(got, [np.asarray(x) for x in want])
    # auto on CPU from FLASH_MIN_LEN: the same numbers as asking for it
    monkeypatch.setattr(sys.modules["jaxseq.kernels.dispatch"], "FLASH_MIN_LEN", 16)
    auto = attention(q, k, v, mask=kpm, causal=True)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(attention(q, k, v, mask=kpm, causal=True, implementation="flash")))
    with pytest.raises(ConfigError, match="implementation='xla'"):
        attention(q, k, v, bias=jnp.zeros((B, H, T, T)), implementation="flash")


def test_errors_name_the_argument():
    q, k, v, _ = inputs(1, 4, 4, 2, 2, 8)
    with pytest.raises(ShapeError, match="key_padding_mask"):
        flash_attention(q, k, v, key_padding_mask=np.ones((1, 5), bool))
    with pytest.raises(ConfigError, match="schedule"):
        flash_attention(q, k, v, schedule="diagonal")
    with pytest.raises(ConfigError, match="block_q"):
        flash_attention(q, k, v, block_q=0)
    with pytest.raises(ShapeError, match="heads"):
        flash_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
