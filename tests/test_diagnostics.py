"""Gradient diagnostics against independent computations: finite differences, autodiff through the whole
recurrence, and the embedding table's own gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxseq import cells as C
from jaxseq.config import ConvConfig, NGramConfig, RNNConfig, TrainConfig, TransformerConfig
from jaxseq.diagnostics import input_gradient_norms, state_jacobian_norms
from jaxseq.errors import ConfigError
from jaxseq.models import build_model
from jaxseq.tasks.probes import Probes


def _run_from(cell, params, xs, t, flat_ct, unravel):
    """c_T as a function of c_t: the cell run over xs[t:]."""
    c = unravel(flat_ct)
    for x in xs[t:]:
        c, _ = cell.step(params, c, x)
    return ravel_pytree(c)[0]


@pytest.mark.parametrize("cell", [C.LSTM(3, 5), C.GRU(3, 4)], ids=["lstm", "gru"])
def test_state_jacobian_matches_autodiff_and_finite_differences(cell):
    params = cell.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (7, 3))
    norms = state_jacobian_norms(cell, params, xs, ord="fro")
    assert norms.shape == (7,)
    flat0, unravel = ravel_pytree(cell.initial_carry(()))
    c = unravel(flat0)
    for t in range(7):  # c is c_t here
        flat_t = ravel_pytree(c)[0]
        jac = jax.jacrev(lambda f: _run_from(cell, params, xs, t, f, unravel))(flat_t)
        np.testing.assert_allclose(norms[t], np.linalg.norm(np.asarray(jac)), rtol=1e-4)
        v = jax.random.normal(jax.random.key(10 + t), flat_t.shape)
        eps = 1e-2
        fd = (_run_from(cell, params, xs, t, flat_t + eps * v, unravel)
              - _run_from(cell, params, xs, t, flat_t - eps * v, unravel)) / (2 * eps)
        np.testing.assert_allclose(fd, jac @ v, rtol=2e-2, atol=2e-3)
        c, _ = cell.step(params, c, xs[t])


def test_scalar_tanh_rnn_gradient_is_the_product_of_derivatives():
    cell = C.Elman(1, 1)
    w = 0.9
    params = {"w_ih": jnp.ones((1, 1)), "w_hh": jnp.full((1, 1), w),
              "b_ih": jnp.zeros(1), "b_hh": jnp.zeros(1)}
    xs = jnp.full((20, 1), 0.3)
    h, hs = 0.0, []
    for x in np.asarray(xs[:, 0], np.float64):  # float64 loop: h_s = tanh(w h_{s-1} + x)
        h = np.tanh(w * h + x)
        hs.append(h)
    derivs = w * (1 - np.square(hs))  # d h_s / d h_{s-1}
    expected = [np.prod(derivs[t:]) for t in range(20)]
    np.testing.assert_allclose(state_jacobian_norms(cell, params, xs), expected, rtol=1e-4)


def _lm_on_probe(model_name, **probe):
    task = Probes(batch_size=4, test_size=4, **probe)
    config = TrainConfig(task="probes", model=model_name, rnn=RNNConfig(d_embed=8, d_hidden=8), ngram=NGramConfig(order=3),
                         conv=ConvConfig(channels=8, dilation_cycle=3),
                         transformer=TransformerConfig(num_layers=1, num_heads=2, d_model=8, d_ff=16, max_len=32,
                                                       tie_embeddings=False))
    model = build_model(config, task.model_spec(None))
    batch = task.batch(None, "train", 0, seed=0)
    variables = model.init(jax.random.key(0), batch["inputs"])
    return task, model, variables, batch


@pytest.mark.parametrize("model_name", ["lstm", "transformer", "conv"])
def test_input_gradient_equals_embedding_table_gradient_when_tokens_are_distinct(model_name):
    task, model, variables, batch = _lm_on_probe(model_name, probe="order", length=9, num_symbols=20)
    # distinct tokens at every position: the table's row of token t is exactly d loss / d x_t
    T = batch["inputs"].shape[1]
    batch = {**batch, "inputs": jnp.tile(jnp.arange(T, dtype=jnp.int32), (4, 1))}
    batch = {**batch, "weight": np.array([True, False, False, False])}  # one row: no sum over rows
    norms = input_gradient_norms(task, model, variables, batch)
    assert norms.shape == (4, T)
    grads = jax.grad(lambda p: task.loss(model, {"params": p}, batch, None)[0])(variables["params"])
    name = "wte" if model_name == "transformer" else "embed"
    table = grads[name]["embedding"]  # (the Transformer's is untied here: the table is only the input)
    np.testing.assert_allclose(norms[0], np.linalg.norm(table[:T], axis=-1), rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(norms[1:]) == 0)  # rows of weight 0 add nothing to the loss


def test_input_gradient_is_causal_and_refuses_count_models():
    task, model, variables, batch = _lm_on_probe("gru", probe="length", length=6)
    norms = np.asarray(input_gradient_norms(task, model, variables, batch))
    for b, pos in enumerate(batch["answer_pos"]):
        assert np.all(norms[b, pos + 1:] == 0) and norms[b, pos] > 0  # nothing after the query counts
    task, model, variables, batch = _lm_on_probe("ngram", probe="order", length=5)
    variables = task.fit(model, None)
    with pytest.raises(ConfigError, match="no token embedding"):
        input_gradient_norms(task, model, variables, batch)
