"""NGramLM: hand-computed probabilities, normalisation, apply == step, masks, EM lambdas, scale."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.config import NGramConfig
from jaxseq.errors import ConfigError, DataError, ShapeError, TokenRangeError
from jaxseq.models.ngram import NGramLM, _count_tables, _target_component_probs, fit_lambdas_em


def markov_stream(n_tokens, V, ctx_len, seed, noise=0.1):
    """Tokens from a random order-(ctx_len+1) Markov source: each context has one favourite successor."""
    rng = np.random.default_rng(seed)
    fav = rng.integers(0, V, size=(V,) * ctx_len)
    out = list(rng.integers(0, V, size=ctx_len))
    for _ in range(n_tokens - ctx_len):
        nxt = fav[tuple(out[-ctx_len:])] if rng.random() > noise else rng.integers(0, V)
        out.append(int(nxt))
    return np.asarray(out, np.int32)


def forward(model, variables, tokens, mask=None):
    """Jitted apply: eager dispatch of the lookups would dominate the test time."""
    return jax.jit(lambda v, x, m: model.apply(v, x, mask=m))(variables, jnp.asarray(tokens), mask)


def run_steps(model, variables, tokens):
    state = model.apply(variables, tokens.shape[0], tokens.shape[1], method="init_state")
    step = jax.jit(lambda v, s, tok: model.apply(v, s, tok, method="step"))
    outs = []
    for t in range(tokens.shape[1]):
        state, lp = step(variables, state, tokens[:, t])
        outs.append(lp)
    return jnp.stack(outs, axis=1)


def test_hand_computed_trigram():
    # Corpus "a b a b b a c" with a=0, b=1, c=2; V=3, add_k=0.5, lambdas (0.2, 0.3, 0.5).
    model = NGramLM(vocab_size=3, order=3, add_k=0.5, lambdas=(0.2, 0.3, 0.5))
    variables = model.fit_variables(np.array([0, 1, 0, 1, 1, 0, 2]))
    np.testing.assert_array_equal(variables["counts"]["unigram"], [3, 3, 1])
    # Unigram: counts a3 b3 c1, N=7 -> (c + .5) / (7 + 1.5).
    p1 = np.array([3.5, 3.5, 1.5]) / 8.5
    # Bigram pairs: a->b, b->a, a->b, b->b, b->a, a->c. "c" is never followed by anything (unseen).
    p2_a = np.array([0.5, 2.5, 1.5]) / 4.5  # c(a,.) = {b:2, c:1}, total 3
    p2_b = np.array([2.5, 1.5, 0.5]) / 4.5  # c(b,.) = {a:2, b:1}, total 3
    # Trigram: (a,b)->a, (b,a)->b, (a,b)->b, (b,b)->a, (b,a)->c.
    p3_ab = np.array([1.5, 1.5, 0.5]) / 3.5  # {a:1, b:1}, total 2
    p3_ba = np.array([0.5, 1.5, 1.5]) / 3.5  # {b:1, c:1}, total 2
    uniform = np.full(3, 1 / 3)
    expected = np.stack([
        0.4 * p1 + 0.6 * p2_b,  # t=0, history "b": order 3 not usable, lambdas renormalised over 1..2
        0.2 * p1 + 0.3 * p2_a + 0.5 * p3_ba,  # t=1, history "b a"
        0.2 * p1 + 0.3 * p2_b + 0.5 * p3_ab,  # t=2, history "a b"
        0.2 * p1 + 0.3 * uniform + 0.5 * uniform,  # t=3, history "b c": both contexts unseen
        0.2 * p1 + 0.3 * uniform + 0.5 * uniform,  # t=4, history "c c"
    ])
    tokens = jnp.array([[1, 0, 1, 2, 2]], jnp.int32)
    logp = forward(model, variables, tokens)
    np.testing.assert_allclose(np.exp(logp[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(run_steps(model, variables, tokens), logp, atol=1e-6)


def test_positions_whose_usable_orders_all_weigh_zero_fall_back_to_the_unigram():
    # Lambdas (0, 0, 1) (fitted weights can zero the low orders): the first position sees one token of
    # history, so only orders 1-2 are usable, both weighted 0. It must get the unigram, not log 0 = -inf.
    model = NGramLM(vocab_size=3, order=3, add_k=0.5, lambdas=(0.0, 0.0, 1.0))
    variables = model.fit_variables(np.array([0, 1, 0, 1, 1, 0, 2]))
    tokens = jnp.array([[1, 0, 1]], jnp.int32)
    logp = forward(model, variables, tokens)
    np.testing.assert_allclose(np.exp(logp[0, 0]), np.array([3.5, 3.5, 1.5]) / 8.5, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(logp)))
    np.testing.assert_allclose(run_steps(model, variables, tokens), logp, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_normalised_and_step_agrees(order):
    V = 11
    rng = np.random.default_rng(order)
    model = NGramLM(vocab_size=V, order=order, add_k=0.3)
    variables = model.fit_variables(markov_stream(4000, V, 2, seed=order))
    tokens = jnp.asarray(rng.integers(0, V, size=(3, 17)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 17)) < 0.8)
    for m in (jnp.ones((3, 17), bool), mask):  # one compile for both
        logp = forward(model, variables, tokens, m)
        assert logp.shape == (3, 17, V) and logp.dtype == jnp.float32
        np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, atol=2e-6)
    full = forward(model, variables, tokens, jnp.ones((3, 17), bool))
    np.testing.assert_allclose(run_steps(model, variables, tokens), full, atol=1e-5)


def test_mask_skips_tokens():
    # A masked token enters no context: each row's valid part scores exactly like the compacted row.
    V = 7
    model = NGramLM(vocab_size=V, order=4, add_k=0.2)
    variables = model.fit_variables(markov_stream(3000, V, 2, seed=3))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(4, 12))
    mask = rng.random((4, 12)) < 0.6
    mask[:, 0] = False  # left padding too
    logp = forward(model, variables, tokens, jnp.asarray(mask))
    # Reference: the valid tokens of each row moved to the front (trailing padding cannot reach them).
    compact = np.zeros_like(tokens)
    for b in range(4):
        compact[b, :mask[b].sum()] = tokens[b][mask[b]]
    ref = forward(model, variables, compact)
    for b in range(4):
        np.testing.assert_allclose(logp[b][mask[b]], ref[b, :mask[b].sum()], atol=1e-6)


def test_unfitted_and_unseen_are_uniform():
    V = 5
    model = NGramLM(vocab_size=V, order=3)
    tokens = jnp.array([[0, 4, 2, 2]], jnp.int32)
    variables = model.init(jax.random.key(0), tokens)  # empty tables
    np.testing.assert_allclose(forward(model, variables, tokens), np.log(1 / V), atol=1e-6)
    # Fitted on tokens {0, 1} only: any context holding 4 is unseen, so its orders give 1/V.
    model = NGramLM(vocab_size=V, order=3, add_k=1.0, lambdas=(0.5, 0.25, 0.25))
    variables = model.fit_variables(np.array([0, 1, 1, 0, 1, 0, 0, 1]))
    p1 = (np.array([4, 4, 0, 0, 0]) + 1.0) / (8 + V)
    logp = forward(model, variables, jnp.array([[0, 4, 4]], jnp.int32))
    np.testing.assert_allclose(np.exp(logp[0, 2]), 0.5 * p1 + 0.5 / V, rtol=1e-6)
    assert np.isfinite(np.asarray(logp)).all()


def test_jax_lookup_matches_numpy_key_lookup():
    # The jitted CSR/trie lookup against the host-side int64 key lookup used for EM.
    V, n = 9, 4
    model = NGramLM(vocab_size=V, order=n, add_k=0.05, lambdas=(0.1, 0.2, 0.3, 0.4))
    train = markov_stream(5000, V, 3, seed=1)
    variables = model.fit_variables(train)
    test = markov_stream(400, V, 3, seed=2)
    tables = {k: np.asarray(v) for k, v in variables["counts"].items()}
    comp = _target_component_probs(tables, test.astype(np.int64), V, n, 0.05)  # [n, M], full contexts
    expected = np.log(np.array([0.1, 0.2, 0.3, 0.4]) @ comp)
    logp = forward(model, variables, test[None])[0]
    got = np.take_along_axis(np.asarray(logp[n - 2:-1]), test[n - 1:, None], axis=1)[:, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Chunked scoring sees the same contexts as one long sequence.
    whole = -np.mean(np.take_along_axis(np.asarray(logp[:-1]), test[1:, None], axis=1))
    assert model.log_loss(variables, test, chunk=37) == pytest.approx(whole, rel=1e-5)


def test_em_lambdas_maximise_heldout_likelihood():
    V, n = 8, 4
    stream = markov_stream(8000, V, 2, seed=5)
    train, held = stream[:6000], stream[6000:]
    tables = _count_tables(train.astype(np.int64), V, n)
    lam = fit_lambdas_em(tables, held.astype(np.int64), V, n, 0.1)
    assert lam.shape == (n,) and (lam >= 0).all() and lam.sum() == pytest.approx(1.0)
    comp = _target_component_probs(tables, held.astype(np.int64), V, n, 0.1)
    best = np.log(lam @ comp).mean()
    rng = np.random.default_rng(0)
    for other in rng.dirichlet(np.ones(n), size=30):  # concave objective: EM's optimum beats any other point
        assert best >= np.log(other @ comp).mean() - 1e-6
    # The source is order 3, so the order-3 weight dominates.
    assert lam.argmax() == 2
    # fit_variables uses these lambdas when given held-out text.
    variables = NGramLM(vocab_size=V, order=n, add_k=0.1).fit_variables(train, held)
    np.testing.assert_allclose(variables["counts"]["lambdas"], lam, rtol=1e-5)


def test_best_order_finds_source_order():
    V = 6
    stream = markov_stream(30000, V, 2, seed=7, noise=0.2)
    best, rows = NGramLM.best_order(stream[:25000], stream[25000:], V, orders=(1, 2, 3, 4), add_k=0.1)
    loss = {r["order"]: r["val_loss"] for r in rows}
    assert loss[1] > loss[2] > loss[3] + 0.3  # order 3 sees the whole source context
    assert best in (3, 4) and loss[best] <= loss[3] + 1e-9 and loss[4] > loss[3] - 0.01


def test_fit_order6_on_200k_tokens_is_fast():
    # Random-ish text: words from a 2000-word random lexicon over 60 letters, separated by token 0.
    rng = np.random.default_rng(0)
    lexicon = [rng.integers(1, 61, size=rng.integers(2, 9)) for _ in range(2000)]
    words = rng.zipf(1.3, size=60000) % 2000
    stream = np.concatenate([np.append(lexicon[w], 0) for w in words])[:200_000]
    model = NGramLM(vocab_size=61, order=6, add_k=0.1)
    t0 = time.perf_counter()
    variables = model.fit_variables(stream)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20.0, f"fit took {elapsed:.1f}s"  # ~0.5 s CPU when the machine is idle
    c = variables["counts"]
    for j in range(1, 6):  # every (context of length j, next token) occurrence counted exactly once
        assert float(c[f"pair_counts_{j}"].sum()) == len(stream) - j
        assert float(c[f"ctx_totals_{j}"].sum()) == len(stream) - j


def test_key_overflow_is_refused():
    # (distinct contexts + 1) * V must fit int32; a huge vocabulary breaks that loudly.
    V = 2**21
    stream = np.random.default_rng(0).integers(0, V, size=3000)
    with pytest.raises(DataError, match="overflow"):
        NGramLM(vocab_size=V, order=2, lambdas=(0.5, 0.5)).fit_variables(stream)


def test_bad_inputs_raise():
    V = 5
    model = NGramLM(vocab_size=V, order=3, lambdas=(0.2, 0.3, 0.5))
    variables = model.fit_variables(np.array([0, 1, 2, 3, 4, 0, 1]))
    tokens = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(TokenRangeError, match="tokens"):
        model.apply(variables, tokens.at[0, 1].set(V))
    with pytest.raises(ShapeError, match="integer"):
        model.apply(variables, tokens.astype(jnp.float32))
    with pytest.raises(ShapeError, match="mask"):
        model.apply(variables, tokens, mask=jnp.ones((2, 3), bool))
    state = model.apply(variables, 2, 4, method="init_state")
    with pytest.raises(ShapeError, match="token"):
        model.apply(variables, state, tokens, method="step")
    with pytest.raises(TokenRangeError, match="token"):
        model.apply(variables, state, jnp.array([0, -1]), method="step")
    with pytest.raises(ShapeError, match="order=2"):  # variables fitted for another order
        NGramLM(vocab_size=V, order=2).apply(variables, tokens)
    with pytest.raises(TokenRangeError, match="train_ids"):
        model.fit_variables(np.array([0, 1, 7]))
    with pytest.raises(DataError, match="1-D"):
        model.fit_variables(np.zeros((2, 5), np.int32))
    with pytest.raises(DataError, match="too few"):
        NGramLM(vocab_size=V, order=3).fit_variables(np.array([0, 1, 2, 3]))
    with pytest.raises(ConfigError, match="lambdas"):
        NGramLM(vocab_size=V, order=3, lambdas=(0.5, 0.5))
    with pytest.raises(ConfigError, match="add_k"):
        NGramLM(vocab_size=V, order=3, add_k=0.0)
    with pytest.raises(ConfigError, match="order"):
        NGramLM(vocab_size=V, order=0)
    with pytest.raises(ConfigError, match="lambdas"):
        NGramLM.from_config(NGramConfig(order=2, lambdas="0.5;0.5"), V)


def test_from_config():
    model = NGramLM.from_config(NGramConfig(order=2, add_k=0.5, lambdas="0.25,0.75"), 7)
    assert (model.order, model.add_k, model.lambdas, model.vocab_size) == (2, 0.5, (0.25, 0.75), 7)
    assert NGramLM.from_config(NGramConfig(), 7).lambdas is None
