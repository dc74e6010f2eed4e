"""WaveNet and the mu-law RNN: the recurrent (queued) form against the parallel form, causality and the
receptive field by perturbation, greedy generation against the parallel form, bad speaker ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.cells import LSTM
from jaxseq.config import WaveNetConfig
from jaxseq.errors import ConfigError, JaxseqError
from jaxseq.models.wavenet import MuLawRNN, WaveNet, build_wavenet, generate

B, T, S = 2, 40, 3


def _tiny(kernel_size=2, ring=True):
    return WaveNet(num_speakers=S, channels=8, skip_channels=12, dilation_cycle=3, repeats=2, kernel_size=kernel_size,
                   ring=ring)


def _init(model, seed, *args):
    """Params of the model's layout drawn with NumPy: `model.init` compiles a random kernel per
    parameter shape (or the whole model under jit), which would dominate these tests' run time."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), shapes)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32), jnp.asarray([0, S - 1], jnp.int32)


def _stepped_logits(model, variables, codes, speaker):
    """Teacher-forced recurrent form: logits of step t after feeding codes[:, :t+1], [B, T, levels]."""

    @jax.jit
    def run(variables, codes, speaker):
        def body(state, code):
            return model.apply(variables, state, code, speaker, method="step")

        state = model.apply(variables, codes.shape[0], method="init_state")
        _, logits = jax.lax.scan(body, state, codes.T)
        return jnp.swapaxes(logits, 0, 1)

    return run(variables, codes, speaker)


@pytest.mark.parametrize("kernel_size,ring", [(2, True), (3, True), (2, False)])
def test_queued_steps_reproduce_parallel_logits_at_every_step(kernel_size, ring):
    model = _tiny(kernel_size, ring)
    codes, speaker = _inputs(kernel_size)
    assert model.receptive_field < T  # the ring buffers wrap around within the sequence
    assert len(jax.tree.leaves(model.apply(_init(model, 0, codes, speaker), B, method="init_state"))) == 1 + 1 + 6
    variables = _init(model, kernel_size, codes, speaker)
    parallel = model.apply(variables, codes, speaker)
    assert parallel.shape == (B, T, 256)
    np.testing.assert_allclose(_stepped_logits(model, variables, codes, speaker), parallel, rtol=1e-4, atol=1e-4)


def test_mulaw_rnn_steps_reproduce_parallel_logits():
    model = MuLawRNN(LSTM(16, 24), num_speakers=S, d_embed=16)
    codes, speaker = _inputs(5)
    variables = _init(model, 0, codes, speaker)
    np.testing.assert_allclose(_stepped_logits(model, variables, codes, speaker),
                               model.apply(variables, codes, speaker), rtol=1e-4, atol=1e-4)


def test_output_at_t_ignores_later_inputs_and_sees_exactly_the_receptive_field():
    model = _tiny()
    codes, speaker = _inputs(1)
    variables = _init(model, 1, codes, speaker)
    apply = jax.jit(model.apply)
    base = np.asarray(apply(variables, codes, speaker))
    R = model.receptive_field  # 1 + 1 + 2 * (1 + 2 + 4) = 16
    assert R == 16
    s = 12
    changed = np.asarray(apply(variables, codes.at[:, s].set((codes[:, s] + 101) % 256), speaker))
    moved = np.abs(changed - base).max(axis=(0, 2))  # [T]: how much each output moved
    assert np.all(moved[:s] == 0.0)  # nothing before s reads input s
    assert np.all(moved[s: s + R] > 0.0)  # outputs s .. s+R-1 read it
    assert np.all(moved[s + R:] == 0.0)  # and none further away


def test_speaker_conditions_the_output():
    model = _tiny()
    codes, _ = _inputs(2)
    variables = _init(model, 2, codes, jnp.zeros(B, jnp.int32))
    a = model.apply(variables, codes, jnp.asarray([0, 0]))
    b = model.apply(variables, codes, jnp.asarray([0, 1]))
    np.testing.assert_array_equal(a[0], b[0])
    assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-4


def test_greedy_generation_is_the_parallel_forms_argmax():
    model = _tiny()
    codes, speaker = _inputs(3)
    variables = _init(model, 3, codes, speaker)
    out = np.asarray(generate(model, variables, speaker, 30, jax.random.key(0), temperature=0.0))
    assert out.shape == (B, 30)
    fed = jnp.concatenate([jnp.full((B, 1), 128, jnp.int32), jnp.asarray(out[:, :-1])], axis=1)
    np.testing.assert_array_equal(np.argmax(model.apply(variables, fed, speaker), -1), out)
    sampled = generate(model, variables, speaker, 30, jax.random.key(0), temperature=1.0)
    assert sampled.shape == (B, 30) and not np.array_equal(np.asarray(sampled), out)


def test_speaker_out_of_range_names_the_argument():
    model = _tiny()
    codes, _ = _inputs(4)
    variables = _init(model, 4, codes, jnp.zeros(B, jnp.int32))
    with pytest.raises(JaxseqError, match="speaker holds id 3"):
        model.apply(variables, codes, jnp.asarray([0, S]))
    with pytest.raises(JaxseqError, match="speaker"):
        generate(model, variables, jnp.asarray([S + 2]), 4, jax.random.key(0))
    with pytest.raises(JaxseqError, match="one speaker id per row"):
        model.apply(variables, codes, jnp.asarray([0]))


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--wavenet.repeats"):
        build_wavenet(WaveNetConfig(repeats=0), {"levels": 256, "num_speakers": 2})
    model = build_wavenet(WaveNetConfig(dilation_cycle=10, repeats=1), {"levels": 256, "num_speakers": 2})
    assert model.receptive_field == 1 + 1 + 1023
