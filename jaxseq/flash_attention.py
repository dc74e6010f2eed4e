"""Blockwise (FlashAttention-style) attention in plain JAX, with its own backward pass.

Why this exists: on CPU `jax.nn.dot_product_attention` lowers to XLA ops that materialise the full
[T, S] score matrix, also its masked half under causal masking, and the gradient keeps the whole
softmax alive. Here the keys are visited block by block with an online softmax (running max and sum,
float32 accumulation; Milakov & Gimelshein 2018, Dao 2023), block pairs that the causal mask hides
entirely are never visited (their list is static, so shapes stay static), and the backward pass
recomputes the probabilities of each block from the saved log-sum-exp, as FlashAttention-2 does.
Memory is O(T) per head beyond the inputs, and the work is about half that of the dense op.

On GPU use cuDNN's fused kernel (`jaxseq.attention(..., implementation="cudnn")`); this module is the
CPU (and portable) path.

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

from jaxseq.errors import ConfigError, ShapeError

# Measured on the 2-core CPU (benchmarks/attention_scaling.py); see `_default_blocks`.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
SCHEDULES = ("rows", "pairs", "unrolled")
DEFAULT_SCHEDULE = "rows"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one call: block sizes and which block pairs are visited (and masked)."""

    B: int
    T: int
    S: int
    Hkv: int
    G: int
    bq: int
    bk: int
    nq: int
    nk: int
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
        q_first = self.static_offset + i * self.bq
        k_last = (j + 1) * self.bk - 1
        return k_last > q_first

    def pairs(self):
        """Static lists of visited (i, j) block pairs: (unmasked, masked)."""
        free, masked = [], []
        for i in range(self.nq):
            for j in range(self.nk):
                if self.visible(i, j):
                    (masked if self.needs_mask(i, j) else free).append((i, j))
        return free, masked

    def row_counts(self):
        """Per q block i: keys blocks [0, n_free) need no mask, [n_free, n_vis) do (a prefix structure)."""
        n_free, n_vis = [], []
        for i in range(self.nq):
            vis = [j for j in range(self.nk) if self.visible(i, j)]
            nv = (max(vis) + 1) if vis else 0
            nf = 0
            while nf < nv and not self.needs_mask(i, nf):
                nf += 1
            assert all(self.needs_mask(i, j) for j in range(nf, nv))
            n_free.append(nf)
            n_vis.append(nv)
        return np.asarray(n_free, np.int32), np.asarray(n_vis, np.int32)

    def col_counts(self):
        """Per k block j: q blocks [i_first, i_free) need a mask, [i_free, nq) do not."""
        i_first, i_free = [], []
        for j in range(self.nk):
            vis = [i for i in range(self.nq) if self.visible(i, j)]
            first = min(vis) if vis else self.nq
            free = first
            while free < self.nq and self.needs_mask(free, j):
                free += 1
            assert all(not self.needs_mask(i, j) for i in range(free, self.nq))
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


# ----------------------------------------------------------------------------------------------------
# One block pair


def _block_mask(plan: _Plan, i, j, kvalid, offset):
    """Bool mask [BH|1, rows|1, bk] for block pair (i, j) (traced indices), or None if none applies."""
    mask = None
    if plan.key_mask:
        mask = lax.dynamic_index_in_dim(kvalid, j, keepdims=False)  # [BH, 1, bk]
    if plan.causal:
        r = lax.broadcasted_iota(jnp.int32, (1, plan.rows, 1), 1)
        q_pos = offset + i * plan.bq + r // plan.G  # offset: [] or [BH, 1, 1]
        k_pos = j * plan.bk + lax.broadcasted_iota(jnp.int32, (1, 1, plan.bk), 2)
        c = k_pos <= q_pos
        mask = c if mask is None else mask & c
    return mask


def _scores(qi, kj, mask):
    s = jnp.einsum("nrd,nkd->nrk", qi, kj, preferred_element_type=jnp.float32)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _fwd_step(carry, qi, kj, vj, mask):
    """Online softmax over one key block. carry: acc [BH, R, d] f32, running max m and sum l [BH, R]."""
    acc, m, l = carry
    s = _scores(qi, kj, mask)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    # A row that has seen only masked keys keeps m = -inf; shift it by 0 so exp gives 0, not nan.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if mask is not None else m_new
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=-1)
    pv = jnp.einsum("nrk,nkd->nrd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
    return alpha[..., None] * acc + pv, m_new, l


def _bwd_step(qi, kj, vj, doi, lse_i, delta_i, mask):
    """Gradients of one block pair, P recomputed from the saved log-sum-exp. Returns dq_i, dk_j, dv_j."""
    s = _scores(qi, kj, mask)
    p = jnp.exp(s - lse_i[..., None])  # masked (-inf) and empty rows (lse = +inf) give exact 0
    dv = jnp.einsum("nrk,nrd->nkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
    dp = jnp.einsum("nrd,nkd->nrk", doi, vj, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_i[..., None])
    dq = jnp.einsum("nrk,nkd->nrd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
    dk = jnp.einsum("nrk,nrd->nkd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _finalize(acc, m, l):
    """Output and log-sum-exp of a row; rows that saw no key give 0 and lse = +inf."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def _at(x, i):
    return lax.dynamic_index_in_dim(x, i, keepdims=False)


def _add_at(x, i, upd):
    return lax.dynamic_update_index_in_dim(x, _at(x, i) + upd, i, 0)


# ----------------------------------------------------------------------------------------------------
# Schedules: the order in which the visible block pairs are visited


def _forward(plan: _Plan, q, k, v, kvalid, offset):
    """q [nq, BH, R, d], k/v [nk, BH, bk, d] -> out [nq, BH, R, d] f32, lse [nq, BH, R] f32."""
    nq, BH, R, d = q.shape
    init = (
        jnp.zeros((BH, R, d), jnp.float32),
        jnp.full((BH, R), -jnp.inf, jnp.float32),
        jnp.zeros((BH, R), jnp.float32),
    )
    if plan.schedule == "rows":
        # One scan over q blocks; per block two loops over key blocks whose trip counts depend on the
        # block: unmasked keys first, then the (diagonal / padded) ones that need a mask.
        n_free, n_vis = plan.row_counts()

        def row(_, xs):
            i, qi, nf, nv = xs
            carry = lax.fori_loop(0, nf, lambda j, c: _fwd_step(c, qi, _at(k, j), _at(v, j), None), init)
            carry = lax.fori_loop(
                nf,
                nv,
                lambda j, c: _fwd_step(c, qi, _at(k, j), _at(v, j), _block_mask(plan, i, j, kvalid, offset)),
                carry,
            )
            return None, _finalize(*carry)

        _, (out, lse) = lax.scan(row, None, (jnp.arange(nq), q, jnp.asarray(n_free), jnp.asarray(n_vis)))
        return out, lse

    free, masked = plan.pairs()
    state = tuple(jnp.broadcast_to(x, (nq,) + x.shape) for x in init)

    def visit(state, ij, with_mask):
        i, j = ij
        mask = _block_mask(plan, i, j, kvalid, offset) if with_mask else None
        blk = _fwd_step(tuple(_at(x, i) for x in state), _at(q, i), _at(k, j), _at(v, j), mask)
        return tuple(lax.dynamic_update_index_in_dim(x, b, i, 0) for x, b in zip(state, blk))

    state = _run_pairs(plan, visit, state, free, masked)
    return _finalize(*state)


def _backward(plan: _Plan, q, k, v, kvalid, offset, out, lse, do):
    """FlashAttention-2 backward: -> dq [nq, BH, R, d], dk, dv [nk, BH, bk, d], all float32."""
    delta = jnp.sum(do.astype(jnp.float32) * out, axis=-1)  # [nq, BH, R]: rowsum(dO * O)
    do = do.astype(q.dtype)
    if plan.schedule == "rows":
        # One scan over key blocks (dk_j, dv_j accumulate in the loop carry; dq in a full buffer),
        # inner loops over the q blocks that see block j: masked ones first, then unmasked.
        i_first, i_free = plan.col_counts()

        def col(dq, xs):
            j, kj, vj, first, free = xs

            def step(i, c, with_mask):
                dq, dk, dv = c
                mask = _block_mask(plan, i, j, kvalid, offset) if with_mask else None
                g = _bwd_step(_at(q, i), kj, vj, _at(do, i), _at(lse, i), _at(delta, i), mask)
                return _add_at(dq, i, g[0]), dk + g[1], dv + g[2]

            zero = jnp.zeros(kj.shape, jnp.float32)
            c = lax.fori_loop(first, free, lambda i, c: step(i, c, True), (dq, zero, zero))
            dq, dk, dv = lax.fori_loop(free, plan.nq, lambda i, c: step(i, c, False), c)
            return dq, (dk, dv)

        xs = (jnp.arange(plan.nk), k, v, jnp.asarray(i_first), jnp.asarray(i_free))
        dq, (dk, dv) = lax.scan(col, jnp.zeros(q.shape, jnp.float32), xs)
        return dq, dk, dv

    free, masked = plan.pairs()
    state = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))

    def visit(state, ij, with_mask):
        i, j = ij
        mask = _block_mask(plan, i, j, kvalid, offset) if with_mask else None
        g = _bwd_step(_at(q, i), _at(k, j), _at(v, j), _at(do, i), _at(lse, i), _at(delta, i), mask)
        dq, dk, dv = state
        return _add_at(dq, i, g[0]), _add_at(dk, j, g[1]), _add_at(dv, j, g[2])

    return _run_pairs(plan, visit, state, free, masked)


def _run_pairs(plan: _Plan, visit, state, free, masked):
    """Visit static lists of block pairs: scanned ("pairs") or unrolled into the program ("unrolled")."""
    for pairs, with_mask in ((free, False), (masked, True)):
        if not pairs:
            continue
        if plan.schedule == "unrolled":
            for i, j in pairs:
                state = visit(state, (i, j), with_mask)
        else:
            ij = jnp.asarray(pairs, jnp.int32)
            state, _ = lax.scan(lambda s, x: (visit(s, (x[0], x[1]), with_mask), None), state, ij)
    return state


# ----------------------------------------------------------------------------------------------------
# custom_vjp over the blocked layout


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
    schedule: str = DEFAULT_SCHEDULE,
):
    """Scaled dot-product attention computed block by block, with a hand-written backward pass.

    Same semantics as `jaxseq.attention` restricted to the masks it can express without a [T, S] array.

    Args:
      q: [B, T, H, d] queries.  k, v: [B, S, Hkv, d], H % Hkv == 0 (grouped-query when Hkv < H).
      causal: query i sits at absolute position q_offset + i and sees keys at positions <= that.
      key_padding_mask: bool [B, S], True = valid key.
      q_offset: int (static: hidden block pairs are skipped), or an int array [] / [B] (traced: every
        block pair is visited and masked). Only used when causal.
      scale: logit scale, default 1/sqrt(d).
      block_q, block_k: upper bounds on the block sizes; T and S are split into equal blocks of at most
        this size (padded to a multiple of 8, the padding masked out).
      schedule: "rows" (scan over q blocks, loops with per-block trip counts), "pairs" (one scan over
        the static list of visible block pairs) or "unrolled" (the pair list unrolled into the
        program: fastest to run, slowest to compile).

    Returns:
      [B, T, H, d] in q's dtype. A query that may attend to no key returns exact zeros, with zero
      (finite) gradients.
    """
    from jaxseq.attention import _check_qkv  # the shared shape checks (lazy: attention imports us)

    B, T, H, S = _check_qkv(q, k, v)
    Hkv, d = k.shape[2], q.shape[3]
    G = H // Hkv
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if int(block_q) < 1 or int(block_k) < 1:
        raise ConfigError(f"block_q and block_k must be positive, got {block_q}, {block_k}.")
    if T == 0:
        return jnp.zeros(q.shape, q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    static_offset = None
    offset = jnp.zeros((), jnp.int32)
    if causal:
        if isinstance(q_offset, (int, np.integer)):
            static_offset = int(q_offset)
            offset = jnp.asarray(static_offset, jnp.int32)
        else:
            offset = jnp.asarray(q_offset, jnp.int32)
            if offset.ndim not in (0, 1) or (offset.ndim == 1 and offset.shape[0] != B):
                raise ShapeError(f"q_offset must be an int, a scalar or [batch] = [{B}] array, got {offset.shape}.")
            if offset.ndim == 1:  # one offset per row -> per (row, kv head): [B*Hkv, 1, 1]
                offset = jnp.repeat(offset, Hkv)[:, None, None]

    bq, nq = _split_blocks(T, int(block_q))
    bk, nk = _split_blocks(S, int(block_k))
    Tp, Sp = bq * nq, bk * nk

    has_padding = key_padding_mask is not None
    kvalid = jnp.ones((B, S), bool)
    if has_padding:
        if tuple(np.shape(key_padding_mask)) != (B, S):
            raise ShapeError(
                f"key_padding_mask must be bool [batch, keys] = {(B, S)}, got shape {tuple(np.shape(key_padding_mask))}."
            )
        kvalid = jnp.asarray(key_padding_mask).astype(bool)
    kvalid = jnp.pad(kvalid, ((0, 0), (0, Sp - S)))  # padded keys are invalid
    # [nk, B*Hkv, 1, bk]
    kvalid = jnp.repeat(kvalid.reshape(B, 1, nk, 1, bk), Hkv, axis=1).reshape(B * Hkv, nk, 1, bk).transpose(1, 0, 2, 3)

    plan = _Plan(
        B=B, T=T, S=S, Hkv=Hkv, G=G, bq=bq, bk=bk, nq=nq, nk=nk, causal=bool(causal),
        static_offset=static_offset, key_mask=has_padding or Sp != S,
        has_padding_mask=has_padding, schedule=schedule,
    )  # fmt: skip

    # [B, T, H, d] -> [nq, B*Hkv, bq*G, d]; the scale goes into q (one multiply per query, not per score).
    qb = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    qb = qb.reshape(B, nq, bq, Hkv, G, d).transpose(1, 0, 3, 2, 4, 5).reshape(nq, B * Hkv, bq * G, d)

    def kv_blocks(x):  # [B, S, Hkv, d] -> [nk, B*Hkv, bk, d]
        x = jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        return x.reshape(B, nk, bk, Hkv, d).transpose(1, 0, 3, 2, 4).reshape(nk, B * Hkv, bk, d)

    out = _flash_blocks(plan, qb, kv_blocks(k), kv_blocks(v), kvalid, offset)
    out = out.reshape(nq, B, Hkv, bq, G, d).transpose(1, 0, 3, 2, 4, 5).reshape(B, Tp, H, d)
    return out[:, :T].astype(q.dtype)
