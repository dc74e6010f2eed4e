"""PPO for recurrent policies: GAE against NumPy, learning on a trivial task, exact resume, bad input."""

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import cli
from jaxseq.config import OptimConfig
from jaxseq.errors import ConfigError, JaxseqError, NonFiniteError
from jaxseq.envs import make_env
from jaxseq.rl import RLConfig, gae, train_rl
from jaxseq.tasks.delayed_cue import DelayedCue, DelayedCueParams

TINY = dict(d_hidden=16, num_envs=8, rollout_len=16, minibatches=2, epochs=2, eval_episodes=16, progress=False)


def gae_numpy(rewards, values, dones, last_value, gamma, lam):
    """Schulman et al. (2016), eq. 16, one environment at a time, truncated at episode ends."""
    steps, n = rewards.shape
    adv = np.zeros((steps, n))
    for e in range(n):
        running = 0.0
        for t in reversed(range(steps)):
            next_value = last_value[e] if t == steps - 1 else values[t + 1, e]
            live = 0.0 if dones[t, e] else 1.0
            delta = rewards[t, e] + gamma * next_value * live - values[t, e]
            running = delta + gamma * lam * live * running
            adv[t, e] = running
    return adv, adv + values


def test_gae_matches_a_numpy_reference_across_episode_ends():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
    dones, last = rng.random((20, 5)) < 0.2, rng.normal(size=5)
    adv, ret = gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(dones),
                   jnp.asarray(last, jnp.float32), 0.99, 0.95)
    ref_adv, ref_ret = gae_numpy(rewards, values, dones, last, 0.99, 0.95)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    # lambda = 1, no episode end: the discounted return plus the bootstrapped tail, minus the value.
    adv1, _ = gae(jnp.ones((3, 1)), jnp.zeros((3, 1)), jnp.zeros((3, 1), bool), jnp.full((1,), 2.0), 0.5, 1.0)
    np.testing.assert_allclose(adv1[:, 0], [1 + 0.5 + 0.25 + 0.125 * 2, 1 + 0.5 + 0.25 * 2, 1 + 0.5 * 2])


def test_a_short_run_on_a_trivial_task_improves_its_return(tmp_path):
    # DelayedCue with delay 0: the cue and the query arrive together; chance is a return of 0.
    config = RLConfig(env="DelayedCue", delay=0, core="gru", iterations=8, run_dir=str(tmp_path),
                      optim=OptimConfig(lr=3e-3, warmup_steps=0, grad_clip=0.5, b2=0.999), **{**TINY, "epochs": 4})
    summary = train_rl(config)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 8 and train[-1]["env_steps"] == 8 * 8 * 16
    first, last = train[0]["return"], train[-1]["return"]
    assert abs(first) < 0.5 and last > 0.8, (first, last)
    assert summary["report"]["greedy_success"] > 0.9 and summary["report"]["greedy_unfinished"] == 0
    assert rows[-1]["split"] == "report"


def test_cli_trains_memory_chain_saves_and_resumes_bit_exactly(tmp_path, capsys):
    pytest.importorskip("gymnax")
    args = ["--env", "MemoryChain-bsuite", "--core", "lstm", "--delay", "3", "--d-hidden", "8", "--num-envs", "4",
            "--rollout-len", "8", "--minibatches", "2", "--epochs", "1", "--no-progress", "--checkpoint-every", "2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    cli.main(["rl", *args, "--iterations", "4", "--run-dir", str(whole), "--eval-episodes", "8"])
    out = capsys.readouterr().out
    assert "MemoryChain-bsuite (lstm core, delay 3): success rate" in out
    assert sorted(p.name for p in (whole / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    # A run killed after its checkpoint at iteration 2 (the log runs on past it), resumed with the same config.
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "4")
    with pytest.raises(SystemExit) as stopped:  # an existing run is never overwritten silently
        cli.main(["rl", *args, "--iterations", "4", "--run-dir", str(part)])
    assert stopped.value.code == 2 and "pass --resume" in capsys.readouterr().err
    cli.main(["rl", *args, "--iterations", "4", "--run-dir", str(part), "--resume", "--eval-episodes", "8"])
    resumed = capsys.readouterr().out
    assert "resumed" in resumed  # ... and reports the same success rate and return:
    assert resumed.splitlines()[-1].split(";")[0] == out.splitlines()[-1].split(";")[0]

    def final(run_dir):
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(run_dir / "checkpoints") as mngr:
            return mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state

    a, b = jax.tree.leaves(final(whole)), jax.tree.leaves(final(part))
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def train_lines(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k not in ("env_steps_per_s",)}
                for line in open(run_dir / "metrics.jsonl") if '"train"' in line]

    assert train_lines(whole) == train_lines(part)  # the resumed log reads as one run


def test_unknown_environment_lists_the_available_ones(capsys):
    pytest.importorskip("gymnax")
    with pytest.raises(ConfigError, match="unknown environment 'Nope'; available: DelayedCue, .*CartPole-v1"):
        make_env("Nope")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["rl", "--env", "Nope"])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and err.startswith("jaxseq: error: unknown environment") and "\n" not in err
    with pytest.raises(ConfigError, match="continuous actions"):
        make_env("Pendulum-v1")
    with pytest.raises(ConfigError, match="memory_length .* must be >= 1"):  # it would divide by zero
        make_env("MemoryChain-bsuite", delay=0)
    with pytest.raises(ConfigError, match="no such knob"):
        make_env("CartPole-v1", delay=3)
    with pytest.raises(ConfigError, match="divisible by --minibatches"):
        train_rl(RLConfig(env="DelayedCue", num_envs=6, minibatches=4))


def test_missing_gymnax_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnax", None)  # import gymnax now raises ImportError
    with pytest.raises(JaxseqError, match=r'pip install -e "\.\[rl\]"'):
        make_env("CartPole-v1")
    env, params = make_env("DelayedCue", delay=4)  # the own task needs no gymnax
    assert isinstance(env, DelayedCue) and params.delay == 4


class NaNReward(DelayedCue):
    """DelayedCue whose rewards are NaN: every PPO loss is non-finite."""

    def step(self, key, state, action, params=None):
        obs, state, reward, term, trunc, info = super().step(key, state, action, params)
        return obs, state, reward * jnp.nan, term, trunc, info


def test_a_non_finite_loss_stops_with_the_iteration_and_step_named(tmp_path):
    config = RLConfig(env="DelayedCue", core="mingru", iterations=5, max_nonfinite_steps=3,
                      run_dir=str(tmp_path), **TINY)
    with pytest.raises(NonFiniteError, match=r"iteration 1, gradient step 3: .* 3 steps in a row \(steps 1\.\.3"):
        train_rl(config, env=(NaNReward(), DelayedCueParams(delay=1)))
