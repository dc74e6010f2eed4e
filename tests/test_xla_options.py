"""Compile options of jaxseq's steps (jaxseq.xla_options): which models get YNNPACK dots on CPU, and
that a step compiled with them computes what XLA's own dot emitter computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.cells import LSTM
from jaxseq.config import OptimConfig
from jaxseq.errors import ConfigError
from jaxseq.models.rnn_lm import RecurrentLM
from jaxseq.models.transformer import TransformerLM
from jaxseq.sharding import make_mesh
from jaxseq.kernels import explain
from jaxseq.steps import make_optimizer, make_sharded_step
from jaxseq.tasks import CharLM
from jaxseq.xla_options import YNN_DOTS, compiler_options, ynn_dots_available

requires_ynn = pytest.mark.skipif(not ynn_dots_available(), reason="this XLA has no YNNPACK dot option")


def _transformer():
    return TransformerLM(vocab_size=17, num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=16)


@requires_ynn
def test_auto_gives_ynn_dots_to_transformers_only():
    assert compiler_options(_transformer()) == YNN_DOTS
    assert compiler_options(RecurrentLM(vocab_size=17, cell=LSTM(8, 16), d_embed=8)) == {}
    assert compiler_options(None, "ynn") == YNN_DOTS
    assert compiler_options(_transformer(), "xla") == {}


def test_unknown_choice_names_the_argument():
    with pytest.raises(ConfigError, match=r"cpu_dots must be one of \('auto', 'ynn', 'xla'\), got 'fast'"):
        compiler_options(_transformer(), "fast")


@requires_ynn
def test_train_steps_with_and_without_ynn_dots_agree():
    """Three AdamW steps of a Transformer (attention through the blockwise path, so its batched matmuls
    run in YNNPACK) give the same losses and parameters to float32 rounding either way."""
    model = TransformerLM(vocab_size=17, num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=512,
                          attention_implementation="flash")
    tokens = jax.random.randint(jax.random.key(1), (2, 257), 0, 17)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((2, 256), bool)}
    task = CharLM(seq_len=256, batch_size=2)

    def loss_fn(params, batch, rng):
        return task.loss(model, {"params": params}, batch, rng)

    def init_params():
        return model.init(jax.random.key(0), jnp.zeros((1, 256), jnp.int32))["params"]

    abstract = jax.eval_shape(init_params)
    assert explain(lambda p, b: loss_fn(p, b, None)[0], abstract, batch) == {"attention": "flash-jax"}  # batched matmuls in XLA
    runs = {}
    for choice in ("ynn", "xla"):
        sharded = make_sharded_step(loss_fn, init_params, make_optimizer(OptimConfig(), 10), make_mesh(),
                                    compiler_options=compiler_options(model, choice))
        state, losses = sharded.init(), []
        for _ in range(3):
            state, metrics = sharded.step(state, batch)
            losses.append(float(metrics["loss"]))
        runs[choice] = (losses, state.params)
    np.testing.assert_allclose(runs["ynn"][0], runs["xla"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs["ynn"][1]), jax.tree.leaves(runs["xla"][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
