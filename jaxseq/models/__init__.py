"""Model families, one file each, all under the model protocol (DESIGN.md)."""

from __future__ import annotations

from jaxseq.cells import make_cell
from jaxseq.config import MODEL_KINDS, TrainConfig
from jaxseq.errors import ConfigError
from jaxseq.models.rnn_lm import RecurrentLM

RECURRENT_KINDS = ("rnn", "lstm", "gru")


def build_model(config: TrainConfig, vocab_size: int):
    """The linen module for `config.model` with `vocab_size` output classes."""
    kind = config.model
    if kind in RECURRENT_KINDS:
        r = config.rnn
        cell = make_cell(kind, r.d_embed, r.d_hidden, num_layers=r.num_layers, residual=r.residual,
                         dropout=r.dropout, nonlinearity=r.nonlinearity)
        return RecurrentLM(vocab_size=vocab_size, cell=cell, d_embed=r.d_embed, dropout=r.dropout)
    if kind in ("mingru", "minlstm", "lru"):
        from jaxseq.linear_cells import make_linear_cell

        # --rnn.residual also makes each layer the papers' pre-norm block (see make_linear_cell).
        r = config.rnn
        cell = make_linear_cell(kind, r.d_embed, r.d_hidden, num_layers=r.num_layers, residual=r.residual,
                                dropout=r.dropout, block=r.residual)
        return RecurrentLM(vocab_size=vocab_size, cell=cell, d_embed=r.d_embed, dropout=r.dropout)
    if kind == "transformer":
        from jaxseq.models.transformer import TransformerLM

        return TransformerLM.from_config(config.transformer, vocab_size)
    if kind == "ngram":
        from jaxseq.models.ngram import NGramLM

        return NGramLM.from_config(config.ngram, vocab_size)
    if kind == "additive":
        from jaxseq.models.additive import AdditiveLM

        return AdditiveLM.from_config(config.additive, vocab_size)
    raise ConfigError(f"unknown model {kind!r}; choose one of {', '.join(MODEL_KINDS)}.")
