"""Tests of jaxseq.decoding against float64 NumPy references on tiny protocol models.

Two toy models follow the protocol (init_state / step): a bigram table (stateless in effect) and a
"counter" LM whose next-token distribution depends on the running sum of every token fed so far and on
a shared scalar position (like a KV-cache index), so wrong forcing, padding or beam reordering of the
state changes the answer.
"""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.decoding import beam_search, length_penalty_factor, sample, top_k_filter, top_p_filter
from jaxseq.errors import ConfigError, ShapeError, TokenRangeError

TRACES = {"step": 0}


def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class BigramLM(nn.Module):
    """logits of the next token = table[current token]. Has a `prefill`, so `sample` takes that path."""

    vocab_size: int

    def setup(self):
        self.table = self.param("table", nn.initializers.normal(1.0), (self.vocab_size, self.vocab_size))

    def __call__(self, tokens, mask=None, deterministic=True):
        return self.table[tokens]

    def init_state(self, batch_size, max_len):
        return jnp.zeros((batch_size,), jnp.int32)

    def step(self, state, token):
        TRACES["step"] += 1  # Python side effect: runs only while tracing
        return state + 1, self.table[token]

    def prefill(self, state, tokens, mask):
        lengths = mask.sum(1)
        last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
        return state + lengths, self.table[last]


class CounterLM(nn.Module):
    """logits = table[(sum of fed tokens) % M, current token] + pos_bias[position % 2]."""

    vocab_size: int
    modulus: int = 3

    def setup(self):
        V, M = self.vocab_size, self.modulus
        self.table = self.param("table", nn.initializers.normal(1.0), (M, V, V))
        self.pos_bias = self.param("pos_bias", nn.initializers.normal(1.0), (2, V))

    def __call__(self, tokens, mask=None, deterministic=True):
        sums = jnp.cumsum(tokens, axis=1) % self.modulus
        pos = jnp.arange(tokens.shape[1]) % 2
        return self.table[sums, tokens] + self.pos_bias[pos][None]

    def init_state(self, batch_size, max_len):
        return {"sum": jnp.zeros((batch_size,), jnp.int32), "pos": jnp.zeros((), jnp.int32)}

    def step(self, state, token):
        s = (state["sum"] + token) % self.modulus
        logits = self.table[s, token] + self.pos_bias[state["pos"] % 2][None]
        return {"sum": s, "pos": state["pos"] + 1}, logits


def bigram(V, seed=0, table=None):
    model = BigramLM(V)
    if table is None:
        table = np.random.default_rng(seed).normal(size=(V, V)) * 1.5
    table = np.asarray(table, np.float32)
    return model, {"params": {"table": jnp.asarray(table)}}, lambda seq: log_softmax_np(table[seq[-1]])


def counter(V, seed=0, M=3):
    rng = np.random.default_rng(seed)
    table = (rng.normal(size=(M, V, V)) * 1.5).astype(np.float32)
    bias = rng.normal(size=(2, V)).astype(np.float32)
    model = CounterLM(V, M)

    def next_logp(seq):
        return log_softmax_np(table[sum(seq) % M, seq[-1]] + bias[(len(seq) - 1) % 2])

    return model, {"params": {"table": jnp.asarray(table), "pos_bias": jnp.asarray(bias)}}, next_logp


def greedy_np(next_logp, prefix, n, end_id=None):
    seq = list(prefix)
    for _ in range(n):
        tok = int(np.argmax(next_logp(seq)))
        seq.append(tok)
        if tok == end_id:
            break
    return seq


# ----------------------------------------------------------------------------- filters


def top_k_np(x, k):
    out = np.array(x, np.float64)
    for row in out.reshape(-1, out.shape[-1]):
        kth = np.sort(row)[::-1][min(k, row.size) - 1]
        row[row < kth] = -np.inf
    return out


def top_p_np(x, p):
    out = np.array(x, np.float64)
    for row in out.reshape(-1, out.shape[-1]):
        order = np.argsort(-row)
        probs = np.exp(log_softmax_np(row))[order]
        kept, mass = [], 0.0
        for i, pr in zip(order, probs):
            kept.append(i)
            mass += pr
            if mass >= p:
                break
        drop = np.setdiff1d(np.arange(row.size), kept)
        row[drop] = -np.inf
    return out


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_top_k_filter_matches_numpy(k):
    x = np.random.default_rng(1).normal(size=(2, 3, 7)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(x), k)), top_k_np(x, k).astype(np.float32))


def test_top_k_filter_keeps_ties():
    x = jnp.asarray([[1.0, 3.0, 2.0, 2.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(top_k_filter(x, 2)), [[-np.inf, 3.0, 2.0, 2.0, -np.inf]])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.999, 1.0])
def test_top_p_filter_matches_numpy(p):
    x = np.random.default_rng(2).normal(size=(5, 9)).astype(np.float32) * 2
    got = np.asarray(jax.jit(top_p_filter)(jnp.asarray(x), p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(top_p_np(x, p)))
    np.testing.assert_array_equal(got[np.isfinite(got)], x[np.isfinite(got)])


def test_filters_reject_bad_arguments():
    with pytest.raises(ConfigError, match="top_k"):
        top_k_filter(jnp.zeros((1, 3)), 0)
    with pytest.raises(ConfigError, match="top_p"):
        top_p_filter(jnp.zeros((1, 3)), 0.0)
    with pytest.raises(ConfigError, match="top_p"):
        top_p_filter(jnp.zeros((1, 3)), 1.5)


# ----------------------------------------------------------------------------- sampling


def test_greedy_matches_python_argmax_bigram():
    model, variables, next_logp = bigram(6)
    prompt = np.array([[0, 3], [5, 1], [2, 2]], np.int32)
    out = sample(model, variables, prompt, max_new_tokens=7, temperature=0.0)
    assert out.tokens.shape == (3, 9) and out.tokens.dtype == jnp.int32
    for b in range(3):
        assert np.asarray(out.tokens[b]).tolist() == greedy_np(next_logp, prompt[b], 7)
    np.testing.assert_array_equal(out.lengths, [9, 9, 9])


def test_greedy_with_end_id_on_stateful_model():
    model, variables, next_logp = counter(5, seed=3)
    prompt = np.array([[1, 2, 0], [4, 4, 3], [0, 1, 1], [3, 0, 2]], np.int32)
    # Pick an end_id that the greedy path really emits in some row (and not in others).
    paths = {e: [greedy_np(next_logp, p, 6, end_id=e) for p in prompt] for e in range(5)}
    end_id = next(e for e, ps in paths.items() if 0 < sum(len(s) < 9 for s in ps) < len(prompt))
    out = sample(model, variables, prompt, max_new_tokens=6, temperature=0.0, end_id=end_id)
    for b, want in enumerate(paths[end_id]):
        assert int(out.lengths[b]) == len(want)
        assert np.asarray(out.tokens[b]).tolist() == want + [end_id] * (9 - len(want))
        np.testing.assert_array_equal(out.mask[b], np.arange(9) < len(want))


def counts_of(tokens, V):
    return np.bincount(np.asarray(tokens), minlength=V) / len(tokens)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, None, None), (0.5, None, None), (2.0, 3, 0.9)],  # the first two share one compiled function
)
def test_sampling_frequencies_match_distribution(temperature, top_k, top_p):
    V, n = 5, 4000
    logits = np.array([1.0, 0.2, -0.5, 0.9, -1.0])
    table = np.tile(logits, (V, 1))
    model, variables, _ = bigram(V, table=table)
    out = sample(model, variables, np.zeros((n, 1), np.int32), max_new_tokens=2, key=jax.random.key(0),
                 temperature=temperature, top_k=top_k, top_p=top_p)
    want = logits / temperature
    if top_k is not None:
        want = top_k_np(want, top_k)
    if top_p is not None:
        want = top_p_np(want, top_p)
    probs = np.exp(log_softmax_np(want))
    for pos in (1, 2):  # both generated positions follow the same distribution
        freq = counts_of(out.tokens[:, pos], V)
        tol = 4.5 * np.sqrt(probs * (1 - probs) / n) + 1e-9
        assert np.all(np.abs(freq - probs) <= tol), (pos, freq, probs)
        assert np.all(freq[probs == 0] == 0)


def test_same_key_same_samples_different_keys_differ():
    model, variables, _ = counter(7, seed=1)
    prompt = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
    kw = dict(max_new_tokens=12, temperature=1.5)
    a = sample(model, variables, prompt, key=jax.random.key(0), **kw).tokens
    b = sample(model, variables, prompt, key=jax.random.key(0), **kw).tokens
    c = sample(model, variables, prompt, key=jax.random.key(1), **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :2], prompt)


def ragged_batch():
    prompts = [[1, 2, 3, 4], [2], [0, 3], [4, 4, 1]]
    P = max(map(len, prompts))
    prompt = np.full((len(prompts), P), 6, np.int32)  # pad with a valid id that the model would react to
    mask = np.zeros_like(prompt, bool)
    for b, p in enumerate(prompts):
        prompt[b, : len(p)] = p
        mask[b, : len(p)] = True
    return prompts, prompt, mask


def test_ragged_prompts_equal_rows_run_alone():
    model, variables, next_logp = counter(7, seed=5)
    prompts, prompt, mask = ragged_batch()
    N = 5
    out = sample(model, variables, prompt, prompt_mask=mask, max_new_tokens=N, temperature=0.0)
    assert out.tokens.shape == (4, 4 + N)
    for b, p in enumerate(prompts):
        want = greedy_np(next_logp, p, N)  # the row alone, in NumPy
        if b in (0, 1):  # the row alone through sample too (two rows: each prompt length compiles anew)
            alone = sample(model, variables, np.array([p], np.int32), max_new_tokens=N, temperature=0.0)
            assert np.asarray(alone.tokens[0]).tolist() == want
        assert np.asarray(out.tokens[b]).tolist() == want + [0] * (4 - len(p))
        assert int(out.lengths[b]) == len(p) + N


def test_sampled_tokens_do_not_depend_on_padding_width():
    model, variables, _ = counter(7, seed=5)
    _, prompt, mask = ragged_batch()
    wide = np.concatenate([prompt, np.full((4, 3), 2, np.int32)], axis=1)
    wide_mask = np.concatenate([mask, np.zeros((4, 3), bool)], axis=1)
    kw = dict(max_new_tokens=6, key=jax.random.key(3), temperature=1.0, top_k=5)
    a = sample(model, variables, prompt, prompt_mask=mask, **kw)
    b = sample(model, variables, wide, prompt_mask=wide_mask, **kw)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.tokens, b.tokens[:, : a.tokens.shape[1]])
    assert np.all(np.asarray(b.tokens[:, a.tokens.shape[1]:]) == 0)


def test_prefill_path_equals_step_path():
    model, variables, next_logp = bigram(7, seed=8)
    prompts, prompt, mask = ragged_batch()
    # Sampled (the per-row keys make both paths draw the same tokens); greedy is checked below.
    kw = dict(key=jax.random.key(4), temperature=1.0, top_p=0.95, max_new_tokens=6, prompt_mask=mask, end_id=3)
    a = sample(model, variables, prompt, prefill=None, **kw)  # the model has prefill: used
    b = sample(model, variables, prompt, prefill=False, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert 0 < int((np.asarray(a.lengths) < np.asarray(mask.sum(1)) + 6).sum())  # end_id was drawn somewhere
    g = sample(model, variables, prompt, max_new_tokens=6, prompt_mask=mask, end_id=3, temperature=0.0)
    for r, p in enumerate(prompts):
        want = greedy_np(next_logp, p, 6, end_id=3)
        assert np.asarray(g.tokens[r]).tolist() == want + [3] * (10 - len(want))
        assert int(g.lengths[r]) == len(want)
    with pytest.raises(ConfigError, match="prefill"):
        sample(*counter(7)[:2], prompt, max_new_tokens=2, temperature=0.0, prefill=True)


def test_generation_is_compiled_once_without_python_loop_per_token():
    model, variables, _ = bigram(4, seed=9)
    prompt = np.array([[1, 2, 3]], np.int32)
    TRACES["step"] = 0
    sample(model, variables, prompt, max_new_tokens=25, key=jax.random.key(0), temperature=0.7, top_p=0.9)
    first = TRACES["step"]
    assert 1 <= first <= 2  # the step is traced once inside the scan, never once per token
    for seed, temp, p in [(1, 0.7, 0.9), (2, 1.3, 0.5)]:  # new key, temperature, top_p: no new trace
        sample(model, variables, prompt, max_new_tokens=25, key=jax.random.key(seed), temperature=temp, top_p=p)
    assert TRACES["step"] == first


def test_caller_built_state_is_used():
    model, variables, next_logp = counter(5, seed=2)
    prompt = np.array([[1, 2], [3, 3]], np.int32)
    # A state that has already seen token 4 (sum 4 % 3 = 1): like an encoder-decoder's prepared state.
    state = {"sum": jnp.array([1, 1], jnp.int32), "pos": jnp.ones((), jnp.int32)}
    out = sample(model, variables, prompt, max_new_tokens=4, temperature=0.0, state=state)
    for b in range(2):
        want = greedy_np(lambda s: next_logp([4] + s), prompt[b], 4)
        assert np.asarray(out.tokens[b]).tolist() == want


def test_zero_new_tokens_returns_prompt():
    model, variables, _ = bigram(4)
    out = sample(model, variables, np.array([[1, 2], [3, 0]], np.int32), prompt_mask=np.array([[1, 1], [1, 0]]),
                 max_new_tokens=0, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, [[1, 2], [3, 0]])
    np.testing.assert_array_equal(out.lengths, [2, 1])


# ----------------------------------------------------------------------------- beam search


def brute_force(next_logp, prefix, V, N, end_id, alpha, pad_to):
    """Every complete hypothesis (ends with end_id, or has N new tokens), best first, as (seq, score)."""
    pad = 0 if end_id is None else end_id
    out = []

    def rec(seq, logp, n):
        if n > 0 and (n == N or seq[-1] == end_id):
            score = logp / ((5 + n) / 6) ** alpha
            out.append((seq + [pad] * (pad_to - len(seq)), score))
            return
        lp = next_logp(seq)
        for v in range(V):
            rec(seq + [v], logp + lp[v], n + 1)

    rec(list(prefix), 0.0, 0)
    return sorted(out, key=lambda x: -x[1])


def assert_beams_match(seqs, scores, want, K):
    got = [(np.asarray(seqs[k]).tolist(), float(scores[k])) for k in range(K)]
    for (gs, gsc), (ws, wsc) in zip(got, want[:K]):
        assert gs == ws, (got, want[:K])
        assert math.isclose(gsc, wsc, rel_tol=1e-5, abs_tol=1e-5)


def test_beam_size_one_equals_greedy():
    model, variables, next_logp = counter(5, seed=3)
    prompt = np.array([[1, 2, 0], [4, 4, 3], [0, 1, 1]], np.int32)

    def logp_of(path):
        return sum(next_logp(path[:i])[path[i]] for i in range(3, len(path)))

    g = sample(model, variables, prompt, max_new_tokens=6, temperature=0.0)
    seqs, scores = beam_search(model, variables, prompt, beam_size=1, max_new_tokens=6)
    assert seqs.shape == (3, 1, 9) and scores.shape == (3, 1)
    np.testing.assert_array_equal(seqs[:, 0], g.tokens)
    for b in range(3):
        assert math.isclose(float(scores[b, 0]), logp_of(np.asarray(g.tokens[b]).tolist()), rel_tol=1e-5)


def test_beam_size_one_with_end_id_keeps_best_complete_hypothesis():
    # With end_id, beam 1 follows the greedy path but also keeps, in the finished pool, any "prefix +
    # end_id" it passed; it returns whichever complete hypothesis has the higher log-prob. Row 1 of
    # this model is a case where ending early beats the 6-token greedy path.
    model, variables, next_logp = counter(5, seed=3)
    prompt = np.array([[1, 2, 0], [4, 4, 3], [0, 1, 1]], np.int32)
    end_id = 2

    def logp_of(path):
        return sum(next_logp(path[:i])[path[i]] for i in range(3, len(path)))

    g = sample(model, variables, prompt, max_new_tokens=6, temperature=0.0, end_id=end_id)
    seqs, scores = beam_search(model, variables, prompt, beam_size=1, max_new_tokens=6, end_id=end_id)
    differs = 0
    for b in range(3):
        greedy = np.asarray(g.tokens[b, : int(g.lengths[b])]).tolist()
        got = np.asarray(seqs[b, 0]).tolist()
        n = got.index(end_id, 3) + 1 if end_id in got[3:] else 9
        got = got[:n]
        # every prefix+end_id that beam 1 can have finished along the greedy path, and the path itself
        # (beam 1 looks at 2 candidates per step: end_id counts only where it is the runner-up)
        options = [greedy] + [
            greedy[:i] + [end_id] for i in range(3, len(greedy))
            if greedy[i] != end_id and end_id in np.argsort(-next_logp(greedy[:i]))[:2]
        ]
        best = max(options, key=logp_of)
        assert got == best
        assert math.isclose(float(scores[b, 0]), logp_of(got), rel_tol=1e-5)
        differs += got != greedy
    assert differs >= 1  # the case is really exercised


def test_beam_search_exact_k_best_with_end_id():
    # V=3, N=3, end_id=2, K=6: the beams and the 2K candidates hold every live prefix, so the K best
    # complete hypotheses are exact; compare with enumeration of all 15 of them per row.
    V, N, K, end_id = 3, 3, 6, 2
    model, variables, next_logp = bigram(V, seed=11)
    prompt = np.array([[0], [1], [2]], np.int32)
    seqs, scores = beam_search(model, variables, prompt, beam_size=K, max_new_tokens=N, end_id=end_id)
    for b in range(3):
        want = brute_force(next_logp, prompt[b], V, N, end_id, 0.0, 1 + N)
        assert len(want) == 15
        assert_beams_match(seqs[b], scores[b], want, K)
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)


def test_beam_search_exact_on_stateful_model_with_ragged_prompts():
    # The counter model's distribution depends on the whole history, so this checks that the state is
    # reordered with its beams and that forced prompt steps leave it right. V=2, N=3, K=4: exhaustive.
    V, N, K = 2, 3, 4
    model, variables, next_logp = counter(V, seed=4)
    prompt = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1]], np.int32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
    seqs, scores = beam_search(model, variables, prompt, beam_size=K, max_new_tokens=N, prompt_mask=mask)
    assert seqs.shape == (3, K, 3 + N)
    for b in range(3):
        want = brute_force(next_logp, prompt[b][mask[b]], V, N, None, 0.0, 3 + N)
        assert len(want) == 8
        assert_beams_match(seqs[b], scores[b], want, K)
    # The same state built by the caller for batch B (tiled to B*K inside) gives the same result.
    state = model.apply(variables, 3, 3 + N, method="init_state")
    seqs2, scores2 = beam_search(model, variables, prompt, beam_size=K, max_new_tokens=N, prompt_mask=mask,
                                 state=state)
    np.testing.assert_array_equal(seqs, seqs2)
    np.testing.assert_allclose(scores, scores2)


def test_beam_search_beats_greedy_on_garden_path():
    # From token 0 greedy takes 1 (p=.6) but every continuation of 1 has p=1/3; 2 (p=.4) then has .9.
    p = np.array([[1e-6, 0.6, 0.4], [1 / 3, 1 / 3, 1 / 3], [0.9, 0.05, 0.05]])
    model, variables, next_logp = bigram(3, table=np.log(p))
    prompt = np.array([[0]], np.int32)
    g = sample(model, variables, prompt, max_new_tokens=2, temperature=0.0)
    assert np.asarray(g.tokens[0]).tolist()[:2] == [0, 1]
    seqs, scores = beam_search(model, variables, prompt, beam_size=2, max_new_tokens=2)
    assert np.asarray(seqs[0, 0]).tolist() == [0, 2, 0]
    np.testing.assert_allclose(float(scores[0, 0]), np.log(0.4 * 0.9), rtol=1e-5)


def test_length_penalty_changes_ranking():
    # Ending right away (p=.5) beats any 3-token hypothesis on log-prob, but with alpha = 5 the GNMT
    # penalty prefers a long one; both rankings must equal brute force.
    end_id, V, N, K = 2, 3, 3, 6
    p = np.array([[0.25, 0.25, 0.5], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    model, variables, next_logp = bigram(V, table=np.log(p))
    prompt = np.array([[0]], np.int32)
    tops = []
    for alpha in (0.0, 5.0):
        seqs, scores = beam_search(model, variables, prompt, beam_size=K, max_new_tokens=N, end_id=end_id,
                                   length_penalty=alpha)
        want = brute_force(next_logp, prompt[0], V, N, end_id, alpha, 1 + N)
        # Ties in score (a uniform row) are ordered arbitrarily: compare the scores, and the top sequence.
        np.testing.assert_allclose(np.asarray(scores[0]), [s for _, s in want[:K]], rtol=1e-5)
        assert np.asarray(seqs[0, 0]).tolist() == want[0][0]
        tops.append(np.asarray(seqs[0, 0]).tolist())
    assert tops[0] == [0, 2, 2, 2]  # stop at once, padded with end_id
    assert tops[1] == [0, 1, 1, 1]
    assert float(length_penalty_factor(3, 3.0)) == pytest.approx((8 / 6) ** 3)


def test_beam_search_zero_new_tokens():
    model, variables, _ = bigram(3)
    seqs, scores = beam_search(model, variables, np.array([[1, 2]], np.int32), beam_size=2, max_new_tokens=0)
    np.testing.assert_array_equal(seqs, [[[1, 2], [1, 2]]])
    np.testing.assert_array_equal(scores, [[0.0, -np.inf]])


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_jaxseq_errors():
    model, variables, _ = bigram(4)
    good = np.array([[1, 2]], np.int32)
    kw = dict(max_new_tokens=2, temperature=0.0)
    with pytest.raises(ShapeError, match="prompt"):
        sample(model, variables, np.array([1, 2], np.int32), **kw)
    with pytest.raises(ShapeError, match="prompt"):
        sample(model, variables, good.astype(np.float32), **kw)
    with pytest.raises(TokenRangeError, match="prompt"):
        sample(model, variables, np.array([[1, 4]], np.int32), **kw)
    with pytest.raises(ShapeError, match="prompt"):
        sample(model, variables, np.zeros((1, 0), np.int32), **kw)
    with pytest.raises(ShapeError, match="right-padded"):
        sample(model, variables, np.array([[1, 2, 3]]), prompt_mask=np.array([[1, 0, 1]], bool), **kw)
    with pytest.raises(ShapeError, match="empty"):
        sample(model, variables, good, prompt_mask=np.array([[0, 1]], bool), **kw)
    with pytest.raises(ShapeError, match="prompt_mask"):
        sample(model, variables, good, prompt_mask=np.array([[1, 1, 1]], bool), **kw)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        sample(model, variables, good, max_new_tokens=-1, temperature=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        sample(model, variables, good, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ConfigError, match="key"):
        sample(model, variables, good, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ConfigError, match="top_k"):
        sample(model, variables, good, top_k=0, **kw)
    with pytest.raises(ConfigError, match="top_p"):
        sample(model, variables, good, top_p=0.0, **kw)
    with pytest.raises(TokenRangeError, match="end_id"):
        sample(model, variables, good, end_id=4, **kw)
    with pytest.raises(ShapeError, match="state"):
        sample(model, variables, good, state=jnp.zeros((3,), jnp.int32), **kw)
    with pytest.raises(ConfigError, match="beam_size"):
        beam_search(model, variables, good, beam_size=0, max_new_tokens=2)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        beam_search(model, variables, good, beam_size=2, max_new_tokens=-1)
    with pytest.raises(ShapeError, match="prompt"):
        beam_search(model, variables, good.astype(np.float32), beam_size=2, max_new_tokens=2)
    with pytest.raises(TokenRangeError, match="prompt"):
        beam_search(model, variables, -good, beam_size=2, max_new_tokens=2)
    with pytest.raises(ConfigError, match="length_penalty"):
        beam_search(model, variables, good, beam_size=2, max_new_tokens=2, length_penalty=-0.5)


# ----------------------------------------------------------------------------- the library's models


def random_variables(model, *args, scale=0.7, seed=0):
    """Variables of `model` with N(0, scale^2) entries: shapes from eval_shape, so no init compile."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def real_model(name, V):
    """A tiny model of the library with random (or fitted) variables."""
    dummy = jnp.zeros((1, 4), jnp.int32)
    if name == "lstm":
        from jaxseq.cells import make_cell
        from jaxseq.models.rnn_lm import RecurrentLM

        model = RecurrentLM(vocab_size=V, cell=make_cell("lstm", 8, 12, num_layers=2), d_embed=8)
        return model, random_variables(model, dummy)
    if name == "transformer":
        from jaxseq.models.transformer import TransformerLM

        model = TransformerLM(vocab_size=V, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=16)
        return model, random_variables(model, dummy)
    if name == "ngram":
        from jaxseq.models.ngram import NGramLM

        model = NGramLM(vocab_size=V, order=3, lambdas=(0.1, 0.3, 0.6))
        ids = np.random.default_rng(0).integers(0, V, size=300)
        ids[::3] = (ids[1::3][: len(ids[::3])] + 1) % V  # some structure to learn
        return model, model.fit_variables(ids)
    raise ValueError(name)


def apply_logp(model, variables, tokens):
    """float64 log-probs [B, T-1, V] of tokens[:, 1:] from the parallel form."""
    logits = jax.jit(model.apply)(variables, jnp.asarray(tokens[:, :-1], jnp.int32))
    return log_softmax_np(np.asarray(logits, np.float64))


@pytest.mark.parametrize("name", ["lstm", "transformer", "ngram"])
def test_library_models_greedy_and_beam_agree_with_parallel_form(name):
    V, N, K = 4, 2, 4
    model, variables = real_model(name, V)
    prompt = np.array([[1, 2, 3], [2, 0, 0], [3, 1, 0]], np.int32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
    lengths = mask.sum(1)
    out = sample(model, variables, prompt, prompt_mask=mask, max_new_tokens=5, temperature=0.0)
    if hasattr(model, "prefill"):  # the TransformerLM: its prefill path must agree with the step path
        stepped = sample(model, variables, prompt, prompt_mask=mask, max_new_tokens=5, temperature=0.0,
                         prefill=False)
        np.testing.assert_array_equal(out.tokens, stepped.tokens)
    seqs, scores = beam_search(model, variables, prompt, prompt_mask=mask, beam_size=K, max_new_tokens=N)
    # Score everything with the parallel form in one call (one compile): the greedy rows, then every
    # one of the V**N continuations of each prompt (padded to the same width; the models are causal).
    greedy = np.asarray(out.tokens)  # [3, 8]
    conts = np.array(list(itertools.product(range(V), repeat=N)), np.int32)  # [16, N]
    brute = np.zeros((3, len(conts), greedy.shape[1]), np.int32)
    for b in range(3):
        brute[b, :, : lengths[b]] = prompt[b, : lengths[b]]
        brute[b, :, lengths[b] : lengths[b] + N] = conts
    lp_all = apply_logp(model, variables, np.concatenate([greedy, brute.reshape(-1, greedy.shape[1])]))

    # Greedy: every generated token is the argmax of the parallel form's distribution at its position.
    lp = lp_all[:3]
    for b in range(3):
        np.testing.assert_array_equal(greedy[b, : lengths[b]], prompt[b, : lengths[b]])
        for pos in range(lengths[b], lengths[b] + 5):
            assert lp[b, pos - 1, greedy[b, pos]] >= lp[b, pos - 1].max() - 1e-4, (b, pos)

    # Beam search (exhaustive here: K = V prefixes, all last-step candidates have equal length) against
    # brute force over all V**N continuations.
    lp = lp_all[3:].reshape(3, len(conts), *lp_all.shape[1:])
    for b in range(3):
        L = lengths[b]
        total = sum(lp[b, np.arange(len(conts)), L - 1 + i, conts[:, i]] for i in range(N))
        best = np.argsort(-total, kind="stable")[:K]
        np.testing.assert_allclose(np.asarray(scores[b]), total[best], atol=2e-4)
        want = brute[b, best, : 3 + N]
        if np.min(-np.diff(total[np.argsort(-total)][: K + 1])) > 1e-3:  # no near-ties: order is defined
            np.testing.assert_array_equal(np.asarray(seqs[b]), want)


def test_encoder_decoder_with_caller_built_state():
    from jaxseq.models.encdec import TransformerSeq2Seq

    V, bos, N, K = 5, 0, 5, 3
    model = TransformerSeq2Seq(src_vocab_size=6, vocab_size=V, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                               max_len=12)
    src = np.array([[1, 2, 3, 4], [5, 4, 0, 0]], np.int32)
    src_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    variables = random_variables(model, jnp.asarray(src), jnp.zeros((2, 3), jnp.int32))

    @jax.jit
    def encoder_state(v, s, m):  # what a seq2seq caller does: encode, then build the decoder state
        return model.apply(v, model.apply(v, s, m, method="encode"), m, 1 + N, method="init_state")

    state = encoder_state(variables, src, src_mask)
    prompt = np.full((2, 1), bos, np.int32)
    # Beam search tiles the caller's [B] state to B * K rows and reorders it (cross-attention memory,
    # source mask and self-attention caches) with the beams. (Greedy sampling from a caller-built state
    # is checked on the counter toy; each extra decoder compile here costs seconds.)
    seqs, scores = beam_search(model, variables, prompt, beam_size=K, max_new_tokens=N, state=state)
    # The teacher-forced parallel form scores the K beams of each row.
    tgt = np.asarray(seqs).reshape(2 * K, 1 + N)
    fwd = jax.jit(lambda v, s, t, m: model.apply(v, s, t, src_mask=m))
    logits = fwd(variables, np.repeat(src, K, 0), tgt[:, :-1], np.repeat(src_mask, K, 0))
    lp = log_softmax_np(np.asarray(logits, np.float64))
    want = lp[np.arange(2 * K)[:, None], np.arange(N)[None], tgt[:, 1:]].sum(1).reshape(2, K)
    np.testing.assert_allclose(np.asarray(scores), want, atol=2e-4)
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)
    for b in range(2):
        assert len({tuple(s) for s in np.asarray(seqs[b]).tolist()}) == K  # distinct hypotheses
