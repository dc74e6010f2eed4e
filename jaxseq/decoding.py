"""Generation over the model protocol: greedy / temperature / top-k / top-p sampling and beam search.

One implementation serves every model, because it only uses the protocol::

    state = model.apply(variables, batch_size, max_len, method="init_state")
    state, logits_t = model.apply(variables, state, token_t, method="step")   # [B] -> [B, V]

Prompts are **right-padded**: `prompt` is int32 `[B, P]` and `prompt_mask[b, t]` is True on the first
`L_b >= 1` positions of row b and False after them (None means every row has length P). All rows step
in lockstep on absolute positions t = 0, 1, ...: at step t every row feeds its token at position t and
gets the distribution of position t + 1. While t + 1 < L_b that next token is *forced* to the row's own
prompt token; from then on it is generated. So a row never feeds a padding token before its own
generation ends, which keeps any recurrent state (RNN carry, n-gram history, KV cache with a shared
position counter) exactly as if the row ran alone. Each row generates `max_new_tokens` tokens (fewer if
it emits `end_id`), so its output occupies positions `[0, L_b + max_new_tokens)`; everything after a
row's end is `pad` = `end_id` (or 0 when `end_id` is None), and `lengths` says where each row ends.

The whole generation (prompt and new tokens) is one `lax.scan` under one `jax.jit`; the model, the
number of new tokens, top_k, beam_size, end_id, greedy-or-not and top_p-or-not are static, so changing
one compiles again, while new keys, temperatures > 0, top_p values, prompts or params do not. This loop feeds back its
own outputs, which `jaxseq.scan.unroll` (a scan over precomputed inputs) cannot express, hence its own
scan here.

`sample` uses a model's optional `prefill(state, tokens [B, P], mask [B, P]) -> (state, logits [B, V])`
(the whole right-padded prompt in one parallel call, logits at each row's last valid token; the
TransformerLM has one) when it exists: then each row generates from its own position, with only
`max_new_tokens - 1` steps after the prefill, which needs every state leaf to be per row (batch axis).
`prefill=False` forces the step path; `beam_search` always uses the step path.

RNG: row b's token at absolute position t is drawn with `fold_in(fold_in(key, t), b)`, so the two
paths draw the same tokens and results do not depend on how wide the prompt padding is.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.checks import check_mask, check_tokens, is_concrete
from jaxseq.errors import ConfigError, ShapeError, TokenRangeError

__all__ = ["SampleOutput", "sample", "beam_search", "top_k_filter", "top_p_filter", "length_penalty_factor"]


# ----------------------------------------------------------------------------- logit filters


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the `k` largest logits of each row `[..., V]`; set the others to -inf.

    Values tied with the k-th largest are all kept (so a row may keep more than k). `k >= V` keeps
    everything. `k` must be a Python int >= 1 (it fixes a shape).
    """
    k = _check_top_k(k)
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, int(k))[0][..., -1:]  # [..., 1] the k-th largest value
    return jnp.where(logits < kth, -jnp.inf, logits)


def _check_top_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"top_k must be an int >= 1 (or None for no top-k filter), got {k!r}.")
    return int(k)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    """Nucleus filter: keep the smallest set of most probable tokens whose total probability is >= p.

    logits: `[..., V]`; p in (0, 1] (may be a traced scalar). The most probable token is always kept;
    tokens tied with the least probable kept token are kept too. Returns logits with the rest at -inf.
    """
    if is_concrete(p) and not (0.0 < float(p) <= 1.0):
        raise ConfigError(f"top_p must lie in (0, 1] (or be None for no nucleus filter), got {p!r}.")
    desc = -jnp.sort(-logits, axis=-1)  # [..., V] descending
    probs = jax.nn.softmax(desc, axis=-1)
    # Exclusive cumulative sum: mass of the tokens strictly more probable than this one.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p  # position 0 has mass 0 < p, so it is always kept
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def length_penalty_factor(num_tokens, alpha):
    """GNMT length penalty `((5 + n) / 6) ** alpha` (Wu et al. 2016); beam scores are log-prob / this.

    `n` counts generated tokens (the end_id included, the prompt not). alpha = 0 gives 1 (plain
    log-probabilities); alpha > 0 favours longer hypotheses.
    """
    n = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0)
    return ((5.0 + n) / 6.0) ** alpha


# ----------------------------------------------------------------------------- input checks


def _check_prompt(model, prompt, prompt_mask):
    """Validate prompt [B, P] and a right-padded prompt_mask; return (prompt int32, lengths int32 [B])."""
    check_tokens(prompt, getattr(model, "vocab_size", None), name="prompt", ndim=2)
    prompt = jnp.asarray(prompt, jnp.int32)
    B, P = prompt.shape
    if B == 0 or P == 0:
        raise ShapeError(
            f"prompt has shape {(B, P)}; decoding needs at least one row and one token per row "
            f"(the step protocol predicts from a fed token: start each row with a BOS id)."
        )
    if prompt_mask is None:
        return prompt, jnp.full((B,), P, jnp.int32)
    mask = check_mask(prompt_mask, (B, P), name="prompt_mask")
    if is_concrete(mask):
        m = np.asarray(mask)
        if not m[:, 0].all():
            rows = np.flatnonzero(~m[:, 0]).tolist()
            raise ShapeError(f"prompt_mask rows {rows} are empty; every prompt row needs >= 1 valid token (a BOS id).")
        if (m[:, 1:] & ~m[:, :-1]).any():
            rows = np.flatnonzero((m[:, 1:] & ~m[:, :-1]).any(1)).tolist()
            raise ShapeError(
                f"prompt_mask rows {rows} are not right-padded; decoding takes prompts as a valid prefix "
                f"(True...True False...False): move each row's tokens to the left."
            )
    return prompt, mask.sum(axis=1).astype(jnp.int32)


def _check_common(model, max_new_tokens, end_id):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
    if end_id is not None:
        vocab = getattr(model, "vocab_size", None)
        if isinstance(end_id, bool) or not isinstance(end_id, (int, np.integer)):
            raise ConfigError(f"end_id must be an int token id or None, got {end_id!r}.")
        if end_id < 0 or (vocab is not None and end_id >= vocab):
            raise TokenRangeError(f"end_id={end_id} is outside [0, {vocab}) for the model's vocab_size={vocab}.")
        return int(end_id)
    return None


def _check_state_batch(state, n: int, what: str):
    """State leaves must have the batch as their leading axis (or be shared scalars such as a position)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        shape = np.shape(leaf)
        if len(shape) > 0 and shape[0] != n:
            raise ShapeError(
                f"state leaf {jax.tree_util.keystr(path)} has shape {shape}, but {what}; decoding needs every "
                f"state leaf to have the batch as its leading axis (or to be a scalar shared by all rows)."
            )


def _start_tokens(prompt, lengths, total: int, pad: int):
    """[B, total] int32: the prompt where valid, pad everywhere else."""
    B, P = prompt.shape
    valid = jnp.arange(P)[None, :] < lengths[:, None]
    return jnp.full((B, total), pad, jnp.int32).at[:, :P].set(jnp.where(valid, prompt, pad))


# ----------------------------------------------------------------------------- sampling


class SampleOutput(NamedTuple):
    """What `sample` returns. `tokens` int32 [B, P + N]; `lengths` int32 [B]: row b's valid tokens
    (prompt + generated, the end_id included) are `tokens[b, :lengths[b]]`, the rest is pad."""

    tokens: jax.Array
    lengths: jax.Array

    @property
    def mask(self) -> jax.Array:
        """bool [B, P + N], True on each row's valid tokens."""
        return jnp.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


def _pick(logits, key, pos, temperature, top_p, *, greedy: bool, top_k, use_top_p: bool):
    """Choose one token per row from logits [B, V] for absolute positions pos (int or [B]) -> int32 [B]."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    B = logits.shape[0]
    keys = jax.vmap(lambda p, b: jax.random.fold_in(jax.random.fold_in(key, p), b))(
        jnp.broadcast_to(pos, (B,)), jnp.arange(B)
    )
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy", "use_top_p", "end_id", "prefill")
)
def _sample_jit(model, variables, prompt, lengths, key, temperature, top_p, state, *,
                max_new_tokens, top_k, greedy, use_top_p, end_id, prefill):
    B, P = prompt.shape
    total = P + max_new_tokens
    pad = 0 if end_id is None else end_id
    tokens = _start_tokens(prompt, lengths, total, pad)
    if state is None:
        state = model.apply(variables, B, total, method="init_state")
    pick = functools.partial(_pick, key=key, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p)
    if prefill:
        return _generate_after_prefill(model, variables, tokens, lengths, state, pick, max_new_tokens, end_id)

    def body(carry, t):
        state, tokens, done, out_len = carry
        pos = t + 1  # the position whose token this step decides
        fed = jax.lax.dynamic_index_in_dim(tokens, t, axis=1, keepdims=False)  # [B]
        state, logits = model.apply(variables, state, fed, method="step")
        drawn = pick(logits, pos=pos)
        here = jax.lax.dynamic_index_in_dim(tokens, pos, axis=1, keepdims=False)  # prompt token or pad
        forced = pos < lengths
        generating = ~forced & ~done & (pos < lengths + max_new_tokens)
        new = jnp.where(forced, here, jnp.where(generating, drawn, pad))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, new, pos, axis=1)
        out_len = jnp.where(generating, pos + 1, out_len)
        if end_id is not None:
            done = done | (generating & (drawn == end_id))
        return (state, tokens, done, out_len), None

    init = (state, tokens, jnp.zeros((B,), bool), lengths)
    (_, tokens, _, out_len), _ = jax.lax.scan(body, init, jnp.arange(total - 1))
    return SampleOutput(tokens, out_len)


def _generate_after_prefill(model, variables, tokens, lengths, state, pick, max_new_tokens, end_id):
    """Prefill every row's prompt in one call, then max_new_tokens - 1 steps; row b writes at lengths[b] + i."""
    B = tokens.shape[0]
    P = tokens.shape[1] - max_new_tokens
    pad = 0 if end_id is None else end_id
    mask = jnp.arange(P)[None, :] < lengths[:, None]
    state, logits = model.apply(variables, state, tokens[:, :P], mask, method="prefill")
    rows = jnp.arange(B)

    def emit(tokens, done, out_len, logits, i):
        pos = lengths + i  # [B] each row's own position
        drawn = pick(logits, pos=pos)
        new = jnp.where(done, pad, drawn)
        tokens = tokens.at[rows, pos].set(new)
        out_len = jnp.where(done, out_len, pos + 1)
        if end_id is not None:
            done = done | (drawn == end_id)
        return tokens, done, out_len, new

    def body(carry, i):
        state, logits, tokens, done, out_len = carry
        tokens, done, out_len, new = emit(tokens, done, out_len, logits, i)
        state, logits = model.apply(variables, state, new, method="step")
        return (state, logits, tokens, done, out_len), None

    init = (state, logits, tokens, jnp.zeros((B,), bool), lengths)
    (_, logits, tokens, done, out_len), _ = jax.lax.scan(body, init, jnp.arange(max_new_tokens - 1))
    tokens, _, out_len, _ = emit(tokens, done, out_len, logits, max_new_tokens - 1)  # no step after the last
    return SampleOutput(tokens, out_len.astype(jnp.int32))


def sample(model, variables, prompt, *, max_new_tokens: int, key=None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, prompt_mask=None,
           end_id: int | None = None, state=None, prefill: bool | None = None) -> SampleOutput:
    """Continue right-padded prompts by sampling; the whole generation is one jitted `lax.scan`.

    Args:
      model: a protocol model (Flax module with `vocab_size`, `init_state`, `step`); static under jit.
      variables: its variables (e.g. `{"params": ...}`).
      prompt: int [B, P], P >= 1; right-padded when `prompt_mask` is given.
      max_new_tokens: tokens to generate per row (>= 0).
      key: PRNG key; row b's token at position t uses `fold_in(fold_in(key, t), b)`. None if greedy.
      temperature: Python float >= 0; 0 means greedy (argmax; top_k/top_p then have no effect).
      top_k: keep only the k most likely tokens (see `top_k_filter`), applied after temperature.
      top_p: nucleus filter in (0, 1] (see `top_p_filter`), applied after temperature and top-k.
      prompt_mask: bool [B, P], a valid prefix per row (>= 1 token); None = all P tokens valid.
      end_id: once a row generates it, the row stops: later positions hold end_id. None: never stop.
      state: an already-built decoding state for batch B and max_len >= P + max_new_tokens (e.g. an
        encoder-decoder's state from the encoder output); None calls `init_state(B, P + max_new_tokens)`.
      prefill: use the model's `prefill` method for the prompt (None: when it has one; see module doc).

    Returns:
      SampleOutput(tokens int32 [B, P + max_new_tokens], lengths int32 [B]); see the module docstring.
    """
    prompt, lengths = _check_prompt(model, prompt, prompt_mask)
    end_id = _check_common(model, max_new_tokens, end_id)
    if not isinstance(temperature, (int, float, np.floating, np.integer)) or not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite Python float >= 0 (0 = greedy), got {temperature!r}.")
    top_k = None if top_k is None else _check_top_k(top_k)
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ConfigError(f"top_p must lie in (0, 1] (or be None for no nucleus filter), got {top_p!r}.")
    greedy = float(temperature) == 0.0
    if not greedy and key is None:
        raise ConfigError("sample needs key=jax.random.key(seed) when temperature > 0 (or use temperature=0).")
    if state is not None:
        _check_state_batch(state, prompt.shape[0], f"the prompt has batch size {prompt.shape[0]}")
    has_prefill = callable(getattr(model, "prefill", None))
    if prefill and not has_prefill:
        raise ConfigError(f"prefill=True but {type(model).__name__} has no prefill method; use prefill=None.")
    if max_new_tokens == 0:
        return SampleOutput(_start_tokens(prompt, lengths, prompt.shape[1], end_id or 0), lengths)
    use_top_p = top_p is not None and float(top_p) < 1.0
    return _sample_jit(
        model, variables, prompt, lengths, None if greedy else key,
        jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p if use_top_p else 1.0), state,
        max_new_tokens=int(max_new_tokens), top_k=top_k, greedy=greedy, use_top_p=use_top_p, end_id=end_id,
        prefill=has_prefill if prefill is None else bool(prefill),
    )


# ----------------------------------------------------------------------------- beam search


def _gather_rows(state, rows):
    """Take rows (int [n]) of every state leaf along its leading (batch) axis; scalars are shared."""
    return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, rows, axis=0), state)


def _take_beams(x, idx):
    """x [B, M, ...], idx int [B, K] -> [B, K, ...] (per-row gather on the beam axis)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_new_tokens", "end_id"))
def _beam_jit(model, variables, prompt, lengths, state, alpha, *, beam_size, max_new_tokens, end_id):
    B, P = prompt.shape
    K, N = beam_size, max_new_tokens
    total = P + N
    pad = 0 if end_id is None else end_id
    NEG = jnp.float32(-jnp.inf)

    alive_seqs = jnp.broadcast_to(_start_tokens(prompt, lengths, total, pad)[:, None], (B, K, total))
    # Only beam 0 is live at the start, so the first expansion does not pick K copies of one token.
    alive_logp = jnp.tile(jnp.where(jnp.arange(K) == 0, 0.0, NEG)[None], (B, 1))
    fin_seqs, fin_scores = alive_seqs, jnp.full((B, K), NEG)
    if state is None:
        state = model.apply(variables, B * K, total, method="init_state")
    else:  # built for batch B: give each beam its own copy, beams of row b at rows b*K .. b*K+K-1
        state = _gather_rows(state, jnp.repeat(jnp.arange(B), K))
    _check_state_batch(state, B * K, f"beam search runs batch * beam_size = {B} * {K} = {B * K} rows")
    beam_range = jnp.broadcast_to(jnp.arange(K)[None], (B, K))

    def body(carry, t):
        state, alive_seqs, alive_logp, fin_seqs, fin_scores = carry
        pos = t + 1
        fed = alive_seqs[:, :, t].reshape(B * K)
        state, logits = model.apply(variables, state, fed, method="step")
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B*K, V]
        V = logp.shape[-1]
        cand = (alive_logp[:, :, None] + logp.reshape(B, K, V)).reshape(B, K * V)
        # 2K candidates: at most K of them (one per beam) end with end_id, so K stay alive.
        top_logp, top_idx = jax.lax.top_k(cand, min(2 * K, K * V))  # [B, C]
        parent, token = top_idx // V, (top_idx % V).astype(jnp.int32)
        cand_seqs = _take_beams(alive_seqs, parent).at[:, :, pos].set(token)  # [B, C, total]
        n_new = pos - lengths + 1  # generated tokens including this one, [B]
        ended = jnp.broadcast_to((n_new == N)[:, None], token.shape)  # out of budget: complete
        if end_id is not None:
            ended = ended | (token == end_id)
        # Finished pool: best K of (old finished, newly completed), ranked by penalised score.
        new_fin = jnp.where(ended, top_logp / length_penalty_factor(n_new, alpha)[:, None], NEG)
        f_scores, f_idx = jax.lax.top_k(jnp.concatenate([fin_scores, new_fin], 1), K)
        f_seqs = _take_beams(jnp.concatenate([fin_seqs, cand_seqs], 1), f_idx)
        # Alive pool: best K not-yet-complete candidates, ranked by log-probability.
        a_logp, a_idx = jax.lax.top_k(jnp.where(ended, NEG, top_logp), K)
        a_seqs, a_parent = _take_beams(cand_seqs, a_idx), _take_beams(parent, a_idx)
        # Rows still forcing their prompt, or already done, keep everything (their beams stay in place).
        active = (pos >= lengths) & (n_new <= N)
        a1, a2 = active[:, None], active[:, None, None]
        alive_seqs = jnp.where(a2, a_seqs, alive_seqs)
        alive_logp = jnp.where(a1, a_logp, alive_logp)
        fin_seqs = jnp.where(a2, f_seqs, fin_seqs)
        fin_scores = jnp.where(a1, f_scores, fin_scores)
        parent = jnp.where(a1, a_parent, beam_range)
        state = _gather_rows(state, (jnp.arange(B)[:, None] * K + parent).reshape(B * K))
        return (state, alive_seqs, alive_logp, fin_seqs, fin_scores), None

    init = (state, alive_seqs, alive_logp, fin_seqs, fin_scores)
    (_, _, _, fin_seqs, fin_scores), _ = jax.lax.scan(body, init, jnp.arange(total - 1))
    return fin_seqs, fin_scores


def beam_search(model, variables, prompt, *, beam_size: int, max_new_tokens: int, end_id: int | None = None,
                length_penalty: float = 0.0, prompt_mask=None, state=None):
    """The `beam_size` best continuations of each prompt, as one jitted `lax.scan`.

    A hypothesis is complete when it emits `end_id` or has `max_new_tokens` new tokens. Completed
    hypotheses go to a separate finished pool (the t5x/flax bookkeeping), ranked by
    `log p(new tokens | prompt) / length_penalty_factor(n_new, length_penalty)` (GNMT
    `((5 + n) / 6) ** alpha`, n = generated tokens with the end_id); live ones are ranked by log-prob.
    With beam_size 1 and length_penalty 0 this is greedy decoding. No early stopping: the scan runs
    the full length (rows whose hypotheses are all complete just idle).

    Args:
      model, variables, prompt, prompt_mask, max_new_tokens, end_id: as in `sample` (right padding).
      beam_size: K >= 1 (static).
      length_penalty: alpha >= 0 of the GNMT penalty; 0 ranks by plain log-probability.
      state: an already-built state for batch B (leaves [B, ...]; each is repeated to B * K rows);
        None calls `init_state(B * K, P + max_new_tokens)`. Beams are folded into the batch (row
        b*K + k is beam k of prompt b) and reordered by gathering every state leaf on its leading axis,
        so state leaves must have the batch as their leading axis (scalar leaves are shared).

    Returns:
      (sequences int32 [B, K, P + N], scores float32 [B, K]), best first. scores are the penalised
      scores (the sum of the new tokens' log-probs when length_penalty == 0). After a hypothesis's
      end_id (and after position L_b + N) the sequence holds pad (end_id, or 0 without one). A score of
      -inf marks an empty slot (fewer than K complete hypotheses exist). With max_new_tokens == 0 the
      prompt is the only hypothesis (score 0).
    """
    prompt, lengths = _check_prompt(model, prompt, prompt_mask)
    end_id = _check_common(model, max_new_tokens, end_id)
    if isinstance(beam_size, bool) or not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
        raise ConfigError(f"beam_size must be an int >= 1, got {beam_size!r}.")
    if not isinstance(length_penalty, (int, float, np.floating, np.integer)) or not (
        math.isfinite(length_penalty) and length_penalty >= 0
    ):
        raise ConfigError(f"length_penalty (GNMT alpha) must be a finite float >= 0, got {length_penalty!r}.")
    B, P = prompt.shape
    K = int(beam_size)
    if state is not None:
        _check_state_batch(state, B, f"the prompt has batch size {B} (pass the state before beams are added)")
    if max_new_tokens == 0:
        seqs = jnp.broadcast_to(_start_tokens(prompt, lengths, P, end_id or 0)[:, None], (B, K, P))
        return seqs, jnp.tile(jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf)[None], (B, 1))
    return _beam_jit(model, variables, prompt, lengths, state, jnp.float32(length_penalty),
                     beam_size=K, max_new_tokens=int(max_new_tokens), end_id=end_id)
