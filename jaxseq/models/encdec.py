"""Encoder-decoder Transformer (Vaswani et al. 2017, pre-LayerNorm), under the seq2seq model protocol.

    src [B, S] -> encoder: N x [self-attention (source padding mask) + MLP] -> LN -> memory [B, S, D]
    tgt [B, T] -> decoder: N x [causal self-attention + cross-attention to memory + MLP] -> LN -> [B, T, V]

    memory = model.apply(v, src, src_mask, method="encode")
    logits = model.apply(v, src, tgt, src_mask=src_mask, tgt_mask=tgt_mask)     # teacher forcing
    state = model.apply(v, memory, src_mask, max_len, method="init_state")      # per-layer KV caches
    state, logits_t = model.apply(v, state, token_t, method="step")             # token_t [B] -> [B, V]

`tgt` is the decoder input (starting with a BOS id); logits[:, t] predict tgt's next token. Masks are
True on valid tokens; padding anywhere is cut out exactly as in `TransformerLM` (see its docstring).
The decoding state is a dict whose every leaf has the batch as its leading axis (self-attention
caches, the memory's cross-attention keys/values computed once, the source mask), so
`jaxseq.decoding` can run beam search over it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxseq.attention import KVCache, attention, check_cache_room
from jaxseq.checks import check_mask, check_tokens
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.models.transformer import (
    Block,
    add_positions,
    check_heads,
    check_positional,
    flat_apply,
    gpt_init,
    layer_norm,
    mask_positions,
)


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the encoder memory (grouped-query if num_kv_heads < num_heads)."""

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    out_init_scale: float = 1.0
    implementation: str | None = None
    kernels: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.kv_heads = check_heads(self.d_model, self.num_heads, self.num_kv_heads)
        self.head_dim = self.d_model // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj = nn.Dense(self.d_model, kernel_init=gpt_init, **kw)
        self.kv_proj = nn.Dense(2 * self.kv_heads * self.head_dim, kernel_init=gpt_init, **kw)
        self.c_proj = nn.Dense(self.d_model, kernel_init=nn.initializers.normal(0.02 * self.out_init_scale), **kw)

    def memory_kv(self, memory):
        """memory [B, S, D] -> (k, v), each [B, S, kv_heads, head_dim]. Done once per source for decoding."""
        B, S, _ = memory.shape
        kv = flat_apply(self.kv_proj, memory).reshape(B, S, 2, self.kv_heads, self.head_dim)
        return kv[:, :, 0], kv[:, :, 1]

    def __call__(self, x, k, v, src_mask=None):
        """x [B, T, D] attends to memory keys/values; src_mask [B, S] hides source padding."""
        B, T, _ = x.shape
        q = flat_apply(self.q_proj, x).reshape(B, T, self.num_heads, self.head_dim)
        y = attention(q, k, v, mask=src_mask, implementation=self.implementation, kernels=self.kernels)
        return flat_apply(self.c_proj, y.reshape(B, T, self.d_model))


class DecoderBlock(Block):
    """A causal `Block` with cross-attention between its two halves:
    x + SelfAttn(LN(x)), x + CrossAttn(LN(x), memory), x + MLP(LN(x))."""

    def setup(self):
        if not self.causal:
            raise ConfigError("a DecoderBlock's self-attention is causal; leave causal=True.")
        super().setup()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_cross = layer_norm(self.layer_norm_eps, **kw)
        self.cross = CrossAttention(
            self.d_model, self.num_heads, self.num_kv_heads, self.out_init_scale, self.implementation,
            kernels=self.kernels, **kw,
        )

    def memory_kv(self, memory):
        return self.cross.memory_kv(memory)

    def __call__(self, x, positions, mem_k, mem_v, src_mask, tgt_mask=None, cache=None, lengths=None,
                 deterministic: bool = True):
        h, cache = self.attn(self.ln_1(x), positions, tgt_mask, cache, lengths)
        x = x + self.drop(h, deterministic=deterministic)
        x = x + self.drop(self.cross(self.ln_cross(x), mem_k, mem_v, src_mask), deterministic=deterministic)
        x = x + self.drop(self.mlp(self.ln_2(x)), deterministic=deterministic)
        return x, cache


class TransformerSeq2Seq(nn.Module):
    """Encoder-decoder Transformer. `vocab_size` is the target vocabulary (what `step` predicts)."""

    src_vocab_size: int
    vocab_size: int
    num_layers: int = 2  # encoder layers
    num_decoder_layers: int | None = None  # None = num_layers
    num_heads: int = 4
    d_model: int = 128
    d_ff: int = 512
    max_len: int = 256  # longest source or target (for learned positions)
    dropout: float = 0.0
    positional: str = "learned"
    tie_embeddings: bool = True  # decoder input embedding = output layer
    num_kv_heads: int | None = None
    layer_norm_eps: float = 1e-5
    gelu_approximate: bool = True
    rope_base: float = 10000.0
    attention_implementation: str | None = None
    kernels: str = "auto"  # "auto" | "reference": attention's dispatch policy (jaxseq.kernels)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Per-head attention matmuls dominate: on CPU its steps compile with YNNPACK dots (jaxseq.xla_options).
    batched_matmuls: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config, src_vocab_size: int, vocab_size: int, **overrides) -> "TransformerSeq2Seq":
        """From a `TransformerConfig` (num_layers is used for both stacks unless overridden)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dataclasses.asdict(config).items() if k in names}
        return cls(src_vocab_size=src_vocab_size, vocab_size=vocab_size, **{**kwargs, **overrides})

    def setup(self):
        self.kv_heads = check_heads(self.d_model, self.num_heads, self.num_kv_heads)
        self.head_dim = self.d_model // self.num_heads
        check_positional(self.positional, self.d_model, self.num_heads)
        n_dec = self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers
        if min(self.src_vocab_size, self.vocab_size, self.num_layers, n_dec, self.max_len) < 1:
            raise ConfigError("src_vocab_size, vocab_size, num_layers, num_decoder_layers and max_len must be >= 1.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(
            d_model=self.d_model, num_heads=self.num_heads, d_ff=self.d_ff, num_kv_heads=self.num_kv_heads,
            dropout=self.dropout, rope=self.positional == "rope", rope_base=self.rope_base,
            layer_norm_eps=self.layer_norm_eps, gelu_approximate=self.gelu_approximate,
            implementation=self.attention_implementation, kernels=self.kernels, **kw,
        )
        self.src_embed = nn.Embed(self.src_vocab_size, self.d_model, embedding_init=gpt_init, **kw)
        self.tgt_embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=gpt_init, **kw)
        if self.positional == "learned":
            pos_init = nn.initializers.normal(0.01)
            self.src_pos = nn.Embed(self.max_len, self.d_model, embedding_init=pos_init, **kw)
            self.tgt_pos = nn.Embed(self.max_len, self.d_model, embedding_init=pos_init, **kw)
        self.encoder = [
            Block(causal=False, out_init_scale=(2 * self.num_layers) ** -0.5, **common) for _ in range(self.num_layers)
        ]
        self.enc_ln = layer_norm(self.layer_norm_eps, **kw)
        # Three residual branches per decoder layer.
        self.decoder = [DecoderBlock(out_init_scale=(3 * n_dec) ** -0.5, **common) for _ in range(n_dec)]
        self.dec_ln = layer_norm(self.layer_norm_eps, **kw)
        if not self.tie_embeddings:
            self.lm_head = nn.Dense(self.vocab_size, use_bias=False, kernel_init=gpt_init, **kw)
        self.drop = nn.Dropout(self.dropout)

    def _check_len(self, n: int, what: str):
        if self.positional == "learned" and n > self.max_len:
            raise ShapeError(f"{what} is {n} but learned positions cover max_len={self.max_len}; raise max_len.")

    def _head(self, x):
        x = self.dec_ln(x)
        flat = x.reshape(-1, self.d_model)
        logits = self.tgt_embed.attend(flat) if self.tie_embeddings else self.lm_head(flat)
        return logits.reshape(*x.shape[:-1], self.vocab_size).astype(jnp.float32)

    def _memory_kv(self, memory):
        kvs = [block.memory_kv(memory) for block in self.decoder]
        return tuple(k for k, _ in kvs), tuple(v for _, v in kvs)

    def encode(self, src, src_mask=None, deterministic: bool = True):
        """src int [B, S], src_mask bool [B, S] -> memory [B, S, D] (after the encoder's final LayerNorm)."""
        check_tokens(src, self.src_vocab_size, name="src")
        B, S = src.shape
        src_mask = check_mask(src_mask, (B, S), name="src_mask")
        self._check_len(S, "source length")
        positions = mask_positions(src_mask, B, S)
        x = add_positions(self.src_embed(src), positions, self.positional, getattr(self, "src_pos", None))
        x = self.drop(x, deterministic=deterministic)
        for block in self.encoder:
            x, _ = block(x, positions, src_mask, deterministic=deterministic)
        return self.enc_ln(x)

    def decode(self, memory, tgt, src_mask=None, tgt_mask=None, deterministic: bool = True):
        """Teacher-forced decoder: memory [B, S, D], tgt int [B, T] -> logits float32 [B, T, V]."""
        check_tokens(tgt, self.vocab_size, name="tgt")
        B, T = tgt.shape
        tgt_mask = check_mask(tgt_mask, (B, T), name="tgt_mask")
        src_mask = check_mask(src_mask, memory.shape[:2], name="src_mask")
        self._check_len(T, "target length")
        positions = mask_positions(tgt_mask, B, T)
        x = add_positions(self.tgt_embed(tgt), positions, self.positional, getattr(self, "tgt_pos", None))
        x = self.drop(x, deterministic=deterministic)
        for block, k, v in zip(self.decoder, *self._memory_kv(memory)):
            x, _ = block(x, positions, k, v, src_mask, tgt_mask, deterministic=deterministic)
        return self._head(x)

    def __call__(self, src, tgt, src_mask=None, tgt_mask=None, deterministic: bool = True):
        """src int [B, S], tgt int [B, T] (decoder input) -> logits float32 [B, T, V]."""
        if src.shape[0] != tgt.shape[0]:
            raise ShapeError(f"src has batch {src.shape[0]} but tgt has batch {tgt.shape[0]}.")
        memory = self.encode(src, src_mask, deterministic)
        return self.decode(memory, tgt, src_mask, tgt_mask, deterministic)

    def init_state(self, encoded, src_mask=None, max_len: int | None = None):
        """Decoder state for `step`: encoded [B, S, D] (from `encode`), src_mask [B, S], target max_len."""
        if len(jnp.shape(encoded)) != 3 or encoded.shape[-1] != self.d_model:
            raise ShapeError(
                f"init_state takes the encoder output [batch, src_len, d_model={self.d_model}] from "
                f"method='encode', got shape {jnp.shape(encoded)}."
            )
        B, S, _ = encoded.shape
        src_mask = check_mask(src_mask, (B, S), name="src_mask")
        if src_mask is None:
            src_mask = jnp.ones((B, S), bool)
        max_len = self.max_len if max_len is None else int(max_len)
        self._check_len(max_len, "init_state max_len")
        cross_k, cross_v = self._memory_kv(encoded)
        caches = tuple(
            KVCache.create(B, max_len, self.kv_heads, self.head_dim, self.dtype) for _ in self.decoder
        )
        return {"self": caches, "cross_k": cross_k, "cross_v": cross_v, "src_mask": src_mask}

    def step(self, state, token):
        """Feed one target token per row: token int [B] -> (state, logits float32 [B, V])."""
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        caches = state["self"]
        check_cache_room(caches[0], 1)
        positions = caches[0].index[:, None]  # [B, 1]
        x = add_positions(self.tgt_embed(token[:, None]), positions, self.positional, getattr(self, "tgt_pos", None))
        ones = jnp.ones(token.shape, jnp.int32)
        new = []
        for block, cache, k, v in zip(self.decoder, caches, state["cross_k"], state["cross_v"]):
            x, cache = block(x, positions, k, v, state["src_mask"], cache=cache, lengths=ones)
            new.append(cache)
        return {**state, "self": tuple(new)}, self._head(x[:, 0])
