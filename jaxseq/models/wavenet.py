"""WaveNet (van den Oord et al. 2016) and a mu-law RNN baseline, over mu-law audio codes with a speaker id.

Both serve the "audio" interface ({"interface": "audio", "levels": 256, "num_speakers": S}):

    logits = model.apply(variables, codes [B, T], speaker [B])       # parallel: logits[:, t] predicts codes[:, t+1]
    state = model.apply(variables, batch_size, method="init_state")
    state, logits_t = model.apply(variables, state, code_t [B], speaker [B], method="step")

WaveNet: embedded codes -> a causal input convolution -> `repeats` x `dilation_cycle` residual layers,
each a dilated causal convolution (kernel 2, dilations 1, 2, ..., 2**(cycle-1)) into a gated unit
tanh(f) * sigmoid(g), with a per-layer speaker embedding added to f and g (global conditioning), then a
1x1 convolution back to the residual stream and another into the skip sum -> relu -> 1x1 -> relu ->
1x1 -> logits over the 256 mu-law classes. Its recurrent form keeps one queue per convolution (Paine et
al. 2016, "Fast WaveNet generation"), used as a ring buffer indexed by the step number, so a step costs
O(layers) however large the receptive field.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseq.checks import check_tokens
from jaxseq.decoding import top_k_filter
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.nn import CausalConv, Recurrent

LEVELS = 256  # mu-law classes


def _check(codes, speaker, levels, num_speakers, ndim):
    check_tokens(codes, levels, name="codes" if ndim == 2 else "code", ndim=ndim)
    check_tokens(speaker, num_speakers, name="speaker", ndim=1)
    if speaker.shape[0] != codes.shape[0]:
        raise ShapeError(f"speaker has {speaker.shape[0]} rows but the codes have {codes.shape[0]}; give one speaker id per row.")


class WaveNet(nn.Module):
    """Dilated causal convolutions with gated units, residual and skip connections, speaker conditioning.

    levels: mu-law classes (256); num_speakers: rows of the speaker embeddings; channels: residual
    width; skip_channels: width of the skip sum and the output layers; dilation_cycle: layers per
    block, dilations 1 .. 2**(cycle-1); repeats: blocks; kernel_size: taps of each dilated convolution.
    ring: the recurrent form's queues are ring buffers indexed by the step (a step reads and writes
    O(1) rows each); False shifts every queue by one row per step (moves the whole receptive field's
    worth of rows; kept for the generation benchmark).
    """

    levels: int = 256
    num_speakers: int = 1
    channels: int = 32
    skip_channels: int = 64
    dilation_cycle: int = 8
    repeats: int = 2
    kernel_size: int = 2
    ring: bool = True

    @property
    def dilations(self) -> list[int]:
        return [2 ** i for _ in range(self.repeats) for i in range(self.dilation_cycle)]

    @property
    def receptive_field(self) -> int:
        """Inputs an output reads: itself, the input convolution's tap and every dilated layer's taps."""
        return 1 + (self.kernel_size - 1) * (1 + sum(self.dilations))

    def setup(self):
        C = self.channels
        self.embed = nn.Embed(self.levels, C)
        self.input_conv = CausalConv(C, kernel_size=2)
        self.convs = [CausalConv(2 * C, self.kernel_size, d) for d in self.dilations]
        self.cond = [nn.Embed(self.num_speakers, 2 * C) for _ in self.dilations]
        self.res = [nn.Dense(C) for _ in self.dilations]
        self.skip = [nn.Dense(self.skip_channels) for _ in self.dilations]
        self.out1 = nn.Dense(self.skip_channels)
        self.out2 = nn.Dense(self.levels)

    def _layer(self, i, h, x, speaker):
        """Layer i after its convolution: h [..., 2C] (+ speaker), x the residual input -> (x, skip)."""
        h = h + self.cond[i](speaker).reshape(speaker.shape + (1,) * (h.ndim - 2) + (h.shape[-1],))
        f, g = jnp.split(h, 2, axis=-1)
        z = jnp.tanh(f) * nn.sigmoid(g)
        return x + self.res[i](z), self.skip[i](z)

    def _head(self, skip):
        return self.out2(nn.relu(self.out1(nn.relu(skip))))

    def __call__(self, codes, speaker):
        """codes int [B, T], speaker int [B] -> logits [B, T, levels]; logits[:, t] reads codes[:, :t+1]."""
        _check(codes, speaker, self.levels, self.num_speakers, 2)
        x = self.input_conv(self.embed(codes))
        skip = 0.0
        for i, conv in enumerate(self.convs):
            x, s = self._layer(i, conv(x), x, speaker)
            skip = skip + s
        return self._head(skip)

    def init_state(self, batch_size: int, max_len: int | None = None):
        """{"t": int32 step number, "queues": [input conv's, each layer's]} of zeros (max_len is unused)."""
        C = self.channels
        queues = [self.input_conv.init_queue(batch_size, C)] + [c.init_queue(batch_size, C) for c in self.convs]
        return {"t": jnp.zeros((), jnp.int32), "queues": queues}

    def step(self, state, code, speaker):
        """One sample: code int [B], speaker int [B] -> (state, logits [B, levels]), as __call__ at step t."""
        _check(code, speaker, self.levels, self.num_speakers, 1)
        t, queues = state["t"], list(state["queues"])
        t_ring = t if self.ring else None
        queues[0], x = self.input_conv.step(queues[0], self.embed(code), t_ring)
        skip = 0.0
        for i, conv in enumerate(self.convs):
            queues[i + 1], h = conv.step(queues[i + 1], x, t_ring)
            x, s = self._layer(i, h, x, speaker)
            skip = skip + s
        return {"t": t + 1, "queues": queues}, self._head(skip)


class MuLawRNN(nn.Module):
    """The baseline: an RNN over samples (embedded mu-law code + speaker embedding -> cell -> softmax).

    Same calls as WaveNet; its state is the cell's carry. `cell` is any jaxseq cell whose d_in is d_embed.
    """

    cell: Any
    levels: int = 256
    num_speakers: int = 1
    d_embed: int = 64
    kernels: str = "auto"

    def setup(self):
        self.embed = nn.Embed(self.levels, self.d_embed)
        self.speaker_embed = nn.Embed(self.num_speakers, self.d_embed)
        self.rnn = Recurrent(self.cell, kernels=self.kernels)
        self.head = nn.Dense(self.levels)

    def __call__(self, codes, speaker):
        _check(codes, speaker, self.levels, self.num_speakers, 2)
        ys, _ = self.rnn(self.embed(codes) + self.speaker_embed(speaker)[:, None])
        return self.head(ys.reshape(-1, ys.shape[-1])).reshape(*ys.shape[:-1], self.levels)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.rnn.initial_carry((batch_size,), jnp.float32)

    def step(self, state, code, speaker):
        _check(code, speaker, self.levels, self.num_speakers, 1)
        state, y = self.rnn.step(state, self.embed(code) + self.speaker_embed(speaker))
        return state, self.head(y)


def build_wavenet(w, spec: dict) -> WaveNet:
    """A WaveNet sized by a `WaveNetConfig` (--wavenet.*) for an audio task's spec."""
    for name in ("channels", "skip_channels", "dilation_cycle", "repeats", "kernel_size"):
        if getattr(w, name) < 1:
            raise ConfigError(f"--wavenet.{name.replace('_', '-')} must be >= 1, got {getattr(w, name)}.")
    return WaveNet(levels=spec["levels"], num_speakers=spec["num_speakers"], channels=w.channels,
                   skip_channels=w.skip_channels, dilation_cycle=w.dilation_cycle, repeats=w.repeats,
                   kernel_size=w.kernel_size)


@partial(jax.jit, static_argnames=("model", "num_steps", "top_k"))
def _generate(model, variables, speaker, num_steps, key, temperature, top_k):
    B = speaker.shape[0]
    state = model.apply(variables, B, method="init_state")
    first = jnp.full((B,), LEVELS // 2, jnp.int32)  # the code of silence (0.0)

    def body(carry, i):
        state, code = carry
        state, logits = model.apply(variables, state, code, speaker, method="step")
        logits = logits.astype(jnp.float32)
        if top_k is not None:
            logits = top_k_filter(logits, top_k)
        sampled = jax.random.categorical(jax.random.fold_in(key, i), logits / jnp.maximum(temperature, 1e-6))
        code = jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
        return (state, code), code

    _, codes = jax.lax.scan(body, (state, first), jnp.arange(num_steps))
    return codes.T


def generate(model, variables, speaker, num_steps: int, key, *, temperature: float = 1.0, top_k: int | None = None):
    """Sample `num_steps` mu-law codes per row with the recurrent form: speaker int [B] -> codes int32 [B, num_steps].

    Starts from the code of silence; temperature 0 is greedy. Works for any model with the audio
    interface's `init_state`/`step` (WaveNet, MuLawRNN).
    """
    speaker = jnp.asarray(speaker, jnp.int32)
    check_tokens(speaker, model.num_speakers, name="speaker", ndim=1)
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {temperature}.")
    return _generate(model, variables, speaker, int(num_steps), key, jnp.float32(temperature), top_k)
