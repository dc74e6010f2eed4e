"""Long-range memory and its price: recall accuracy against distance, and training cost against length.

Claims (DeepMind/UCL lecture 6, "Sequences and Recurrent Networks": "Tim ... grew up in France ...
speaks fluent French", the clue far back; the MIT 6.S191 lecture and "LSTM is dead, long live
Transformers", Nelson 2019): the plain RNN forgets over long distances and gated cells (LSTM, GRU)
hold on for longer; a convolution sees only its receptive field; attention reaches every position at
once, paying quadratically in the sequence length, while recurrences pay linearly.

Measured:
1. Recall (`--task probes --probes.probe recall`): one key-value pair, D distractors, the query; the
   answer is the value (16 values: chance 1/16). Every family at the same fixed number of steps
   (`steps`, batch 32, seed 0) for each D; accuracy on 1,024 fresh test sequences.
2. Cost: seconds per 1,000 tokens of one training step (forward, backward, Adam) against the sequence
   length T at a constant 8,192 tokens per batch, for LSTM, minGRU, conv and Transformer, each at its
   `experiments/common.py` size; the median of `repeats` timings, the families alternating, compile excluded.

    python experiments/long_range.py                # both parts; results/long_range.{jsonl,png}, long_range_cost.png
    python experiments/long_range.py --quick        # seconds: the pulse test

Measured (seed 0, D = 10 / 30 / 100 / 300; tables in experiments/README.md): Transformer and the
additive bag 1.00 at every distance; minGRU 1.00 to 100, 0.92 at 300; GRU 1.00 to 100, 0.33 at 300;
conv (receptive field 129) 1.00 to 100, chance at 300; LRU 1.00 to 100, chance at 300; LSTM 0.80 at
10, chance beyond; Elman RNN and n-gram at chance. Cost: the Transformer's cost per token relative to
the LSTM's grows from 5x at T = 128 to 13x at 4,096; minGRU and conv stay at 1.5-3.5x.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from common import FAMILIES, family_sections, train_probe
from jaxseq.config import TrainConfig
from jaxseq.losses import lm_loss
from jaxseq.models import build_model
from jaxseq.tasks.probes import Probes

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Args:
    families: tuple[str, ...] = FAMILIES
    """Families of the recall sweep."""
    distances: tuple[int, ...] = (10, 30, 100, 300)
    """Distractors between the pair and the query (the probe takes any: --distances 1000 3000 ...)."""
    steps: int = 1000
    """Training steps of every recall run."""
    cost_families: tuple[str, ...] = ("lstm", "mingru", "conv", "transformer")
    lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    """Sequence lengths of the cost measurement."""
    tokens_per_batch: int = 8192
    repeats: int = 5
    """Timings per (family, length); the median is reported."""
    seed: int = 0
    run_root: str = "runs/long_range"
    out: str = str(RESULTS / "long_range.jsonl")
    resume: bool = False
    """Keep the rows already in `out` and run only the missing (family, distance) and (family, length) cells."""
    quick: bool = False
    """Seconds, tiny sizes: what tests/test_experiments.py runs; writes nothing to results/."""


def recall_sweep(args: Args, done: dict, record) -> list[dict]:
    rows = []
    for D in args.distances:
        probe = Probes(probe="recall", distance=D, num_symbols=16, test_size=64 if args.quick else 1024)
        for family in args.families:
            if ("recall", family, D) in done:
                rows.append(done["recall", family, D])
                continue
            row = train_probe(family, probe, steps=args.steps, run_root=args.run_root, seed=args.seed,
                              quick=args.quick, tag=f"-d{D}")
            row.update(kind="recall", distance=D)
            rows.append(record(row))
    return rows


def cost_sweep(args: Args, done: dict, record) -> list[dict]:
    """Seconds per 1,000 tokens against T; the families alternate at each length, one repeat at a time."""
    rows = []
    for T in args.lengths:
        if all(("cost", f, T) in done for f in args.cost_families):
            rows += [done["cost", f, T] for f in args.cost_families]
            continue
        batch = max(1, args.tokens_per_batch // T)
        times: dict[str, list[float]] = {f: [] for f in args.cost_families}
        steppers = {f: _stepper(f, T, batch, args.quick) for f in args.cost_families}
        for _ in range(args.repeats):
            for family, run in steppers.items():
                times[family].append(run())
        for family in args.cost_families:
            med = float(np.median(times[family]))
            row = {"kind": "cost", "family": family, "length": T, "batch": batch,
                   "s_per_1k_tokens": med / (batch * T) * 1000, "step_s_runs": [round(t, 5) for t in times[family]],
                   "load_1min": round(os.getloadavg()[0], 2)}
            rows.append(record(row))
    return rows


def _stepper(family: str, T: int, batch: int, quick: bool):
    """A compiled training step of `family` on [batch, T] tokens, returned as a no-argument timer."""
    config = TrainConfig(task="char_lm", model=family, **family_sections(family, quick, max_len=T))
    model = build_model(config, {"interface": "lm", "vocab_size": 64})
    tokens = jax.random.randint(jax.random.key(0), (batch, T + 1), 0, 64)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((batch, T), bool)}
    params = model.init(jax.random.key(1), data["inputs"])["params"]
    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, data):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(model, {"params": p}, data)[0])(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = (params, opt.init(params))
    jax.block_until_ready(step(*state, data))  # compile, untimed

    def timed() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(step(*state, data))
        return time.perf_counter() - t0

    return timed


def main(args: Args) -> list[dict]:
    if args.quick:
        args = Args(families=("ngram", "conv"), distances=(3,), steps=4,
                    cost_families=("lstm", "conv"), lengths=(16, 32), tokens_per_batch=64, repeats=1,
                    run_root=args.run_root, out=args.out, resume=args.resume, quick=True)
    out = Path(args.out)
    done = {}
    if args.resume and out.is_file():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[r["kind"], r["family"], r["distance" if r["kind"] == "recall" else "length"]] = r
    if not args.quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in done.values()))

    def record(row: dict) -> dict:  # each row is written as soon as it is measured: a cut run keeps its rows
        print(json.dumps(row), flush=True)
        if not args.quick:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    rows = cost_sweep(args, done, record) + recall_sweep(args, done, record)
    if not args.quick:
        plot(rows, Path(args.out).with_suffix(".png"), Path(args.out).with_name("long_range_cost.png"))
    return rows


def plot(rows: list[dict], recall_path: Path, cost_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    recall = [r for r in rows if r["kind"] == "recall"]
    for i, family in enumerate(dict.fromkeys(r["family"] for r in recall)):
        pts = sorted((r["distance"] * 1.04 ** (i - 4), r["accuracy"]) for r in recall if r["family"] == family)
        ax.plot(*zip(*pts), marker="os^vD<>px"[i % 9], label=family)  # nudged sideways: equal curves stay visible
    ax.axhline(1 / 16, color="grey", ls=":", label="chance")
    ax.set(xscale="log", xlabel="distance D (distractor tokens)", ylabel="recall accuracy",
           title="Recall of a value seen D tokens earlier")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(recall_path, dpi=120)
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(12, 4.2))
    cost = [r for r in rows if r["kind"] == "cost"]
    at = {(r["family"], r["length"]): r["s_per_1k_tokens"] for r in cost}
    base = next(iter(dict.fromkeys(r["family"] for r in cost)))
    for family in dict.fromkeys(r["family"] for r in cost):
        pts = sorted((T, v) for (f, T), v in at.items() if f == family)
        ax.plot(*zip(*pts), marker="o", label=family)
        # the families alternate at each length, so a ratio at one length cancels most of the machine's load
        rel.plot(*zip(*[(T, v / at[base, T]) for T, v in pts]), marker="o", label=family)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (8,192 tokens per batch)",
           ylabel="training seconds per 1,000 tokens", title="Cost per token against length")
    rel.set(xscale="log", xlabel="sequence length T", ylabel=f"cost per token / {base}'s",
            title=f"Cost relative to {base} at the same length")
    ax.legend(fontsize=8)
    rel.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cost_path, dpi=120)


if __name__ == "__main__":
    main(tyro.cli(Args))
