"""Frame models: sequences of binary frames (piano rolls), one independent Bernoulli per unit per frame.

The "frames" interface ({"interface": "frames", "d_frame": P}) of the model table. Inputs are float
frames [B, T, P] (at t, the previous frame: the task shifts), logits [B, T, P] give
p(x_t[p] = 1 | x_<t) = sigmoid(logits[:, t, p]). The two families keep their bodies and swap the token
embedding for a linear frame projection, and the softmax layer for P logistic outputs:

    FrameRNN:          frames -> Dense(d_embed) -> any cell (Elman, LSTM, GRU, stacks) -> Dense(P)
    FrameTransformer:  frames -> Dense(d_model) + positions -> pre-LN blocks -> LN -> Dense(P)

Both have the two forms of every sequence model: `apply(frames, mask)` and `init_state(B, max_len)` +
`step(state, frame [B, P]) -> (state, logits [B, P])`; `sample_frames` draws sequences from the second.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseq.attention import KVCache, check_cache_room
from jaxseq.checks import check_mask
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.models.transformer import (Block, add_positions, check_heads, check_positional, flat_apply, gpt_init,
                                       layer_norm, mask_positions)
from jaxseq.nn import Recurrent


def check_frames(frames, d_frame: int, ndim: int = 3, name: str = "frames"):
    """frames must be floating with the last axis d_frame and `ndim` axes ([B, T, P] or [B, P])."""
    if frames.ndim != ndim or frames.shape[-1] != d_frame:
        want = "[B, T, P]" if ndim == 3 else "[B, P]"
        raise ShapeError(f"{name} has shape {tuple(frames.shape)}; a frame model with d_frame={d_frame} takes "
                         f"{want} with P = {d_frame} (one unit per pitch).")
    if not jnp.issubdtype(frames.dtype, jnp.floating):
        raise ShapeError(f"{name} must be floating (0.0 / 1.0 per unit), got dtype {frames.dtype}.")


class FrameRNN(nn.Module):
    """A recurrent cell over frames: apply(frames [B, T, P], mask=None) -> logits [B, T, P].

    step(state, frame [B, P]) -> (state, logits [B, P]); init_state(batch_size, max_len) -> the carry.
    """

    d_frame: int
    cell: Any
    d_embed: int
    dropout: float = 0.0
    kernels: str = "auto"

    def setup(self):
        self.frame_in = nn.Dense(self.d_embed)
        self.rnn = Recurrent(self.cell, kernels=self.kernels)
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Dense(self.d_frame)

    def __call__(self, frames, mask=None, deterministic: bool = True):
        check_frames(frames, self.d_frame)
        mask = check_mask(mask, frames.shape[:2])
        xs = self.drop(flat_apply(self.frame_in, frames), deterministic=deterministic)
        ys, _ = self.rnn(xs, mask=mask, deterministic=deterministic)
        return flat_apply(self.head, self.drop(ys, deterministic=deterministic)).astype(jnp.float32)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.rnn.initial_carry((batch_size,), jnp.float32)

    def step(self, state, frame):
        check_frames(frame, self.d_frame, ndim=2, name="frame")
        state, y = self.rnn.step(state, self.frame_in(frame))
        return state, self.head(y).astype(jnp.float32)


class FrameTransformer(nn.Module):
    """A GPT-style pre-LN decoder over frames (the blocks of `jaxseq.models.transformer`).

    apply(frames [B, T, P], mask=None) -> logits [B, T, P]; init_state(B, max_len) -> one KVCache per
    layer; step(state, frame [B, P]) -> (state, logits [B, P]). Build with `from_config`.
    """

    d_frame: int
    num_layers: int = 4
    num_heads: int = 4
    d_model: int = 128
    d_ff: int = 512
    max_len: int = 256
    dropout: float = 0.0
    positional: str = "learned"
    num_kv_heads: int | None = None
    kernels: str = "auto"

    @classmethod
    def from_config(cls, config, d_frame: int, **overrides) -> "FrameTransformer":
        """From a `jaxseq.config.TransformerConfig` (tie_embeddings has no meaning here and is ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dataclasses.asdict(config).items() if k in names}
        return cls(d_frame=d_frame, **{**kwargs, **overrides})

    def setup(self):
        self.kv_heads = check_heads(self.d_model, self.num_heads, self.num_kv_heads)
        check_positional(self.positional, self.d_model, self.num_heads)
        if self.num_layers < 1 or self.max_len < 1:
            raise ConfigError(f"--transformer.num-layers and --transformer.max-len must be >= 1, got "
                              f"{self.num_layers}, {self.max_len}.")
        self.frame_in = nn.Dense(self.d_model, kernel_init=gpt_init)
        if self.positional == "learned":
            self.wpe = nn.Embed(self.max_len, self.d_model, embedding_init=nn.initializers.normal(0.01))
        self.h = [Block(self.d_model, self.num_heads, self.d_ff, self.num_kv_heads, self.dropout, causal=True,
                        rope=self.positional == "rope", out_init_scale=(2 * self.num_layers) ** -0.5,
                        kernels=self.kernels) for _ in range(self.num_layers)]
        self.ln_f = layer_norm(1e-5)
        self.head = nn.Dense(self.d_frame, kernel_init=gpt_init)
        self.drop = nn.Dropout(self.dropout)

    def _embed(self, frames, positions, deterministic):
        x = add_positions(flat_apply(self.frame_in, frames), positions, self.positional, getattr(self, "wpe", None))
        return self.drop(x, deterministic=deterministic)

    def _check_len(self, T: int, what: str):
        if self.positional == "learned" and T > self.max_len:
            raise ShapeError(f"{what} is {T} but learned positions cover --transformer.max-len {self.max_len}; "
                             f"raise it or use --transformer.positional rope.")

    def __call__(self, frames, mask=None, deterministic: bool = True):
        check_frames(frames, self.d_frame)
        B, T, _ = frames.shape
        mask = check_mask(mask, (B, T))
        self._check_len(T, "sequence length")
        positions = mask_positions(mask, B, T)
        x = self._embed(frames, positions, deterministic)
        for block in self.h:
            x, _ = block(x, positions, mask, deterministic=deterministic)
        return flat_apply(self.head, self.ln_f(x)).astype(jnp.float32)

    def init_state(self, batch_size: int, max_len: int | None = None):
        max_len = self.max_len if max_len is None else int(max_len)
        self._check_len(max_len, "init_state max_len")
        head_dim = self.d_model // self.num_heads
        return tuple(KVCache.create(batch_size, max_len, self.kv_heads, head_dim, jnp.float32)
                     for _ in range(self.num_layers))

    def step(self, state, frame):
        check_frames(frame, self.d_frame, ndim=2, name="frame")
        if len(state) != self.num_layers:
            raise ShapeError(f"state has {len(state)} layer caches but the model has {self.num_layers} layers.")
        lengths = jnp.ones(frame.shape[:1], jnp.int32)
        check_cache_room(state[0], lengths)
        positions = state[0].index[:, None]  # [B, 1]
        x = self._embed(frame[:, None, :], positions, deterministic=True)
        new_state = []
        for block, cache in zip(self.h, state):
            x, cache = block(x, positions, cache=cache, lengths=lengths, deterministic=True)
            new_state.append(cache)
        return tuple(new_state), self.head(self.ln_f(x[:, 0])).astype(jnp.float32)


def build_frame_transformer(t, spec: dict, kernels: str) -> FrameTransformer:
    """The model table's builder for a frames `spec`; `spec["max_len"]` (the longest sequence the task
    evaluates, if it says) must fit learned positions, checked here before any training."""
    longest = spec.get("max_len", 0)
    if t.positional == "learned" and longest > t.max_len:
        raise ConfigError(f"the task evaluates sequences of {longest} frames but --transformer.max-len is "
                          f"{t.max_len}; raise it to >= {longest}, use --transformer.positional rope, or lower "
                          f"the task's evaluation length (--music.eval-len).")
    return FrameTransformer.from_config(t, spec["d_frame"], kernels=kernels)


def sample_frames(model, variables, *, num_samples: int, num_frames: int, key, temperature: float = 1.0,
                  first=None):
    """Draw binary frame sequences from a frame model's recurrent form: float32 [num_samples, num_frames, P].

    Each frame's units are independent Bernoulli draws with p = sigmoid(logits / temperature), fed back as
    the next input. `first` [num_samples, P] is the input before the first frame (default zeros: the
    silent start frame the task puts before every sequence). temperature 0 takes p > 0.5.
    """
    if num_frames < 1 or num_samples < 1:
        raise ConfigError(f"num_frames and num_samples must be >= 1, got {num_frames}, {num_samples}.")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}.")
    P = model.d_frame
    x0 = jnp.zeros((num_samples, P), jnp.float32) if first is None else jnp.asarray(first, jnp.float32)
    state = model.apply(variables, num_samples, num_frames, method="init_state")

    @jax.jit
    def run(state, x0, key):
        def body(carry, k):
            state, x = carry
            state, logits = model.apply(variables, state, x, method="step")
            if temperature == 0:
                y = (logits > 0).astype(jnp.float32)
            else:
                y = jax.random.bernoulli(k, jax.nn.sigmoid(logits / temperature)).astype(jnp.float32)
            return (state, y), y

        _, ys = jax.lax.scan(body, (state, x0), jax.random.split(key, num_frames))
        return jnp.swapaxes(ys, 0, 1)

    return run(state, x0, key)
