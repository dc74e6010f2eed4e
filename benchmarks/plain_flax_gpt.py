"""A GPT written the way a Flax user would, on nothing of jaxseq's: the plain Flax/XLA competitor of
benchmarks/gpt_step.py.

nanoGPT's architecture (pre-LayerNorm blocks, fused q/k/v projection, tanh GELU MLP, learned positions,
the output layer tied to the token embedding, biases everywhere as in nanoGPT's default) from
`nn.Embed`, `nn.Dense`, `nn.LayerNorm` and `jax.nn.dot_product_attention(is_causal=True)`, trained
by a hand-written jit of cross-entropy + grad + `optax.adamw`, compiled with XLA's defaults. It has
exactly nanoGPT's parameter count, so the two steps do the same arithmetic.

    model = PlainGPT(vocab=65, ctx=64, layers=4, d=128, heads=4)
    params = model.init(key, tokens)["params"]          # tokens: int32 [B, T]
    step = make_plain_step(model, optax.adamw(1e-3))    # (params, opt_state, x, y) -> (params, opt_state, loss)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class Block(nn.Module):
    d: int
    heads: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):  # x: [B, T, d]
        b, t, d = x.shape
        init = nn.initializers.normal(0.02)
        qkv = nn.Dense(3 * d, kernel_init=init, dtype=self.dtype)(nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x))
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in jnp.split(qkv, 3, axis=-1))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)  # [B, T, H, hd] layout
        x = x + nn.Dense(d, kernel_init=init, dtype=self.dtype)(y)
        h = nn.Dense(4 * d, kernel_init=init, dtype=self.dtype)(nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x))
        return x + nn.Dense(d, kernel_init=init, dtype=self.dtype)(nn.gelu(h, approximate=True))


class PlainGPT(nn.Module):
    """tokens int32 [B, T] (T <= ctx) -> logits [B, T, vocab] (float32)."""

    vocab: int
    ctx: int
    layers: int
    d: int
    heads: int
    dtype: jnp.dtype | None = None  # compute dtype (bfloat16 for MFU in bf16); parameters stay float32

    @nn.compact
    def __call__(self, tokens):
        wte = nn.Embed(self.vocab, self.d, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype)
        wpe = nn.Embed(self.ctx, self.d, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype)
        x = wte(tokens) + wpe(jnp.arange(tokens.shape[1]))
        for _ in range(self.layers):
            x = Block(self.d, self.heads, self.dtype)(x)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x)
        return wte.attend(x).astype(jnp.float32)  # tied output layer, no bias (nanoGPT's lm_head)


def make_plain_step(model: PlainGPT, optimizer: optax.GradientTransformation):
    """The jitted train step, parameters and optimizer state donated: (params, opt_state, x, y) ->
    (params, opt_state, loss), x and y int32 [B, T]."""

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))
