"""Losses for sequence models: masked next-token negative log-likelihood.

    loss_fn = lm_loss_fn(model)
    loss, sums = loss_fn(params, batch, rng)    # rng=None: deterministic (no dropout)

Sums and counts are returned separately so that evaluation can average over many
batches exactly (sum of sums / sum of counts), not as a mean of means.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def token_nll(logits, targets, mask):
    """Summed next-token negative log-likelihood (nats) over valid positions, and their number.

    logits: float [B, T, V] (computed in float32 whatever their dtype); targets: int [B, T];
    mask: bool [B, T] (True = the target counts). Returns (sum_nll float32 [], num_tokens int32 []).
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, T]
    mask = jnp.asarray(mask, dtype=bool)
    # `where`, not `nll * mask`: a masked position with inf/NaN logits (padding) must add exactly 0, not NaN.
    sum_nll = jnp.sum(jnp.where(mask, nll, 0.0))
    return sum_nll, jnp.sum(mask, dtype=jnp.int32)


def cast_floating(tree, dtype):
    """Every floating-point leaf of `tree` cast to `dtype` (integer, bool and complex leaves as they are)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, tree)


def lm_loss(model, variables, batch, rng=None):
    """The mean masked next-token loss (nats) of a linen LM under the model protocol, and its sums.

    batch = {"inputs", "targets", "mask"}; rng None runs deterministically (evaluation), otherwise it is
    the dropout key. Returns (loss, {"count": valid targets, "sum_loss": summed nats, "sum_bits"}). A
    batch with no valid token gives loss 0 (mean over max(count, 1)), never 0/0.
    """
    rngs = None if rng is None else {"dropout": rng}
    logits = model.apply(variables, batch["inputs"], mask=batch["mask"], deterministic=rng is None, rngs=rngs)
    sum_nll, count = token_nll(logits, batch["targets"], batch["mask"])
    loss = sum_nll / jnp.maximum(count, 1).astype(jnp.float32)
    return loss, {"count": count, "sum_loss": sum_nll, "sum_bits": sum_nll / math.log(2)}


def lm_loss_fn(model, *, compute_dtype=None):
    """`loss_fn(params, batch, rng) -> (loss, sums)`: `lm_loss` over a linen LM's params, for `make_train_step`.

    compute_dtype (e.g. jnp.bfloat16): mixed precision. The (float32) params are cast to it inside the
    loss, so embeddings, cells and matmuls run in it while the gradients come back float32 (the cast's
    transpose); logits are upcast and the softmax/loss computed in float32. Modules with their own
    `dtype` attribute (TransformerLM) must also be built with it, or Flax promotes back to float32.
    """

    def loss_fn(params, batch, rng: jax.Array | None = None):
        if compute_dtype is not None:
            params = cast_floating(params, compute_dtype)
        return lm_loss(model, {"params": params}, batch, rng)

    return loss_fn
