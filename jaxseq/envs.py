"""The environments `jaxseq rl` trains on: DelayedCue (jaxseq.tasks.delayed_cue) and gymnax's discrete-action
ones (pip install -e ".[rl]"), e.g. `MemoryChain-bsuite` and `CartPole-v1`, under one gymnax-style interface.

    env, env_params = make_env("MemoryChain-bsuite", delay=10)     # --delay: memory_length here
"""

from __future__ import annotations

from jaxseq.errors import ConfigError, JaxseqError

OWN_ENVS = ("DelayedCue",)


def available_envs() -> list[str]:
    try:
        import gymnax
    except ImportError:
        return list(OWN_ENVS)
    return list(OWN_ENVS) + list(gymnax.registered_envs)


def make_env(name: str, delay: int | None = None):
    """(env, env_params) for `name`: DelayedCue, or a gymnax environment (imported on first use)."""
    if delay is not None and (not isinstance(delay, int) or delay < 0):
        raise ConfigError(f"--delay must be an int >= 0, got {delay!r}.")
    if name == "DelayedCue":
        from jaxseq.tasks.delayed_cue import DelayedCue, DelayedCueParams

        return DelayedCue(), DelayedCueParams(delay=5 if delay is None else delay)
    try:
        import gymnax
    except ImportError as e:
        raise JaxseqError(f"--env {name} needs gymnax, which is not installed: pip install -e \".[rl]\" (or pip "
                          f"install gymnax six). Without it only {', '.join(OWN_ENVS)} is available.") from e
    if name not in gymnax.registered_envs:
        raise ConfigError(f"unknown environment {name!r}; available: {', '.join(available_envs())}.")
    env, params = gymnax.make(name)
    if type(env.action_space(params)).__name__ != "Discrete":
        raise ConfigError(f"--env {name} has continuous actions; the policy's categorical head needs a discrete "
                          f"action space (e.g. CartPole-v1, MemoryChain-bsuite, Catch-bsuite).")
    if delay is not None:
        if name != "MemoryChain-bsuite":
            raise ConfigError(f"--delay sets DelayedCue's delay or MemoryChain-bsuite's memory_length; --env {name} "
                              f"has no such knob (leave --delay unset).")
        if delay < 1:  # its observation shows the time left as 1 - t / memory_length
            raise ConfigError(f"MemoryChain-bsuite's memory_length (--delay) must be >= 1, got {delay}.")
        params = params.replace(memory_length=delay)
    return env, params


def num_actions(env, env_params) -> int:
    return int(env.action_space(env_params).n) if hasattr(env, "action_space") else int(env.num_actions)
