"""The recurrent policy: its step form and its parallel form agree over a rollout with episode resets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.errors import ConfigError, ShapeError
from jaxseq.models.policy import ActorCritic, FeedForward, ff_width, make_core, param_count
from jaxseq.tasks.delayed_cue import DelayedCue, DelayedCueParams

B, T, OBS, A = 3, 12, (2, 3), 4  # a 2-D observation: the encoder flattens it


def rollout_inputs(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    obs = jax.random.normal(k1, (B, T, *OBS))
    resets = jax.random.bernoulli(k2, 0.25, (B, T)).at[:, 0].set(False)
    resets = resets.at[0, 5].set(True)  # at least one episode boundary inside the chunk
    return obs, resets, k3


def stepped(model, variables, carry, obs, resets):
    """The step form, one observation at a time (a Python loop over a jitted step)."""
    step = jax.jit(lambda v, c, o, r: model.apply(v, c, o, r, method="step"))
    logits, values = [], []
    for t in range(obs.shape[1]):
        carry, lg, v = step(variables, carry, obs[:, t], resets[:, t])
        logits.append(lg)
        values.append(v)
    return jnp.stack(logits, 1), jnp.stack(values, 1), carry


@pytest.mark.parametrize("kind", ["lstm", "mingru", "ff"])  # a tuple carry, a linear cell, no carry
def test_step_and_parallel_forms_agree_with_resets_and_a_stored_carry(kind):
    model = ActorCritic(num_actions=A, core=make_core(kind, 8), d_head=8)
    obs, resets, key = rollout_inputs()
    variables = jax.jit(model.init)(key, obs, resets)
    # A chunk starts mid-episode: its stored carry is whatever stepping left (not zeros).
    warm = jax.random.normal(jax.random.key(7), (B, 5, *OBS))
    _, _, carry0 = stepped(model, variables, model.apply(variables, B, method="init_state"), warm,
                           jnp.zeros((B, 5), bool))
    logits_p, values_p, carry_p = jax.jit(model.apply)(variables, obs, resets, carry0)
    logits_s, values_s, carry_s = stepped(model, variables, carry0, obs, resets)
    assert logits_p.shape == (B, T, A) and values_p.shape == (B, T)
    np.testing.assert_allclose(logits_p, logits_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values_p, values_s, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(carry_p), jax.tree.leaves(carry_s)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_reset_starts_the_episode_from_zeros_not_from_the_stored_carry():
    model = ActorCritic(num_actions=A, core=make_core("lstm", 8), d_head=8)
    obs, _, key = rollout_inputs()
    resets = jnp.zeros((B, T), bool).at[:, 4].set(True)
    variables = jax.jit(model.init)(key, obs, resets)
    apply = jax.jit(model.apply)
    carry0 = jax.tree.map(lambda c: jnp.ones_like(c) * 0.7, model.apply(variables, B, method="init_state"))
    from_stored, _, _ = apply(variables, obs, resets, carry0)
    fresh, _, _ = model.apply(variables, obs[:, 4:], jnp.zeros((B, T - 4), bool))  # zero carry
    np.testing.assert_allclose(from_stored[:, 4:], fresh, rtol=1e-5, atol=1e-6)
    assert not np.allclose(from_stored[:, :4], apply(variables, obs, resets)[0][:, :4])  # zeros != stored carry


def test_feed_forward_core_has_no_memory_and_a_gru_sized_parameter_count():
    core = make_core("ff", 64)
    assert isinstance(core, FeedForward) and core.initial_carry((3,)) == ()
    gru = make_core("gru", 64)
    ratio = param_count(core.init(jax.random.key(0))) / param_count(gru.init(jax.random.key(0)))
    assert 0.97 < ratio < 1.03 and ff_width(64, 64) == core.d_ff
    model = ActorCritic(num_actions=2, core=core, d_head=8)
    obs = jax.random.normal(jax.random.key(1), (2, 6, 3))
    variables = model.init(jax.random.key(2), obs, jnp.zeros((2, 6), bool))
    shuffled = obs[:, ::-1]
    a, _, _ = model.apply(variables, obs, jnp.zeros((2, 6), bool))
    b, _, _ = model.apply(variables, shuffled, jnp.zeros((2, 6), bool))
    np.testing.assert_allclose(a[:, ::-1], b, rtol=1e-6, atol=1e-7)  # each step sees only its observation


def test_bad_core_and_bad_shapes_are_named():
    with pytest.raises(ConfigError, match="unknown policy core 'transformer'.*lstm"):
        make_core("transformer", 8)
    model = ActorCritic(num_actions=2, core=make_core("gru", 8), d_head=8)
    obs = jnp.zeros((2, 5, 3))
    variables = model.init(jax.random.key(0), obs, jnp.zeros((2, 5), bool))
    with pytest.raises(ShapeError, match="resets has shape"):
        model.apply(variables, obs, jnp.zeros((2, 4), bool))
    with pytest.raises(ShapeError, match=r"obs must be \[batch, steps"):
        model.apply(variables, jnp.zeros((5, 3)), jnp.zeros((5,), bool))


@pytest.mark.parametrize("delay", [0, 3])
def test_delayed_cue_shows_the_cue_once_and_rewards_the_answer_at_the_query(delay):
    env, params = DelayedCue(num_cues=3), DelayedCueParams(delay=delay)
    obs, state = env.reset(jax.random.key(4), params)
    cue = int(state.cue)
    seen = [np.asarray(obs)]
    for t in range(delay):
        obs, state, reward, term, trunc, _ = env.step(jax.random.key(t), state, 0, params)
        assert float(reward) == 0.0 and not bool(term) and not bool(trunc)
        seen.append(np.asarray(obs))
    assert seen[0][cue] == 1.0 and seen[0][:3].sum() == 1.0  # the cue, one-hot, at step 0 ...
    assert all(o[:3].sum() == 0.0 for o in seen[1:])  # ... and never again
    assert [o[3] for o in seen] == [0.0] * delay + [1.0]  # the query flag at step `delay` only
    _, after, reward, term, _, _ = env.step(jax.random.key(9), state, cue, params)
    assert float(reward) == 1.0 and bool(term) and int(after.time) == 0  # answered: +1, auto-reset
    _, _, reward, term, _, _ = env.step(jax.random.key(9), state, (cue + 1) % 3, params)
    assert float(reward) == -1.0 and bool(term)
