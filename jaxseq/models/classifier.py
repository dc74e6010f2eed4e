"""Many-to-one classifiers.

SequenceClassifier: feature series -> input projection -> any recurrent cell -> the last valid output -> logits.
TokenClassifier: token documents -> a language model's body (its `features`) -> pooling -> logits; the
body's parameters are those of the LM, so a pretrained LM's weights load into it (`jaxseq.finetune`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseq.checks import check_mask
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.nn import Recurrent


def last_valid(ys, mask):
    """ys [B, T, d] at each row's last valid step (mask [B, T] bool) -> [B, d]; zeros for an empty row."""
    steps = ys.shape[1]
    last = steps - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # [B]: the highest t with mask[b, t]
    picked = jnp.take_along_axis(ys, last[:, None, None], axis=1)[:, 0]
    return jnp.where(jnp.any(mask, axis=1)[:, None], picked, jnp.zeros_like(picked))


class SequenceClassifier(nn.Module):
    """apply(xs [B, T, d_input] float, mask [B, T] bool = None) -> logits [B, num_classes].

    The features of each step are projected to `d_embed` (the cell's d_in), the cell runs over the valid
    steps (`jaxseq.unroll` semantics: padding holds the carry), and the output at the last valid step
    is classified. Dropout (rate `dropout`) acts on the projected inputs and the cell's last output.
    """

    num_classes: int
    cell: Any
    d_embed: int
    dropout: float = 0.0
    kernels: str = "auto"

    def setup(self):
        self.embed = nn.Dense(self.d_embed)
        self.rnn = Recurrent(self.cell, kernels=self.kernels)
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Dense(self.num_classes)

    def __call__(self, xs, mask=None, deterministic: bool = True):
        if xs.ndim != 3:
            raise ShapeError(f"xs must be [batch, steps, features], got shape {tuple(xs.shape)}; add a trailing "
                             f"axis of size 1 for a scalar series.")
        mask = check_mask(mask, xs.shape[:2], name="mask")
        if mask is None:
            mask = jnp.ones(xs.shape[:2], bool)
        hs = self.drop(self.embed(xs), deterministic=deterministic)
        ys, _ = self.rnn(hs, mask=mask, deterministic=deterministic)
        return self.head(self.drop(last_valid(ys, mask), deterministic=deterministic))


def mean_valid(ys, mask):
    """Mean of ys [B, T, d] over each row's valid steps (mask [B, T] bool) -> [B, d]; zeros for an empty row."""
    weight = mask.astype(ys.dtype)[..., None]
    return jnp.sum(ys * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)


POOLS = ("mean", "last")


class TokenClassifier(nn.Module):
    """apply(tokens [B, T] int, mask [B, T] bool = None) -> logits [B, num_classes].

    `body` is a language model with `features(tokens, mask, deterministic) -> [B, T, d]` (RecurrentLM,
    TransformerLM, AdditiveLM); its parameters sit under "body" with the LM's own names (its softmax
    layer is never called, so it has none), the new classification layer under "head". `pool`: "mean"
    over the valid positions, or "last", the last valid position: an RNN's final state, the bag of
    words of the additive model, and for a causal Transformer the one position that sees the whole
    document (GPT's classification position). Dropout (rate `dropout`) acts on the pooled vector.
    """

    body: Any
    num_classes: int
    pool: str = "mean"
    dropout: float = 0.0

    def setup(self):
        if self.pool not in POOLS:
            raise ConfigError(f"pool={self.pool!r} must be one of {POOLS}.")
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Dense(self.num_classes)

    def __call__(self, tokens, mask=None, deterministic: bool = True):
        if tokens.ndim != 2:
            raise ShapeError(f"tokens must be [batch, steps] integers, got shape {tuple(tokens.shape)}.")
        mask = check_mask(mask, tokens.shape, name="mask")
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        ys = self.body.features(tokens, mask, deterministic).astype(jnp.float32)
        pooled = mean_valid(ys, mask) if self.pool == "mean" else last_valid(ys, mask)
        return self.head(self.drop(pooled, deterministic=deterministic))
