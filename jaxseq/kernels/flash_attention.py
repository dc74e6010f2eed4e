"""Blockwise (FlashAttention-style) attention in plain JAX, with its own backward pass.

Why this exists: on CPU `jax.nn.dot_product_attention` lowers to XLA ops that materialise the full
[T, S] score matrix, also its masked half under causal masking, and the gradient keeps the whole
softmax alive. Here the keys are visited block by block with an online softmax (running max and sum,
float32 accumulation; Milakov & Gimelshein 2018, Dao 2023), block pairs that the causal mask hides
entirely are never visited (their list is static, so shapes stay static), and the backward pass
recomputes the probabilities of each block from the saved log-sum-exp, as FlashAttention-2 does.
Memory is O(T) per head beyond the inputs, and the work is about half that of the dense op.

On GPU use cuDNN's fused kernel (`jaxseq.attention(..., implementation="cudnn")`); on a single-device
CPU `jaxseq.attention` takes the same algorithm as a native kernel (`jaxseq.kernels.cpu.attention`,
1.5x-2x this module's speed) when it is built. This module is the portable path (any dtype or backend, sharded
programs) and a reference for the kernel.

Internal layout: every sequence is cut into blocks, and the heads sharing one key/value head (GQA)
are folded into the query rows of a block, so one block pair is two batched matmuls:
    q: [nq, B*Hkv, bq*G, d]   (G = H // Hkv query heads per key/value head; row r is query r // G)
    k, v: [nk, B*Hkv, bk, d]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseq.checks import check_qkv, key_validity, row_offsets
from jaxseq.errors import ConfigError

# Chosen by measurement on the 2-core CPU (benchmarks/attention_scaling.py, benchmarks/README.md). With
# YNNPACK dots (how jaxseq's Transformer steps compile on CPU, jaxseq.xla_options) a step's batched
# matmuls run on every core once they are big enough: 32 (batch, head) slices of 128 x 128 tiles ran
# 1.6-1.7x faster than 4 slices at lengths 256..4096 (0.8-0.9x PyTorch SDPA against 0.5x). With XLA's
# own dot emitter, which runs a batched matmul on one thread, 4 slices keep tiles in L2 and are ~15%
# faster than 32.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128
DEFAULT_CHUNK = 32
SCHEDULES = ("rows", "pairs")
DEFAULT_SCHEDULE = "rows"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one call: block sizes and which block pairs are visited (and masked)."""

    T: int
    S: int
    G: int  # query heads per key/value head
    bq: int
    bk: int
    nq: int
    nk: int
    chunk: int  # (batch, kv head) slices handled per step
    causal: bool
    static_offset: int | None  # the causal offset when it is a Python int, else None (traced)
    key_mask: bool  # a key-validity array is applied (key padding given, or S padded to the block)
    has_padding_mask: bool  # key padding given: every key block needs the mask, not just the last
    schedule: str

    @property
    def rows(self) -> int:  # query rows per block: bq queries x G heads
        return self.bq * self.G

    def visible(self, i: int, j: int) -> bool:
        """May some query of block i see some key of block j (causal masking only)?"""
        if not self.causal or self.static_offset is None:
            return True
        q_last = self.static_offset + min((i + 1) * self.bq, self.T) - 1
        return j * self.bk <= q_last

    def needs_mask(self, i: int, j: int) -> bool:
        """Must block pair (i, j) be masked element-wise (diagonal, key padding, padded tail)?"""
        if self.key_mask and (self.has_padding_mask or j == self.nk - 1):
            return True
        if not self.causal:
            return False
        if self.static_offset is None:
            return True
        return (j + 1) * self.bk - 1 > self.static_offset + i * self.bq

    def pairs(self):
        """Static lists of visited (i, j) block pairs: (unmasked, masked)."""
        free, masked = [], []
        for i in range(self.nq):
            for j in range(self.nk):
                if self.visible(i, j):
                    (masked if self.needs_mask(i, j) else free).append((i, j))
        return free, masked

    def row_counts(self):
        """Per q block i: key blocks [0, n_free) need no mask, [n_free, n_vis) do (a prefix structure)."""
        n_free, n_vis = [], []
        for i in range(self.nq):
            nv = sum(self.visible(i, j) for j in range(self.nk))
            nf = 0
            while nf < nv and not self.needs_mask(i, nf):
                nf += 1
            n_free.append(nf)
            n_vis.append(nv)
        return np.asarray(n_free, np.int32), np.asarray(n_vis, np.int32)

    def col_counts(self):
        """Per k block j: q blocks [i_first, i_free) need a mask, [i_free, nq) do not."""
        i_first, i_free = [], []
        for j in range(self.nk):
            first = self.nq - sum(self.visible(i, j) for i in range(self.nq))
            free = first
            while free < self.nq and self.needs_mask(free, j):
                free += 1
            i_first.append(first)
            i_free.append(free)
        return np.asarray(i_first, np.int32), np.asarray(i_free, np.int32)


def _split_blocks(n: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering n with as little padding as possible."""
    nb = max(1, math.ceil(n / block))
    size = math.ceil(n / nb)
    if size >= 8:  # multiples of 8 keep the vector units aligned
        size = 8 * math.ceil(size / 8)
    return size, nb


def _pick_chunk(B: int, Hkv: int, target: int) -> int:
    """The largest chunk c <= target of (batch, kv head) slices that splits [B, Hkv] as (.., c) or
    (.., c / Hkv) x Hkv, so moving to the blocked layout is a single transpose."""
    ok = [c for c in range(1, B * Hkv + 1) if Hkv % c == 0 or (c % Hkv == 0 and B % (c // Hkv) == 0)]
    return max([c for c in ok if c <= max(1, target)] or [1])


def _to_blocks(x, nb: int, c: int):
    """[B, nb*blk, Hkv, G, d] -> [nc, nb, c, blk*G, d], chunks c over the (batch, kv head) slices."""
    B, L, Hkv, G, d = x.shape
    blk = L // nb
    if Hkv % c == 0:  # c divides the heads: [B, nb, blk, Hkv/c, c, G, d] -> [B, Hkv/c, nb, c, blk, G, d]
        x = x.reshape(B, nb, blk, Hkv // c, c, G, d).transpose(0, 3, 1, 4, 2, 5, 6)
    else:  # c = b2 * Hkv: [B/b2, b2, nb, blk, Hkv, G, d] -> [B/b2, nb, b2, Hkv, blk, G, d]
        x = x.reshape(B // (c // Hkv), c // Hkv, nb, blk, Hkv, G, d).transpose(0, 2, 1, 4, 3, 5, 6)
    return x.reshape(B * Hkv // c, nb, c, blk * G, d)


def _from_blocks(x, B: int, Hkv: int, G: int):
    """Inverse of _to_blocks: [nc, nb, c, blk*G, d] -> [B, nb*blk, Hkv, G, d]."""
    nc, nb, c, rows, d = x.shape
    blk = rows // G
    if Hkv % c == 0:
        x = x.reshape(B, Hkv // c, nb, c, blk, G, d).transpose(0, 2, 4, 1, 3, 5, 6)
    else:
        x = x.reshape(B // (c // Hkv), nb, c // Hkv, Hkv, blk, G, d).transpose(0, 2, 1, 4, 3, 5, 6)
    return x.reshape(B, nb * blk, Hkv, G, d)


# ----------------------------------------------------------------------------------------------------
# One block pair. Shapes: c = chunk of (batch, kv head) slices, R = rows of a q block, K = keys of a block.


def _block_mask(plan: _Plan, i, j, kvalid_j, offset):
    """Bool mask [c, R|1, K] of block pair (i, j) (traced indices); kvalid_j [c, 1, K], offset [c, 1, 1]."""
    mask = kvalid_j if plan.key_mask else None
    if plan.causal:
        r = lax.broadcasted_iota(jnp.int32, (1, plan.rows, 1), 1)
        q_pos = offset + i * plan.bq + r // plan.G  # offset: [c, 1, 1]
        k_pos = j * plan.bk + lax.broadcasted_iota(jnp.int32, (1, 1, plan.bk), 2)
        c = k_pos <= q_pos
        mask = c if mask is None else mask & c
    return mask


def _scores(qi, kj, mask):
    s = jnp.einsum("nrd,nkd->nrk", qi, kj, preferred_element_type=jnp.float32)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _row_max(s):
    """max over the last axis, by halving it with elementwise maxima down to 8 columns, then a reduce.

    Why not jnp.max alone: XLA:CPU rewrites the row max of a [c, R, K] score block into a reduce-window
    and a reduce, which took ~215 us of a ~1.5 ms block-pair step ([32, 128, 128], 2-core CPU); the
    halvings fuse into one vectorised loop (~36 us; benchmarks/README.md, "Measurement history"). Exact:
    max does not depend on the order.
    (The same trick for the row sum lost: that fusion then ran beside p @ v and took its second core.)
    """
    while s.shape[-1] > 8 and s.shape[-1] % 2 == 0:
        half = s.shape[-1] // 2
        s = jnp.maximum(s[..., :half], s[..., half:])
    return jnp.max(s, axis=-1)


def _fwd_step(carry, qi, kj, vj, mask):
    """Online softmax over one key block. carry: acc [c, R, d] f32, running max m and sum l [c, R]."""
    acc, m, l = carry
    s = _scores(qi, kj, mask)
    m_new = jnp.maximum(m, _row_max(s))
    # A row that has seen only masked keys keeps m = -inf; shift it by 0 so exp gives 0, not nan.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if mask is not None else m_new
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=-1)
    pv = jnp.einsum("nrk,nkd->nrd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
    return alpha[..., None] * acc + pv, m_new, l


def _bwd_step(qi, qTi, kj, vj, doi, doTi, lse_i, delta_i, mask):
    """Gradients of one block pair, P recomputed from the saved log-sum-exp.

    Returns dq_i [c, R, d] and the TRANSPOSED dk_j^T, dv_j^T [c, d, K]: with q^T and dO^T at hand every
    product is a plain (or B-transposed) matmul, which XLA's CPU backend runs fastest; the form
    P^T @ dO (contracting the rows of both) fell back to a slower path (measured: -25% at 128x128).
    """
    f32 = jnp.float32
    s = _scores(qi, kj, mask)
    p = jnp.exp(s - lse_i[..., None])  # masked (-inf) and empty rows (lse = +inf) give exact 0
    dvT = jnp.einsum("ndr,nrk->ndk", doTi, p.astype(doTi.dtype), preferred_element_type=f32)
    dp = jnp.einsum("nrd,nkd->nrk", doi, vj, preferred_element_type=f32)
    ds = p * (dp - delta_i[..., None])
    dq = jnp.einsum("nrk,nkd->nrd", ds.astype(kj.dtype), kj, preferred_element_type=f32)
    dkT = jnp.einsum("ndr,nrk->ndk", qTi, ds.astype(qTi.dtype), preferred_element_type=f32)
    return dq, dkT, dvT


def _finalize(acc, m, l):
    """Output and log-sum-exp of a row; rows that saw no key give 0 and lse = +inf."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def _at(x, *idx):
    """x[idx] for traced leading indices (one dynamic slice)."""
    start = tuple(idx) + (0,) * (x.ndim - len(idx))
    return lax.dynamic_slice(x, start, (1,) * len(idx) + x.shape[len(idx) :]).reshape(x.shape[len(idx) :])


def _add_at(x, idx, upd):
    """x with x[idx] += upd."""
    new = (_at(x, *idx) + upd).reshape((1,) * len(idx) + upd.shape)
    return lax.dynamic_update_slice(x, new, tuple(idx) + (0,) * upd.ndim)


# ----------------------------------------------------------------------------------------------------
# Schedules: the order in which the visible block pairs are visited. Arrays carry a leading axis of
# chunks n; one loop runs over (chunk, block) rows, so no chunk is ever sliced out and copied.
# q: [nc, nq, c, R, d], k/v: [nc, nk, c, K, d], kvalid: [nc, nk, c, 1, K], offset: [nc, c, 1, 1].


def _forward(plan: _Plan, q, k, v, kvalid, offset):
    """-> out [nc, nq, c, R, d] f32, lse [nc, nq, c, R] f32."""
    nc, nq, c, R, d = q.shape
    init = (jnp.zeros((c, R, d), jnp.float32), jnp.full((c, R), -jnp.inf, jnp.float32), jnp.zeros((c, R), jnp.float32))

    def mask_of(n, i, j, with_mask):
        return _block_mask(plan, i, j, _at(kvalid, n, j), _at(offset, n)) if with_mask else None

    if plan.schedule == "rows":
        # A scan over (chunk, q block) rows; per row two loops over key blocks whose trip counts depend
        # on the block: unmasked keys first, then the (diagonal / padded) ones that need a mask.
        n_free, n_vis = plan.row_counts()

        def row(_, xs):
            n, i, nf, nv = xs
            qi = _at(q, n, i)

            def step(j, carry, with_mask):
                return _fwd_step(carry, qi, _at(k, n, j), _at(v, n, j), mask_of(n, i, j, with_mask))

            carry = lax.fori_loop(0, nf, lambda j, c: step(j, c, False), init)
            carry = lax.fori_loop(nf, nv, lambda j, c: step(j, c, True), carry)
            return None, _finalize(*carry)

        xs = (
            np.repeat(np.arange(nc, dtype=np.int32), nq), np.tile(np.arange(nq, dtype=np.int32), nc),
            np.tile(n_free, nc), np.tile(n_vis, nc),
        )  # fmt: skip
        _, (out, lse) = lax.scan(row, None, xs)
        return out.reshape(q.shape), lse.reshape(q.shape[:-1])

    state = tuple(jnp.broadcast_to(x, (nc, nq) + x.shape) for x in init)

    def visit(state, n, i, j, with_mask):
        blk = _fwd_step(tuple(_at(x, n, i) for x in state), _at(q, n, i), _at(k, n, j), _at(v, n, j), mask_of(n, i, j, with_mask))
        return tuple(lax.dynamic_update_slice(x, b[None, None], (n, i) + (0,) * b.ndim) for x, b in zip(state, blk))

    return _finalize(*_scan_pairs(plan, nc, visit, state))


def _backward(plan: _Plan, q, k, v, kvalid, offset, out, lse, do):
    """FlashAttention-2 backward -> dq [nc, nq, c, R, d], dk, dv [nc, nk, c, K, d], float32."""
    nc, nk, c, K, d = k.shape
    delta = jnp.sum(do.astype(jnp.float32) * out, axis=-1)  # [nc, nq, c, R]: rowsum(dO * O)
    do = do.astype(q.dtype)
    qT, doT = jnp.swapaxes(q, -1, -2), jnp.swapaxes(do, -1, -2)  # [nc, nq, c, d, R]

    def grads(n, i, j, kj, vj, with_mask):
        mask = _block_mask(plan, i, j, _at(kvalid, n, j), _at(offset, n)) if with_mask else None
        qi, qTi, doi, doTi = _at(q, n, i), _at(qT, n, i), _at(do, n, i), _at(doT, n, i)
        return _bwd_step(qi, qTi, kj, vj, doi, doTi, _at(lse, n, i), _at(delta, n, i), mask)

    if plan.schedule == "rows":
        # A scan over (chunk, key block) columns (dk_j, dv_j accumulate in the loop carry, dq in a
        # buffer), inner loops over the q blocks that see block j: masked ones first, then unmasked.
        i_first, i_free = plan.col_counts()

        def col(dq, xs):
            n, j, first, free = xs
            kj, vj = _at(k, n, j), _at(v, n, j)

            def step(i, carry, with_mask):
                dq, dkT, dvT = carry
                g = grads(n, i, j, kj, vj, with_mask)
                return _add_at(dq, (n, i), g[0]), dkT + g[1], dvT + g[2]

            zero = jnp.zeros((c, d, K), jnp.float32)
            carry = lax.fori_loop(first, free, lambda i, c: step(i, c, True), (dq, zero, zero))
            dq, dkT, dvT = lax.fori_loop(free, plan.nq, lambda i, c: step(i, c, False), carry)
            return dq, (dkT, dvT)

        xs = (
            np.repeat(np.arange(nc, dtype=np.int32), nk), np.tile(np.arange(nk, dtype=np.int32), nc),
            np.tile(i_first, nc), np.tile(i_free, nc),
        )  # fmt: skip
        dq, (dkT, dvT) = lax.scan(col, jnp.zeros(q.shape, jnp.float32), xs)
        dkT, dvT = dkT.reshape(nc, nk, c, d, K), dvT.reshape(nc, nk, c, d, K)
    else:
        zero = jnp.zeros((nc, nk, c, d, K), jnp.float32)

        def visit(state, n, i, j, with_mask):
            g = grads(n, i, j, _at(k, n, j), _at(v, n, j), with_mask)
            return _add_at(state[0], (n, i), g[0]), _add_at(state[1], (n, j), g[1]), _add_at(state[2], (n, j), g[2])

        dq, dkT, dvT = _scan_pairs(plan, nc, visit, (jnp.zeros(q.shape, jnp.float32), zero, zero))
    return dq, jnp.swapaxes(dkT, -1, -2), jnp.swapaxes(dvT, -1, -2)


def _scan_pairs(plan: _Plan, nc: int, visit, state):
    """One scan over the static list of unmasked (chunk, q block, key block) triples, one over the masked."""
    free, masked = plan.pairs()
    for pairs, with_mask in ((free, False), (masked, True)):
        if pairs:
            nij = jnp.asarray([(n, i, j) for n in range(nc) for i, j in pairs], jnp.int32)
            state, _ = lax.scan(lambda s, x: (visit(s, x[0], x[1], x[2], with_mask), None), state, nij)
    return state


# ----------------------------------------------------------------------------------------------------
# custom_vjp over the blocked layout. The leading chunk axis bounds how many (batch, head) slices one
# step touches (see DEFAULT_CHUNK).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_blocks(plan, q, k, v, kvalid, offset):
    return _forward(plan, q, k, v, kvalid, offset)[0]


def _flash_blocks_fwd(plan, q, k, v, kvalid, offset):
    out, lse = _forward(plan, q, k, v, kvalid, offset)
    return out, (q, k, v, kvalid, offset, out, lse)


def _flash_blocks_bwd(plan, res, do):
    q, k, v, kvalid, offset, out, lse = res
    dq, dk, dv = _backward(plan, q, k, v, kvalid, offset, out, lse, do)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash_blocks.defvjp(_flash_blocks_fwd, _flash_blocks_bwd)


# ----------------------------------------------------------------------------------------------------
# Public entry point


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    key_padding_mask=None,
    q_offset=0,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    chunk: int = DEFAULT_CHUNK,
    schedule: str = DEFAULT_SCHEDULE,
):
    """Scaled dot-product attention computed block by block, with a hand-written backward pass.

    Same semantics as `jaxseq.attention` for the masks it can express without a [T, S] array.

    Args:
      q: [B, T, H, d] queries.  k, v: [B, S, Hkv, d], H % Hkv == 0 (grouped-query when Hkv < H).
      causal: query i sits at absolute position q_offset + i and sees keys at positions <= that.
      key_padding_mask: bool [B, S], True = valid key.
      q_offset: int (static: block pairs the causal mask hides are skipped), or an int array [] / [B]
        (traced: every block pair is visited and masked). Only used when causal.
      scale: logit scale, default 1/sqrt(d).
      block_q: upper bound on the query rows of a block, counting the H // Hkv query heads that share
        a key/value head (so grouped-query attention keeps the same tile size).
      block_k: upper bound on the keys of a block. T and S are split into equal blocks of at most
        these sizes (a multiple of 8 when >= 8), the padding masked out.
      chunk: how many (batch, kv head) slices one step of the loops handles (a divisor of B * Hkv).
      schedule: "rows" (a scan over q blocks with loops whose trip counts depend on the block; the
        backward mirrors it over key blocks) or "pairs" (one scan over the static list of visible
        block pairs).

    Returns:
      [B, T, H, d] in q's dtype. A query that may attend to no key returns exact zeros, with zero
      (finite) gradients.
    """
    B, T, H, S = check_qkv(q, k, v)
    Hkv, d = k.shape[2], q.shape[3]
    G = H // Hkv
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    for name, val in (("block_q", block_q), ("block_k", block_k), ("chunk", chunk)):
        if int(val) < 1:
            raise ConfigError(f"{name} must be a positive int, got {val!r}.")
    if T == 0:
        return jnp.zeros(q.shape, q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    BH = B * Hkv
    c = _pick_chunk(B, Hkv, int(chunk))
    nc = BH // c

    static_offset = None
    offset = jnp.zeros((BH,), jnp.int32)
    if causal:
        if isinstance(q_offset, (int, np.integer)):
            static_offset = int(q_offset)
            offset = jnp.full((BH,), static_offset, jnp.int32)
        else:
            offset = jnp.repeat(row_offsets(q_offset, B), Hkv)
    offset = offset.reshape(nc, c, 1, 1)

    bq, nq = _split_blocks(T, max(1, int(block_q) // G))
    bk, nk = _split_blocks(S, int(block_k))
    Tp, Sp = bq * nq, bk * nk

    has_padding = key_padding_mask is not None
    kvalid = jnp.pad(key_validity(key_padding_mask, B, S), ((0, 0), (0, Sp - S)))  # padded keys are invalid
    kvalid = jnp.broadcast_to(kvalid.reshape(B, Sp, 1, 1, 1), (B, Sp, Hkv, 1, 1))
    kvalid = _to_blocks(kvalid, nk, c)[..., 0][:, :, :, None, :]  # [nc, nk, c, 1, bk]

    plan = _Plan(
        T=T, S=S, G=G, bq=bq, bk=bk, nq=nq, nk=nk, chunk=c, causal=bool(causal), static_offset=static_offset,
        key_mask=has_padding or Sp != S, has_padding_mask=has_padding, schedule=schedule,
    )  # fmt: skip

    # [B, T, H, d] -> [nc, nq, c, bq*G, d]: the scale goes into q (one multiply per query, not per score).
    qb = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    qb = _to_blocks(qb.reshape(B, Tp, Hkv, G, d), nq, c)  # [nc, nq, c, bq*G, d]

    def kv_blocks(x):  # [B, S, Hkv, d] -> [nc, nk, c, bk, d]
        x = jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        return _to_blocks(x.reshape(B, Sp, Hkv, 1, d), nk, c)

    out = _flash_blocks(plan, qb, kv_blocks(k), kv_blocks(v), kvalid, offset)  # [nc, nq, c, bq*G, d]
    out = _from_blocks(out, B, Hkv, G)
    return out.reshape(B, Tp, H, d)[:, :T].astype(q.dtype)
