"""RNN encoder-decoders (Sutskever et al. 2014), with attention (Bahdanau et al. 2015; Luong et al. 2015).

    src [B, S] -> TextEncoder: embedding -> any cell (stacked, bidirectional) -> memory [B, S, M], summary [B, D]
    image [B, H, W, C] -> ImageEncoder: CNN -> its spatial grid as memory [B, h*w, M], summary [B, D]
    decoder: s_0 = tanh(W summary) (the final encoder state initialises the decoder), then per target token
        without attention: s_t = cell(s_{t-1}, embed(y_{t-1}))                     -> logits
        with attention:    an `AttentionCell` over the memory (Bahdanau or Luong)   -> logits

The seq2seq protocol, shared with `TransformerSeq2Seq`, so `jaxseq.decoding` serves both:

    encoded = model.apply(v, src, src_mask, method="encode")
    logits = model.apply(v, src, tgt, src_mask=src_mask, tgt_mask=tgt_mask)         # teacher forcing [B, T, V]
    state = model.apply(v, encoded, src_mask, max_len, method="init_state")        # the decoder's carry
    state, logits_t = model.apply(v, state, token_t, method="step")                # token_t [B] -> [B, V]
    weights = model.apply(v, src, tgt, src_mask, tgt_mask, method="attention_weights")   # [B, T, S]

`tgt` is the decoder input (BOS, y_1, ...); logits[:, t] predict its next token. Masks are True on valid
positions (right padding); src_mask is None for images. Every leaf of the decoding state has the batch
as its leading axis (the memory and its keys included), so beam search reorders it like any state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
from flax.core import unfreeze
import jax.numpy as jnp

from jaxseq.attention_cells import AttentionCell
from jaxseq.cells import bidirectional, make_cell, stack
from jaxseq.checks import check_mask, check_tokens
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.nn import Recurrent
from jaxseq.scan import unroll


class TextEncoder(nn.Module):
    """src int [B, S] (src_mask bool [B, S]) -> (memory [B, S, cell.d_out], summary [B, D]).

    summary concatenates every layer's and direction's final carry (h, and c for an LSTM), each taken
    at the row's last valid token (the backward direction's at its first).
    """

    vocab_size: int
    cell: Any
    d_embed: int
    dropout: float = 0.0
    kernels: str = "auto"

    @property
    def d_memory(self) -> int:
        return self.cell.d_out

    @nn.compact
    def __call__(self, src, src_mask=None, deterministic: bool = True):
        check_tokens(src, self.vocab_size, name="src")
        src_mask = check_mask(src_mask, src.shape, name="src_mask")
        drop = nn.Dropout(self.dropout)
        xs = drop(nn.Embed(self.vocab_size, self.d_embed, name="embed")(src), deterministic=deterministic)
        ys, carry = Recurrent(self.cell, kernels=self.kernels, name="rnn")(xs, mask=src_mask,
                                                                           deterministic=deterministic)
        return drop(ys, deterministic=deterministic), jnp.concatenate(jax.tree.leaves(carry), axis=-1)


class ImageEncoder(nn.Module):
    """images float [B, H, W, C] -> (memory [B, h*w, d_memory], summary [B, d_memory]).

    `num_layers` 3x3 convolutions with ReLU (stride 1, then 2: the grid is H / 2**(num_layers-1)), a
    learned position embedding per grid cell, since a caption says *where* things are and a weighted sum
    of memory entries keeps only what they encode, and a projection to d_memory. The summary (the
    no-attention decoder's only view) is a dense layer over the whole flattened grid, as in a CNN's
    final layer, so it keeps the positions too.
    """

    d_memory: int
    channels: int = 64
    num_layers: int = 3

    @nn.compact
    def __call__(self, images, src_mask=None, deterministic: bool = True):
        if images.ndim != 4:
            raise ShapeError(f"images must be [batch, height, width, channels], got shape {images.shape}.")
        if src_mask is not None:
            raise ShapeError("an image has no padding: pass src_mask=None.")
        x = images.astype(jnp.float32)
        for i in range(self.num_layers):
            stride = 1 if i == 0 else 2
            x = nn.relu(nn.Conv(self.channels, (3, 3), strides=(stride, stride), name=f"conv_{i}")(x))
        B, h, w, c = x.shape
        grid = x.reshape(B, h * w, c)
        grid = grid + self.param("positions", nn.initializers.normal(0.02), (h * w, c))
        memory = nn.Dense(self.d_memory, name="project")(grid)
        summary = jnp.tanh(nn.Dense(self.d_memory, name="summary")(grid.reshape(B, h * w * c)))
        return memory, summary


class RNNSeq2Seq(nn.Module):
    """An encoder (`TextEncoder` or `ImageEncoder`) and a recurrent decoder over `cell`.

    cell: the decoder's cell, taking embeddings of width d_embed: a plain cell (Sutskever), or an
    `AttentionCell` over the encoder's memory (Bahdanau / Luong). `vocab_size` is the target vocabulary.
    """

    encoder: nn.Module
    vocab_size: int
    cell: Any
    d_embed: int
    dropout: float = 0.0
    kernels: str = "auto"

    @property
    def attentive(self) -> bool:
        return isinstance(self.cell, AttentionCell)

    def setup(self):
        if self.cell.d_in != self.d_embed:
            raise ConfigError(f"the decoder cell takes inputs of width {self.cell.d_in} but d_embed={self.d_embed}.")
        self.decoder_cell = dataclasses.replace(self.cell, return_weights=True) if self.attentive else self.cell
        self.decoder = self.param("decoder", lambda key: self.cell.init(key))
        self.embed = nn.Embed(self.vocab_size, self.d_embed)
        inner = self.cell.cell if self.attentive else self.cell
        leaves = jax.tree.leaves(jax.eval_shape(lambda: inner.initial_carry((1,))))
        self.bridge = [nn.Dense(leaf.shape[-1], name=f"bridge_{i}") for i, leaf in enumerate(leaves)]
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Dense(self.vocab_size)

    def _params(self):
        return unfreeze(self.decoder)  # plain dicts, as the cells' own init made them (see jaxseq.nn.Recurrent)

    def encode(self, src, src_mask=None, deterministic: bool = True):
        """src (tokens [B, S] or images [B, H, W, C]) -> {"memory": [B, S', M], "summary": [B, D]}."""
        memory, summary = self.encoder(src, src_mask, deterministic=deterministic)
        return {"memory": memory, "summary": summary}

    def _start(self, encoded, src_mask):
        """(decoder params, bound to the memory when attentive; the first carry, from the encoder's summary)."""
        if not isinstance(encoded, dict) or "summary" not in encoded:
            raise ShapeError("init_state takes the dict {'memory', 'summary'} from method='encode'.")
        memory, summary = encoded["memory"], encoded["summary"]
        carry = self.decoder_cell.initial_carry((summary.shape[0],), summary.dtype)
        inner = carry["cell"] if self.attentive else carry
        inner = jax.tree.unflatten(jax.tree.structure(inner), [jnp.tanh(d(summary)) for d in self.bridge])
        if not self.attentive:
            return self._params(), inner
        src_mask = check_mask(src_mask, memory.shape[:2], name="src_mask")
        return self.decoder_cell.bind(self._params(), memory, src_mask), {**carry, "cell": inner}

    def init_state(self, encoded, src_mask=None, max_len: int | None = None):
        """Decoding state from `encode`'s output: {"carry", and "memory" when attentive} (max_len is unused)."""
        params, carry = self._start(encoded, src_mask)
        if not self.attentive:
            return {"carry": carry}
        return {"carry": carry, "memory": AttentionCell.memory_of(params)}

    def _decode(self, encoded, tgt, src_mask, tgt_mask, deterministic):
        check_tokens(tgt, self.vocab_size, name="tgt")
        tgt_mask = check_mask(tgt_mask, tgt.shape, name="tgt_mask")
        if tgt.shape[0] != encoded["summary"].shape[0]:
            raise ShapeError(f"src has batch {encoded['summary'].shape[0]} but tgt has batch {tgt.shape[0]}.")
        xs = self.drop(self.embed(tgt), deterministic=deterministic)
        params, carry = self._start(encoded, src_mask)
        key = None if deterministic or self.dropout == 0 else self.make_rng("dropout")  # between stacked layers
        ys, _ = unroll(self.decoder_cell, params, xs, mask=tgt_mask, carry=carry, key=key, kernels=self.kernels)
        ys, weights = ys if self.attentive else (ys, None)
        return self._logits(self.drop(ys, deterministic=deterministic)), weights

    def _logits(self, ys):
        flat = ys.reshape(-1, ys.shape[-1])  # 2-D dense: see RecurrentLM._logits
        return self.head(flat).reshape(*ys.shape[:-1], self.vocab_size).astype(jnp.float32)

    def __call__(self, src, tgt, src_mask=None, tgt_mask=None, deterministic: bool = True):
        """Teacher forcing: src (tokens [B, S] or images), tgt int [B, T] (decoder input) -> logits float32 [B, T, V]."""
        encoded = self.encode(src, src_mask, deterministic)
        return self._decode(encoded, tgt, src_mask, tgt_mask, deterministic)[0]

    def attention_weights(self, src, tgt, src_mask=None, tgt_mask=None):
        """The attention each target position paid to each memory entry: float [B, T, S'] (rows sum to 1)."""
        if not self.attentive:
            raise ConfigError("this encoder-decoder has no attention; choose a -bahdanau or -luong model.")
        return self._decode(self.encode(src, src_mask), tgt, src_mask, tgt_mask, True)[1]

    def step(self, state, token):
        """Feed one target token per row: token int [B] -> (state, logits float32 [B, V])."""
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        params = {**self._params(), **state["memory"]} if self.attentive else self._params()
        carry, y = self.decoder_cell.step(params, state["carry"], self.embed(token))
        y = y[0] if self.attentive else y
        return {**state, "carry": carry}, self._logits(y)


def build_rnn_seq2seq(config, spec: dict, kernels: str, *, cell_kind: str, score: str | None):
    """An `RNNSeq2Seq` from a `Seq2SeqConfig` and a task spec; score None = no attention.

    spec: {"interface": "seq2seq", "source": "tokens" | "image", "src_vocab_size": V_s (tokens),
    "vocab_size": V_t}. A bidirectional text encoder gives each direction d_hidden // 2 units, so the
    memory is d_hidden wide either way (Luong's dot score compares it with the decoder state).
    """
    s = config
    if min(s.d_embed, s.d_hidden, s.encoder_layers, s.decoder_layers) < 1:
        raise ConfigError("--seq2seq.d-embed, d-hidden, encoder-layers and decoder-layers must be >= 1.")
    if spec["source"] == "image":
        encoder = ImageEncoder(d_memory=s.d_hidden, channels=s.cnn_channels, num_layers=s.cnn_layers)
    else:
        if s.bidirectional and s.d_hidden % 2:
            raise ConfigError(f"a bidirectional encoder splits --seq2seq.d-hidden in two directions; "
                              f"make it even (got {s.d_hidden}).")
        width = s.d_hidden // 2 if s.bidirectional else s.d_hidden
        layers, d_in = [], s.d_embed
        for _ in range(s.encoder_layers):
            layer = make_cell(cell_kind, d_in, width)
            layers.append(bidirectional(layer) if s.bidirectional else layer)
            d_in = layers[-1].d_out
        cell = layers[0] if len(layers) == 1 else stack(layers, dropout=s.dropout)
        encoder = TextEncoder(spec["src_vocab_size"], cell, s.d_embed, s.dropout, kernels)
    fed = 0 if score is None else (s.d_hidden if score == "bahdanau" or s.input_feeding else 0)
    inner = make_cell(cell_kind, s.d_embed + fed, s.d_hidden, num_layers=s.decoder_layers, dropout=s.dropout)
    if score is not None:
        score = s.luong_score if score == "luong" else score
        inner = AttentionCell(inner, d_memory=s.d_hidden, score=score, d_attention=s.d_attention,
                              input_feeding=s.input_feeding)
    return RNNSeq2Seq(encoder=encoder, vocab_size=spec["vocab_size"], cell=inner, d_embed=s.d_embed,
                      dropout=s.dropout, kernels=kernels)
