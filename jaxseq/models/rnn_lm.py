"""RecurrentLM: embedding -> any cell (Elman, LSTM, GRU, stacks, linear cells) -> softmax layer."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseq.checks import check_mask, check_tokens
from jaxseq.nn import Recurrent


class RecurrentLM(nn.Module):
    """Character/word language model over a recurrent cell.

    apply(tokens [B, T], mask=None) -> logits [B, T, V]: logits[:, t] predicts tokens[:, t+1].
    features(tokens [B, T], mask=None) -> the cell's outputs [B, T, d_out], what the softmax layer reads
        (a classifier's pretrained body, `jaxseq.models.classifier.TokenClassifier`).
    init_state(batch_size, max_len) -> the cell's carry (max_len is unused: an RNN's state has fixed size).
    step(state, token [B]) -> (state, logits [B, V]).
    Dropout (rate `dropout`) is applied to the embeddings and to the cell outputs, and between
    stacked layers by the cell itself. `kernels` ("auto" | "reference") picks the recurrence's
    implementation (`jaxseq.unroll`).
    """

    vocab_size: int
    cell: Any
    d_embed: int
    dropout: float = 0.0
    kernels: str = "auto"

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.d_embed)
        self.rnn = Recurrent(self.cell, kernels=self.kernels)
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Dense(self.vocab_size)

    def _logits(self, ys):
        # Flatten to [N, d] before the output layer: the 3-D Dense sent the weight-gradient
        # matmul down a slow XLA path on CPU (DESIGN.md).
        flat = ys.reshape(-1, ys.shape[-1])
        return self.head(flat).reshape(*ys.shape[:-1], self.vocab_size)

    def features(self, tokens, mask=None, deterministic: bool = True):
        check_tokens(tokens, self.vocab_size, name="tokens")
        mask = check_mask(mask, tokens.shape, name="mask")
        xs = self.drop(self.embed(tokens), deterministic=deterministic)
        ys, _ = self.rnn(xs, mask=mask, deterministic=deterministic)
        return ys

    def __call__(self, tokens, mask=None, deterministic: bool = True):
        ys = self.features(tokens, mask, deterministic)
        return self._logits(self.drop(ys, deterministic=deterministic))

    def init_state(self, batch_size: int, max_len: int | None = None):
        return self.rnn.initial_carry((batch_size,), jnp.float32)

    def step(self, state, token):
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        state, y = self.rnn.step(state, self.embed(token))
        return state, self._logits(y)
