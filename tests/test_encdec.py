"""TransformerSeq2Seq: decoder steps == teacher forcing with source padding; decoding over its state; errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.errors import ShapeError, TokenRangeError
from jaxseq.models.encdec import TransformerSeq2Seq
V, SV = 13, 11
TINY = dict(vocab_size=V, num_heads=4, d_model=32, d_ff=64, max_len=16)


def random_variables(model, *example_args, seed=0, std=0.2):
    """NumPy-drawn parameters of the right shapes (skips compiling model.init; see test_transformer.py)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example_args)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        return jnp.asarray((path[-1].key == "scale") + std * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tokens(shape, seed=0, vocab=V):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@functools.lru_cache(maxsize=None)
def built_s2s(**kw):
    # One encoder layer is enough to exercise source masking; two decoder layers chain their caches.
    model = TransformerSeq2Seq(**{**TINY, "src_vocab_size": SV, "num_layers": 1, "num_decoder_layers": 2, **kw})
    variables = random_variables(model, tokens((1, 5), vocab=SV), tokens((1, 4)))
    apply = jax.jit(lambda v, s, t, sm, tm: model.apply(v, s, t, src_mask=sm, tgt_mask=tm))
    step = jax.jit(lambda v, st, t: model.apply(v, st, t, method="step"))

    @functools.partial(jax.jit, static_argnums=3)
    def start(v, src, src_mask, max_len):  # encode + init_state: the decoding state for a source batch
        memory = model.apply(v, src, src_mask, method="encode")
        return model.apply(v, memory, src_mask, max_len, method="init_state")

    return model, variables, apply, step, start


@pytest.mark.parametrize("kw", [dict(positional="learned"), dict(positional="rope", num_kv_heads=2, tie_embeddings=False)])
def test_step_matches_teacher_forcing_with_source_padding(kw):
    model, v, apply, step, start = built_s2s(**kw)
    src, tgt = tokens((3, 7), seed=1, vocab=SV), tokens((3, 6), seed=2)
    src_mask = jnp.asarray(np.arange(7)[None] < np.array([7, 3, 5])[:, None])
    full = np.asarray(apply(v, src, tgt, src_mask, None))
    state = start(v, src, src_mask, 8)
    for t in range(6):
        state, logits = step(v, state, tgt[:, t])
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=2e-5, rtol=1e-5)
    # Source padding is invisible: with any ids under the padding, and vs. row 1's 3 source tokens alone.
    other = src.at[1, 3:].set(SV - 1)
    np.testing.assert_allclose(np.asarray(apply(v, other, tgt, src_mask, None)), full, atol=2e-5)
    if kw["positional"] != "learned":
        return  # (compiling the alone shape once is enough)
    alone = np.asarray(apply(v, src[1:2, :3], tgt[1:2], None, None))[0]
    np.testing.assert_allclose(full[1], alone, atol=2e-5)


def test_empty_source_row_is_finite_and_bad_inputs_raise():
    model, v, apply, _, _ = built_s2s(positional="learned")
    src, tgt = tokens((3, 7), vocab=SV), tokens((3, 6))
    out = apply(v, src, tgt, jnp.asarray([[True] * 7, [False] * 7, [True] * 7]), None)
    assert np.all(np.isfinite(np.asarray(out)))
    with pytest.raises(TokenRangeError, match="src"):
        model.apply(v, jnp.full((1, 3), SV, jnp.int32), tokens((1, 3)))
    with pytest.raises(ShapeError, match="batch"):
        model.apply(v, src, tokens((2, 4)))
    with pytest.raises(ShapeError, match="encoder output"):
        model.apply(v, src, None, 8, method="init_state")


def test_greedy_and_beam_search_over_its_state():
    """jaxseq.decoding on the encoder-decoder state: greedy = argmax of teacher forcing; beam scores =
    the log-probabilities teacher forcing gives the returned beams (so beam reordering of the state is right)."""
    decoding = pytest.importorskip("jaxseq.decoding")
    model, v, apply, _, start = built_s2s(positional="learned")
    src, src_mask = tokens((3, 7), vocab=SV), jnp.asarray(np.arange(7)[None] < np.array([7, 2, 5])[:, None])
    state = start(v, src, src_mask, 8)
    bos = jnp.zeros((3, 1), jnp.int32)
    greedy = decoding.sample(model, v, bos, max_new_tokens=5, temperature=0.0, state=state)
    seq = np.zeros((3, 6), np.int32)  # BOS + 5 greedy tokens, by rerunning teacher forcing (causal)
    for t in range(1, 6):
        seq[:, t] = np.asarray(apply(v, src, jnp.asarray(seq), src_mask, None))[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), seq)

    seqs, scores = decoding.beam_search(model, v, bos, max_new_tokens=5, beam_size=3, state=state)
    seqs, scores = np.asarray(seqs), np.asarray(scores)
    assert seqs.shape == (3, 3, 6) and np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    for k in range(3):
        logp = np.asarray(jax.nn.log_softmax(apply(v, src, jnp.asarray(seqs[:, k]), src_mask, None)))[:, :-1]
        want = np.take_along_axis(logp, seqs[:, k, 1:, None], axis=-1)[..., 0].sum(-1)
        np.testing.assert_allclose(scores[:, k], want, atol=1e-4)
