"""Typed, frozen configuration. The `jaxseq` command parses these with tyro.

`jaxseq train --model lstm --rnn.d-hidden 512 --data.source path/to/text.txt`
Each model family has its own section (`--rnn.*`, `--ngram.*`, `--additive.*`,
`--transformer.*`); only the section of the chosen `--model` is used, and only
that section counts when a resumed run is checked against its checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

# Which library runs the matmuls of a jitted step on CPU (see jaxseq.xla_options).
CpuDots = Literal["auto", "ynn", "xla"]

MODEL_KINDS = ("ngram", "additive", "rnn", "lstm", "gru", "transformer", "mingru", "minlstm", "lru")
ModelKind = Literal["ngram", "additive", "rnn", "lstm", "gru", "transformer", "mingru", "minlstm", "lru"]


@dataclass(frozen=True)
class RNNConfig:
    """Embedding -> stacked recurrent cells -> softmax. Used by --model rnn|lstm|gru (and the linear cells)."""

    d_embed: int = 64
    d_hidden: int = 512
    num_layers: int = 1
    dropout: float = 0.0
    residual: bool = False
    nonlinearity: Literal["tanh", "relu"] = "tanh"  # Elman only


@dataclass(frozen=True)
class NGramConfig:
    """Count-based n-gram with add-k smoothing, interpolated with all lower orders."""

    # Measured on tinyshakespeare (val nats/char): order 8 with add_k 0.001 gives 1.605;
    # add_k 0.1 stalls at 1.699 (6.5 pseudo-counts per context drown the high orders).
    order: int = 7
    add_k: float = 0.001
    # Interpolation weights are fitted on held-out training text unless given ("" = fit).
    lambdas: str = ""


@dataclass(frozen=True)
class AdditiveConfig:
    """The order-blind bag-of-context model: softmax(W @ reduce(embed(x_<t)))."""

    d_embed: int = 256
    reduce: Literal["sum", "mean"] = "mean"
    d_hidden: int = 0  # > 0: a tanh hidden layer between the context vector and the softmax


@dataclass(frozen=True)
class TransformerConfig:
    """GPT-style pre-LayerNorm decoder."""

    num_layers: int = 4
    num_heads: int = 4
    d_model: int = 128
    d_ff: int = 512
    max_len: int = 256
    dropout: float = 0.0
    positional: Literal["learned", "sinusoidal", "rope"] = "learned"
    tie_embeddings: bool = True
    # Key/value heads: None = num_heads (multi-head), 1 = multi-query, a divisor of num_heads = grouped-query.
    num_kv_heads: int | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it is cut into batches."""

    # "stdlib" (built from Python's own docstrings, always present), a local file or
    # folder of .txt files, or a Hugging Face hub dataset name (needs the hub cache or network).
    source: str = "stdlib"
    text_column: str = "text"
    val_fraction: float = 0.1
    seq_len: int = 128
    batch_size: int = 32


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, gradient clipping by global norm."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.99


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: `--mesh.data 8`, `--mesh.fsdp 2`; -1 fills with the devices there are."""

    data: int = -1
    fsdp: int = 1


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up. Empty values fall back to JAXSEQ_COORDINATOR / JAXSEQ_NUM_PROCESSES /
    JAXSEQ_PROCESS_ID, then to no distribution (one process)."""

    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults train a character LSTM on the stdlib corpus in a few minutes on 2 cores."""

    model: ModelKind = "lstm"
    rnn: RNNConfig = field(default_factory=RNNConfig)
    ngram: NGramConfig = field(default_factory=NGramConfig)
    additive: AdditiveConfig = field(default_factory=AdditiveConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    # Mixed precision: parameters and optimizer state stay float32 (so checkpoints do not depend on it and it
    # is not part of the architecture); "bfloat16" runs the forward/backward in bfloat16, logits and loss float32.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # Which library runs the matmuls on CPU (ignored elsewhere): "auto" = YNNPACK for the Transformers, whose
    # per-head matmuls XLA's own emitter runs on one thread, XLA's defaults for the rest (jaxseq.xla_options).
    cpu_dots: CpuDots = "auto"
    steps: int = 1500
    eval_every: int = 250
    eval_batches: int = 16
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5
    seed: int = 0
    run_dir: str = "runs/default"
    resume: bool = False
    # Stop after this many seconds of training (0 = no limit); checkpoints and evaluates first.
    time_limit_s: float = 0.0
    progress: bool = True


def model_section(config: TrainConfig):
    """The config section that defines the chosen model's architecture."""
    return {
        "ngram": config.ngram,
        "additive": config.additive,
        "transformer": config.transformer,
    }.get(config.model, config.rnn)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, d: dict):
    """Rebuild a (nested) frozen dataclass from `to_dict` output, ignoring unknown keys."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k not in hints:
            continue
        f = hints[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            kwargs[k] = from_dict(type(default), v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def architecture(config: TrainConfig) -> dict:
    """What must match for a checkpoint to be restored into this config."""
    return {"model": config.model, config.model if config.model in ("ngram", "additive", "transformer") else "rnn": to_dict(model_section(config))}


def architecture_hash(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(architecture(config), sort_keys=True).encode()).hexdigest()[:16]
