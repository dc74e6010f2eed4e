"""Typed, frozen configuration. The `jaxseq` command parses these with tyro.

`jaxseq train --model lstm --rnn.d-hidden 512 --char-lm.source path/to/text.txt`
`jaxseq train --task mnist1d --model gru --mnist1d.shuffle`
`jaxseq train --task translation --model lstm-bahdanau --seq2seq.d-hidden 256`
Each task has its own section (the task dataclass itself: `--char-lm.*`, `--mnist1d.*`, `--translation.*`,
`--captioning.*`) and each model family its own (`--rnn.*`, `--ngram.*`, `--additive.*`, `--transformer.*`,
`--seq2seq.*`); only the sections of the
chosen `--task` and `--model` are used, and only the model's section (with the task, the model name and
`--kernels`) counts when a resumed run is checked against its checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from jaxseq.models import MODELS
from jaxseq.tasks import TASKS
from jaxseq.tasks.audio import Audio
from jaxseq.tasks.captioning import Captioning
from jaxseq.tasks.char_lm import CharLM
from jaxseq.tasks.images import Images
from jaxseq.tasks.mnist1d import MNIST1D
from jaxseq.tasks.music import Music
from jaxseq.tasks.probes import Probes
from jaxseq.tasks.stdlib_docs import StdlibDocs
from jaxseq.tasks.translation import Translation

# Which library runs the matmuls of a jitted step on CPU (see jaxseq.xla_options).
CpuDots = Literal["auto", "ynn", "xla"]

# The choices come from the model and task tables (one line each there).
ModelKind = Literal[tuple(MODELS)]  # type: ignore[valid-type]
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
KernelPolicy = Literal["auto", "reference"]


# Each field's description is the string right below it: tyro shows it in `jaxseq train --help`. (Comments
# above a field are not safe there: tyro also gives them to the undescribed fields that follow.) tyro keeps
# the line breaks of these strings, so each line ends where a sentence or clause does.


@dataclass(frozen=True)
class RNNConfig:
    """Embedding -> stacked recurrent cells -> softmax. Used by --model rnn|lstm|gru (and the linear cells)."""

    d_embed: int = 64
    """Width of the token embedding, the first layer's input."""
    d_hidden: int = 512
    """Hidden size of each recurrent layer (the LRU's state size; its layers keep the width d_embed)."""
    num_layers: int = 1
    """Recurrent layers, stacked."""
    dropout: float = 0.0
    """Dropout between stacked layers, in training only."""
    residual: bool = False
    """A residual connection around each layer whose input and output widths match.
    (Linear cells: the papers' pre-norm block.)"""
    nonlinearity: Literal["tanh", "relu"] = "tanh"
    """The Elman cell's activation (--model rnn only)."""


@dataclass(frozen=True)
class NGramConfig:
    """Count-based n-gram with add-k smoothing, interpolated with all lower orders."""

    order: int = 7
    """n: the longest context is the last n - 1 tokens."""
    add_k: float = 0.001
    """Pseudo-count added at every order.
    Measured on tinyshakespeare (val nats/char): order 8 with add_k 0.001 gives 1.605;
    add_k 0.1 stalls at 1.699 (6.5 pseudo-counts per context drown the high orders)."""
    lambdas: str = ""
    """Interpolation weights of orders 1..n, comma-separated and summing to 1, e.g. "0.1,0.3,0.6".
    "" fits them on held-out training text."""


@dataclass(frozen=True)
class AdditiveConfig:
    """The order-blind bag-of-context model: softmax(W @ reduce(embed(x_<t)))."""

    d_embed: int = 256
    """Width of the token embedding."""
    reduce: Literal["sum", "mean"] = "mean"
    """How the embeddings of the tokens before t are combined."""
    d_hidden: int = 0
    """> 0: a tanh hidden layer of this width between the context vector and the softmax."""


@dataclass(frozen=True)
class ConvConfig:
    """The causal convolutional LM (--model conv): gated residual blocks of dilated causal convolutions."""

    channels: int = 128
    """Width of every block."""
    kernel_size: int = 2
    """Taps per convolution."""
    dilation_cycle: int = 8
    """Blocks per cycle, dilated 1, 2, ..., 2^(cycle-1) (8: a receptive field of 256 tokens at kernel 2)."""
    repeats: int = 1
    """Cycles of blocks."""


@dataclass(frozen=True)
class TransformerConfig:
    """GPT-style pre-LayerNorm decoder."""

    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention (query) heads; d_model must be a multiple."""
    d_model: int = 128
    """Width of the residual stream."""
    d_ff: int = 512
    """Width of each block's MLP."""
    max_len: int = 256
    """Longest context the model takes (the size of learned positions)."""
    dropout: float = 0.0
    """Dropout on the embeddings and both residual branches, in training only."""
    positional: Literal["learned", "sinusoidal", "rope"] = "learned"
    """Position encoding: learned or sinusoidal embeddings added to the tokens', or rotary (RoPE)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    num_kv_heads: int | None = None
    """Key/value heads: None = num_heads (multi-head), 1 = multi-query, a divisor of num_heads = grouped-query."""


@dataclass(frozen=True)
class WaveNetConfig:
    """WaveNet over mu-law audio (--model wavenet): dilated causal convolutions, gated units, speaker conditioning."""

    channels: int = 32
    """Width of the residual stream (each dilated convolution outputs twice this for the gate)."""
    skip_channels: int = 64
    """Width of the skip connections' sum and of the output layers."""
    dilation_cycle: int = 8
    """Layers per block, dilated 1, 2, ..., 2^(cycle-1)."""
    repeats: int = 2
    """Blocks of dilation_cycle layers (the defaults: a receptive field of 512 samples)."""
    kernel_size: int = 2
    """Taps of each dilated convolution."""


@dataclass(frozen=True)
class Seq2SeqConfig:
    """RNN encoder-decoders: --model lstm-seq2seq (no attention), lstm-bahdanau, lstm-luong (and gru-*, rnn-*)."""

    d_embed: int = 64
    """Width of the source and target token embeddings."""
    d_hidden: int = 128
    """Hidden size of the decoder, and the width of the encoder's memory (split between directions)."""
    encoder_layers: int = 1
    """Recurrent layers of the text encoder, stacked."""
    decoder_layers: int = 1
    """Recurrent layers of the decoder, stacked."""
    bidirectional: bool = True
    """Bidirectional text encoder (each direction d_hidden / 2 wide)."""
    d_attention: int | None = 64
    """Width of Bahdanau's scoring layer (None: d_hidden). Its tanh over [batch, source, width] at every
    decoder step is most of the step's time on CPU."""
    luong_score: Literal["general", "dot"] = "general"
    """Luong's score: h . W m ("general") or h . m ("dot")."""
    input_feeding: bool = True
    """Luong's input feeding: the previous attentional vector is part of the next input."""
    dropout: float = 0.0
    """Dropout on embeddings and decoder outputs, and between stacked layers (but a stacked cell under
    attention), in training only."""
    cnn_channels: int = 32
    """Channels of the image encoder's convolutions (captioning)."""
    cnn_layers: int = 3
    """3x3 convolutions of the image encoder; each after the first halves the grid."""


@dataclass(frozen=True)
class PixelRNNConfig:
    """PixelRNN (--model row-lstm | diagonal-bilstm) and its baseline, one LSTM over the flattened pixels
    (--model pixel-lstm)."""

    d_hidden: int = 32
    """h: state channels of each LSTM; the residual stream between layers is 2h wide.
    pixel-lstm: the width of its LSTM and pixel embedding."""
    num_layers: int = 2
    """Recurrent layers, each with a residual connection (pixel-lstm: stacked LSTMs)."""
    d_head: int = 64
    """Width of the hidden 1x1 layer before the softmax (the paper's 1024)."""
    first_kernel: int = 7
    """Size of the first, mask-A convolution (odd; the paper's 7)."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, gradient clipping by global norm."""

    lr: float = 3e-3
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr_ratio: float = 0.1
    """The learning rate at the last step, as a fraction of lr (in [0, 1])."""
    warmup_steps: int = 100
    """Steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, applied to matrices only (not to biases or norm scales)."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm; <= 0 turns clipping off."""
    b1: float = 0.9
    """Adam's first-moment decay."""
    b2: float = 0.99
    """Adam's second-moment decay."""
    body_lr_ratio: float = 1.0
    """The learning rate of a classifier's language-model body (the parameters under "body", e.g. loaded
    with --init-from) as a fraction of lr; 0 freezes the body, so only the new head trains."""


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: `--mesh.data 8`, `--mesh.fsdp 2`; -1 fills with the devices there are."""

    data: int = -1
    """Devices along the data-parallel axis (-1: all the devices the fsdp axis leaves)."""
    fsdp: int = 1
    """Devices along the axis that shards parameters and optimizer state (FSDP)."""


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up. Empty values fall back to JAXSEQ_COORDINATOR / JAXSEQ_NUM_PROCESSES /
    JAXSEQ_PROCESS_ID, then to no distribution (one process)."""

    coordinator: str = ""
    """host:port of process 0's coordination service."""
    num_processes: int = 0
    """Processes in the run (0: from the environment, else one)."""
    process_id: int = -1
    """This process's index, 0..num_processes-1 (-1: from the environment)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults train a character LSTM on the stdlib corpus in a few minutes on 2 cores."""

    task: TaskName = "char_lm"
    """What to learn; its section (--char-lm.*, --mnist1d.*, --stdlib-docs.*, --translation.*,
    --captioning.*, --images.*, --probes.*, --music.*, --audio.*) sets its data and batches."""
    model: ModelKind = "lstm"
    """The model family; its section (--rnn.*, --ngram.*, --additive.*, --transformer.*, --conv.*,
    --seq2seq.*, --pixelrnn.*, --wavenet.*) sets its size."""
    kernels: KernelPolicy = "auto"
    """Which implementations run the recurrences and attention: "auto" (the fastest eligible one on this
    machine, see jaxseq.kernels) or "reference" (lax.scan of each cell's step; XLA's dense attention).
    Saved with the run; a resume must use the same."""
    rnn: RNNConfig = field(default_factory=RNNConfig)
    ngram: NGramConfig = field(default_factory=NGramConfig)
    additive: AdditiveConfig = field(default_factory=AdditiveConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    conv: ConvConfig = field(default_factory=ConvConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    wavenet: WaveNetConfig = field(default_factory=WaveNetConfig)
    pixelrnn: PixelRNNConfig = field(default_factory=PixelRNNConfig)
    char_lm: CharLM = field(default_factory=CharLM)
    mnist1d: MNIST1D = field(default_factory=MNIST1D)
    stdlib_docs: StdlibDocs = field(default_factory=StdlibDocs)
    translation: Translation = field(default_factory=Translation)
    captioning: Captioning = field(default_factory=Captioning)
    audio: Audio = field(default_factory=Audio)
    images: Images = field(default_factory=Images)
    music: Music = field(default_factory=Music)
    probes: Probes = field(default_factory=Probes)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Mixed precision. Parameters and optimizer state stay float32, so checkpoints do not depend on it.
    "bfloat16" runs the forward and backward in bfloat16, with float32 logits and loss."""
    cpu_dots: CpuDots = "auto"
    """Which library runs the matmuls on CPU (ignored elsewhere; see jaxseq.xla_options).
    "auto": YNNPACK for the Transformers, whose per-head matmuls XLA's own emitter runs on one thread;
    XLA's defaults for the rest."""
    steps: int = 1500
    """Optimizer steps in the whole run (a resumed run continues to this total)."""
    eval_every: int = 250
    """Steps between evaluations on the validation text."""
    eval_batches: int = 16
    """Validation batches per evaluation."""
    checkpoint_every: int = 250
    """Steps between checkpoints (one is also saved at the end, and on SIGTERM / SIGINT)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in run_dir; older ones are deleted."""
    max_nonfinite_steps: int = 5
    """Stop with an error after this many steps in a row whose loss or gradient norm was not finite.
    (Such a step changes nothing; 0 never stops.)"""
    seed: int = 0
    """Seed of the initialisation, the data order and dropout."""
    run_dir: str = "runs/default"
    """Where checkpoints, metrics and the config are written."""
    resume: bool = False
    """Continue the run in run_dir from its last checkpoint (a run is never overwritten without it)."""
    init_from: str = ""
    """Start from the weights of another run (e.g. a pretrained language model): every parameter of its
    model that this model has (a classifier's "body": embeddings and layers) is loaded, the rest starts
    fresh; the vocabulary comes from that run. Sizes must match. See --optim.body-lr-ratio."""
    time_limit_s: float = 0.0
    """Stop after this many seconds of training (0 = no limit); checkpoints and evaluates first."""
    progress: bool = True
    """Show a progress bar."""


def model_section(config: TrainConfig):
    """The config section that defines the chosen model's architecture (from the model table)."""
    return getattr(config, MODELS[config.model].section)


def task_section(config: TrainConfig):
    """The chosen task: its dataclass is its config section."""
    return getattr(config, config.task)


def to_dict(config) -> dict:
    """The config as plain JSON values (tuples become lists), so it equals what a run directory stores."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls, d: dict):
    """Rebuild a (nested) frozen dataclass from `to_dict` output, ignoring unknown keys."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k not in hints:
            continue
        f = hints[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            kwargs[k] = from_dict(type(default), v)
        elif isinstance(default, tuple) and isinstance(v, list):
            kwargs[k] = tuple(v)  # JSON has no tuples; a tuple field (e.g. --audio.voices) comes back as one
        else:
            kwargs[k] = v
    return cls(**kwargs)


def architecture(config: TrainConfig) -> dict:
    """What must match for a checkpoint to be restored into this config: task, model, its section, kernels."""
    return {"task": config.task, "model": config.model, "kernels": config.kernels,
            MODELS[config.model].section: to_dict(model_section(config))}


def architecture_hash(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(architecture(config), sort_keys=True).encode()).hexdigest()[:16]
