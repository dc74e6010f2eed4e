"""PixelRNN: the recurrences against float64 NumPy loops, parallel form vs pixel-by-pixel steps, causality
by gradients, bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import decoding
from jaxseq.errors import ConfigError, ShapeError, TokenRangeError
from jaxseq.models.pixel_lstm import PixelLSTM
from jaxseq.models.pixelrnn import PixelRNN, causal_mask, skew, unskew

H, W, LEVELS = 4, 5, 3  # not square, so a swapped height and width fails


def models():
    small = {"levels": LEVELS, "height": H, "width": W, "d_hidden": 3, "num_layers": 2, "d_head": 16, "first_kernel": 3}
    return {"row": PixelRNN(kind="row", **small), "diagonal": PixelRNN(kind="diagonal", **small),
            "pixel-lstm": PixelLSTM(LEVELS, H, W, d_hidden=6, num_layers=2)}


def images(batch=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, LEVELS, (batch, H, W)), jnp.int32)


@functools.cache
def built(name):
    """(model, variables), initialised once per test session (jitted: one compile, not one per op)."""
    model = models()[name]
    return model, jax.jit(model.init)(jax.random.key(1), images())


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _lstm(z, c_prev):
    i, f, g, o = np.split(z, 4, axis=-1)
    c = _sigmoid(f) * c_prev + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c


def test_row_lstm_matches_numpy_loop():
    """Row LSTM layer: h[i, j] from x[i, j] and h[i-1, j-1..j+1]; c[i, j] from c[i-1, j]."""
    model, variables = built("row")
    g = np.random.default_rng(2).normal(size=(2, H, W, 4 * 3)).astype(np.float32)
    got = jax.jit(lambda v: model.apply(variables, v, method=lambda m, v: m.rnn[0](v.reshape(2, H, -1))[0]))(g)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["rnn_0"]["cell"])
    h = np.zeros((2, H + 1, W + 2, 3))  # a zero row above, zero columns at both sides
    c = np.zeros((2, H + 1, W, 3))
    for i in range(H):
        for j in range(W):
            z = g[:, i, j] + p["b"] + sum(h[:, i, j + k] @ p["w_hh"][k] for k in range(3))  # j-1, j, j+1
            h[:, i + 1, j + 1], c[:, i + 1, j] = _lstm(z, c[:, i, j])
    np.testing.assert_allclose(np.asarray(got).reshape(2, H, W, 3), h[:, 1:, 1:-1], atol=1e-5)


def test_diagonal_lstm_matches_numpy_loop():
    """Diagonal LSTM over the skewed map: h[i, j] from x[i, j], h[i-1, j] and h[i, j-1]; c[i, j] from c[i, j-1]."""
    model, variables = built("diagonal")
    g = np.random.default_rng(3).normal(size=(2, H, W, 4 * 3)).astype(np.float32)
    got = jax.jit(lambda v: model.apply(variables, v, method=lambda m, v: m._diagonal_lstm(m.rnn[0][0], v)))(g)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["rnn_lr_0"]["cell"])
    h = np.zeros((2, H + 1, W + 1, 3))
    c = np.zeros((2, H, W + 1, 3))
    for i in range(H):
        for j in range(W):
            z = g[:, i, j] + p["b"] + h[:, i, j + 1] @ p["w_hh"][0] + h[:, i + 1, j] @ p["w_hh"][1]
            h[:, i + 1, j + 1], c[:, i, j + 1] = _lstm(z, c[:, i, j])
    np.testing.assert_allclose(np.asarray(got), h[:, 1:, 1:], atol=1e-5)


def test_skew_round_trip_and_masks():
    x = jnp.arange(2 * H * W * 1, dtype=jnp.float32).reshape(2, H, W, 1)
    s = skew(x)
    assert s.shape == (2, H, W + H - 1, 1)
    assert float(s[0, 2, 3, 0]) == float(x[0, 2, 1, 0])  # row i shifted right by i
    np.testing.assert_array_equal(unskew(s, W), x)
    a, b = causal_mask(3, 3, 1, 1, include_centre=False)[..., 0, 0], causal_mask(3, 3, 1, 1, include_centre=True)[..., 0, 0]
    np.testing.assert_array_equal(a, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b, [[1, 1, 1], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("name", ["row", "diagonal", "pixel-lstm"])
def test_parallel_form_equals_pixel_by_pixel_steps(name):
    model, variables = built(name)
    x = images(seed=4)
    parallel = jax.jit(model.apply)(variables, x)  # [B, H, W, levels]
    state = model.apply(variables, 2, None, method="init_state")
    step = jax.jit(lambda s, tok: model.apply(variables, s, tok, method="step"))
    flat = np.asarray(x).reshape(2, -1)
    fed = np.concatenate([np.full((2, 1), LEVELS), flat[:, :-1]], axis=1)  # BOS, then pixel t - 1
    for t in range(H * W):
        state, logits = step(state, jnp.asarray(fed[:, t], jnp.int32))
        np.testing.assert_allclose(logits, parallel[:, t // W, t % W], atol=1e-5, err_msg=f"pixel {t}")


def test_greedy_sample_is_the_parallel_argmax():
    """jaxseq.decoding.sample through the step protocol: each greedy pixel is the parallel form's argmax
    on the generated image itself. (The Row LSTM samples through it in test_images.py.)"""
    model, variables = built("diagonal")
    out = decoding.sample(model, variables, jnp.full((3, 1), LEVELS, jnp.int32), max_new_tokens=H * W, temperature=0.0)
    generated = np.asarray(out.tokens[:, 1:]).reshape(3, H, W)
    assert generated.max() < LEVELS
    np.testing.assert_array_equal(np.argmax(model.apply(variables, jnp.asarray(generated)), -1), generated)


@pytest.mark.parametrize("name", ["row", "diagonal", "pixel-lstm"])
def test_causality_by_gradients(name):
    """d logits(pixel i) / d input(pixel j) is exactly zero for j >= i in raster order, nonzero for the
    pixels left of and above i."""
    model, variables = built(name)
    xs = model.apply(variables, images(batch=1, seed=5), method="pixel_inputs")  # [1, H, W, D]
    # At a random point of input space rather than at the pixels' few values, so that no ReLU of these
    # tiny models is off at every unit of a position (which would zero a gradient the model can have).
    xs = jax.random.normal(jax.random.key(6), xs.shape)

    def logits(inputs):
        return model.apply(variables, inputs, method="logits_from_inputs")[0]  # [H, W, levels]

    jac = jax.jit(jax.jacrev(logits))(xs)  # [H, W, levels, 1, H, W, D]
    size = np.abs(np.asarray(jac, np.float64)).sum(axis=(2, 3, 6)).reshape(H * W, H * W)  # [i, j]
    future = np.triu(np.ones((H * W, H * W), bool))  # j >= i
    assert size[future].max() == 0.0
    for i in range(H * W):
        r, c = divmod(i, W)
        if c > 0:
            assert size[i, i - 1] > 0, f"pixel {i} does not see its left neighbour"
        if r > 0:
            assert size[i, i - W] > 0, f"pixel {i} does not see the pixel above"
    seen = size > 0
    if name == "pixel-lstm":  # the whole past, through one state
        np.testing.assert_array_equal(seen, ~future)
    if name == "diagonal":
        # The whole past but one pixel: the last of the row above enters the first layer only at the
        # positions after it (mask A), in the row below from column W - 1 - first_kernel // 2 on, and
        # the shifted right-to-left half carries nothing back to the left within a row.
        blind = np.zeros_like(future)
        for i in range(W, H * W):
            if i % W < W - 1 - 1:
                blind[i, i - i % W - 1] = True
        np.testing.assert_array_equal(seen, ~future & ~blind)


@pytest.mark.parametrize("name", ["row", "diagonal", "pixel-lstm"])
def test_bad_images_are_refused(name):
    model, variables = built(name)
    with pytest.raises(ShapeError, match=f"built for {H}x{W}"):
        model.apply(variables, jnp.zeros((2, W, H), jnp.int32))
    with pytest.raises(TokenRangeError, match=f"outside \\[0, {LEVELS}\\)"):
        model.apply(variables, images().at[0, 1, 1].set(LEVELS))  # a depth the model does not have
    with pytest.raises(ShapeError, match="integer"):
        model.apply(variables, images().astype(jnp.float32))


def test_builder_refuses_bad_sizes():
    from jaxseq.config import PixelRNNConfig, TrainConfig
    from jaxseq.models import build_model

    spec = {"interface": "images", "height": 8, "width": 8, "levels": 17}
    with pytest.raises(ConfigError, match="--pixelrnn.first-kernel"):
        build_model(TrainConfig(task="images", model="row-lstm", pixelrnn=PixelRNNConfig(first_kernel=4)), spec)
    with pytest.raises(ConfigError, match="--pixelrnn.d-hidden"):
        build_model(TrainConfig(task="images", model="pixel-lstm", pixelrnn=PixelRNNConfig(d_hidden=0)), spec)
    with pytest.raises(ConfigError, match="does not serve the images interface"):
        build_model(TrainConfig(task="images", model="lstm"), spec)
