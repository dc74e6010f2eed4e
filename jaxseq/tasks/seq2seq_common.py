"""What the sequence-to-sequence tasks (translation, captioning) share: batches, loss, decoding, scores.

A batch is a dict of arrays with fixed shapes (one compile):
    "src": int32 [B, S] tokens (with "src_mask" bool [B, S]) or float32 [B, H, W, C] images (no mask)
    "tgt_in": int32 [B, T] = BOS y_1 ... y_n PAD...       (the decoder's input, teacher forcing)
    "tgt_out": int32 [B, T] = y_1 ... y_n EOS PAD...      (what each position predicts)
    "tgt_mask": bool [B, T]: True on the n + 1 predicted positions
    "weight": bool [B]: False on rows that only pad the last evaluation batch
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import decoding
from jaxseq.errors import ConfigError, DataError
from jaxseq.losses import token_nll
from jaxseq.tasks.vocab import BOS, EOS, PAD


def pad_tokens(seqs, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad int sequences to [len(seqs), width]: (ids int32, mask bool)."""
    ids = np.full((len(seqs), width), PAD, np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = True
    return ids, mask


def target_arrays(seqs, width: int) -> dict:
    """Teacher-forcing arrays of targets (without BOS/EOS) padded to width T >= longest + 1."""
    tgt_in, mask = pad_tokens([np.concatenate([[BOS], s]) for s in seqs], width)
    tgt_out, _ = pad_tokens([np.concatenate([s, [EOS]]) for s in seqs], width)
    return {"tgt_in": tgt_in, "tgt_out": tgt_out, "tgt_mask": mask}


def seq2seq_loss(model, variables, batch, rng=None):
    """Teacher-forced mean NLL (nats) per target token; sums: count, sum_loss, sum_accuracy (argmax correct)."""
    rngs = None if rng is None else {"dropout": rng}
    logits = model.apply(variables, batch["src"], batch["tgt_in"], src_mask=batch.get("src_mask"),
                         tgt_mask=batch["tgt_mask"], deterministic=rng is None, rngs=rngs)
    mask = batch["tgt_mask"] & batch["weight"][:, None]
    sum_nll, count = token_nll(logits, batch["tgt_out"], mask)
    correct = (jnp.argmax(logits, axis=-1) == batch["tgt_out"]) & mask
    sums = {"count": count, "sum_loss": sum_nll, "sum_accuracy": jnp.sum(correct, dtype=jnp.float32)}
    return sum_nll / jnp.maximum(count, 1).astype(jnp.float32), sums


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_new_tokens", "length_penalty"))
def _decode_jit(model, variables, src, src_mask, *, length_penalty, beam_size, max_new_tokens):
    encoded = model.apply(variables, src, src_mask, method="encode")
    state = model.apply(variables, encoded, src_mask, max_new_tokens + 1, method="init_state")
    bos = jnp.full((src.shape[0], 1), BOS, jnp.int32)
    seqs, _ = decoding.beam_search(model, variables, bos, beam_size=beam_size, max_new_tokens=max_new_tokens,
                                   end_id=EOS, length_penalty=length_penalty, state=state)
    return seqs[:, 0, 1:]  # the best hypothesis, BOS dropped


def decode(model, variables, src, src_mask=None, *, beam_size: int, max_new_tokens: int,
           length_penalty: float = 0.0) -> np.ndarray:
    """Beam-search translations of a batch: src [B, ...] -> int32 [B, max_new_tokens] (EOS then EOS padding).

    beam_size 1 is greedy decoding; length_penalty is GNMT's alpha (`jaxseq.decoding.beam_search`).
    """
    if beam_size < 1:
        raise ConfigError(f"beam_size must be >= 1, got {beam_size}.")
    return np.asarray(_decode_jit(model, variables, jnp.asarray(src), None if src_mask is None else jnp.asarray(src_mask),
                                  length_penalty=float(length_penalty), beam_size=int(beam_size),
                                  max_new_tokens=int(max_new_tokens)))


def scores(hypotheses: list[str], references: list[str], *, bleu_tokenize: str = "13a") -> dict:
    """Corpus BLEU and chrF (sacrebleu, one reference each) and exact match, as percentages.

    bleu_tokenize: sacrebleu's tokenizer: "13a" (words, its default) or "char" (character n-grams, for
    targets that are single long words such as German number compounds).
    """
    if len(hypotheses) != len(references) or not references:
        raise DataError(f"scores needs one hypothesis per reference, got {len(hypotheses)} and {len(references)}.")
    try:
        import sacrebleu
    except ImportError as e:
        raise ConfigError("BLEU and chrF need sacrebleu: pip install 'jaxseq[tasks]' (or pip install sacrebleu).") from e
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=bleu_tokenize)
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    return {"bleu": float(bleu.score), "chrf": float(chrf.score), "exact_match": 100.0 * exact}
