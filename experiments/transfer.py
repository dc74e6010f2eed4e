"""Pretrain, then fine-tune: does pretraining help the Transformer much more than the LSTM?

Claim (the talk "LSTM is dead. Long live Transformers!", L. Nelson, 2019; after Howard & Ruder's ULMFiT
and Radford et al.'s GPT, 2018): a Transformer pretrained as a language model on unlabelled text transfers
to a new task with few labels, where LSTMs transferred poorly; bag-of-words classifiers are the classic
baseline.

Set-up, all on 2 CPU cores, characters as tokens:
- the task: `--task stdlib_docs`, docstrings of ten stdlib packages labelled by package, a test split
  by module; `--stdlib-docs.train-examples N` labels;
- pretraining: one character LM per family on "stdlib-unlabelled" (the stdlib docstrings outside those
  ten packages: no test document, nor any labelled one, is in it), each for the same wall-clock budget.
  The budget becomes a number of steps per family from each family's training speed, measured first in
  alternating short runs (median of `calibration_rounds`), so that the pretraining itself is
  deterministic and a busy machine cannot favour one family;
- families of about the same size: bag of words (the additive model: the mean of character
  embeddings), LSTM (hidden 300, mean pooling), Transformer (2 blocks of width 128, mean pooling);
  each fine-tuned in full (`--init-from`) and trained from scratch, the same steps; plus TF-IDF word
  1-2-grams with logistic regression (scikit-learn) on the same characters.

    python experiments/transfer.py                 # pretrain 3 LMs (--pretrain-s each), then 28 classifiers
    python experiments/transfer.py --quick         # seconds: the pulse test's form

Writes experiments/results/transfer.jsonl (a line per calibration, pretraining and classifier) and
transfer.png (test accuracy against labelled examples).

Measured (seed 0, one run, on 2 CPU cores shared with another job): the 7-minute budget gave the additive
LM 8,289 steps, the LSTM 922, the Transformer 909 (80.8k / 9.0k / 8.9k characters per second), reaching
4.76 / 2.53 / 2.55 validation bits per character (51 min with the 300-step classifiers). Test accuracy (%)
at 50 / 200 / 1000 / all (1,684) labels with 600 classifier steps (`--reuse-pretraining
--finetune-steps 600`, 52 min); the majority class is 32.9%:

    TF-IDF + logistic regression   35.9  46.7  68.0  70.6
    bag of characters, scratch     19.6  26.2  33.8  32.2    pretrained  20.4  23.9  31.2  30.0
    LSTM, scratch                  22.3  27.2  39.3  41.2    pretrained  17.5  23.8  41.9  47.8
    Transformer, scratch           23.9  21.3  26.2  30.3    pretrained  20.0  29.4  45.5  53.5

With 1,000 labels and more, pretraining adds 19-23 points to the Transformer and 3-7 to the LSTM: the
talk's claim, measured. With 50 labels no family gains, every neural classifier stays below the majority
class at 50 and 200, and TF-IDF beats them all at every label count. With 300 classifier steps
(results/transfer_steps300.jsonl) the gains were 18-20 (Transformer) and 11-13 (LSTM): the LSTM from
scratch was under-fitted there (52% of its 1,000 training documents fitted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import tyro

from jaxseq.config import AdditiveConfig, OptimConfig, RNNConfig, TrainConfig, TransformerConfig
from jaxseq.tasks import CharLM, StdlibDocs
from jaxseq.train import train

RESULTS = Path(__file__).parent / "results"
FAMILIES = ("additive", "lstm", "transformer")


@dataclass(frozen=True)
class Args:
    labels: tuple[int, ...] = (50, 200, 1000, 0)
    """Labelled training documents per row (0 = all of them)."""
    families: tuple[str, ...] = FAMILIES
    pretrain_s: float = 420.0
    """Wall-clock budget of each language model's pretraining on this machine, in seconds."""
    calibration_rounds: int = 3
    """Alternating timing runs per family that turn the budget into steps."""
    finetune_steps: int = 300
    """Steps of every classifier run (batch 32), fine-tuned or from scratch."""
    body_lr_ratio: float = 0.3
    """A pretrained body's learning rate as a fraction of the head's (ULMFiT's discriminative fine-tuning;
    1 = one rate for all, 0 = a frozen body)."""
    max_len: int = 128
    """Characters of each document read by the models (and by TF-IDF), and the LMs' training length."""
    reuse_pretraining: bool = False
    """Take the calibration and pretraining rows from `out` and the LMs from `run_root` (an earlier run),
    and train only the classifiers."""
    seed: int = 0
    run_root: str = "runs/transfer"
    out: str = str(RESULTS / "transfer.jsonl")
    quick: bool = False
    """Seconds, tiny sizes: what tests/test_experiments.py runs."""


def sizes(family: str, quick: bool) -> dict:
    """The model section of each family: about 0.4M parameters apart from the embeddings (tiny when quick)."""
    if family == "additive":
        return {"additive": AdditiveConfig(d_embed=16 if quick else 256)}
    if family == "lstm":
        return {"rnn": RNNConfig(d_embed=16, d_hidden=16) if quick else RNNConfig(d_embed=64, d_hidden=300)}
    return {"transformer": TransformerConfig(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=64) if quick
            else TransformerConfig(num_layers=2, num_heads=4, d_model=128, d_ff=512, max_len=128)}


def lm_config(args: Args, family: str, run_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        task="char_lm", model=family, seed=args.seed, run_dir=str(run_dir), progress=False,
        char_lm=CharLM(source="stdlib-unlabelled", seq_len=args.max_len, batch_size=32),
        optim=OptimConfig(warmup_steps=min(100, steps // 10)), steps=steps, eval_every=steps,
        checkpoint_every=steps, eval_batches=2 if args.quick else 16, **sizes(family, args.quick))


def calibrate(args: Args) -> list[dict]:
    """Each family's pretraining speed (characters per second, compile excluded): the median over
    `calibration_rounds` short runs, the families alternating within each round."""
    speeds: dict[str, list[float]] = {f: [] for f in args.families}
    for round_ in range(args.calibration_rounds):
        for family in args.families:
            run_dir = Path(args.run_root) / f"calibrate-{family}-{round_}"
            summary = train(None, None, lm_config(args, family, run_dir, steps=5 if args.quick else 40))
            speeds[family].append(summary["items_per_s"])
    return [{"kind": "calibration", "family": f, "chars_per_s": float(np.median(v)), "chars_per_s_runs": v,
             "pretrain_steps": max(1, int(args.pretrain_s * np.median(v) / (32 * args.max_len)))}
            for f, v in speeds.items()]


def pretrain(args: Args, family: str, steps: int) -> dict:
    """A character LM of `family` on stdlib-unlabelled for `steps` steps; its summary row."""
    run_dir = Path(args.run_root) / f"lm-{family}"
    t0 = time.perf_counter()
    summary = train(None, None, lm_config(args, family, run_dir, steps))
    return {"kind": "pretrain", "family": family, "steps": summary["steps"], "val_bits": summary["report"]["bits"],
            "params": _param_count(run_dir), "wall_s": round(time.perf_counter() - t0, 1),
            "load_1min": round(os.getloadavg()[0], 2)}


def finetune(args: Args, family: str, labels: int, pretrained: bool) -> dict:
    """One classifier run on stdlib_docs with `labels` training documents; its result row."""
    init = "pretrained" if pretrained else "scratch"
    run_dir = Path(args.run_root) / f"cls-{family}-{init}-{labels or 'all'}-{args.finetune_steps}"
    config = TrainConfig(
        task="stdlib_docs", model=family, seed=args.seed, run_dir=str(run_dir), progress=False,
        stdlib_docs=StdlibDocs(max_len=args.max_len, train_examples=labels),
        init_from=str(Path(args.run_root) / f"lm-{family}") if pretrained else "",
        optim=OptimConfig(warmup_steps=min(30, args.finetune_steps // 2),
                          body_lr_ratio=args.body_lr_ratio if pretrained else 1.0), steps=args.finetune_steps,
        eval_every=args.finetune_steps, checkpoint_every=args.finetune_steps, **sizes(family, args.quick))
    t0 = time.perf_counter()
    summary = train(None, None, config)
    report = summary["report"]
    return {"kind": "classifier", "family": family, "init": init, "labels": labels,
            "test_accuracy": report["accuracy"], "test_loss": report["loss"], "test_count": report["count"],
            "params": _param_count(run_dir), "steps": summary["steps"],
            "wall_s": round(time.perf_counter() - t0, 1), "load_1min": round(os.getloadavg()[0], 2)}


def tfidf(args: Args, labels: int) -> dict:
    """TF-IDF of word 1- and 2-grams -> multinomial logistic regression, on the same first max_len characters."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    task = StdlibDocs(max_len=args.max_len, train_examples=labels)
    data = task.prepare()
    texts = {s: [data["tokenizer"].decode(x[m]) for x, m in zip(data[f"x_{s}"], data[f"mask_{s}"])]
             for s in ("train", "test")}
    t0 = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    classifier = LogisticRegression(C=10.0, max_iter=2000)
    classifier.fit(vectorizer.fit_transform(texts["train"]), data["y_train"])
    accuracy = float(np.mean(classifier.predict(vectorizer.transform(texts["test"])) == data["y_test"]))
    return {"kind": "classifier", "family": "tfidf-logreg", "init": "scratch", "labels": labels,
            "test_accuracy": accuracy, "test_count": len(data["y_test"]), "wall_s": round(time.perf_counter() - t0, 1)}


def _param_count(run_dir: Path) -> int:
    from jaxseq.run import load_run

    return int(sum(np.size(p) for p in jax.tree.leaves(load_run(run_dir).variables["params"])))


def main(args: Args) -> list[dict]:
    if args.quick:
        args = dataclasses.replace(args, labels=(50,), families=("lstm",), pretrain_s=0.05, calibration_rounds=1,
                                   finetune_steps=4, max_len=32)
    if args.reuse_pretraining:
        earlier = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
        rows = [r for r in earlier if r["kind"] in ("calibration", "pretrain") and r["family"] in args.families]
    else:
        rows = calibrate(args)
        for row in list(rows):
            print(json.dumps(row), flush=True)
            rows.append(pretrain(args, row["family"], row["pretrain_steps"]))
            print(json.dumps(rows[-1]), flush=True)
    for labels in args.labels:
        rows.append(tfidf(args, labels))
        for family in args.families:
            for pretrained in (False, True):
                rows.append(finetune(args, family, labels, pretrained))
                print(json.dumps(rows[-1]), flush=True)
    meta = {"seed": args.seed, "quick": args.quick, "pretrain_s": args.pretrain_s, "max_len": args.max_len,
            "finetune_steps": args.finetune_steps, "body_lr_ratio": args.body_lr_ratio, "cpu_count": os.cpu_count(), "device": str(jax.devices()[0])}
    rows = [{**meta, **row} for row in rows]  # reused rows keep their own
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot(rows, Path(args.out).with_suffix(".png"))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classifiers = [r for r in rows if r["kind"] == "classifier"]
    data = StdlibDocs().prepare()
    every = len(data["y_train"])  # "labels 0" (all of them) is drawn at this count
    majority = np.bincount(data["y_test"]).max() / len(data["y_test"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(majority, color="black", lw=0.8, ls=":", label="majority class (tkinter)")
    colors = {"additive": "tab:green", "lstm": "tab:blue", "transformer": "tab:red", "tfidf-logreg": "gray"}
    for family in sorted({r["family"] for r in classifiers}):
        for init, style in (("scratch", "--"), ("pretrained", "-")):
            pts = sorted((r["labels"] or every, r["test_accuracy"]) for r in classifiers
                         if r["family"] == family and r["init"] == init)
            if not pts:
                continue
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=colors.get(family), label=f"{family}, {init}")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training documents")
    ax.set_ylabel("test accuracy (10 packages)")
    ax.set_title("stdlib_docs: pretrained on stdlib-unlabelled vs from scratch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(tyro.cli(Args))
