"""The causal convolutional LM: its recurrent form (ring buffers) agrees with the parallel form, position t reads
exactly the R tokens up to t, and it trains and samples through the library's protocol."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import decoding
from jaxseq.config import ConvConfig, TrainConfig
from jaxseq.models import build_model
from jaxseq.models.conv_lm import ConvLM, dilations


def _model(**kw):
    return ConvLM(vocab_size=11, channels=16, kernel_size=kw.pop("kernel_size", 2), dilation_cycle=kw.pop("cycle", 4),
                  repeats=kw.pop("repeats", 2))


@pytest.mark.parametrize("kernel_size,cycle,repeats", [(2, 4, 2), (3, 3, 1)])
def test_step_reproduces_parallel_logits(kernel_size, cycle, repeats):
    model = _model(kernel_size=kernel_size, cycle=cycle, repeats=repeats)
    tokens = jax.random.randint(jax.random.key(0), (3, 40), 0, 11)
    variables = model.init(jax.random.key(1), tokens)
    parallel = model.apply(variables, tokens)
    state = model.apply(variables, 3, 40, method="init_state")
    step = jax.jit(lambda s, tok: model.apply(variables, s, tok, method="step"))
    stepped = []
    for t in range(40):
        state, logits = step(state, tokens[:, t])
        stepped.append(logits)
    np.testing.assert_allclose(np.stack(stepped, 1), parallel, rtol=2e-5, atol=2e-5)


def test_position_reads_exactly_its_receptive_field():
    model = _model(kernel_size=2, cycle=3, repeats=1)
    R = model.receptive_field
    assert R == 1 + 1 * (1 + sum(dilations(3, 1))) == 9
    T = 24
    tokens = jax.random.randint(jax.random.key(0), (1, T), 0, 11)
    variables = model.init(jax.random.key(1), tokens)
    embedded = variables["params"]["embed"]["embedding"][tokens]

    def out_at(delta, t):  # the logits at t as a function of an additive change of every input vector
        def add(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            hit = isinstance(context.module, nn.Embed) and context.method_name == "__call__"
            return out + delta if hit else out

        with nn.intercept_methods(add):
            return model.apply(variables, tokens)[0, t].sum()

    t = 20
    grad = jax.grad(out_at)(jnp.zeros_like(embedded), t)
    reach = np.abs(np.asarray(grad[0])).sum(-1) > 0
    assert reach[t - R + 1:t + 1].all()  # every token in the window matters
    assert not reach[:t - R + 1].any() and not reach[t + 1:].any()  # nothing before it, nothing after t


def test_mask_right_padding_is_exact():
    model = _model()
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 11)
    variables = model.init(jax.random.key(1), tokens)
    mask = jnp.arange(12)[None] < jnp.array([[7], [12]])
    full = model.apply(variables, tokens, mask=mask)
    short = model.apply(variables, tokens[:1, :7])
    np.testing.assert_allclose(full[0, :7], short[0], rtol=1e-5, atol=1e-5)


def test_conv_model_from_the_table_samples_and_trains(tmp_path):
    config = TrainConfig(model="conv", conv=ConvConfig(channels=16, dilation_cycle=3))
    model = build_model(config, {"interface": "lm", "vocab_size": 11})
    prompt = jnp.ones((2, 3), jnp.int32)
    variables = model.init(jax.random.key(0), prompt)
    out = decoding.sample(model, variables, prompt, max_new_tokens=5, key=jax.random.key(0))
    assert out.tokens.shape == (2, 8)
    greedy = decoding.sample(model, variables, prompt, max_new_tokens=4, key=jax.random.key(0), temperature=0.0)
    beams, _ = decoding.beam_search(model, variables, prompt, beam_size=2, max_new_tokens=4)
    assert greedy.tokens.shape == (2, 7) and beams.shape[:2] == (2, 2)


def test_conv_learns_recall_within_its_receptive_field(tmp_path):
    from jaxseq.tasks.probes import Probes
    from jaxseq.train import train

    config = TrainConfig(task="probes", model="conv", steps=300, eval_every=300, checkpoint_every=300,
                         eval_batches=8, progress=False, run_dir=str(tmp_path / "run"),
                         probes=Probes(probe="recall", distance=6, num_symbols=8, test_size=256),
                         conv=ConvConfig(channels=32, dilation_cycle=3))  # receptive field 9 >= 2 + 6 + 2
    report = train(None, None, config)["report"]
    assert report["accuracy"] > 0.9, report
