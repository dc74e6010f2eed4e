"""AdditiveLM: NumPy float64 reference, apply == step, masks, learning a topic task, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseq.config import AdditiveConfig
from jaxseq.errors import ConfigError, ShapeError, TokenRangeError
from jaxseq.models.additive import AdditiveLM

V, D = 13, 8


def reference_logits(params, tokens, mask, reduce):
    """float64 loop: context_t = sum/mean of the embeddings of valid tokens s <= t, then the dense layer."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    emb, w, b = p["embed"]["embedding"], p["head"]["kernel"], p["head"]["bias"]
    B, T = tokens.shape
    out = np.zeros((B, T, V))
    for i in range(B):
        total, count = np.zeros(D), 0
        for t in range(T):
            if mask[i, t]:
                total, count = total + emb[tokens[i, t]], count + 1
            ctx = total if reduce == "sum" else total / max(count, 1)
            out[i, t] = ctx @ w + b
    return out


def run_steps(model, variables, tokens):
    state = model.apply(variables, tokens.shape[0], tokens.shape[1], method="init_state")
    step = jax.jit(lambda v, s, tok: model.apply(v, s, tok, method="step"))
    outs = []
    for t in range(tokens.shape[1]):
        state, logits = step(variables, state, tokens[:, t])
        outs.append(logits)
    return jnp.stack(outs, axis=1)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_matches_float64_reference(reduce):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(3, 10))
    mask = rng.random((3, 10)) < 0.7
    mask[2, :3] = False  # leading padding: context is the zero vector until the first valid token
    model = AdditiveLM(vocab_size=V, d_embed=D, reduce=reduce)
    variables = model.init(jax.random.key(1), jnp.asarray(tokens))
    for m in (mask, np.ones_like(mask)):
        logits = model.apply(variables, jnp.asarray(tokens), mask=jnp.asarray(m))
        np.testing.assert_allclose(logits, reference_logits(variables["params"], tokens, m, reduce), rtol=1e-5, atol=1e-5)
    assert not np.allclose(reference_logits(variables["params"], tokens, mask, "sum"),
                           reference_logits(variables["params"], tokens, mask, "mean"))


@pytest.mark.parametrize("reduce,d_hidden", [("sum", 0), ("mean", 0), ("mean", 16)])
def test_step_agrees_with_apply(reduce, d_hidden):
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, V, size=(4, 20)), jnp.int32)
    model = AdditiveLM(vocab_size=V, d_embed=D, reduce=reduce, d_hidden=d_hidden)
    variables = model.init(jax.random.key(0), tokens)
    if d_hidden:
        assert variables["params"]["hidden"]["kernel"].shape == (D, d_hidden)
    np.testing.assert_allclose(run_steps(model, variables, tokens), model.apply(variables, tokens), rtol=1e-5, atol=1e-5)


def test_learns_topic_task():
    # Each sequence draws a topic k in 0..3 and then i.i.d. tokens uniform over {4k, .., 4k+3} (V=16).
    # One token reveals the topic, so the best possible loss is log 4 = 1.386 nats (unigram: log 16 = 2.77);
    # the bag of context can represent that exactly.
    Vt, B, T = 16, 32, 16

    def batch(key):
        k1, k2 = jax.random.split(key)
        topic = jax.random.randint(k1, (B, 1), 0, 4)
        x = 4 * topic + jax.random.randint(k2, (B, T + 1), 0, 4)
        return x[:, :-1], x[:, 1:]

    model = AdditiveLM(vocab_size=Vt, d_embed=16, reduce="mean")
    params = model.init(jax.random.key(0), jnp.zeros((B, T), jnp.int32))["params"]
    opt = optax.adam(3e-2)
    opt_state = opt.init(params)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, key):
        x, y = batch(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(200):
        params, opt_state, _ = train_step(params, opt_state, jax.random.key(i + 1))
    x, y = batch(jax.random.key(10_000))
    assert float(loss_fn(params, x, y)) < 1.45  # log 4 = 1.386 is optimal


def test_bad_inputs_raise():
    model = AdditiveLM(vocab_size=V, d_embed=D)
    tokens = jnp.zeros((2, 5), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    with pytest.raises(TokenRangeError, match="tokens"):
        model.apply(variables, tokens.at[1, 2].set(V))
    with pytest.raises(ShapeError, match="integer"):
        model.apply(variables, tokens.astype(jnp.float32))
    with pytest.raises(ShapeError, match="mask"):
        model.apply(variables, tokens, mask=jnp.ones((2, 4), bool))
    state = model.apply(variables, 2, 5, method="init_state")
    with pytest.raises(TokenRangeError, match="token"):
        model.apply(variables, state, jnp.array([0, V]), method="step")
    with pytest.raises(ConfigError, match="reduce"):
        AdditiveLM(vocab_size=V, reduce="max")


def test_from_config():
    model = AdditiveLM.from_config(AdditiveConfig(d_embed=32, reduce="sum"), 9)
    assert (model.vocab_size, model.d_embed, model.reduce, model.d_hidden) == (9, 32, "sum", 0)
