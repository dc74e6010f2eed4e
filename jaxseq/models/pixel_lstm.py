"""The plain baseline of PixelRNN: one LSTM over the flattened pixel sequence (raster order).

The input at position t is pixel t - 1 (a begin-of-image id BOS = `levels` at t = 0), embedded; the
LSTM's output at t gives the softmax over pixel t's `levels`. It sees every earlier pixel, but only
through one state vector, and a pixel's upper neighbour is W steps back.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxseq import cells as C
from jaxseq.checks import check_tokens
from jaxseq.models.pixelrnn import check_images
from jaxseq.nn import Recurrent


class PixelLSTM(nn.Module):
    """apply(images int [B, H, W]) -> logits [B, H, W, levels]; step protocol as `PixelRNN`'s.
    pixel_inputs(images) -> xs [B, H, W, d_hidden]; logits_from_inputs(xs) -> logits (the same, split).

    init_state(batch_size, max_len=None) -> the LSTM carry; step(state, token [B]) feeds pixel t - 1
    (BOS at t = 0) and returns (state, logits [B, levels] of pixel t): O(num_layers * d_hidden^2) a pixel.
    """

    levels: int
    height: int
    width: int
    d_hidden: int = 128
    num_layers: int = 1
    kernels: str = "auto"

    @property
    def vocab_size(self) -> int:
        return self.levels + 1

    def setup(self):
        layers = [C.LSTM(self.d_hidden, self.d_hidden) for _ in range(self.num_layers)]
        cell = layers[0] if len(layers) == 1 else C.stack(layers)
        self.embed = nn.Embed(self.vocab_size, self.d_hidden)
        self.rnn = Recurrent(cell, kernels=self.kernels)
        self.out = nn.Dense(self.levels)

    def __call__(self, images):
        check_images(images, self.height, self.width, self.levels)
        return self.logits_from_inputs(self.pixel_inputs(images))

    def pixel_inputs(self, images):
        """Each pixel's embedding, float [B, H, W, d_hidden]."""
        return self.embed(images.astype(jnp.int32))

    def logits_from_inputs(self, xs):
        """The parallel form from `pixel_inputs`: position t reads pixel t - 1's embedding (BOS's at t = 0)."""
        B = xs.shape[0]
        flat = xs.reshape(B, -1, self.d_hidden)
        bos = jnp.broadcast_to(self.embed(jnp.full((1, 1), self.levels, jnp.int32)), (B, 1, self.d_hidden))
        ys, _ = self.rnn(jnp.concatenate([bos.astype(flat.dtype), flat[:, :-1]], axis=1))  # [B, HW, d_hidden]
        return self.out(ys.reshape(-1, self.d_hidden)).reshape(B, self.height, self.width, self.levels)

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.rnn.initial_carry((batch_size,), jnp.float32)

    def step(self, state, token):
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        state, y = self.rnn.step(state, self.embed(token))
        return state, self.out(y)
