"""ConvLM: a language model of dilated causal convolutions (the lectures' convolution row; WaveNet's stack
over tokens, van den Oord et al. 2016).

    embed [B, T, C] -> CausalConv(C, kernel, dilation 1)
    -> num_blocks x (gated block, residual):  z = CausalConv(2C, kernel, d)(x);  x += Dense(tanh(z1) * sigmoid(z2))
    -> LayerNorm -> Dense(V)
with the dilations 1, 2, 4, ..., 2^(cycle-1) repeated. Position t reads tokens t - R + 1 .. t, R = the
receptive field (`receptive_field`), and nothing further back: the convolution's long-term memory is
exactly R tokens, and it grows with depth, not with the sequence.

The recurrent form keeps one ring buffer per convolution (`CausalConv.step` with the step number), so a
generated token costs O(layers x kernel), not O(receptive field) (Paine et al. 2016).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxseq.checks import check_mask, check_tokens
from jaxseq.errors import ConfigError
from jaxseq.nn import CausalConv


def dilations(cycle: int, repeats: int) -> tuple[int, ...]:
    """(1, 2, ..., 2^(cycle-1)) repeated `repeats` times: the blocks' dilations."""
    return tuple(2 ** i for i in range(cycle)) * repeats


class ConvLM(nn.Module):
    """Causal convolutional language model.

    apply(tokens [B, T], mask=None) -> logits [B, T, V]: logits[:, t] predicts tokens[:, t+1].
    mask=False positions enter as zero vectors: right padding (the loop's batches) is exact; a hole in the
    middle of a row is read as a zero input, not skipped.
    features(tokens, mask) -> [B, T, channels] (what the softmax layer reads; a classifier's body).
    init_state(batch_size, max_len) -> {"t": int32 [B] (the step number; every row's is the same), "queues":
        one [B, padding, C] ring per convolution} (the batch leads every leaf, so beams can be gathered).
    step(state, token [B]) -> (state, logits [B, V]).
    """

    vocab_size: int
    channels: int = 128
    kernel_size: int = 2
    dilation_cycle: int = 8
    repeats: int = 1

    def setup(self):
        if self.kernel_size < 2 or self.dilation_cycle < 1 or self.repeats < 1 or self.channels < 1:
            raise ConfigError(f"--conv: kernel-size must be >= 2 and dilation-cycle, repeats, channels >= 1 "
                              f"(got {self.kernel_size}, {self.dilation_cycle}, {self.repeats}, {self.channels}).")
        C = self.channels
        self.embed = nn.Embed(self.vocab_size, C)
        self.input_conv = CausalConv(C, self.kernel_size, 1)
        self.convs = [CausalConv(2 * C, self.kernel_size, d) for d in dilations(self.dilation_cycle, self.repeats)]
        self.mixes = [nn.Dense(C) for _ in self.convs]
        self.norm = nn.LayerNorm()
        self.head = nn.Dense(self.vocab_size)

    @property
    def receptive_field(self) -> int:
        """Tokens a position reads, itself included: 1 + (kernel-1) x (1 + sum of the dilations)."""
        return 1 + (self.kernel_size - 1) * (1 + sum(dilations(self.dilation_cycle, self.repeats)))

    @staticmethod
    def _gate(z):
        a, b = jnp.split(z, 2, axis=-1)
        return jnp.tanh(a) * nn.sigmoid(b)

    def features(self, tokens, mask=None, deterministic: bool = True):
        check_tokens(tokens, self.vocab_size, name="tokens")
        mask = check_mask(mask, tokens.shape, name="mask")
        x = self.embed(tokens)
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0.0)
        x = self.input_conv(x)
        for conv, mix in zip(self.convs, self.mixes):
            x = x + mix(self._gate(conv(x)))
        return self.norm(x)

    def __call__(self, tokens, mask=None, deterministic: bool = True):
        return self.head(self.features(tokens, mask, deterministic))

    def init_state(self, batch_size: int, max_len: int | None = None):
        C = self.channels
        queues = [self.input_conv.init_queue(batch_size, C)] + [c.init_queue(batch_size, C) for c in self.convs]
        return {"t": jnp.zeros((batch_size,), jnp.int32), "queues": tuple(queues)}

    def step(self, state, token):
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        t, queues = state["t"][0], list(state["queues"])
        queues[0], x = self.input_conv.step(queues[0], self.embed(token), t=t)
        for i, (conv, mix) in enumerate(zip(self.convs, self.mixes)):
            queues[i + 1], z = conv.step(queues[i + 1], x, t=t)
            x = x + mix(self._gate(z))
        return {"t": state["t"] + 1, "queues": tuple(queues)}, self.head(self.norm(x))
