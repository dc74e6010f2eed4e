"""RNN encoder-decoders and step-wise attention: the two forms agree, padding is exact, decoding serves them.

The attention cell is also held against an independent float64 NumPy loop of the papers' equations.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import GRU, LSTM, decoding, unroll
from jaxseq.attention_cells import AttentionCell, masked_softmax
from jaxseq.config import Seq2SeqConfig
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.models.seq2seq import build_rnn_seq2seq

SV, TV = 11, 13
SMALL = Seq2SeqConfig(d_embed=8, d_hidden=12, d_attention=10, cnn_channels=6)
MODELS = [("lstm", None), ("gru", "bahdanau"), ("lstm", "luong")]


def build(kind="lstm", score=None, source="tokens", **overrides):
    cfg = dataclasses.replace(SMALL, **overrides)
    spec = {"interface": "seq2seq", "source": source, "src_vocab_size": SV, "vocab_size": TV}
    model = build_rnn_seq2seq(cfg, spec, "auto", cell_kind=kind, score=score)
    src = jnp.zeros((1, 8, 8, 1)) if source == "image" else jnp.zeros((1, 5), jnp.int32)
    variables = model.init(jax.random.key(0), src, jnp.zeros((1, 4), jnp.int32))
    return model, variables


def tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def lengths_mask(lengths, width):
    return jnp.asarray(np.arange(width)[None] < np.asarray(lengths)[:, None])


def stepwise(model, v, src, tgt, src_mask):
    """Logits of every target position by encode -> init_state -> step, one token at a time."""
    enc = model.apply(v, src, src_mask, method="encode")
    state = model.apply(v, enc, src_mask, tgt.shape[1], method="init_state")
    out = []
    for t in range(tgt.shape[1]):
        state, logits = model.apply(v, state, tgt[:, t], method="step")
        out.append(logits)
    return jnp.stack(out, 1)


@pytest.mark.parametrize("kind,score", MODELS + [("lstm", "dot")])
def test_teacher_forcing_equals_stepwise_decoding(kind, score):
    """The parallel (teacher-forced, unrolled) and the recurrent (step) forms agree at every valid position,
    with ragged source and target padding."""
    luong = {"luong_score": score} if score == "dot" else {}
    model, v = build(kind, "luong" if score == "dot" else score, encoder_layers=2, decoder_layers=2, **luong)
    src, tgt = tokens((3, 7), SV), tokens((3, 6), TV, 1)
    src_mask, tgt_mask = lengths_mask([7, 2, 5], 7), lengths_mask([6, 6, 3], 6)
    parallel = model.apply(v, src, tgt, src_mask=src_mask, tgt_mask=tgt_mask)
    steps = stepwise(model, v, src, tgt, src_mask)
    valid = np.asarray(tgt_mask)
    np.testing.assert_allclose(np.asarray(parallel)[valid], np.asarray(steps)[valid], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind,score", [("gru", None), ("lstm", "bahdanau")])
def test_padded_batch_equals_unpadded_rows(kind, score):
    """Garbage tokens in the padding change nothing: each padded row gives its unpadded row's logits."""
    model, v = build(kind, score)
    lens = [6, 2, 4]
    src = tokens((3, 6), SV, 2)
    src_mask = lengths_mask(lens, 6)
    tgt = tokens((3, 5), TV, 3)
    batch = model.apply(v, src, tgt, src_mask=src_mask)
    for b, n in enumerate(lens):
        alone = model.apply(v, src[b:b + 1, :n], tgt[b:b + 1])
        np.testing.assert_allclose(np.asarray(batch[b]), np.asarray(alone[0]), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("score", ["bahdanau", "luong"])
def test_attention_weights_zero_on_padding_and_sum_to_one(score):
    model, v = build("lstm", score)
    src, tgt = tokens((3, 7), SV, 4), tokens((3, 5), TV, 5)
    src_mask = lengths_mask([7, 1, 4], 7)
    w = np.asarray(model.apply(v, src, tgt, src_mask, None, method="attention_weights"))
    assert w.shape == (3, 5, 7)
    assert np.all(w[~np.broadcast_to(np.asarray(src_mask)[:, None], w.shape)] == 0.0)  # exactly zero
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(w[1, :, 0], 1.0, atol=1e-6)  # one valid position takes all the weight
    with pytest.raises(ConfigError, match="no attention"):
        build("lstm", None)[0].apply(build("lstm", None)[1], src, tgt, method="attention_weights")


def test_padded_memory_gets_no_gradient():
    cell = AttentionCell(LSTM(4 + 6, 5), d_memory=6)
    params = cell.init(jax.random.key(0))
    memory = jax.random.normal(jax.random.key(1), (2, 5, 6))
    mask = lengths_mask([5, 3], 5)
    xs = jax.random.normal(jax.random.key(2), (2, 3, 4))

    def loss(memory):
        ys, _ = unroll(cell, cell.bind(params, memory, mask), xs)
        return jnp.sum(ys ** 2)

    g = np.asarray(jax.grad(loss)(memory))
    assert np.all(g[1, 3:] == 0.0) and np.abs(g[1, :3]).sum() > 0


def _np_lstm(p, h, c, x):
    z = x @ p["w_ih"] + p["b_ih"] + h @ p["w_hh"] + p["b_hh"]
    i, f, g, o = np.split(z, 4, axis=-1)
    sig = lambda a: 1 / (1 + np.exp(-a))
    c = sig(f) * c + sig(i) * np.tanh(g)
    return sig(o) * np.tanh(c), c


def _np_softmax(s, mask):
    s = np.where(mask, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("score", ["bahdanau", "general", "dot"])
def test_attention_cell_matches_float64_numpy_loop(score):
    """Bahdanau: e = v . tanh(W s_{t-1} + U m + b), s_t = LSTM(s_{t-1}, [x; c]), y = [s_t; c].
    Luong: h_t = LSTM(h_{t-1}, [x; h~_{t-1}]), a = softmax(h_t . m) or (h_t . W m), h~ = tanh(W_c [c; h])."""
    E, M, H, S, T, B = 3, 5 if score != "dot" else 4, 4, 6, 4, 2
    fed = M if score == "bahdanau" else H
    cell = AttentionCell(LSTM(E + fed, H), d_memory=M, score=score, d_attention=7)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), cell.init(jax.random.key(3)))
    memory = np.random.default_rng(0).normal(size=(B, S, M))
    mask = np.arange(S)[None] < np.array([[6], [3]])
    xs = np.random.default_rng(1).normal(size=(B, T, E))
    got, _ = unroll(cell, cell.bind(params, jnp.asarray(memory, jnp.float32), jnp.asarray(mask)),
                    jnp.asarray(xs, jnp.float32))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h, c, feed = np.zeros((B, H)), np.zeros((B, H)), np.zeros((B, H))
    want = []
    for t in range(T):
        if score == "bahdanau":
            e = np.tanh((h @ p["w_query"])[:, None] + memory @ p["w_key"] + p["b_key"]) @ p["v"]
            a = _np_softmax(e, mask)
            ctx = np.einsum("bs,bsm->bm", a, memory)
            h, c = _np_lstm(p["cell"], h, c, np.concatenate([xs[:, t], ctx], -1))
            want.append(np.concatenate([h, ctx], -1))
        else:
            h, c = _np_lstm(p["cell"], h, c, np.concatenate([xs[:, t], feed], -1))
            keys = memory @ p["w_key"] if score == "general" else memory
            a = _np_softmax(np.einsum("bh,bsh->bs", h, keys), mask)
            ctx = np.einsum("bs,bsm->bm", a, memory)
            feed = np.tanh(np.concatenate([ctx, h], -1) @ p["w_out"])
            want.append(feed)
    np.testing.assert_allclose(np.asarray(got), np.stack(want, 1), atol=1e-5, rtol=1e-5)


def test_masked_softmax_all_masked_row_is_zero():
    w = masked_softmax(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[True, False], [False, False]]))
    np.testing.assert_array_equal(np.asarray(w), [[1.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("score", [None, "bahdanau"])
def test_beam_one_equals_greedy_and_beam_scores_are_teacher_forced_logprobs(score):
    model, v = build("gru", score)
    src, src_mask = tokens((3, 6), SV, 6), lengths_mask([6, 3, 1], 6)
    enc = model.apply(v, src, src_mask, method="encode")
    state = model.apply(v, enc, src_mask, 7, method="init_state")
    bos = jnp.ones((3, 1), jnp.int32)
    greedy = decoding.sample(model, v, bos, max_new_tokens=6, temperature=0.0, state=state)
    beam1, _ = decoding.beam_search(model, v, bos, max_new_tokens=6, beam_size=1, state=state)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(beam1[:, 0]))
    seqs, scores = decoding.beam_search(model, v, bos, max_new_tokens=6, beam_size=3, state=state)
    for k in range(3):
        seq = jnp.asarray(seqs[:, k])
        logp = jax.nn.log_softmax(model.apply(v, src, seq, src_mask=src_mask))[:, :-1]
        want = np.take_along_axis(np.asarray(logp), np.asarray(seq)[:, 1:, None], -1)[..., 0].sum(-1)
        np.testing.assert_allclose(np.asarray(scores[:, k]), want, atol=1e-4)


@pytest.mark.parametrize("score", [None, "luong"])
def test_image_encoder_decoder_two_forms_agree(score):
    model, v = build("lstm", score, source="image")
    images = jax.random.uniform(jax.random.key(7), (2, 8, 8, 1))
    tgt = tokens((2, 5), TV, 8)
    parallel = model.apply(v, images, tgt)
    np.testing.assert_allclose(np.asarray(parallel), np.asarray(stepwise(model, v, images, tgt, None)),
                               atol=2e-5, rtol=2e-5)
    if score is not None:  # the memory is the 2 x 2 grid left by two stride-2 convolutions of 8 x 8
        assert model.apply(v, images, tgt, method="attention_weights").shape == (2, 5, 4)


def test_bad_configurations_are_named():
    with pytest.raises(ConfigError, match="make them equal"):
        AttentionCell(LSTM(8, 4), d_memory=6, score="dot")
    with pytest.raises(ConfigError, match="d_in = d_embed"):
        AttentionCell(GRU(5, 4), d_memory=6, score="bahdanau")
    with pytest.raises(ConfigError, match="make it even"):
        build("lstm", None, d_hidden=11)
    cell = AttentionCell(LSTM(10, 5), d_memory=6)
    with pytest.raises(ConfigError, match="bind"):
        unroll(cell, cell.init(jax.random.key(0)), jnp.zeros((2, 3, 4)))
    with pytest.raises(ShapeError, match="d_memory=6"):
        cell.bind(cell.init(jax.random.key(0)), jnp.zeros((2, 3, 5)))


@pytest.mark.parametrize("score", ["luong"])
def test_dropout_acts_in_training_only(score):
    model, v = build("lstm", score, dropout=0.5, decoder_layers=2, encoder_layers=2)
    src, tgt = tokens((2, 5), SV, 9), tokens((2, 4), TV, 10)
    fixed = [np.asarray(model.apply(v, src, tgt)) for _ in range(2)]
    np.testing.assert_array_equal(*fixed)
    drawn = [np.asarray(model.apply(v, src, tgt, deterministic=False, rngs={"dropout": jax.random.key(k)}))
             for k in range(2)]
    assert np.all(np.isfinite(drawn)) and not np.allclose(*drawn)
