"""PixelRNN (van den Oord, Kalchbrenner & Kavukcuoglu, "Pixel Recurrent Neural Networks", ICML 2016).

An image is a sequence of pixels in raster order, x_0 ... x_{HW-1}, and the model is the product of
the conditionals p(x_t | x_<t), each a softmax over `levels` grey levels. Grey images only (one
channel), so the paper's channel split of masks A and B reduces to: mask A excludes the centre pixel,
mask B includes it; both see every pixel above and those to the left in the centre row.

    input [B, H, W] ints -> 7x7 conv, mask A (2h channels)
      -> num_layers x (recurrent layer with a residual connection: 2h -> h -> 1x1 up to 2h)
      -> ReLU, 1x1 (d_head), ReLU, 1x1 (levels)            logits [B, H, W, levels]

kind "row" (Row LSTM): each row is one step of an LSTM whose state is a whole row [W, h]; the
  input-to-state is a 1x3 convolution along the row with mask B (columns j-1, j), computed for all
  rows at once; the state-to-state is an unmasked 1x3 convolution over the previous row's state.
kind "diagonal" (Diagonal BiLSTM): the map is skewed (row i shifted right by i) so that each column
  of the skewed map is one diagonal; an LSTM runs over those columns with a 1x1 input-to-state and a
  2x1 state-to-state convolution (rows i-1 and i of the previous column, i.e. the pixels above and to
  the left). A second LSTM runs over the mirrored image (right to left); its output is shifted down
  by one row before the two are added, so no pixel sees its own row's future. Its context is the
  whole past but one pixel: the last pixel of the row above, which (mask A) enters only at positions
  after it, reaches the row below from column W - 1 - first_kernel // 2 on. The Row LSTM's context is
  a triangle above the pixel (plus the first convolution's reach to the left).

Both recurrences are one pure cell, `LineLSTM`, run by `jaxseq.unroll` (parallel form) or its `step`.

Recurrent form (the step protocol of `jaxseq.decoding`): the tokens are the flattened pixels after a
begin-of-image id, BOS = `levels` (so `vocab_size` = levels + 1). `step(state, token)` feeds pixel
t - 1 (BOS at t = 0) and returns the logits of pixel t. The state holds the image so far ([B, H, W],
pixels not yet generated are 0, which no prediction of an earlier pixel can see) and the position t;
- Row LSTM: also every layer's carry entering the current row. One step computes the current row
  for every layer (and the first convolution over the k rows it reads): O(num_layers * W * h^2),
  twice at the first pixel of a row (the finished row is computed once more to advance the carries).
- Diagonal BiLSTM: one step runs the parallel form on the image so far and reads pixel t's logits:
  O(num_layers * H * W * h^2), a whole pass per pixel, so O((H W)^2) per image: exact and simple,
  reusing no carries (the right-to-left half of a row can only run once the row is finished).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.checks import check_tokens
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.nn import Recurrent


@dataclasses.dataclass(frozen=True)
class LineLSTM:
    """An LSTM whose state is a line of `length` positions [*B, length, d_hidden] (a row, a diagonal).

    x: the input-to-state pre-activations, flattened [*B, length * 4 * d_hidden] (gate order i, f, g, o).
    The state-to-state is a convolution over the previous line: position p reads the previous state at
    p + o for each o in `offsets` (zero outside the line): (-1, 0, 1) for the Row LSTM's 1x3 kernel,
    (-1, 0) for the Diagonal LSTM's 2x1 kernel. y: the new h, flattened [*B, length * d_hidden].
    Params: w_hh [len(offsets), d_hidden, 4 d_hidden], b [4 d_hidden], U(-1/sqrt(H), 1/sqrt(H)).
    """

    length: int
    d_hidden: int
    offsets: tuple = (-1, 0, 1)
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("length", "d_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"LineLSTM.{name} must be a positive int, got {value!r}.")

    @property
    def d_in(self) -> int:
        return self.length * 4 * self.d_hidden

    @property
    def d_out(self) -> int:
        return self.length * self.d_hidden

    def init(self, key):
        bound = 1.0 / math.sqrt(self.d_hidden)
        k1, k2 = jax.random.split(key)
        g = 4 * self.d_hidden
        return {"w_hh": jax.random.uniform(k1, (len(self.offsets), self.d_hidden, g), self.dtype, -bound, bound),
                "b": jax.random.uniform(k2, (g,), self.dtype, -bound, bound)}

    def initial_carry(self, batch_shape=(), dtype=None):
        h = jnp.zeros((*batch_shape, self.length, self.d_hidden), dtype or self.dtype)
        return (h, h)

    def step(self, params, carry, x):
        h, c = carry
        z = x.reshape(*x.shape[:-1], self.length, 4 * self.d_hidden) + params["b"]
        for k, o in enumerate(self.offsets):  # z[p] += h[p + o] @ w[k]
            z = z + _shift(h, o) @ params["w_hh"][k]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h.reshape(*h.shape[:-2], self.d_out)


def _shift(h, o: int):
    """out[..., p, :] = h[..., p + o, :], zero where p + o is off the line (axis -2)."""
    if o == 0:
        return h
    n = h.shape[-2]
    pad = [(0, 0)] * h.ndim
    pad[-2] = (0, o) if o > 0 else (-o, 0)
    padded = jnp.pad(h, pad)
    return padded[..., o:o + n, :] if o > 0 else padded[..., :n, :]


def causal_mask(kh: int, kw: int, c_in: int, c_out: int, *, include_centre: bool) -> np.ndarray:
    """A conv kernel mask [kh, kw, c_in, c_out]: the rows above the centre, the centre row left of the
    centre, and the centre itself when `include_centre` (mask B) but not otherwise (mask A)."""
    m = np.zeros((kh, kw), np.float32)
    m[: kh // 2, :] = 1.0
    m[kh // 2, : kw // 2 + int(include_centre)] = 1.0
    return np.broadcast_to(m[:, :, None, None], (kh, kw, c_in, c_out)).copy()


def skew(x):
    """[B, H, W, C] -> [B, H, W + H - 1, C]: row i shifted right by i, so column c holds the diagonal i + j = c."""
    H = x.shape[1]
    return jnp.stack([jnp.pad(x[:, i], ((0, 0), (i, H - 1 - i), (0, 0))) for i in range(H)], axis=1)


def unskew(s, width: int):
    """The inverse of `skew`: [B, H, W + H - 1, C] -> [B, H, W, C]."""
    return jnp.stack([s[:, i, i:i + width] for i in range(s.shape[1])], axis=1)


def check_images(images, height: int, width: int, levels: int, name: str = "images"):
    """Int images [B, height, width] with values in [0, levels) (values checked outside jit)."""
    check_tokens(images, levels, name=name, ndim=3)
    if tuple(images.shape[1:]) != (height, width):
        raise ShapeError(f"{name} has shape {tuple(images.shape)}, but the model was built for {height}x{width} "
                         f"images ([batch, {height}, {width}]); train a model for this size (--images.dataset).")
    return images


class PixelRNN(nn.Module):
    """Row LSTM (kind "row") or Diagonal BiLSTM (kind "diagonal"); see the module docstring.

    apply(images int [B, H, W]) -> logits [B, H, W, levels]: logits[:, i, j] is p(x_ij | pixels before it).
    pixel_inputs(images) -> xs float [B, H, W, 1]; logits_from_inputs(xs) -> logits (the same, split).
    init_state(batch_size, max_len=None) -> state; step(state, token [B]) -> (state, logits [B, levels]).
    """

    levels: int
    height: int
    width: int
    kind: str = "row"
    d_hidden: int = 32  # h: each LSTM's state channels; the residual stream is 2h wide
    num_layers: int = 2
    d_head: int = 64
    first_kernel: int = 7
    kernels: str = "auto"  # `jaxseq.unroll`'s policy

    @property
    def vocab_size(self) -> int:
        return self.levels + 1  # the pixel levels and BOS, what `step` takes

    def setup(self):
        if self.kind not in ("row", "diagonal"):
            raise ConfigError(f"PixelRNN.kind must be 'row' or 'diagonal', got {self.kind!r}.")
        if self.levels < 2 or self.first_kernel < 1 or self.first_kernel % 2 == 0:
            raise ConfigError(f"PixelRNN needs levels >= 2 and an odd first_kernel (--pixelrnn.first-kernel), got "
                              f"levels={self.levels}, first_kernel={self.first_kernel}.")
        h, k = self.d_hidden, self.first_kernel
        self.first = nn.Conv(2 * h, (k, k), padding="VALID", mask=causal_mask(k, k, 1, 2 * h, include_centre=False))
        self.up = [nn.Dense(2 * h, name=f"up_{i}") for i in range(self.num_layers)]
        if self.kind == "row":
            cell = LineLSTM(self.width, h, offsets=(-1, 0, 1))
            mask = causal_mask(1, 3, 2 * h, 4 * h, include_centre=True)
            self.input_to_state = [nn.Conv(4 * h, (1, 3), padding="VALID", mask=mask, name=f"is_{i}")
                                   for i in range(self.num_layers)]
            self.rnn = [Recurrent(cell, kernels=self.kernels, name=f"rnn_{i}") for i in range(self.num_layers)]
        else:
            cell = LineLSTM(self.height, h, offsets=(-1, 0))
            self.input_to_state = [(nn.Dense(4 * h, name=f"is_lr_{i}"), nn.Dense(4 * h, name=f"is_rl_{i}"))
                                   for i in range(self.num_layers)]
            self.rnn = [(Recurrent(cell, kernels=self.kernels, name=f"rnn_lr_{i}"),
                         Recurrent(cell, kernels=self.kernels, name=f"rnn_rl_{i}")) for i in range(self.num_layers)]
        self.hidden = nn.Dense(self.d_head)
        self.out = nn.Dense(self.levels)

    def _scaled(self, images):
        return (images.astype(jnp.float32) / (self.levels - 1))[..., None]  # [B, H, W, 1] in [0, 1]

    def _head(self, u):
        return self.out(nn.relu(self.hidden(nn.relu(u))))

    def __call__(self, images):
        check_images(images, self.height, self.width, self.levels)
        return self.logits_from_inputs(self.pixel_inputs(images))

    def pixel_inputs(self, images):
        """What each pixel feeds the network: its value scaled to [0, 1], float [B, H, W, 1]."""
        return self._scaled(images)

    def logits_from_inputs(self, xs):
        """The parallel form from `pixel_inputs` (differentiable: the causality test's gradients)."""
        p = self.first_kernel // 2
        u = self.first(jnp.pad(xs, ((0, 0), (p, p), (p, p), (0, 0))))  # [B, H, W, 2h]
        for i in range(self.num_layers):
            y = self._row_layer(i, u) if self.kind == "row" else self._diagonal_layer(i, u)
            u = u + self.up[i](y)
        return self._head(u)

    def _row_layer(self, i, u):
        """u [B, H, W, 2h] -> the Row LSTM's h [B, H, W, h]: rows are the time steps."""
        B, H, W, _ = u.shape
        x = self.input_to_state[i](jnp.pad(u, ((0, 0), (0, 0), (1, 1), (0, 0))))  # [B, H, W, 4h]
        ys, _ = self.rnn[i](x.reshape(B, H, W * 4 * self.d_hidden))
        return ys.reshape(B, H, W, self.d_hidden)

    def _diagonal_layer(self, i, u):
        """u [B, H, W, 2h] -> left-to-right h plus right-to-left h shifted down a row, [B, H, W, h]."""
        lr = self._diagonal_lstm(self.rnn[i][0], self.input_to_state[i][0](u))
        rl = self._diagonal_lstm(self.rnn[i][1], self.input_to_state[i][1](u[:, :, ::-1]))[:, :, ::-1]
        return lr + jnp.pad(rl, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, : self.height]

    def _diagonal_lstm(self, rnn, x):
        """x [B, H, W, 4h] input-to-state -> h [B, H, W, h]: one step per diagonal of the skewed map."""
        B, H, W, G = x.shape
        s = skew(x)  # [B, H, T, 4h], T = W + H - 1
        T = s.shape[2]
        # Left of the image (column c < row i) the input gate is shut, so c and h stay exactly zero there,
        # the boundary a pixel in column 0 reads, as on the image's other edges.
        left = (np.arange(T)[None, :] < np.arange(H)[:, None])[None, :, :, None]
        input_gate = (np.arange(G) < self.d_hidden)[None, None, None, :]
        s = jnp.where(left & input_gate, jnp.asarray(-1e30, s.dtype), s)
        ys, _ = rnn(s.transpose(0, 2, 1, 3).reshape(B, T, H * G))
        return unskew(ys.reshape(B, T, H, self.d_hidden).transpose(0, 2, 1, 3), W)

    # ------------------------------------------------------------------ recurrent form

    def init_state(self, batch_size: int, max_len: int | None = None):
        """The empty image and position 0 (and, Row LSTM, zero carries); max_len is unused (fixed size)."""
        state = {"image": jnp.zeros((batch_size, self.height, self.width), jnp.int32), "t": jnp.zeros((), jnp.int32)}
        if self.kind == "row":
            carry = self.rnn[0].initial_carry((batch_size,), jnp.float32)
            state["row"] = jnp.zeros((), jnp.int32)
            state["carries"] = tuple(carry for _ in range(self.num_layers))
        return state

    def step(self, state, token):
        """Feed pixel t - 1 (BOS = levels at t = 0): (state, logits [B, levels] of pixel t)."""
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        t = state["t"]
        prev = jnp.maximum(t - 1, 0)
        image = state["image"]
        written = jnp.where(t > 0, token.astype(jnp.int32), image[:, prev // self.width, prev % self.width])
        image = image.at[:, prev // self.width, prev % self.width].set(written)
        i, j = t // self.width, t % self.width
        new = {**state, "image": image, "t": t + 1}
        if self.kind == "diagonal":
            logits = self(image)
            return new, jax.lax.dynamic_index_in_dim(logits[:, i], j, axis=1, keepdims=False)
        # Row LSTM: at the first pixel of row i the finished row i - 1 advances the carries.
        carries = jax.lax.cond(i > state["row"], lambda: self._row_step(state["carries"], image, state["row"])[0],
                               lambda: state["carries"])
        logits = self._row_step(carries, image, i)[1]  # [B, W, levels]
        new.update(row=i, carries=carries)
        return new, jax.lax.dynamic_index_in_dim(logits, j, axis=1, keepdims=False)

    def _row_step(self, carries, image, i):
        """Row i of every layer from the carries entering it: (carries after row i, logits [B, W, levels])."""
        p = self.first_kernel // 2
        padded = jnp.pad(self._scaled(image), ((0, 0), (p, p), (p, p), (0, 0)))
        window = jax.lax.dynamic_slice_in_dim(padded, i, self.first_kernel, axis=1)  # image rows i-p .. i+p
        u = self.first(window)  # [B, 1, W, 2h]
        B, out = image.shape[0], []
        for k in range(self.num_layers):
            x = self.input_to_state[k](jnp.pad(u, ((0, 0), (0, 0), (1, 1), (0, 0))))
            carry, y = self.rnn[k].step(carries[k], x.reshape(B, -1))
            out.append(carry)
            u = u + self.up[k](y.reshape(B, 1, self.width, self.d_hidden))
        return tuple(out), self._head(u)[:, 0]
