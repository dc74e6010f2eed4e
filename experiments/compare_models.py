"""The lecture's comparison: n-gram / additive / RNN / LSTM / GRU (/ Transformer) on one corpus, one split.

Each model is trained with the defaults of `jaxseq train` (plus any overrides below) and
evaluated on the same held-out text: the task's final report (`CharLM.evaluate`, the whole validation
split, `val_tokens` tokens); the table gives validation loss in nats and bits per character and the
wall time of each run.

    python experiments/compare_models.py --source ../shared/data/tinyshakespeare.txt \
        --models ngram additive rnn lstm gru --out benchmarks/results/cpu-compare.jsonl

Expected on tinyshakespeare (nanoGPT's 90/10 split, 2-core CPU): the n-gram (order 7) near
1.61 nats/char; the order-blind additive model at 3.23, barely below the unigram's 3.35 (a
mean over the whole prefix keeps topic, not syntax, and a play has one topic); the LSTM
below nanoGPT's small-CPU 1.88 within 10 minutes. The measured table is the README's
"Results".
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from jaxseq.config import TrainConfig
from jaxseq.train import train


@dataclass(frozen=True)
class Args:
    source: str = "stdlib"
    models: tuple[str, ...] = ("ngram", "additive", "rnn", "lstm", "gru")
    run_root: str = "runs/compare"
    # Seconds of training per gradient-trained model (0: the default number of steps).
    time_limit_s: float = 0.0
    steps: int = 0  # 0: TrainConfig's default
    out: str = ""  # JSON-lines file to append results to
    quick: bool = False  # seconds, tiny sizes (what tests/test_experiments.py runs); writes no results
    base: TrainConfig = field(default_factory=TrainConfig)


def quick_base(base: TrainConfig) -> TrainConfig:
    """Tiny sizes for every family: the pulse test's form."""
    return dataclasses.replace(
        base, steps=4, eval_every=4, checkpoint_every=4, eval_batches=2,
        char_lm=dataclasses.replace(base.char_lm, seq_len=16, batch_size=4),
        rnn=dataclasses.replace(base.rnn, d_embed=8, d_hidden=16), ngram=dataclasses.replace(base.ngram, order=3),
        additive=dataclasses.replace(base.additive, d_embed=8),
        transformer=dataclasses.replace(base.transformer, num_layers=1, d_model=16, d_ff=32, max_len=16))


def run_one(args: Args, model: str) -> dict:
    base = quick_base(args.base) if args.quick else args.base
    config = dataclasses.replace(
        base,
        model=model,
        char_lm=dataclasses.replace(base.char_lm, source=args.source),
        run_dir=str(Path(args.run_root) / model),
        time_limit_s=args.time_limit_s,
        steps=args.steps or (4 if args.quick else args.base.steps),
        progress=False,
    )
    t0 = time.perf_counter()
    summary = train(None, None, config)
    report = summary["report"]  # the whole validation split, the same for every model (counted or trained)
    return {"model": model, "source": args.source, "val_loss": report["loss"], "val_bits": report["bits"],
            "val_tokens": report["count"], "steps": summary["steps"], "wall_s": round(time.perf_counter() - t0, 1),
            "tokens_per_s": summary["items_per_s"], "stopped": summary["stopped"]}


def main(args: Args) -> list[dict]:
    rows = []
    for model in args.models:
        row = run_one(args, model)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out and not args.quick:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| model | val nats/char | val bits/char | steps | wall s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['val_loss']:.3f} | {r['val_bits']:.3f} | {r['steps']} | {r['wall_s']:.0f} |")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
