"""Model families, one file each, and the one table that names them (DESIGN.md, "Models").

`MODELS[name]` says which TrainConfig section sizes the model, which task interfaces it serves, and
how to build it for a task's `spec` (`Task.model_spec(data)`: {"interface": "lm", "vocab_size": V} or
{"interface": "classifier", "num_classes": C, "d_input": D} (feature series) or {"interface":
"documents", "num_classes": C, "vocab_size": V, "pool": "mean" | "last"} (token documents: a
`TokenClassifier` over the family's language model), or {"interface": "seq2seq", "source": "tokens" |
"image", "src_vocab_size": V_s, "vocab_size": V_t}, or {"interface": "frames", "d_frame": P} (binary
frames such as piano rolls: jaxseq.models.frames), or {"interface": "images", "height": H, "width": W,
"levels": L} (grey images pixel by pixel: jaxseq.models.pixelrnn)). The CLI's `--model` choices, the
checkpoint's architecture check and `build_model` all read this table, so a new cell needs its class
and one line below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from jaxseq import cells as C
from jaxseq import linear_cells as L
from jaxseq.cells import stack
from jaxseq.errors import ConfigError

LM, CLASSIFIER, SEQ2SEQ = "lm", "classifier", "seq2seq"
DOCUMENTS = "documents"  # classifying token documents: a TokenClassifier over a language model's body
AUDIO = "audio"  # mu-law audio codes with a speaker id ({"levels": 256, "num_speakers": S}): jaxseq.models.wavenet
FRAMES = "frames"  # binary frames (piano rolls), a Bernoulli per unit: jaxseq.models.frames
IMAGES = "images"  # images pixel by pixel, {"height", "width", "levels"}: jaxseq.models.pixelrnn


@dataclass(frozen=True)
class ModelEntry:
    section: str  # the TrainConfig field holding the model's size: "rnn", "transformer", ...
    serves: frozenset  # task interfaces it implements
    build: Callable[[Any, dict, str], Any]  # (section config, task spec, kernels policy) -> linen module


def recurrent(make_layer):
    """Builder of a recurrent LM or classifier whose layers are `make_layer(d_in, rnn_config)` cells."""

    def build(r, spec, kernels):
        if r.num_layers < 1:
            raise ConfigError(f"--rnn.num-layers must be >= 1, got {r.num_layers}.")
        first = make_layer(r.d_embed, r)
        layers = [first] + [make_layer(first.d_out, r) for _ in range(r.num_layers - 1)]
        cell = layers[0] if len(layers) == 1 else stack(layers, residual=r.residual, dropout=r.dropout)
        if spec["interface"] == FRAMES:
            from jaxseq.models.frames import FrameRNN

            return FrameRNN(spec["d_frame"], cell, d_embed=r.d_embed, dropout=r.dropout, kernels=kernels)
        if spec["interface"] == AUDIO:
            from jaxseq.models.wavenet import MuLawRNN

            return MuLawRNN(cell, levels=spec["levels"], num_speakers=spec["num_speakers"], d_embed=r.d_embed,
                            kernels=kernels)
        if spec["interface"] == DOCUMENTS:
            return token_classifier(build(r, {"interface": LM, "vocab_size": spec["vocab_size"]}, kernels), spec)
        if spec["interface"] == CLASSIFIER:
            from jaxseq.models.classifier import SequenceClassifier

            return SequenceClassifier(num_classes=spec["num_classes"], cell=cell, d_embed=r.d_embed,
                                      dropout=r.dropout, kernels=kernels)
        from jaxseq.models.rnn_lm import RecurrentLM

        return RecurrentLM(vocab_size=spec["vocab_size"], cell=cell, d_embed=r.d_embed, dropout=r.dropout,
                           kernels=kernels)

    return build


def token_classifier(lm, spec: dict):
    """A classifier of token documents over `lm`'s body (`TokenClassifier`), for a classifier `spec`."""
    from jaxseq.models.classifier import TokenClassifier

    return TokenClassifier(body=lm, num_classes=spec["num_classes"], pool=spec.get("pool", "mean"))


def _transformer(t, spec, kernels):
    if spec["interface"] == FRAMES:
        from jaxseq.models.frames import build_frame_transformer

        return build_frame_transformer(t, spec, kernels)
    if spec["interface"] == DOCUMENTS:
        return token_classifier(_transformer(t, {"interface": LM, "vocab_size": spec["vocab_size"]}, kernels), spec)
    if spec["interface"] == SEQ2SEQ:
        if spec["source"] != "tokens":
            raise ConfigError(f"--model transformer encodes token sources, not {spec['source']} sources; "
                              f"choose an RNN encoder-decoder (e.g. lstm-bahdanau).")
        from jaxseq.models.encdec import TransformerSeq2Seq

        return TransformerSeq2Seq.from_config(t, spec["src_vocab_size"], spec["vocab_size"], kernels=kernels)
    from jaxseq.models.transformer import TransformerLM

    return TransformerLM.from_config(t, spec["vocab_size"], kernels=kernels)


def pixel_model(name: str):
    """Builder of an image model for an images `spec` ({"height", "width", "levels"}): "row-lstm",
    "diagonal-bilstm" (jaxseq.models.pixelrnn) or "pixel-lstm" (jaxseq.models.pixel_lstm)."""

    def build(p, spec, kernels):
        for field in ("d_hidden", "num_layers", "d_head"):
            if getattr(p, field) < 1:
                raise ConfigError(f"--pixelrnn.{field.replace('_', '-')} must be >= 1, got {getattr(p, field)}.")
        sizes = {"levels": spec["levels"], "height": spec["height"], "width": spec["width"]}
        if name == "pixel-lstm":
            from jaxseq.models.pixel_lstm import PixelLSTM

            return PixelLSTM(**sizes, d_hidden=p.d_hidden, num_layers=p.num_layers, kernels=kernels)
        from jaxseq.models.pixelrnn import PixelRNN

        if p.first_kernel < 1 or p.first_kernel % 2 == 0:
            raise ConfigError(f"--pixelrnn.first-kernel must be odd and >= 1, got {p.first_kernel}.")
        return PixelRNN(**sizes, kind="row" if name == "row-lstm" else "diagonal", d_hidden=p.d_hidden,
                        num_layers=p.num_layers, d_head=p.d_head, first_kernel=p.first_kernel, kernels=kernels)

    return build


def seq2seq(cell_kind: str, score: str | None):
    """Builder of an RNN encoder-decoder over `cell_kind` cells; score: None, "bahdanau" or "luong"."""

    def build(s, spec, kernels):
        from jaxseq.models.seq2seq import build_rnn_seq2seq

        return build_rnn_seq2seq(s, spec, kernels, cell_kind=cell_kind, score=score)

    return build


def _ngram(n, spec, kernels):
    from jaxseq.models.ngram import NGramLM

    return NGramLM.from_config(n, spec["vocab_size"])


def _additive(a, spec, kernels):
    from jaxseq.models.additive import AdditiveLM

    lm = AdditiveLM.from_config(a, spec["vocab_size"])
    return token_classifier(lm, spec) if spec["interface"] == DOCUMENTS else lm


def _conv(c, spec, kernels):
    from jaxseq.models.conv_lm import ConvLM

    lm = ConvLM(spec["vocab_size"], channels=c.channels, kernel_size=c.kernel_size,
                dilation_cycle=c.dilation_cycle, repeats=c.repeats)
    return token_classifier(lm, spec) if spec["interface"] == DOCUMENTS else lm


def _wavenet(w, spec, kernels):
    from jaxseq.models.wavenet import build_wavenet

    return build_wavenet(w, spec)


SEQUENCE = frozenset({LM, CLASSIFIER, DOCUMENTS, FRAMES})
# --rnn.residual also makes each linear cell the papers' pre-norm block (see jaxseq.linear_cells).
MODELS: dict[str, ModelEntry] = {
    "ngram": ModelEntry("ngram", frozenset({LM}), _ngram),
    "additive": ModelEntry("additive", frozenset({LM, DOCUMENTS}), _additive),
    "rnn": ModelEntry("rnn", SEQUENCE, recurrent(lambda d, r: C.Elman(d, r.d_hidden, nonlinearity=r.nonlinearity))),
    "lstm": ModelEntry("rnn", SEQUENCE, recurrent(lambda d, r: C.LSTM(d, r.d_hidden))),
    "gru": ModelEntry("rnn", SEQUENCE, recurrent(lambda d, r: C.GRU(d, r.d_hidden))),
    "conv": ModelEntry("conv", frozenset({LM, DOCUMENTS}), _conv),
    "transformer": ModelEntry("transformer", frozenset({LM, DOCUMENTS, SEQ2SEQ, FRAMES}), _transformer),
    "mingru": ModelEntry("rnn", SEQUENCE, recurrent(lambda d, r: L.MinGRU(d, r.d_hidden, norm=r.residual))),
    "minlstm": ModelEntry("rnn", SEQUENCE, recurrent(lambda d, r: L.MinLSTM(d, r.d_hidden, norm=r.residual))),
    "lru": ModelEntry("rnn", SEQUENCE, recurrent(lambda d, r: L.LRU(d, r.d_hidden, norm=r.residual, glu=r.residual))),
}
# PixelRNN (--pixelrnn.*): Row LSTM, Diagonal BiLSTM, and the baseline LSTM over the flattened pixels.
for _name in ("row-lstm", "diagonal-bilstm", "pixel-lstm"):
    MODELS[_name] = ModelEntry("pixelrnn", frozenset({IMAGES}), pixel_model(_name))
# Encoder-decoders (--seq2seq.*): Sutskever et al. without attention; Bahdanau's additive and Luong's
# multiplicative attention (jaxseq.attention_cells).
for _kind in ("rnn", "lstm", "gru"):
    for _suffix, _score in (("seq2seq", None), ("bahdanau", "bahdanau"), ("luong", "luong")):
        MODELS[f"{_kind}-{_suffix}"] = ModelEntry("seq2seq", frozenset({SEQ2SEQ}), seq2seq(_kind, _score))
# Audio (--task audio): WaveNet (--wavenet.*), and the recurrent families over samples as its baseline.
MODELS["wavenet"] = ModelEntry("wavenet", frozenset({AUDIO}), _wavenet)
for _kind in ("rnn", "lstm", "gru", "mingru", "minlstm", "lru"):
    MODELS[_kind] = ModelEntry(MODELS[_kind].section, MODELS[_kind].serves | {AUDIO}, MODELS[_kind].build)


def build_model(config, spec: dict):
    """The linen module for `config.model`, shaped for a task's `spec` (see the module docstring).

    config: a `jaxseq.config.TrainConfig`; spec: `task.model_spec(data)`.
    """
    name = config.model
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    entry = MODELS[name]
    if spec["interface"] not in entry.serves:
        fits = ", ".join(n for n, e in MODELS.items() if spec["interface"] in e.serves)
        raise ConfigError(f"--model {name} does not serve the {spec['interface']} interface of --task "
                          f"{config.task}; choose one of {fits}.")
    return entry.build(getattr(config, entry.section), spec, config.kernels)
