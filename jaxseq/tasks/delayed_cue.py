"""DelayedCue: a memory task for recurrent policies, in pure JAX with gymnax's interface.

One of `num_cues` cues is shown once, as a one-hot observation at step 0; then `delay` steps of blank
observations follow; at step `delay` a query flag asks for an action, which earns +1 if it names the cue
and -1 otherwise, and the episode ends. With `delay = 0` the cue and the query arrive together (a
memoryless policy can solve it); beyond that a policy without memory is at chance (1 / num_cues).
Actions before the query change nothing and earn 0.

    env, params = DelayedCue(), DelayedCueParams(delay=10)
    obs, state = env.reset(key, params)                       # obs [num_cues + 1] float32
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

`step` auto-resets a finished episode (the returned obs is then the new episode's first), as gymnax's
environments do, so `jaxseq.rl` runs it and the gymnax ones through the same code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class DelayedCueState:
    cue: jax.Array  # int32 [], the cue to recall
    time: jax.Array  # int32 [], steps taken in this episode


@struct.dataclass
class DelayedCueParams:
    # Leaves, not static fields: one compiled training function serves every delay.
    delay: int = 5
    """Steps from the cue (step 0) to the query (step `delay`): the memory span asked for."""
    max_steps_in_episode: int = 10_000


class DelayedCue:
    """Cue at step 0, query at step `delay`; reward +1 for naming the cue, -1 otherwise (see the module docstring)."""

    name = "DelayedCue"

    def __init__(self, num_cues: int = 2):
        self.num_cues = num_cues

    @property
    def default_params(self) -> DelayedCueParams:
        return DelayedCueParams()

    @property
    def num_actions(self) -> int:
        return self.num_cues

    def obs_shape(self) -> tuple[int, ...]:
        return (self.num_cues + 1,)

    def _obs(self, state: DelayedCueState, params: DelayedCueParams) -> jax.Array:
        """[one-hot cue (only at step 0), query flag (only at step `delay`)]."""
        cue = jax.nn.one_hot(state.cue, self.num_cues) * (state.time == 0)
        query = (state.time == params.delay).astype(jnp.float32)[None]
        return jnp.concatenate([cue, query]).astype(jnp.float32)

    def reset(self, key, params: DelayedCueParams | None = None):
        params = self.default_params if params is None else params
        state = DelayedCueState(cue=jax.random.randint(key, (), 0, self.num_cues, jnp.int32), time=jnp.int32(0))
        return self._obs(state, params), state

    def step(self, key, state: DelayedCueState, action, params: DelayedCueParams | None = None):
        """-> (obs, state, reward float32, terminated bool, truncated bool, info); auto-resets when done."""
        params = self.default_params if params is None else params
        at_query = state.time == params.delay
        reward = jnp.where(at_query, jnp.where(action == state.cue, 1.0, -1.0), 0.0).astype(jnp.float32)
        stepped = DelayedCueState(cue=state.cue, time=state.time + 1)
        truncated = (stepped.time >= params.max_steps_in_episode) & ~at_query
        done = at_query | truncated
        obs_reset, state_reset = self.reset(key, params)
        new_state = jax.tree.map(lambda a, b: jnp.where(done, a, b), state_reset, stepped)
        obs = jnp.where(done, obs_reset, self._obs(stepped, params))
        return obs, new_state, reward, at_query, truncated, {"discount": 1.0 - at_query.astype(jnp.float32)}
