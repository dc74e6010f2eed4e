"""NGramLM: a count-based n-gram of any order, add-k smoothed, interpolated with every lower order.

    p(w | h) = sum_k lambda_k * p_k(w | h_{k-1}) / sum_k lambda_k   (k over the orders usable at t)
    p_k(w | h) = (c(h, w) + add_k) / (c(h) + add_k * V)            (c(h) = sum_w c(h, w))

h_{k-1} is the last k-1 tokens. An order-k context that never occurred in training has c(h, .) = 0,
so its p_k is uniform (add-k on an empty row). At the start of a sequence (fewer than k-1 tokens
seen) order k is not usable and the lambdas are renormalised over orders 1..(tokens seen + 1):
the "shorter context" convention, no BOS token. apply and step share one function, so they agree.

Storage scales with the text, not with V^n. Context ids form a trie read right to left: the
length-1 context of position t is the token x_t; the length-j context is the pair
(id of its length-(j-1) suffix, x_{t-j+1}), encoded as `suffix_id * V + token`. Per context length j
the variables hold the sorted unique keys (`ctx_keys_j`, [C+1]), the context totals c(h)
(`ctx_totals_j`) and the nonzero (next token, count) pairs of every context as a CSR matrix
(`row_start_j` [C+2], `pair_next_j` and `pair_counts_j` [P+1]; memory O(text), not O(C * V)).
Keys are collision-free and fit int32 (JAX runs without x64) as long as (C + 1) * V < 2**31, which
`fit_variables` checks. `apply`/`step` find context ids with `jnp.searchsorted`, so both jit. Every
array ends with a sentinel entry (key int32 max, an empty row C) so lookups of absent contexts stay
in bounds and read zero counts, even when a table is empty.

The counts live in the non-param collection "counts"; `model.init` gives empty tables (every
prediction uniform) and `model.fit_variables(train_ids)` gives the fitted ones.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.checks import check_mask, check_tokens
from jaxseq.errors import ConfigError, DataError, ShapeError

COLLECTION = "counts"
_SENTINEL = np.iinfo(np.int32).max
_KEY_LIMIT = 2**31 - 1
_PER_LENGTH = ("ctx_keys", "ctx_totals", "row_start", "pair_next", "pair_counts")


def parse_lambdas(text: str) -> tuple[float, ...] | None:
    """`NGramConfig.lambdas` ("" = fit on held-out text, or "0.1,0.3,0.6") -> tuple or None."""
    text = text.strip()
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(
            f"ngram.lambdas={text!r} is not a comma-separated list of numbers; write e.g. '0.1,0.3,0.6' "
            f"(one weight per order 1..n, summing to 1) or '' to fit them on held-out text."
        ) from None


class NGramLM(nn.Module):
    """Interpolated add-k n-gram LM under the model protocol.

    apply(variables, tokens [B, T], mask=None) -> log-probabilities [B, T, V] (logits[:, t] predicts
        tokens[:, t+1] from tokens[:, max(0, t-n+2) .. t]). Where mask is False the token is skipped
        (it enters no context), as a recurrent model holds its carry; the output there repeats the
        prediction after the last valid token and should be ignored.
    init_state(batch_size, max_len) -> {"history": int32 [B, n-1] (most recent last), "count": int32 [B]}.
    step(state, token [B]) -> (state, log-probabilities [B, V]).

    Attributes: vocab_size; order n >= 1; add_k > 0 (pseudo-count at every order); lambdas: weights of
    orders 1..n summing to 1, or None to fit them by EM on held-out text in `fit_variables`.
    """

    vocab_size: int
    order: int = 5
    add_k: float = 0.1
    lambdas: tuple[float, ...] | None = None

    def __post_init__(self):
        if not (isinstance(self.order, int) and self.order >= 1):
            raise ConfigError(f"order={self.order!r} must be an integer >= 1 (1 = unigram).")
        if not (isinstance(self.vocab_size, int) and self.vocab_size >= 1):
            raise ConfigError(f"vocab_size={self.vocab_size!r} must be a positive integer.")
        if not self.add_k > 0:
            # add_k = 0 gives zero probability to unseen continuations, i.e. infinite loss: refuse it.
            raise ConfigError(f"add_k={self.add_k!r} must be > 0 (try 0.01 .. 1).")
        if self.lambdas is not None:
            lam = np.asarray(self.lambdas, dtype=np.float64)
            if lam.shape != (self.order,) or (lam < 0).any() or abs(lam.sum() - 1.0) > 1e-4:
                raise ConfigError(
                    f"lambdas={tuple(self.lambdas)} must hold {self.order} non-negative weights (orders 1..{self.order}) "
                    f"summing to 1; pass lambdas=None to fit them on held-out text."
                )
        super().__post_init__()

    @classmethod
    def from_config(cls, config, vocab_size: int) -> "NGramLM":
        """Build from a `jaxseq.config.NGramConfig`."""
        return cls(vocab_size=vocab_size, order=config.order, add_k=config.add_k, lambdas=parse_lambdas(config.lambdas))

    # ----------------------------------------------------------------- variables

    def setup(self):
        # The count tables, created empty by `init` (every prediction uniform); fit_variables fills them.
        n = self.order
        lam0 = np.asarray(self.lambdas if self.lambdas is not None else [1.0 / n] * n, np.float32)
        self.variable(COLLECTION, "lambdas", lambda: jnp.asarray(lam0))
        self.variable(COLLECTION, "unigram", lambda: jnp.zeros((self.vocab_size,), jnp.float32))
        for j in range(1, n):
            self.variable(COLLECTION, f"ctx_keys_{j}", lambda: jnp.full((1,), _SENTINEL, jnp.int32))
            self.variable(COLLECTION, f"ctx_totals_{j}", lambda: jnp.zeros((1,), jnp.float32))
            self.variable(COLLECTION, f"row_start_{j}", lambda: jnp.zeros((2,), jnp.int32))
            self.variable(COLLECTION, f"pair_next_{j}", lambda: jnp.full((1,), self.vocab_size, jnp.int32))
            self.variable(COLLECTION, f"pair_counts_{j}", lambda: jnp.zeros((1,), jnp.float32))

    def _tables(self) -> dict:
        names = ["lambdas", "unigram"] + [f"{name}_{j}" for j in range(1, self.order)
                                          for name in _PER_LENGTH]
        t = {name: self.get_variable(COLLECTION, name) for name in names}
        missing = [name for name, v in t.items() if v is None]
        if missing or t["lambdas"].shape != (self.order,) or t["unigram"].shape != (self.vocab_size,):
            got = "missing " + ", ".join(missing[:3]) if missing else (
                f"lambdas {t['lambdas'].shape}, unigram {t['unigram'].shape}")
            raise ShapeError(
                f"the '{COLLECTION}' variables do not fit NGramLM(order={self.order}, vocab_size={self.vocab_size}) "
                f"({got}); fit them with this model's fit_variables."
            )
        return t

    def fit_variables(self, train_ids, heldout_ids=None, *, heldout_fraction: float = 0.1) -> dict:
        """Exact counts (NumPy) -> variables {"counts": ...} for apply/step. Host-side, not jitted.

        train_ids: 1-D int array, one token stream. If `self.lambdas` is None the weights are fitted
        by EM (maximum held-out likelihood; the log-likelihood is concave in the lambdas, so EM finds
        the optimum): on `heldout_ids` with counts from all of `train_ids` if given, otherwise by
        deleted interpolation: lambdas on the last `heldout_fraction` of `train_ids` with counts from
        the rest, then the counts are refitted on all of `train_ids`.
        """
        V, n = self.vocab_size, self.order
        train = _check_stream(train_ids, V, "train_ids")
        if self.lambdas is not None:
            lambdas = np.asarray(self.lambdas, np.float64)
        elif heldout_ids is not None:
            held = _check_stream(heldout_ids, V, "heldout_ids")
            lambdas = fit_lambdas_em(_count_tables(train, V, n), held, V, n, self.add_k)
        else:
            if not 0 < heldout_fraction < 1:
                raise ConfigError(f"heldout_fraction={heldout_fraction} must be in (0, 1).")
            cut = int(round(len(train) * (1 - heldout_fraction)))
            if cut < 2 or len(train) - cut < n:
                raise DataError(
                    f"train_ids has {len(train)} tokens: too few to hold out {heldout_fraction:.0%} for fitting "
                    f"the lambdas of an order-{n} model; pass heldout_ids, or fixed lambdas to NGramLM."
                )
            lambdas = fit_lambdas_em(_count_tables(train[:cut], V, n), train[cut:], V, n, self.add_k)
        tables = _count_tables(train, V, n)
        tables["lambdas"] = lambdas.astype(np.float32)
        return {COLLECTION: {k: jnp.asarray(v) for k, v in tables.items()}}

    # ----------------------------------------------------------------- protocol

    def __call__(self, tokens, mask=None, deterministic: bool = True):
        check_tokens(tokens, self.vocab_size, name="tokens")
        mask = check_mask(mask, tokens.shape, name="mask")
        tokens = jnp.asarray(tokens, jnp.int32)
        B, T = tokens.shape
        n = self.order
        valid = jnp.ones((B, T), bool) if mask is None else mask
        seen = jnp.cumsum(valid, axis=1, dtype=jnp.int32)  # valid tokens up to and including t
        # Compact the valid tokens to the left (masked ones go to a dropped extra column), so the
        # history of position t is compact[seen[t]-n+1 .. seen[t]-1].
        dest = jnp.where(valid, seen - 1, T)
        compact = jnp.zeros((B, T + 1), jnp.int32).at[jnp.arange(B)[:, None], dest].set(tokens)[:, :T]
        src = seen[:, :, None] - (n - 1) + jnp.arange(n - 1)  # [B, T, n-1], most recent last
        history = jnp.take_along_axis(compact, jnp.maximum(src, 0).reshape(B, T * (n - 1)), axis=1)
        history = history.reshape(B, T, n - 1)
        count = jnp.minimum(seen, n - 1)
        return _log_probs(self._tables(), history, count, self.vocab_size, self.add_k)

    def init_state(self, batch_size: int, max_len: int | None = None):
        """Empty history. max_len is unused: the state is the last n-1 tokens whatever the length."""
        return {"history": jnp.zeros((batch_size, self.order - 1), jnp.int32),
                "count": jnp.zeros((batch_size,), jnp.int32)}

    def step(self, state, token):
        check_tokens(token, self.vocab_size, name="token", ndim=1)
        token = jnp.asarray(token, jnp.int32)
        if self.order > 1:
            history = jnp.concatenate([state["history"][:, 1:], token[:, None]], axis=1)
        else:
            history = state["history"]
        count = jnp.minimum(state["count"] + 1, self.order - 1)
        state = {"history": history, "count": count}
        return state, _log_probs(self._tables(), history, count, self.vocab_size, self.add_k)

    # ----------------------------------------------------------------- evaluation

    def log_loss(self, variables, ids, *, chunk: int = 16384) -> float:
        """Mean negative log-likelihood (nats/token) of predicting ids[1:] from a 1-D stream.

        The stream is scored in windows of `chunk` predictions, each with n-2 tokens of overlap so
        that every prediction sees the same context as in one long sequence. Windows are padded to
        one shape (padding masked, so it is skipped) so the model compiles once.
        """
        ids = _check_stream(ids, self.vocab_size, "ids")
        M, ctx = len(ids), max(self.order - 2, 0)
        if M < 2:
            raise DataError(f"ids has {M} tokens; need at least 2 to score a prediction.")
        fn = jax.jit(lambda v, x, m: self.apply(v, x, mask=m))
        L = chunk + ctx
        total = 0.0
        for s in range(0, M - 1, chunk):
            e = min(s + chunk, M - 1)  # predict ids[i + 1] for i in [s, e)
            seg = ids[max(0, s - ctx):e]
            off = ctx - (s - max(0, s - ctx))  # left padding: position s lands at index ctx
            x, m = np.zeros((1, L), np.int32), np.zeros((1, L), bool)
            x[0, off:off + len(seg)], m[0, off:off + len(seg)] = seg, True
            logp = fn(variables, jnp.asarray(x), jnp.asarray(m))[0, ctx:ctx + (e - s)]
            tgt = jnp.asarray(ids[s + 1:e + 1], jnp.int32)
            total += float(-jnp.take_along_axis(logp, tgt[:, None], axis=1).sum())
        return total / (M - 1)

    @staticmethod
    def best_order(train_ids, val_ids, vocab_size: int, orders: Sequence[int] = range(1, 9),
                   add_k: float = 0.1) -> tuple[int, list[dict]]:
        """Fit one model per order on train_ids (lambdas by deleted interpolation) and score val_ids.

        Returns (best order, rows of {"order", "val_loss" (nats/token), "fit_s", "eval_s", "lambdas"}).
        """
        rows = []
        for k in orders:
            model = NGramLM(vocab_size=vocab_size, order=int(k), add_k=add_k)
            t0 = time.perf_counter()
            variables = model.fit_variables(train_ids)
            t1 = time.perf_counter()
            loss = model.log_loss(variables, val_ids)
            rows.append({"order": int(k), "val_loss": loss, "fit_s": t1 - t0, "eval_s": time.perf_counter() - t1,
                         "lambdas": [round(float(x), 4) for x in variables[COLLECTION]["lambdas"]]})
        best = min(rows, key=lambda r: r["val_loss"])["order"]
        return best, rows


# --------------------------------------------------------------------- pure helpers


def _log_probs(t: dict, history, count, V: int, add_k: float):
    """Interpolated log p(. | history). history: int32 [..., n-1] (most recent last); count: [...] valid
    history tokens (right-aligned). Returns float32 [..., V]."""
    lead = count.shape
    n = t["lambdas"].shape[0]
    c = count.reshape(-1)
    M = c.shape[0]
    h = history.reshape(M, n - 1)
    vocab = jnp.arange(V, dtype=jnp.int32)
    uni = t["unigram"]
    comps = [jnp.broadcast_to((uni + add_k) / (uni.sum() + add_k * V), (M, V))]
    usable = [jnp.ones((M,), bool)]
    ctx_id = jnp.zeros((M,), jnp.int32)
    found = jnp.ones((M,), bool)
    for j in range(1, n):  # context length j = order j + 1
        keys = t[f"ctx_keys_{j}"]
        tok = h[:, n - 1 - j]  # the token j places back
        q = tok if j == 1 else ctx_id * V + tok
        ctx_id = jnp.searchsorted(keys, q).astype(jnp.int32)  # sentinel keeps it in bounds
        ok = c >= j
        found = found & ok & (keys[ctx_id] == q)
        # The context's row of nonzero (next token, count) pairs, scattered into a dense [M, V]
        # (a row has at most V entries; 5x faster on CPU than a searchsorted per (context, token)).
        start, end = t[f"row_start_{j}"][ctx_id], t[f"row_start_{j}"][ctx_id + 1]
        nxt, cnt = t[f"pair_next_{j}"], t[f"pair_counts_{j}"]
        idx = jnp.minimum(start[:, None] + vocab, nxt.shape[0] - 1)  # [M, V]
        cols = jnp.where(vocab < (end - start)[:, None], nxt[idx], V)  # V = dropped
        counts = jnp.zeros((M, V), jnp.float32).at[jnp.arange(M)[:, None], cols].add(cnt[idx], mode="drop")
        total = t[f"ctx_totals_{j}"][ctx_id]
        p = (counts + add_k) / (total[:, None] + add_k * V)
        comps.append(jnp.where(found[:, None], p, 1.0 / V))  # unseen context: add-k on an empty row
        usable.append(ok)
    w = t["lambdas"][None, :] * jnp.stack(usable, axis=1).astype(jnp.float32)  # [M, n]
    total = w.sum(axis=1, keepdims=True)
    # Where every order this position can use has weight 0 (fitted lambdas may zero the low orders and
    # the first positions lack the context of the high ones), the unigram alone: never a row of zeros.
    unigram_only = (jnp.arange(n) == 0).astype(jnp.float32)[None, :]
    w = jnp.where(total > 0, w / jnp.maximum(total, 1e-30), unigram_only)
    prob = jnp.einsum("mk,mkv->mv", w, jnp.stack(comps, axis=1))
    return jnp.log(prob).reshape(*lead, V)


def _check_stream(ids, V: int, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise DataError(f"{name} must be a 1-D token stream, got shape {arr.shape}; concatenate documents "
                        f"(e.g. np.concatenate) before fitting.")
    check_tokens(arr, V, name=name, ndim=1)
    return arr.astype(np.int64)


def _count_tables(ids: np.ndarray, V: int, n: int) -> dict:
    """Exact count tables (see module docstring) of a 1-D int64 stream, as NumPy arrays."""
    N = len(ids)
    tables = {"unigram": np.bincount(ids, minlength=V).astype(np.float32)}
    prev = None  # context id of length j-1 ending at each position (-1 where none)
    for j in range(1, n):
        t = np.arange(j - 1, N - 1)  # positions whose length-j context is followed by a token
        key = ids[t] if j == 1 else prev[t] * V + ids[t - j + 1]
        ctx_keys, inv = np.unique(key, return_inverse=True)
        inv = inv.reshape(-1)
        if (len(ctx_keys) + 1) * V >= _KEY_LIMIT:
            raise DataError(
                f"{len(ctx_keys)} distinct contexts of length {j} times vocab_size={V} overflow the int32 keys "
                f"of the n-gram tables; lower the order or the vocabulary size, or fit on less text."
            )
        pair_keys, pair_counts = np.unique(inv * V + ids[t + 1], return_counts=True)  # sorted by (context, next)
        totals = np.bincount(inv, minlength=len(ctx_keys))
        row_start = np.searchsorted(pair_keys // V, np.arange(len(ctx_keys) + 1))
        tables[f"ctx_keys_{j}"] = np.append(ctx_keys, _SENTINEL).astype(np.int32)
        tables[f"ctx_totals_{j}"] = np.append(totals, 0).astype(np.float32)
        # Row C (the "not found" id) is empty: row_start[C] = row_start[C + 1] = P.
        tables[f"row_start_{j}"] = np.append(row_start, len(pair_keys)).astype(np.int32)
        tables[f"pair_next_{j}"] = np.append(pair_keys % V, V).astype(np.int32)
        tables[f"pair_counts_{j}"] = np.append(pair_counts, 0).astype(np.float32)
        prev = np.full(N, -1, np.int64)
        prev[t] = inv
    return tables


def _target_component_probs(tables: dict, ids: np.ndarray, V: int, n: int, add_k: float) -> np.ndarray:
    """p_k(ids[i+1] | context at i) for k = 1..n at every i with a full (n-1)-token context: [n, M]."""
    i = np.arange(n - 2, len(ids) - 1) if n > 1 else np.arange(len(ids) - 1)
    tgt = ids[i + 1]
    uni = tables["unigram"].astype(np.float64)
    out = [(uni[tgt] + add_k) / (uni.sum() + add_k * V)]
    ctx_id = np.zeros(len(i), np.int64)
    found = np.ones(len(i), bool)
    for j in range(1, n):
        keys = tables[f"ctx_keys_{j}"].astype(np.int64)
        tok = ids[i - j + 1]
        q = tok if j == 1 else ctx_id * V + tok
        ctx_id = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        found &= keys[ctx_id] == q
        # Global pair keys (int64 on the host): the rows are sorted by (context, next token).
        row_start = tables[f"row_start_{j}"].astype(np.int64)
        pair_ctx = np.repeat(np.arange(len(row_start) - 1), np.diff(row_start))
        pkeys = np.append(pair_ctx * V + tables[f"pair_next_{j}"][:-1], np.iinfo(np.int64).max)
        pq = ctx_id * V + tgt
        pidx = np.searchsorted(pkeys, pq)
        cnt = np.where(pkeys[pidx] == pq, tables[f"pair_counts_{j}"][pidx], 0.0)
        tot = tables[f"ctx_totals_{j}"][ctx_id].astype(np.float64)
        out.append(np.where(found, (cnt + add_k) / (tot + add_k * V), 1.0 / V))
    return np.stack(out)


def fit_lambdas_em(tables: dict, heldout: np.ndarray, V: int, n: int, add_k: float,
                   iters: int = 500, tol: float = 1e-7) -> np.ndarray:
    """Interpolation weights maximising the held-out likelihood, by EM (float64). Returns [n]."""
    probs = _target_component_probs(tables, heldout, V, n, add_k)  # [n, M]
    if probs.shape[1] == 0:
        raise DataError(f"held-out text has {len(heldout)} tokens: too few for an order-{n} model "
                        f"(need at least {n}); pass more held-out text or fixed lambdas.")
    lam = np.full(n, 1.0 / n)
    prev_ll = -math.inf
    for _ in range(iters):
        mix = lam[:, None] * probs
        total = mix.sum(axis=0)
        ll = np.log(total).mean()
        lam = (mix / total).mean(axis=1)  # E-step posteriors averaged = M-step
        if ll - prev_ll < tol:
            break
        prev_ll = ll
    return lam / lam.sum()
