"""AdditiveLM: the lecture's "addition" model, an order-blind bag of context.

    c_t = reduce_{s <= t, mask[s]} E[x_s]          reduce = sum or mean, E: [V, d_embed]
    logits_t = W_out @ c_t + b                      (or W_out @ tanh(W_h c_t + b_h) + b with d_hidden > 0)

The context of position t is every valid token up to and including t with its order thrown away,
so the model can learn "topic" (which tokens are around) but not syntax. apply computes all c_t
with one cumsum; step keeps the running sum and count.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from jaxseq.checks import check_mask, check_tokens
from jaxseq.errors import ConfigError


class AdditiveLM(nn.Module):
    """Bag-of-context language model under the model protocol.

    apply(tokens [B, T], mask=None) -> logits [B, T, V]; logits[:, t] predicts tokens[:, t+1] from
        reduce(embed(tokens[:, :t+1])). Masked tokens do not enter the sum (or the count of the
        mean); the output at a masked position is that of the last valid one. With no valid token
        yet, the context is the zero vector.
    features(tokens [B, T], mask=None) -> the context vectors c_t [B, T, d] (after the hidden layer, if
        any): at the last valid position, the bag of words of the whole row.
    init_state(batch_size, max_len) -> {"sum": float32 [B, d_embed], "count": float32 [B]}.
    step(state, token [B]) -> (state, logits [B, V]).
    """

    vocab_size: int
    d_embed: int = 256
    reduce: Literal["sum", "mean"] = "mean"
    d_hidden: int = 0  # 0 = softmax layer directly on the context; > 0 adds a tanh hidden layer

    def __post_init__(self):
        if self.reduce not in ("sum", "mean"):
            raise ConfigError(f"reduce={self.reduce!r} must be 'sum' or 'mean'.")
        if self.d_hidden < 0:
            raise ConfigError(f"d_hidden={self.d_hidden} must be >= 0 (0 = no hidden layer).")
        super().__post_init__()

    @classmethod
    def from_config(cls, config, vocab_size: int) -> "AdditiveLM":
        """Build from a `jaxseq.config.AdditiveConfig`."""
        return cls(vocab_size=vocab_size, d_embed=config.d_embed, reduce=config.reduce,
                   d_hidden=config.d_hidden)

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.d_embed)
        self.hidden = nn.Dense(self.d_hidden) if self.d_hidden else None
        self.head = nn.Dense(self.vocab_size)

    def _context(self, total, count):
        if self.reduce == "sum":
            return total
        return total / jnp.maximum(count, 1.0)[..., None]

    def _hidden(self, ctx):
        # Flatten to [N, d] before the dense layers (3-D Dense is a slow XLA path on CPU, DESIGN.md).
        h = ctx.reshape(-1, ctx.shape[-1])
        if self.hidden is not None:
            h = jnp.tanh(self.hidden(h))
        return h.reshape(*ctx.shape[:-1], h.shape[-1])

    def _logits(self, ctx):
        h = self._hidden(ctx)
        return self.head(h.reshape(-1, h.shape[-1])).reshape(*ctx.shape[:-1], self.vocab_size)

    def _contexts(self, tokens, mask):
        check_tokens(tokens, self.vocab_size, name="tokens")
        mask = check_mask(mask, tokens.shape, name="mask")
        valid = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        e = self.embed(jnp.asarray(tokens, jnp.int32)) * valid[..., None]  # [B, T, d]
        return self._context(jnp.cumsum(e, axis=1), jnp.cumsum(valid, axis=1))

    def features(self, tokens, mask=None, deterministic: bool = True):
        return self._hidden(self._contexts(tokens, mask))

    def __call__(self, tokens, mask=None, deterministic: bool = True):
        return self._logits(self._contexts(tokens, mask))

    def init_state(self, batch_size: int, max_len: int | None = None):
        """Zero sum and count. max_len is unused: the state has a fixed size."""
        return {"sum": jnp.zeros((batch_size, self.d_embed), jnp.float32),
                "count": jnp.zeros((batch_size,), jnp.float32)}

    def step(self, state, token):
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        total = state["sum"] + self.embed(jnp.asarray(token, jnp.int32))
        count = state["count"] + 1.0
        return {"sum": total, "count": count}, self._logits(self._context(total, count))
