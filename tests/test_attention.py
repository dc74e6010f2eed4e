"""attention(): against a float64 NumPy softmax and torch SDPA; zero rows; RoPE; sinusoidal; KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.attention import KVCache, apply_rope, attention, check_cache_room, sinusoidal_positions
from jaxseq.errors import ConfigError, ShapeError


def np_attention(q, k, v, mask=None, causal=False, q_offset=0, scale=None, bias=None):
    """float64 reference. q [B,T,H,d], k/v [B,S,K,d]; mask broadcastable to [B,H,T,S]; zeros for empty rows."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, d = q.shape
    S, K = k.shape[1], k.shape[2]
    allowed = np.ones((B, H, T, S), bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim == 2:
            m = m[:, None, None, :]
        elif m.ndim == 3:
            m = m[:, None]
        allowed &= np.broadcast_to(m, allowed.shape)
    if causal:
        off = np.broadcast_to(np.asarray(q_offset), (B,))
        qpos = off[:, None] + np.arange(T)[None]  # [B, T]
        allowed &= (np.arange(S)[None, None, :] <= qpos[:, :, None])[:, None]
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((B, T, H, d))
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)  # query head h reads kv head h // group_size
            for t in range(T):
                ok = allowed[b, h, t]
                if not ok.any():
                    continue
                logits = scale * k[b, :, kh] @ q[b, t, h]
                if bias is not None:
                    logits = logits + np.broadcast_to(bias, (B, H, T, S))[b, h, t]
                logits = np.where(ok, logits, -np.inf)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, t, h] = p @ v[b, :, kh]
    return out


def jit_attention(**kw):
    """attention with its keyword arguments fixed, jitted: one compile instead of many eager ops."""
    return jax.jit(lambda q, k, v, mask=None: attention(q, k, v, mask=mask, **kw))


def rand_qkv(B=2, T=5, S=7, H=4, K=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return f(B, T, H, d), f(B, S, K, d), f(B, S, K, d)


CASES = {
    "plain": dict(),
    "causal_square": dict(T=6, S=6, causal=True),
    "causal_T_lt_S": dict(T=3, S=7, causal=True),
    "causal_T_gt_S": dict(T=7, S=3, causal=True),
    "causal_offset_scalar": dict(T=3, S=8, causal=True, q_offset=4),
    "causal_offset_rows": dict(T=2, S=8, causal=True, q_offset=np.array([0, 5])),
    "key_padding": dict(mask="kpad"),
    "key_padding_causal": dict(T=7, S=7, mask="kpad", causal=True),
    "full_mask_3d": dict(mask="3d"),
    "full_mask_4d_heads": dict(mask="4d"),
    "mqa": dict(K=1, causal=True, T=7, S=7),
    "mha": dict(K=4, mask="kpad"),
    "scale": dict(scale=0.3),
    "bias_causal": dict(T=6, S=6, causal=True, bias="alibi"),
}


def make_mask(kind, B, T, S, H, rng):
    if kind == "kpad":
        lengths = rng.integers(1, S + 1, size=B)
        return np.arange(S)[None] < lengths[:, None]
    if kind == "3d":
        return rng.random((B, T, S)) < 0.6
    if kind == "4d":
        return rng.random((B, H, T, S)) < 0.6
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_numpy(case):
    c = dict(CASES[case])
    B, T, S, H, K = 2, c.pop("T", 5), c.pop("S", 7), 4, c.pop("K", 2)
    q, k, v = rand_qkv(B, T, S, H, K)
    mask = make_mask(c.pop("mask", None), B, T, S, H, np.random.default_rng(1))
    if c.get("bias") == "alibi":  # a per-head linear distance penalty, [1, H, T, S]
        slopes = 2.0 ** -np.arange(1, H + 1)
        c["bias"] = -slopes[None, :, None, None] * np.abs(np.arange(T)[:, None] - np.arange(S)[None, :])
    out = jit_attention(**{**c, "bias": None if c.get("bias") is None else jnp.asarray(c["bias"], jnp.float32)})(
        q, k, v, None if mask is None else jnp.asarray(mask)
    )
    ref = np_attention(q, k, v, mask=mask, **c)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=1e-5)


def test_jitted_with_traced_offsets_matches_numpy():
    q, k, v = rand_qkv(T=2, S=9)
    f = jax.jit(lambda q, k, v, off: attention(q, k, v, causal=True, q_offset=off))
    off = np.array([3, 7])
    np.testing.assert_allclose(np.asarray(f(q, k, v, jnp.asarray(off))), np_attention(q, k, v, causal=True, q_offset=off), atol=2e-6)


torch = pytest.importorskip("torch")


def _t(x):  # [B, T, H, d] -> torch [B, H, T, d], float64 for a tight comparison
    return torch.from_numpy(np.asarray(x, np.float64)).transpose(1, 2)


@pytest.mark.parametrize("K", [4, 2, 1])
@pytest.mark.parametrize("setting", ["causal", "padding", "offset"])
def test_matches_torch_sdpa(K, setting):
    F = torch.nn.functional
    T, S = (6, 6) if setting != "offset" else (3, 9)
    q, k, v = rand_qkv(B=3, T=T, S=S, H=4, K=K, seed=K)
    kw, tkw = {}, {}
    if setting == "causal":
        kw, tkw = dict(causal=True), dict(is_causal=True)
    elif setting == "padding":
        mask = np.arange(S)[None] < np.array([6, 2, 4])[:, None]
        kw, tkw = dict(mask=jnp.asarray(mask)), dict(attn_mask=torch.from_numpy(mask)[:, None, None, :])
    else:  # a decoding chunk: query i sits at position offset_b + i
        off = np.array([0, 3, 6])
        allowed = np.arange(S)[None, None, :] <= (off[:, None] + np.arange(T))[:, :, None]
        kw, tkw = dict(causal=True, q_offset=jnp.asarray(off)), dict(attn_mask=torch.from_numpy(allowed)[:, None])
    mask = kw.pop("mask", None)
    out = jit_attention(**kw)(q, k, v, mask)
    ref = F.scaled_dot_product_attention(_t(q), _t(k), _t(v), enable_gqa=K != 4, **tkw).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=1e-5)


def test_fully_masked_rows_are_exact_zeros_with_finite_gradients():
    q, k, v = rand_qkv(B=2, T=4, S=5)
    mask = np.ones((2, 4, 5), bool)
    mask[0, 1] = False  # query 1 of row 0 may see nothing
    mask[1] = False  # row 1 sees nothing at all
    mask = jnp.asarray(mask)
    out = jit_attention()(q, k, v, mask)
    assert np.all(np.asarray(out[0, 1]) == 0.0) and np.all(np.asarray(out[1]) == 0.0)
    # The raw op gives those rows the mean of the values instead: the silent wrong number we fix.
    raw = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    assert np.abs(np.asarray(raw[1])).max() > 1e-3

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, mask=mask) ** 2)

    gq, gk, gv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in (gq, gk, gv):
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(gq[0, 1]) == 0.0) and np.all(np.asarray(gq[1]) == 0.0)
    assert np.all(np.asarray(gk[1]) == 0.0) and np.all(np.asarray(gv[1]) == 0.0)
    assert np.abs(np.asarray(gq[0, 0])).max() > 0  # valid rows still learn


def test_gradients_match_a_plain_jnp_softmax():
    q, k, v = rand_qkv(T=5, S=5, K=2)
    mask = jnp.asarray(np.arange(5)[None] < np.array([5, 3])[:, None])

    def plain(q, k, v):  # independent of jax.nn.dot_product_attention
        kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        logits = jnp.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(8)
        ok = mask[:, None, None, :] & (jnp.arange(5)[None, :] <= jnp.arange(5)[:, None])[None, None]
        p = jax.nn.softmax(jnp.where(ok, logits, -1e30), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", p, vr)

    w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    ga = jax.jit(jax.grad(lambda *a: jnp.sum(w * attention(*a, mask=mask, causal=True)), argnums=(0, 1, 2)))(q, k, v)
    gb = jax.jit(jax.grad(lambda *a: jnp.sum(w * plain(*a)), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize(
    "shapes, kwargs, match",
    [
        (((2, 5, 8), (2, 5, 2, 8), (2, 5, 2, 8)), {}, "q must have rank 4"),
        (((2, 5, 3, 8), (2, 5, 2, 8), (2, 5, 2, 8)), {}, "multiple of the key/value heads"),
        (((2, 5, 4, 8), (2, 5, 2, 4), (2, 5, 2, 4)), {}, "head_dim"),
        (((2, 5, 4, 8), (3, 5, 2, 8), (3, 5, 2, 8)), {}, "batch"),
        (((2, 5, 4, 8), (2, 5, 2, 8), (2, 6, 2, 8)), {}, "same shape"),
        (((2, 5, 4, 8), (2, 0, 2, 8), (2, 0, 2, 8)), {}, "nothing to attend"),
        (((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)), {"mask": np.ones((2, 5), bool)}, "key-padding"),
        (((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)), {"mask": np.ones((2, 3, 5, 6), bool)}, "rank 4"),
        (((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)), {"mask": np.ones((2, 6), np.float32)}, "boolean"),
        (((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)), {"causal": True, "q_offset": np.array([1, 2, 3])}, "q_offset"),
        (((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)), {"bias": np.zeros((2, 4, 5, 5), np.float32)}, "bias"),
    ],
)
def test_bad_shapes_raise(shapes, kwargs, match):
    q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
    with pytest.raises(ShapeError, match=match):
        attention(q, k, v, **{n: jnp.asarray(a) if isinstance(a, np.ndarray) else a for n, a in kwargs.items()})


def test_bad_dtype_and_implementation_raise():
    q, k, v = rand_qkv()
    with pytest.raises(ShapeError, match="dtype"):
        attention(q.astype(jnp.bfloat16), k, v)
    with pytest.raises(ConfigError, match="implementation"):
        attention(q, k, v, implementation="pallas")  # "flash" is valid now (jaxseq.kernels.flash_attention)


# ---------------------------------------------------------------------------------------------- RoPE


def np_rope(x, pos, base=10000.0):
    """Reference: pair (i, i + d/2) as a complex number and multiply by exp(i * pos * base^(-2i/d))."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    theta = base ** (-np.arange(0, d, 2) / d)
    z = x[..., : d // 2] + 1j * x[..., d // 2 :]
    z = z * np.exp(1j * np.asarray(pos, np.float64)[:, :, None, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_numpy_and_is_relative():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 3, 16)), jnp.float32)
    pos = np.array([[0, 1, 2, 3, 4, 5], [7, 9, 100, 3, 0, 2000]])
    out = apply_rope(x, jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(out), np_rope(x, pos), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(x[0, 0]))  # position 0 is the identity
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)  # rotation

    # <rope(q, m), rope(k, n)> depends on m - n only
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    rope_dot = jax.jit(lambda m, n: jnp.sum(apply_rope(q, m[None, None]) * apply_rope(k, n[None, None])))
    dot = lambda m, n: float(rope_dot(jnp.int32(m), jnp.int32(n)))
    for m, n in [(5, 2), (0, 7), (11, 11)]:
        for shift in (1, 13, 250):
            assert dot(m, n) == pytest.approx(dot(m + shift, n + shift), abs=2e-4)
    assert abs(dot(5, 2) - dot(5, 3)) > 1e-3  # but it does depend on the difference


def test_rope_and_sinusoidal_reject_bad_shapes():
    with pytest.raises(ShapeError, match="even head_dim"):
        apply_rope(jnp.zeros((1, 2, 1, 5)), jnp.arange(2))
    with pytest.raises(ShapeError, match="positions"):
        apply_rope(jnp.zeros((1, 2, 1, 4)), jnp.arange(3))
    with pytest.raises(ShapeError, match="even d_model"):
        sinusoidal_positions(jnp.arange(3), 7)


def test_sinusoidal_matches_formula():
    pos = np.arange(50)
    pe = np.asarray(sinusoidal_positions(jnp.asarray(pos), 16))
    i = np.arange(8)
    ang = pos[:, None] / 10000 ** (2 * i / 16)
    np.testing.assert_allclose(pe[:, 0::2], np.sin(ang), atol=1e-5)
    np.testing.assert_allclose(pe[:, 1::2], np.cos(ang), atol=1e-5)


# ---------------------------------------------------------------------------------------------- KV cache


def test_kv_cache_ragged_writes_and_cached_attention_matches_full():
    B, S, H, K, d = 2, 8, 4, 2, 8
    q, k, v = rand_qkv(B=B, T=S, S=S, H=H, K=K)
    full = np.asarray(jit_attention(causal=True)(q, k, v))

    @jax.jit
    def extend(cache, q, k, v, lengths):  # append a chunk; its queries attend to the cache
        offset = cache.index
        cache = cache.update(k, v, lengths)
        return cache, attention(q, cache.k, cache.v, causal=True, q_offset=offset)

    # Row 0 gets a 5-token prompt, row 1 a 2-token prompt, in one padded call; then single steps.
    lengths = np.array([5, 2])
    cache, out = extend(KVCache.create(B, S, K, d), q[:, :5], k[:, :5], v[:, :5], jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(cache.index), lengths)
    for b in range(B):
        np.testing.assert_allclose(np.asarray(out[b, : lengths[b]]), full[b, : lengths[b]], atol=1e-6)
    # Next: each row feeds its own next token; the write lands at that row's index.
    rows = np.arange(B)
    for _ in range(2):
        idx = np.asarray(cache.index)
        cache, o = extend(cache, q[rows, idx][:, None], k[rows, idx][:, None], v[rows, idx][:, None], jnp.ones(B, jnp.int32))
        np.testing.assert_allclose(np.asarray(o[:, 0]), full[rows, idx], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cache.index), lengths + 2)


def test_kv_cache_overflow_is_dropped_not_clobbered_and_detected():
    cache = KVCache.create(1, 4, 1, 2)
    cache = cache.update(jnp.ones((1, 3, 1, 2)), jnp.ones((1, 3, 1, 2)))
    cache2 = cache.update(jnp.full((1, 3, 1, 2), 7.0), jnp.full((1, 3, 1, 2), 7.0))
    # position 3 takes the first new token; the two beyond max_len are dropped, positions 0..2 untouched
    np.testing.assert_array_equal(np.asarray(cache2.k[0, :, 0, 0]), [1, 1, 1, 7])
    with pytest.raises(ShapeError, match="larger max_len"):
        check_cache_room(cache, 3)
    check_cache_room(cache, 1)  # exactly fits
    with pytest.raises(ShapeError, match="KV cache holds"):
        cache.update(jnp.ones((1, 1, 2, 2)), jnp.ones((1, 1, 2, 2)))
