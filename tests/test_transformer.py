"""TransformerLM: parallel form == KV-cache form, ragged prefill, padding, tying, learning, errors.

The encoder-decoder is tested in test_encdec.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseq.config import TrainConfig, TransformerConfig
from jaxseq.errors import ConfigError, ShapeError, TokenRangeError
from jaxseq.models.transformer import TransformerLM

V = 13
TINY = dict(vocab_size=V, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_len=16)


def random_variables(model, *example_args, seed=0, std=0.2):
    """Parameters of the right shapes drawn with NumPy: skips compiling `model.init` (~3 s CPU each),
    and weights larger than GPT-2's 0.02 make attention peaked, so agreement tests are not trivially met."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example_args)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0  # LayerNorm scales around 1
        return jnp.asarray(base + std * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tokens(shape, seed=0, vocab=V):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@functools.lru_cache(maxsize=None)
def built(**kw):
    """(model, variables, jitted apply, jitted step, jitted prefill) for a TransformerLM config."""
    model = TransformerLM(**{**TINY, **kw})
    variables = random_variables(model, tokens((1, 4)))
    apply = jax.jit(lambda v, x, m=None: model.apply(v, x, mask=m))
    step = jax.jit(lambda v, s, t: model.apply(v, s, t, method="step"))
    prefill = jax.jit(lambda v, s, x, m: model.apply(v, s, x, m, method="prefill"))
    return model, variables, apply, step, prefill


# Three configurations cover positional codes x head layouts x tying; tests share them (and their
# compiled functions, via `built`) and the shape [3, 9], so the file compiles each function once.
LEARNED = dict(positional="learned")  # multi-head, tied
SINUS = dict(positional="sinusoidal", num_kv_heads=2, tie_embeddings=False)  # grouped-query, untied
ROPE = dict(positional="rope", num_kv_heads=1)  # multi-query
B, T = 3, 9


@pytest.mark.parametrize("cfg", [LEARNED, SINUS, ROPE], ids=["learned-mha-tied", "sinusoidal-gqa-untied", "rope-mqa"])
def test_step_matches_apply_at_every_position(cfg):
    model, variables, apply, step, _ = built(**cfg)
    x = tokens((B, T), seed=1)
    full = np.asarray(apply(variables, x))
    assert full.shape == (B, T, V) and full.dtype == np.float32
    state = model.apply(variables, B, 12, method="init_state")
    for t in range(T):
        state, logits = step(variables, state, x[:, t])
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state[0].index), [T] * B)


@pytest.mark.parametrize("cfg", [LEARNED, ROPE], ids=["learned", "rope"])
def test_ragged_prefill_then_steps_match_each_row_alone(cfg):
    """Prompts of lengths 6, 2, 4 in one right-padded batch; every row continues as if it ran alone."""
    model, variables, apply, step, prefill = built(**cfg)
    lengths = np.array([6, 2, 4])
    seqs = np.asarray(tokens((B, T), seed=10))  # row b: its prompt, then its continuation
    prompt = np.where(np.arange(6)[None] < lengths[:, None], seqs[:, :6], V - 1)  # any id under the padding
    mask = np.arange(6)[None] < lengths[:, None]
    state = model.apply(variables, B, 12, method="init_state")
    state, logits = prefill(variables, state, jnp.asarray(prompt), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(state[0].index), lengths)
    alone = np.asarray(apply(variables, jnp.asarray(seqs)))  # no padding anywhere: each row as if alone
    rows = np.arange(B)
    np.testing.assert_allclose(np.asarray(logits), alone[rows, lengths - 1], atol=2e-5)
    for j in range(3):  # then each row feeds its own next token
        state, logits = step(variables, state, jnp.asarray(seqs[rows, lengths + j]))
        np.testing.assert_allclose(np.asarray(logits), alone[rows, lengths + j], atol=2e-5)


def test_padding_anywhere_is_cut_out_in_apply():
    """Left, middle and right padding: valid positions get the logits of the row without its padding."""
    model, variables, apply, _, _ = built(**LEARNED)
    row = np.asarray(tokens((T,), seed=3))
    masks = np.ones((B, T + 2), bool)
    masks[0, :2] = masks[1, [2, 5]] = masks[2, -2:] = False
    padded = np.zeros((B, T + 2), np.int32)
    for b in range(B):
        padded[b, masks[b]] = row
        padded[b, ~masks[b]] = V - 1 - b  # arbitrary ids under the padding
    got = np.asarray(apply(variables, jnp.asarray(padded), jnp.asarray(masks)))
    want = np.asarray(apply(variables, jnp.tile(jnp.asarray(row), (B, 1))))[0]
    for b in range(B):
        np.testing.assert_allclose(got[b][masks[b]], want, atol=2e-5)


def test_tied_equals_untied_with_the_transposed_embedding():
    tied, vt, apply_t, _, _ = built(**LEARNED)
    untied = TransformerLM(**{**TINY, "tie_embeddings": False})
    vu = jax.eval_shape(untied.init, jax.random.key(0), tokens((1, 4)))
    assert "lm_head" not in vt["params"] and vu["params"]["lm_head"]["kernel"].shape == (32, V)
    n = lambda v: sum(x.size for x in jax.tree.leaves(v))
    assert n(vu) - n(vt) == 32 * V
    params = dict(vt["params"], lm_head={"kernel": vt["params"]["wte"]["embedding"].T})
    x = tokens((B, T), seed=4)
    np.testing.assert_allclose(
        np.asarray(jax.jit(untied.apply)({"params": params}, x)), np.asarray(apply_t(vt, x)), atol=1e-5
    )


def test_dropout_needs_rng_and_is_off_when_deterministic():
    model = TransformerLM(**{**TINY, "dropout": 0.3})
    _, v, apply_plain, _, _ = built(**LEARNED)  # same parameter shapes
    x = tokens((B, T))
    base = jax.jit(model.apply)(v, x)
    np.testing.assert_allclose(base, apply_plain(v, x), atol=1e-6)  # dropout off = no-op
    noisy = jax.jit(lambda v, x, k: model.apply(v, x, deterministic=False, rngs={"dropout": k}))
    a, b, c = (noisy(v, x, jax.random.key(i)) for i in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-3 and np.abs(np.asarray(a - base)).max() > 1e-3
    with pytest.raises(Exception, match="dropout"):
        model.apply(v, x, deterministic=False)


def test_learns_copy_task():
    """x_1..x_8 SEP x_1..x_8: predicting the copied half needs attention to the token 9 positions back.

    Chance is ln(15) = 2.71 nats; a 2-layer d=64 model gets below 0.05 within 200 Adam steps.
    """
    Vt, N, Bt = 16, 8, 32
    model = TransformerLM(vocab_size=Vt, num_layers=2, num_heads=4, d_model=64, d_ff=128, max_len=2 * N)

    def batch(key):
        x = jax.random.randint(key, (Bt, N), 1, Vt)
        seq = jnp.concatenate([x, jnp.zeros((Bt, 1), jnp.int32), x], 1)
        return seq[:, :-1], seq[:, 1:], jnp.arange(2 * N)[None] >= N  # loss on the copied half only

    def loss_fn(params, key):
        inputs, targets, mask = batch(key)
        ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, inputs), targets)
        return jnp.sum(ce * mask) / (Bt * N)

    opt = optax.adam(3e-3)

    @jax.jit
    def train(params):
        def body(carry, i):
            params, st = carry
            loss, g = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(jax.random.key(1), i))
            u, st = opt.update(g, st, params)
            return (optax.apply_updates(params, u), st), loss

        (params, _), losses = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(200))
        return params, losses

    params, losses = train(random_variables(model, jnp.zeros((1, 2 * N), jnp.int32), std=0.02))
    assert float(losses[0]) > 2.0
    assert float(jnp.mean(losses[-10:])) < 0.05, losses[-10:]


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(num_heads=3), ConfigError, "multiple of num_heads"),
        (dict(num_kv_heads=3), ConfigError, "must divide num_heads"),
        (dict(positional="alibi"), ConfigError, "positional"),
        (dict(num_layers=0), ConfigError, "num_layers"),
        (dict(d_model=36, num_heads=4, positional="rope"), ConfigError, "even head_dim"),
    ],
)
def test_bad_config_raises(kw, err, match):
    with pytest.raises(err, match=match):
        jax.eval_shape(TransformerLM(**{**TINY, **kw}).init, jax.random.key(0), tokens((1, 4)))


def test_bad_inputs_raise():
    model, v, _, _, _ = built(**LEARNED)
    with pytest.raises(TokenRangeError, match="outside"):
        model.apply(v, jnp.full((1, 4), V, jnp.int32))
    with pytest.raises(ShapeError, match="integer"):
        model.apply(v, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ShapeError, match="max_len=16"):
        model.apply(v, tokens((1, 17)))
    with pytest.raises(ShapeError, match="mask"):
        model.apply(v, tokens((2, 4)), mask=jnp.ones((2, 5), bool))
    with pytest.raises(ShapeError, match="max_len=16"):
        model.apply(v, 2, 17, method="init_state")
    state = model.apply(v, 2, 4, method="init_state")
    with pytest.raises(ShapeError, match="right-padded"):
        model.apply(v, state, tokens((2, 3)), jnp.asarray([[1, 1, 1], [0, 1, 1]], bool), method="prefill")
    with pytest.raises(ShapeError, match="larger max_len"):
        model.apply(v, state, tokens((2, 5)), method="prefill")
    with pytest.raises(ShapeError, match="rank 1"):
        model.apply(v, state, tokens((2, 1)), method="step")


def test_from_config_and_build_model():
    from jaxseq.models import build_model

    cfg = TransformerConfig(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=8, positional="rope", num_kv_heads=1)
    model = build_model(TrainConfig(model="transformer", transformer=cfg), {"interface": "lm", "vocab_size": 7})
    assert isinstance(model, TransformerLM)
    assert (model.vocab_size, model.num_layers, model.num_heads, model.d_model, model.num_kv_heads) == (7, 1, 2, 16, 1)
    assert model.positional == "rope" and model.max_len == 8
    v = jax.eval_shape(model.init, jax.random.key(0), tokens((1, 3), vocab=7))
    assert v["params"]["h_0"]["attn"]["c_attn"]["kernel"].shape == (16, 16 + 2 * 8)  # q + one k/v head


def test_bfloat16_compute_returns_float32_logits():
    model = TransformerLM(**{**TINY, "dtype": jnp.bfloat16})
    _, v, apply_f32, _, _ = built(**LEARNED)
    x = tokens((B, T))
    out = jax.jit(model.apply)(v, x)
    ref = apply_f32(v, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.05)


def test_greedy_decoding_agrees_with_argmax_of_apply():
    decoding = pytest.importorskip("jaxseq.decoding")
    model, v, apply, _, _ = built(**ROPE)
    P = 3
    out = decoding.sample(model, v, tokens((B, P), seed=7), max_new_tokens=T - P, temperature=0.0)
    seq = np.zeros((B, T), np.int32)  # the slow way: rerun the whole (causal) sequence each time
    seq[:, :P] = np.asarray(tokens((B, P), seed=7))
    for t in range(P, T):
        seq[:, t] = np.asarray(apply(v, jnp.asarray(seq)))[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(np.asarray(out.tokens), seq)
