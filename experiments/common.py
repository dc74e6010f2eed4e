"""What the desiderata, long-range and vanishing-gradient experiments share: the model families at comparable
sizes, and one training run of a family on a probe task (`jaxseq.tasks.probes`).

Sizes (`family_sections`): 23-34k parameters in each gradient-trained model, so a family wins by its
structure, not its width. The classic cells are one layer, as in the lecture; the linear recurrences
(minGRU, LRU) are two residual pre-norm blocks, the form their papers train (one linear layer cannot
mix information across time nonlinearly). The conv LM has 7 dilated blocks: a receptive field of 129
tokens, by design shorter than the longest distances probed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from jaxseq.config import (AdditiveConfig, ConvConfig, NGramConfig, OptimConfig, RNNConfig, TrainConfig,
                           TransformerConfig)
from jaxseq.tasks.probes import Probes
from jaxseq.train import train

# The rows of the lecture's table, then the linear recurrences beyond it.
FAMILIES = ("ngram", "additive", "rnn", "lstm", "gru", "conv", "transformer", "mingru", "lru")
GRADIENT_FREE = frozenset({"ngram"})


def family_sections(family: str, quick: bool, max_len: int = 256) -> dict:
    """The TrainConfig section of `family` (tiny when quick); max_len: the Transformer's learned positions."""
    if quick:
        return {"rnn": RNNConfig(d_embed=8, d_hidden=8), "additive": AdditiveConfig(d_embed=8, d_hidden=8),
                "conv": ConvConfig(channels=8, dilation_cycle=2), "ngram": NGramConfig(order=3),
                "transformer": TransformerConfig(num_layers=1, num_heads=2, d_model=8, d_ff=16, max_len=max_len)}
    return {
        "ngram": {"ngram": NGramConfig(order=7)},
        "additive": {"additive": AdditiveConfig(d_embed=128, d_hidden=128)},
        "rnn": {"rnn": RNNConfig(d_embed=32, d_hidden=128)},
        "lstm": {"rnn": RNNConfig(d_embed=32, d_hidden=64)},
        "gru": {"rnn": RNNConfig(d_embed=32, d_hidden=72)},
        "mingru": {"rnn": RNNConfig(d_embed=64, d_hidden=64, num_layers=2, residual=True)},
        "lru": {"rnn": RNNConfig(d_embed=48, d_hidden=48, num_layers=2, residual=True)},
        "conv": {"conv": ConvConfig(channels=26, dilation_cycle=7)},
        "transformer": {"transformer": TransformerConfig(num_layers=2, num_heads=4, d_model=40, d_ff=80,
                                                         max_len=max_len)},
    }[family]


def probe_config(family: str, probe: Probes, *, steps: int, run_dir: Path, seed: int = 0, quick: bool = False,
                 grad_clip: float = 1.0) -> TrainConfig:
    """One run of `family` on `probe`: `steps` steps of Adam (warm-up then cosine), evaluated at the end."""
    return TrainConfig(task="probes", model=family, probes=probe, steps=steps, eval_every=steps,
                       checkpoint_every=steps, eval_batches=1 << 20, seed=seed, run_dir=str(run_dir),
                       progress=False, optim=OptimConfig(warmup_steps=min(100, max(1, steps // 10)),
                                                         grad_clip=grad_clip),
                       **family_sections(family, quick, max_len=max(64, probe.max_len())))


def param_count(run_dir) -> int:
    """Trained (gradient) parameters of a saved run; 0 for a count model."""
    from jaxseq.run import is_count_model, load_run

    run = load_run(run_dir)
    if is_count_model(run.model):
        return 0
    return int(sum(np.size(p) for p in jax.tree.leaves(run.variables["params"])))


def train_probe(family: str, probe: Probes, *, steps: int, run_root, seed: int = 0, quick: bool = False,
                tag: str = "", grad_clip: float = 1.0) -> dict:
    """Train `family` on `probe`; the result row: test accuracy (and at 2x / 4x length), params, wall time."""
    run_dir = Path(run_root) / f"{probe.probe}{tag}-{family}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short earlier is started again, not resumed
    t0 = time.perf_counter()
    summary = train(None, None, probe_config(family, probe, steps=steps, run_dir=run_dir, seed=seed, quick=quick,
                                             grad_clip=grad_clip))
    report = summary["report"]
    row = {"family": family, "probe": probe.probe, "accuracy": report["accuracy"], "test_loss": report["loss"],
           "steps": summary["steps"], "params": param_count(run_dir), "seed": seed,
           "wall_s": round(time.perf_counter() - t0, 1), "load_1min": round(os.getloadavg()[0], 2)}
    row.update({k: v for k, v in report.items() if k.startswith("accuracy_")})
    return row
