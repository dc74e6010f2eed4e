"""GPT-style Transformer language model (pre-LayerNorm decoder), and the layers it is built from.

    tokens [B, T] -> nn.Embed (+ learned / sinusoidal positions, or RoPE inside attention)
                  -> N x [x + Attn(LN(x)); x + MLP(LN(x))] -> LN -> logits [B, T, V]

Two forms that agree (the library's key test):
  * parallel: `apply(tokens, mask=None, deterministic=True)`, causal self-attention over the sequence;
  * recurrent: `init_state(batch_size, max_len)` gives one KVCache per layer, `step(state, token)` adds
    one token, `prefill(state, tokens, mask)` adds a whole (right-padded, ragged) prompt in one call.

Padding. In `apply`, `mask[b, t] == False` removes token t of row b: no query attends to it and the
positions of the valid tokens are counted without it (position = number of valid tokens before it), so
the logits at valid positions equal those of the row with its padding cut out, for padding anywhere.
`prefill` takes right-padded prompts (each mask row a prefix of Trues): row b's valid tokens go into
its cache at index[b], index[b] + 1, ..., and index[b] advances by the row's length only.

Attention-probability dropout is not offered: `jax.nn.dot_product_attention` (and cuDNN's fused kernel
behind it) has none. `dropout` applies to the embeddings and to both residual branches, as in nanoGPT.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.attention import KVCache, apply_rope, attention, check_cache_room, sinusoidal_positions
from jaxseq.checks import check_mask, check_tokens, is_concrete
from jaxseq.errors import ConfigError, ShapeError

POSITIONAL = ("learned", "sinusoidal", "rope")
gpt_init = nn.initializers.normal(stddev=0.02)  # GPT-2's initialisation


def flat_apply(layer, x):
    """layer(x) over x [..., K] as one [N, K] matmul: a 3-D Dense sent the weight-gradient matmul down a
    slow XLA path on CPU (as in RecurrentLM._logits)."""
    y = layer(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def layer_norm(epsilon: float, **kw) -> nn.LayerNorm:
    """Flax's LayerNorm with the two-pass variance mean((x - mean)^2): the one-pass default loses digits
    when |mean| >> std."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, **kw)


def check_heads(d_model: int, num_heads: int, num_kv_heads: int | None) -> int:
    """Validate the head layout; return the number of key/value heads."""
    if num_heads < 1 or d_model % num_heads:
        raise ConfigError(f"d_model={d_model} must be a positive multiple of num_heads={num_heads}.")
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if kv < 1 or num_heads % kv:
        raise ConfigError(
            f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} "
            f"(None or num_heads = multi-head, 1 = multi-query, a divisor in between = grouped-query)."
        )
    return kv


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (GPT-2's c_attn layout [q | k | v]).

    With num_kv_heads < num_heads the K and V parts are narrower (grouped-query / multi-query).
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    causal: bool = True
    rope: bool = False
    rope_base: float = 10000.0
    out_init_scale: float = 1.0  # GPT-2 scales the residual projections by 1/sqrt(2 * num_layers)
    implementation: str | None = None
    kernels: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.kv_heads = check_heads(self.d_model, self.num_heads, self.num_kv_heads)
        self.head_dim = self.d_model // self.num_heads
        width = (self.num_heads + 2 * self.kv_heads) * self.head_dim
        self.c_attn = nn.Dense(width, kernel_init=gpt_init, dtype=self.dtype, param_dtype=self.param_dtype)
        out_init = nn.initializers.normal(stddev=0.02 * self.out_init_scale)
        self.c_proj = nn.Dense(self.d_model, kernel_init=out_init, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x, positions, mask=None, cache: KVCache | None = None, lengths=None):
        """x [B, T, D], positions int [B, T]; mask [B, T] key padding (parallel form only).

        With a cache, the T new tokens are appended at cache.index (per row) and attend to everything
        the cache holds before them. Returns (y [B, T, D], cache).
        """
        B, T, _ = x.shape
        H, K, d = self.num_heads, self.kv_heads, self.head_dim
        qkv = flat_apply(self.c_attn, x)  # [B, T, (H + 2K) * d]
        q = qkv[..., : H * d].reshape(B, T, H, d)
        k = qkv[..., H * d : (H + K) * d].reshape(B, T, K, d)
        v = qkv[..., (H + K) * d :].reshape(B, T, K, d)
        if self.rope:
            q = apply_rope(q, positions, base=self.rope_base)
            k = apply_rope(k, positions, base=self.rope_base)
        if cache is None:
            y = attention(q, k, v, mask=mask, causal=self.causal, implementation=self.implementation, kernels=self.kernels)
        else:
            # Right padding needs no key mask here: a valid query at index + t only sees keys up to
            # index + t, which are all valid; padded keys lie beyond the row's new index.
            offset = cache.index
            cache = cache.update(k, v, lengths)
            y = attention(q, cache.k, cache.v, causal=True, q_offset=offset, implementation=self.implementation,
                          kernels=self.kernels)
        return flat_apply(self.c_proj, y.reshape(B, T, H * d)), cache


class MLP(nn.Module):
    d_model: int
    d_ff: int
    gelu_approximate: bool = True  # tanh approximation = GPT-2's "gelu_new"
    out_init_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = flat_apply(nn.Dense(self.d_ff, kernel_init=gpt_init, name="c_fc", **kw), x)
        h = jax.nn.gelu(h, approximate=self.gelu_approximate)
        out_init = nn.initializers.normal(stddev=0.02 * self.out_init_scale)
        return flat_apply(nn.Dense(self.d_model, kernel_init=out_init, name="c_proj", **kw), h)


class Block(nn.Module):
    """Pre-LN Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); dropout on both branches."""

    d_model: int
    num_heads: int
    d_ff: int
    num_kv_heads: int | None = None
    dropout: float = 0.0
    causal: bool = True
    rope: bool = False
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    gelu_approximate: bool = True
    out_init_scale: float = 1.0
    implementation: str | None = None
    kernels: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_1 = layer_norm(self.layer_norm_eps, **kw)
        self.attn = SelfAttention(
            self.d_model, self.num_heads, self.num_kv_heads, causal=self.causal, rope=self.rope,
            rope_base=self.rope_base, out_init_scale=self.out_init_scale, implementation=self.implementation,
            kernels=self.kernels, **kw,
        )
        self.ln_2 = layer_norm(self.layer_norm_eps, **kw)
        self.mlp = MLP(self.d_model, self.d_ff, self.gelu_approximate, self.out_init_scale, **kw)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, x, positions, mask=None, cache=None, lengths=None, deterministic: bool = True):
        h, cache = self.attn(self.ln_1(x), positions, mask, cache, lengths)
        x = x + self.drop(h, deterministic=deterministic)
        x = x + self.drop(self.mlp(self.ln_2(x)), deterministic=deterministic)
        return x, cache


def add_positions(x, positions, positional: str, wpe: nn.Embed | None = None):
    """Add the positional code to embeddings x [B, T, D] at int positions [B, T] (RoPE: nothing here)."""
    if positional == "learned":
        # Clip so that padding beyond the table (never attended to) cannot turn into NaN.
        return x + wpe(jnp.minimum(positions, wpe.num_embeddings - 1))
    if positional == "sinusoidal":
        return x + sinusoidal_positions(positions, x.shape[-1]).astype(x.dtype)
    return x


def check_positional(positional: str, d_model: int, num_heads: int):
    if positional not in POSITIONAL:
        raise ConfigError(f"positional must be one of {POSITIONAL}, got {positional!r}.")
    if positional == "rope" and (d_model // num_heads) % 2:
        raise ConfigError(f"positional='rope' needs an even head_dim, got d_model/num_heads = {d_model // num_heads}.")
    if positional == "sinusoidal" and d_model % 2:
        raise ConfigError(f"positional='sinusoidal' needs an even d_model, got {d_model}.")


def mask_positions(mask, B: int, T: int):
    """Positions [B, T]: 0..T-1, or with a mask the count of valid tokens before each one."""
    if mask is None:
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def prompt_lengths(mask, B: int, T: int):
    """Lengths [B] of right-padded prompts; raises if a concrete mask is not right-padded or a row is empty."""
    if mask is None:
        return jnp.full((B,), T, jnp.int32)
    if is_concrete(mask):
        m = np.asarray(mask)
        if np.any(m[:, 1:] & ~m[:, :-1]):
            raise ShapeError(
                "prefill needs right-padded prompts: each mask row must be True for its tokens then False; "
                "move the padding to the end of the row."
            )
        if T and not np.all(m[:, 0]):
            raise ShapeError(
                f"prompt row(s) {np.flatnonzero(~m[:, 0]).tolist()} are empty; every row needs at least one "
                f"token (start generation from a BOS id)."
            )
    return jnp.sum(mask, axis=1).astype(jnp.int32)


def gather_last(x, lengths):
    """x [B, T, ...] -> x[b, lengths[b] - 1] as [B, ...] (row 0's position for empty rows)."""
    idx = jnp.maximum(lengths - 1, 0)
    return jnp.take_along_axis(x, idx.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]


class TransformerLM(nn.Module):
    """GPT-style decoder-only LM under the jaxseq model protocol.

    Build from the CLI config: `TransformerLM.from_config(config.transformer, vocab_size)`.
    Parameter names follow GPT-2 (wte, wpe, h_i.ln_1, h_i.attn.c_attn, ..., ln_f) so checkpoints port;
    see `jaxseq.interop_gpt2`.
    """

    vocab_size: int
    num_layers: int = 4
    num_heads: int = 4
    d_model: int = 128
    d_ff: int = 512
    max_len: int = 256
    dropout: float = 0.0
    positional: str = "learned"  # "learned" | "sinusoidal" | "rope"
    tie_embeddings: bool = True
    num_kv_heads: int | None = None  # None = num_heads; 1 = multi-query; a divisor = grouped-query
    layer_norm_eps: float = 1e-5
    gelu_approximate: bool = True
    rope_base: float = 10000.0
    attention_implementation: str | None = None  # None = the dispatch table; or force "xla", "cudnn", "flash", "native"
    kernels: str = "auto"  # "auto" | "reference": attention's dispatch policy (jaxseq.kernels)
    dtype: Any = jnp.float32  # compute dtype; logits are always returned in float32
    param_dtype: Any = jnp.float32
    # Per-head attention matmuls dominate: on CPU its steps compile with YNNPACK dots (jaxseq.xla_options).
    batched_matmuls: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config, vocab_size: int, **overrides) -> "TransformerLM":
        """From a `jaxseq.config.TransformerConfig` (any dataclass with matching field names)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dataclasses.asdict(config).items() if k in names}
        return cls(vocab_size=vocab_size, **{**kwargs, **overrides})

    def setup(self):
        self.kv_heads = check_heads(self.d_model, self.num_heads, self.num_kv_heads)
        self.head_dim = self.d_model // self.num_heads
        check_positional(self.positional, self.d_model, self.num_heads)
        if self.vocab_size < 1 or self.num_layers < 1 or self.max_len < 1:
            raise ConfigError(
                f"need vocab_size >= 1, num_layers >= 1, max_len >= 1; got {self.vocab_size}, "
                f"{self.num_layers}, {self.max_len}."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.wte = nn.Embed(self.vocab_size, self.d_model, embedding_init=gpt_init, **kw)
        if self.positional == "learned":
            self.wpe = nn.Embed(self.max_len, self.d_model, embedding_init=nn.initializers.normal(0.01), **kw)
        self.h = [
            Block(
                self.d_model, self.num_heads, self.d_ff, self.num_kv_heads, self.dropout, causal=True,
                rope=self.positional == "rope", rope_base=self.rope_base, layer_norm_eps=self.layer_norm_eps,
                gelu_approximate=self.gelu_approximate, out_init_scale=(2 * max(self.num_layers, 1)) ** -0.5,
                implementation=self.attention_implementation, kernels=self.kernels, **kw,
            )
            for _ in range(self.num_layers)
        ]
        self.ln_f = layer_norm(self.layer_norm_eps, **kw)
        if not self.tie_embeddings:
            self.lm_head = nn.Dense(self.vocab_size, use_bias=False, kernel_init=gpt_init, **kw)
        self.drop = nn.Dropout(self.dropout)

    # -- pieces shared by both forms ----------------------------------------------------------------

    def _embed(self, tokens, positions, deterministic):
        x = add_positions(self.wte(tokens), positions, self.positional, getattr(self, "wpe", None))
        return self.drop(x, deterministic=deterministic)

    def _head(self, x):
        """Final LayerNorm and output layer: [..., D] -> float32 logits [..., V]."""
        return self._logits(self.ln_f(x))

    def _logits(self, x):
        flat = x.reshape(-1, self.d_model)
        logits = self.wte.attend(flat) if self.tie_embeddings else self.lm_head(flat)
        return logits.reshape(*x.shape[:-1], self.vocab_size).astype(jnp.float32)

    def _check_len(self, T: int, what: str):
        if self.positional == "learned" and T > self.max_len:
            raise ShapeError(
                f"{what} is {T} but learned positions cover max_len={self.max_len}; shorten it, raise "
                f"max_len, or use positional='rope'/'sinusoidal'."
            )

    # -- parallel form -------------------------------------------------------------------------------

    def __call__(self, tokens, mask=None, deterministic: bool = True):
        """tokens int [B, T], mask bool [B, T] (False = padding) -> logits float32 [B, T, V]."""
        return self._logits(self.features(tokens, mask, deterministic))

    def features(self, tokens, mask=None, deterministic: bool = True):
        """tokens int [B, T], mask bool [B, T] -> the final LayerNorm's output [B, T, D], what the output
        layer reads (a classifier's pretrained body, `jaxseq.models.classifier.TokenClassifier`)."""
        check_tokens(tokens, self.vocab_size)
        B, T = tokens.shape
        mask = check_mask(mask, (B, T))
        self._check_len(T, "sequence length")
        positions = mask_positions(mask, B, T)
        x = self._embed(tokens, positions, deterministic)
        for block in self.h:
            x, _ = block(x, positions, mask, deterministic=deterministic)
        return self.ln_f(x)

    # -- recurrent form ------------------------------------------------------------------------------

    def init_state(self, batch_size: int, max_len: int | None = None):
        """An empty KV cache per layer: tuple of KVCache with k, v [B, max_len, kv_heads, head_dim]."""
        max_len = self.max_len if max_len is None else int(max_len)
        self._check_len(max_len, "init_state max_len")
        return tuple(
            KVCache.create(batch_size, max_len, self.kv_heads, self.head_dim, self.dtype) for _ in range(self.num_layers)
        )

    def _extend(self, state, tokens, lengths):
        """Append tokens [B, T] (row b's first lengths[b] valid) to the caches; return (state, hidden [B, T, D])."""
        if len(state) != self.num_layers:
            raise ShapeError(f"state has {len(state)} layer caches but the model has {self.num_layers} layers.")
        T = tokens.shape[1]
        check_cache_room(state[0], lengths)
        index = state[0].index
        positions = index[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
        x = self._embed(tokens, positions, deterministic=True)
        new_state = []
        for block, cache in zip(self.h, state):
            x, cache = block(x, positions, cache=cache, lengths=lengths, deterministic=True)
            new_state.append(cache)
        return tuple(new_state), x

    def step(self, state, token):
        """Feed one token per row: token int [B] -> (state, logits float32 [B, V] for the next token)."""
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        state, x = self._extend(state, token[:, None], jnp.ones(token.shape, jnp.int32))
        return state, self._head(x[:, 0])

    def prefill(self, state, tokens, mask=None):
        """Feed a right-padded prompt in one call: tokens int [B, T], mask bool [B, T].

        Equivalent to `step` over each row's valid tokens. Returns (state, logits float32 [B, V]) at each
        row's last valid token, i.e. the distribution of the first generated token.
        """
        check_tokens(tokens, self.vocab_size)
        B, T = tokens.shape
        mask = check_mask(mask, (B, T))
        lengths = prompt_lengths(mask, B, T)
        state, x = self._extend(state, tokens, lengths)
        return state, self._head(gather_last(x, lengths))
