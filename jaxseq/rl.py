"""Reinforcement learning of recurrent policies: PPO with GAE over vectorised pure-JAX environments.

    summary = train_rl(RLConfig(env="MemoryChain-bsuite", core="lstm", run_dir="runs/memory"))
    jaxseq rl --env MemoryChain-bsuite --core lstm --run-dir runs/memory           # the same from the shell

One iteration is one jitted function: a rollout of `rollout_len` steps in `num_envs` environments
(`jax.lax.scan` over the policy's `step` and the vmapped `env.step`), GAE (Schulman et al. 2016), then
`epochs` passes of PPO (Schulman et al. 2017: clipped ratio, value loss, entropy bonus) over
`minibatches` groups of environments. A minibatch is a set of whole environment rows of the rollout: the
policy's parallel form runs over them from the carry stored at the start of the rollout, with resets at
episode starts (truncated backpropagation through time over the rollout). Each gradient step is
`jaxseq.steps.make_train_step` on the TrainState, with `make_optimizer`'s clipped Adam, so a step with a
non-finite loss or gradient changes nothing, and `max_nonfinite_steps` of them in a row stop the run
with an error naming the iteration and step. Episodes that end by truncation (CartPole's 500 steps)
are treated as terminal, as in most PPO implementations.

Environments: `DelayedCue` (jaxseq.tasks.delayed_cue, `--delay` D) and gymnax's discrete-action ones
(pip install -e ".[rl]"), e.g. `MemoryChain-bsuite` (`--delay` sets its memory_length) and `CartPole-v1`.

Exact resume: the keys of iteration i are `fold_in(key(seed), i)`, and a checkpoint holds everything
the next iteration reads (TrainState, environment states, last observations, reset flags, the policy's
carry, running episode returns, the last 100 finished episodes), so a resumed run repeats an
uninterrupted one bit for bit on CPU. RUN_DIR holds config.json, metrics.jsonl (one line per
iteration, then the final report) and checkpoints/ (Orbax, with fingerprints checked on restore).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxseq import checkpoint_checks as checks
from jaxseq import fingerprints as fp
from jaxseq.config import OptimConfig, to_dict
from jaxseq.envs import make_env, num_actions
from jaxseq.errors import CheckpointError, ConfigError, NonFiniteError
from jaxseq.models.policy import CORES, ActorCritic, make_core
from jaxseq.run import MetricsLog
from jaxseq.steps import TrainState, init_train_state, make_optimizer, make_train_step

WINDOW = 100  # finished episodes in the running average (CartPole's "475 over 100 episodes")


@dataclass(frozen=True)
class RLConfig:
    """PPO for a recurrent actor-critic on a pure-JAX environment (`jaxseq rl`)."""

    env: str = "MemoryChain-bsuite"
    """DelayedCue or a gymnax environment with discrete actions (e.g. MemoryChain-bsuite, CartPole-v1)."""
    delay: int | None = None
    """DelayedCue's delay D, or MemoryChain-bsuite's memory_length; None: the environment's default (5)."""
    core: str = "lstm"
    """The policy's core: rnn, lstm, gru, mingru, minlstm, lru, or ff (feed-forward, no memory)."""
    d_hidden: int = 64
    """Width of the encoder output and of the core."""
    num_envs: int = 16
    """Environments stepped in parallel."""
    rollout_len: int = 128
    """Steps per environment per iteration: the training chunk (truncated BPTT length)."""
    iterations: int = 100
    """Training iterations (rollout + PPO epochs); environment steps = iterations * num_envs * rollout_len."""
    epochs: int = 4
    """PPO passes over each rollout."""
    minibatches: int = 4
    """Minibatches per epoch, each a group of num_envs / minibatches whole environment rows."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE's lambda: 0 = one-step TD advantages, 1 = Monte Carlo returns."""
    clip_eps: float = 0.2
    """PPO's ratio clip."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss; lower it where returns are large (CartPole: 0.05, experiments/README.md)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.1,
                                                                  grad_clip=0.5, b2=0.999))
    """Adam on a cosine schedule over all gradient steps (iterations * epochs * minibatches)."""
    seed: int = 0
    """Seed of the initialisation, the environments and the actions (iteration i uses fold_in(key(seed), i))."""
    run_dir: str = "runs/rl"
    """Where config.json, metrics.jsonl and checkpoints/ go."""
    resume: bool = False
    """Continue the run in run_dir from its newest checkpoint."""
    checkpoint_every: int = 25
    """Iterations between checkpoints (and one at the end)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept."""
    eval_episodes: int = 100
    """Fresh episodes of the final evaluation (sampled and greedy actions); 0: none."""
    time_limit_s: float = 0.0
    """Stop (with a checkpoint) after the iteration that passes this many seconds of training; 0: no limit.
    `--resume` with the same config then continues the run exactly."""
    max_nonfinite_steps: int = 10
    """Stop after this many gradient steps in a row with a non-finite loss or gradient."""
    progress: bool = True
    """Show a progress bar (return and success of the last 100 episodes, environment steps/s)."""


class RLState(NamedTuple):
    """Everything one iteration reads and writes; arrays only, checkpointed whole."""

    train: TrainState
    env_state: Any  # the environments' states, [N] leaves
    obs: jax.Array  # [N, *obs_shape] the next observation
    reset: jax.Array  # [N] bool: obs starts an episode
    carry: Any  # the policy's carry before obs, [N, ...] leaves
    ep_return: jax.Array  # [N] return so far of the running episodes
    recent: jax.Array  # [WINDOW] returns of the last finished episodes (a ring)
    finished: jax.Array  # int32 [] episodes finished so far
    iteration: jax.Array  # int32 []


# -- the pure pieces ------------------------------------------------------------------------------------


def gae(rewards, values, dones, last_value, gamma: float, lam: float):
    """Generalised advantage estimation, time-major. rewards, values, dones [T, N] (done[t]: the episode ended
    with step t's reward); last_value [N] = V(obs after step T-1). Returns (advantages, returns) [T, N]."""

    def body(carry, inputs):
        next_adv, next_value = carry
        r, v, d = inputs
        live = 1.0 - d.astype(v.dtype)
        delta = r + gamma * next_value * live - v
        adv = delta + gamma * lam * live * next_adv
        return (adv, v), adv

    _, advantages = jax.lax.scan(body, (jnp.zeros_like(last_value), last_value), (rewards, values, dones),
                                 reverse=True)
    return advantages, advantages + values


def ppo_loss(model, config: RLConfig):
    """loss_fn(params, batch, rng) -> (loss, {"count"}) for `make_train_step`; batch holds whole env rows
    [n, T, ...]: obs, reset, action, logp (old), adv, ret, and carry (the rollout's starting carry)."""

    def loss_fn(params, batch, rng):
        logits, values, _ = model.apply({"params": params}, batch["obs"], batch["reset"], batch["carry"])
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, batch["action"][..., None], axis=-1)[..., 0]
        ratio = jnp.exp(logp - batch["logp"])
        adv = (batch["adv"] - batch["adv"].mean()) / (batch["adv"].std() + 1e-8)
        clipped = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps)
        policy_loss = -jnp.mean(jnp.minimum(ratio * adv, clipped * adv))
        value_loss = 0.5 * jnp.mean(jnp.square(values - batch["ret"]))
        entropy = -jnp.mean(jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1))
        loss = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
        return loss, {"count": jnp.asarray(batch["action"].size, jnp.int32)}

    return loss_fn


def _stats(returns, dones):
    """Finished episodes of [T, N] arrays: (count, sum of returns, successes)."""
    d = dones.astype(jnp.float32)
    return d.sum(), (d * returns).sum(), (d * (returns > 0)).sum()


def make_iteration(config: RLConfig, env, model, optimizer):
    """`iteration(state, env_params, seed) -> (state, metrics)`: rollout + GAE + PPO epochs, one pure function
    (jit it). env_params and seed are arguments, not constants, so one compiled function serves every delay
    and seed of an experiment (with JAX's persistent compilation cache, across runs too)."""
    n, steps, m = config.num_envs, config.rollout_len, config.minibatches
    env_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    # The loss draws no randomness, so the step's own key (from its seed) is unused.
    train_step = make_train_step(ppo_loss(model, config), optimizer, seed=0)

    def rollout_step(params, env_params, c, inputs):
        carry, env_state, obs, reset, ep_return = c
        t, key = inputs
        k_act, k_env = jax.random.split(key)
        carry, logits, value = model.apply({"params": params}, carry, obs, reset, method="step")
        action = jax.random.categorical(k_act, logits)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[:, 0]
        entropy = -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), axis=-1)
        obs_next, env_state, reward, terminated, truncated, _ = env_step(jax.random.split(k_env, n), env_state,
                                                                         action, env_params)
        done = terminated | truncated
        reward = reward.astype(jnp.float32)
        ep_return = ep_return + reward
        out = {"obs": obs, "reset": reset, "action": action, "logp": logp, "value": value, "reward": reward,
               "done": done, "episode_return": ep_return, "entropy": entropy}
        return (carry, env_state, obs_next, done, jnp.where(done, 0.0, ep_return)), out

    def iteration(s: RLState, env_params, seed):
        key = jax.random.fold_in(jax.random.key(seed), s.iteration)
        k_roll, k_update = jax.random.split(key)
        params = s.train.params
        keys = jax.random.split(k_roll, steps)
        c0 = (s.carry, s.env_state, s.obs, s.reset, s.ep_return)
        (carry, env_state, obs, reset, ep_return), traj = jax.lax.scan(
            lambda c, x: rollout_step(params, env_params, c, x), c0, (jnp.arange(steps), keys))
        _, _, last_value = model.apply({"params": params}, carry, obs, reset, method="step")
        adv, ret = gae(traj["reward"], traj["value"], traj["done"], last_value, config.gamma, config.gae_lambda)

        def rows(a):  # [T, N, ...] -> [N, T, ...]
            return jnp.swapaxes(a, 0, 1)

        data = {"obs": rows(traj["obs"]), "reset": rows(traj["reset"]), "action": rows(traj["action"]),
                "logp": rows(traj["logp"]), "adv": rows(adv), "ret": rows(ret), "carry": s.carry}

        def epoch(train, e):
            perm = jax.random.permutation(jax.random.fold_in(k_update, e), n)
            split = jax.tree.map(lambda a: a[perm].reshape(m, n // m, *a.shape[1:]), data)
            return jax.lax.scan(train_step, train, split)

        train, step_metrics = jax.lax.scan(epoch, s.train, jnp.arange(config.epochs))

        # The ring of the last WINDOW finished episodes, in time order (only the newest WINDOW are written).
        done = traj["done"].reshape(-1)
        rank = jnp.cumsum(done) - 1
        total = done.sum()
        write = done & (rank >= total - WINDOW)
        slot = jnp.where(write, (s.finished + rank) % WINDOW, WINDOW)
        recent = s.recent.at[slot].set(traj["episode_return"].reshape(-1), mode="drop")
        finished = s.finished + total.astype(jnp.int32)

        count, ret_sum, wins = _stats(traj["episode_return"], traj["done"])
        kept = jnp.minimum(finished, WINDOW)
        valid = jnp.arange(WINDOW) < kept
        metrics = {
            "loss": step_metrics["loss"].mean(),
            "grad_norm": step_metrics["grad_norm"].mean(),
            "lr": step_metrics["lr"][-1, -1],
            "nonfinite_counts": step_metrics["nonfinite_count"].reshape(-1),  # [epochs * minibatches]
            "entropy": traj["entropy"].mean(),
            "value": traj["value"].mean(),
            "episodes": count,
            "return": ret_sum / jnp.maximum(count, 1.0),
            "success": wins / jnp.maximum(count, 1.0),
            "return_100": jnp.sum(jnp.where(valid, recent, 0.0)) / jnp.maximum(kept, 1),
            "success_100": jnp.sum(jnp.where(valid, recent > 0, 0.0)) / jnp.maximum(kept, 1),
        }
        new = RLState(train, env_state, obs, reset, carry, ep_return, recent, finished, s.iteration + 1)
        return new, metrics

    return iteration


def init_state(config: RLConfig, env, env_params, model, optimizer) -> RLState:
    """Fresh params (key(seed)), environments reset, zero carry; everything iteration 0 reads."""
    k_params, k_env = jax.random.split(jax.random.key(config.seed))
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, config.num_envs), env_params)
    n = config.num_envs
    params = model.init(k_params, obs[:, None], jnp.ones((n, 1), bool))["params"]
    return RLState(init_train_state(params, optimizer), env_state, obs, jnp.ones((n,), bool),
                   model.init_state(n), jnp.zeros((n,), jnp.float32), jnp.zeros((WINDOW,), jnp.float32),
                   jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def evaluate(model, params, env, env_params, *, episodes: int, seed: int, max_steps: int) -> dict:
    """The first episode of `episodes` fresh environments under the policy, with sampled and with argmax
    actions: {"sampled_return", "sampled_success", "greedy_return", ...}, each mode's "return" the mean, "success"
    the share of episodes with return > 0, "unfinished" those still running at max_steps."""

    def run(params, key, env_params, greedy):
        k_env, k_act = jax.random.split(key)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, episodes), env_params)
        zeros = jnp.zeros((episodes,), jnp.float32)
        c0 = (jnp.int32(0), model.init_state(episodes), env_state, obs, jnp.ones((episodes,), bool), zeros,
              jnp.zeros((episodes,), bool))

        def body(c):
            t, carry, env_state, obs, reset, ret, over = c
            ka, ke = jax.random.split(jax.random.fold_in(k_act, t))
            carry, logits, _ = model.apply({"params": params}, carry, obs, reset, method="step")
            action = jnp.where(greedy, jnp.argmax(logits, -1), jax.random.categorical(ka, logits))
            obs, env_state, reward, term, trunc, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(ke, episodes), env_state, action, env_params)
            ret = ret + jnp.where(over, 0.0, reward.astype(jnp.float32))
            return t + 1, carry, env_state, obs, term | trunc, ret, over | term | trunc

        out = jax.lax.while_loop(lambda c: (c[0] < max_steps) & ~jnp.all(c[-1]), body, c0)
        return out[-2], out[-1]

    run = jax.jit(run)
    key = jax.random.fold_in(jax.random.key(seed), 2**31 - 1)
    report = {}
    for mode in ("sampled", "greedy"):
        returns, over = jax.device_get(run(params, key, env_params, jnp.asarray(mode == "greedy")))
        report.update({f"{mode}_episodes": episodes, f"{mode}_return": float(returns.mean()),
                       f"{mode}_success": float((returns > 0).mean()), f"{mode}_unfinished": int((~over).sum())})
    return report


# -- checkpoints ----------------------------------------------------------------------------------------


def architecture(config: RLConfig) -> dict:
    """What a checkpoint must share with the config that resumes it (array shapes and meanings)."""
    return {k: getattr(config, k) for k in ("env", "delay", "core", "d_hidden", "num_envs", "rollout_len")}


class Checkpoints:
    """Orbax checkpoints of an RLState in RUN_DIR/checkpoints/<iteration>/ (state + JSON meta with the config
    and per-array fingerprints); restores check the architecture, every leaf's shape and dtype, and the
    fingerprints. (`jaxseq.checkpoint.CheckpointManager` is bound to the supervised TrainConfig.)"""

    def __init__(self, run_dir: Path, config: RLConfig):
        import orbax.checkpoint as ocp

        self.ocp, self.config, self.directory = ocp, config, Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, iteration: int, state: RLState) -> None:
        meta = {"iteration": iteration, "config": to_dict(self.config), "architecture": architecture(self.config),
                "fingerprint_method": fp.METHOD, "fingerprints": fp.fingerprints(state)}
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(state), meta=self.ocp.args.JsonSave(meta))
        self.mngr.save(iteration, args=args, force=True)

    def restore(self, template: RLState) -> RLState:
        step = self.latest()
        ocp = self.ocp
        meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        diffs = checks.dict_diff(meta.get("architecture", {}), architecture(self.config))
        if diffs:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} was trained with another setup: "
                + "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
                + ". Resume with the run's config (RUN_DIR/config.json) or choose another --run-dir.")
        checks.check_leaves(checks.stored_leaves(self.mngr.item_metadata(step)["state"]), template, step)
        restored = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))).state
        bad = fp.mismatches(restored, checks.saved_fingerprints(meta))
        if bad:
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not match its fingerprints "
                                  f"({'; '.join(bad[:5])}); its array files changed after they were saved.")
        return restored

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


# -- the loop -------------------------------------------------------------------------------------------


def _check_config(config: RLConfig) -> None:
    if config.eval_episodes < 0:
        raise ConfigError(f"--eval-episodes must be >= 0 (0: no final evaluation), got {config.eval_episodes}.")
    for name in ("num_envs", "rollout_len", "iterations", "epochs", "minibatches", "checkpoint_every",
                 "keep_checkpoints", "d_hidden"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}.")
    if config.num_envs % config.minibatches:
        raise ConfigError(f"--num-envs {config.num_envs} must be divisible by --minibatches {config.minibatches} "
                          f"(a minibatch is a group of whole environment rows).")
    if config.core not in CORES:
        raise ConfigError(f"unknown --core {config.core!r}; choose one of {', '.join(CORES)}.")


def train_rl(config: RLConfig, *, env=None) -> dict:
    """Train a policy under `config`; returns {"iterations", "env_steps", "final" (last iteration's metrics),
    "report" (evaluation), "env_steps_per_s", "stopped" (None or "time_limit"), "params", "wall_s", "run_dir"}.
    env: an (env, env_params) pair to use instead of `config.env` (tests)."""
    t_start = time.perf_counter()
    _check_config(config)
    env, env_params = make_env(config.env, config.delay) if env is None else env
    model = ActorCritic(num_actions=num_actions(env, env_params), core=make_core(config.core, config.d_hidden))
    total_steps = config.iterations * config.epochs * config.minibatches
    optimizer = make_optimizer(config.optim, total_steps)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(run_dir, config)
    log = MetricsLog(run_dir)
    try:
        if ckpt.latest() is not None and not config.resume:
            raise ConfigError(f"{run_dir} already holds checkpoints (newest: iteration {ckpt.latest()}); "
                              f"pass --resume to continue that run, or choose another --run-dir.")
        state = jax.jit(lambda: init_state(config, env, env_params, model, optimizer))()
        start = 0
        if ckpt.latest() is not None:
            state = ckpt.restore(state)
            start = int(state.iteration)
            log.truncate(start)
            print(f"resumed {run_dir} from iteration {start}", flush=True)
        else:
            log.reset()
        (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        iteration = jax.jit(make_iteration(config, env, model, optimizer))
        seed = jnp.int32(config.seed)

        def step_fn(s):
            return iteration(s, env_params, seed)

        state, final, rate, stopped = _loop(config, step_fn, state, start, ckpt, log)
        params = state.train.params
        report = {"env": config.env, "core": config.core, "delay": _delay_of(config, env_params),
                  "train_return_100": final.get("return_100"), "train_success_100": final.get("success_100")}
        if config.eval_episodes > 0 and stopped is None:
            max_steps = int(getattr(env_params, "max_steps_in_episode", 1000))
            report.update(evaluate(model, params, env, env_params, episodes=config.eval_episodes, seed=config.seed,
                                   max_steps=max_steps))
        if stopped is None:  # a stopped run reports when it is resumed and finishes
            log.write({"step": int(state.iteration), "split": "report", **report})
    finally:
        ckpt.close()
        log.close()
    iterations = int(state.iteration)
    return {"iterations": iterations, "env_steps": iterations * config.num_envs * config.rollout_len,
            "final": final, "report": report, "env_steps_per_s": rate, "run_dir": str(run_dir), "stopped": stopped,
            "params": param_count_of(params), "wall_s": time.perf_counter() - t_start}


def param_count_of(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _delay_of(config: RLConfig, env_params):
    for name in ("delay", "memory_length"):
        if hasattr(env_params, name):
            return int(getattr(env_params, name))
    return None


def _loop(config: RLConfig, step_fn, state: RLState, start: int, ckpt: Checkpoints, log: MetricsLog):
    per_iter = config.num_envs * config.rollout_len
    updates = config.epochs * config.minibatches
    bar = tqdm(total=config.iterations, initial=start, disable=not config.progress, unit="it", dynamic_ncols=True)
    m, t_first, done_steps, last_saved, stopped = {}, None, 0, start, None
    t_loop = time.perf_counter()
    try:
        for i in range(start, config.iterations):
            state, metrics = step_fn(state)
            metrics = jax.device_get(metrics)
            counts = np.asarray(metrics.pop("nonfinite_counts"))
            m = {k: np.asarray(v).item() for k, v in metrics.items()}
            it = i + 1
            if m["episodes"] == 0:  # nothing finished in this rollout: no return to report
                m["return"] = m["success"] = None
            if t_first is None:
                t_first = time.perf_counter()  # the rate leaves out the first (compiling) iteration
            else:
                done_steps += per_iter
            rate = done_steps / max(time.perf_counter() - t_first, 1e-9) if done_steps else None
            log.write({"step": it, "split": "train", "env_steps": it * per_iter, **m,
                       "env_steps_per_s": None if rate is None else round(rate, 1)})
            bar.update(1)
            bar.set_postfix(ret100=f"{m['return_100']:.3g}", succ100=f"{m['success_100']:.2f}",
                            sps=f"{rate or 0:,.0f}")
            m["nonfinite_count"] = int(counts[-1])
            over = np.flatnonzero(counts >= config.max_nonfinite_steps) if config.max_nonfinite_steps > 0 else []
            if len(over):
                step, n = i * updates + int(over[0]) + 1, config.max_nonfinite_steps
                raise NonFiniteError(
                    f"iteration {it}, gradient step {step}: the PPO loss or gradient norm was not finite for {n} "
                    f"steps in a row (steps {step - n + 1}..{step}; params were left unchanged on those steps). "
                    f"Newest checkpoint: iteration {ckpt.latest()}. Lower --optim.lr, tighten "
                    f"--optim.grad-clip, or check the environment's observations and rewards; "
                    f"--max-nonfinite-steps sets the limit.")
            if it % config.checkpoint_every == 0 or it == config.iterations:
                ckpt.save(it, state)
                last_saved = it
            if config.time_limit_s > 0 and time.perf_counter() - t_loop > config.time_limit_s:
                stopped = "time_limit"
                break
        if last_saved != int(state.iteration) and int(state.iteration) > 0:
            ckpt.save(int(state.iteration), state)
    finally:
        bar.close()
    rate = done_steps / max(time.perf_counter() - t_first, 1e-9) if done_steps else None
    return state, m, rate, stopped


def summary_line(summary: dict) -> str:
    """The line `jaxseq rl` prints at the end: success rate and average return of the evaluation (or, without
    one, of the last 100 training episodes)."""
    r, rate = summary["report"], summary["env_steps_per_s"]
    head = f"{r['env']} ({r['core']} core" + (f", delay {r['delay']})" if r["delay"] is not None else ")")
    if "sampled_success" in r:
        body = (f"success rate {r['sampled_success']:.3f} sampled / {r['greedy_success']:.3f} greedy, average "
                f"return {r['sampled_return']:.3f} sampled / {r['greedy_return']:.3f} greedy over "
                f"{r['sampled_episodes']} episodes")
    else:
        body = (f"success rate {r['train_success_100'] or 0:.3f}, average return {r['train_return_100'] or 0:.3f} "
                f"over the last 100 training episodes" + (" (stopped by --time-limit-s)" if summary["stopped"] else ""))
    return (f"{head}: {body}; {summary['env_steps']:,} environment steps" + (f" at {rate:,.0f}/s" if rate else ""))
