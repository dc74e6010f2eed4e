"""The encoding bottleneck: without attention, translation quality falls as sentences get longer.

Claim (the lectures; Cho et al. 2014, "On the properties of neural machine translation", fig. 4;
Bahdanau et al. 2015, fig. 2): an RNN encoder-decoder squeezes the whole source into its final state,
so its BLEU drops as the source grows, most of all past the lengths it was trained on; with attention
(Bahdanau's additive, Luong's multiplicative) each output step reads all encoder states and the drop
disappears, as it does for the Transformer encoder-decoder.

Measured on the offline number task (English number words -> German, `--task translation`): numbers of
1 to 9 digits, training pairs only with sources of at most 60 characters (as RNNsearch-30 trains on
sentences of at most 30 words), test pairs of every length up to ~110 characters, disjoint from the
training numbers. Four models of similar size, the same steps and batches; test BLEU (character
n-grams, since German writes a number as one word) and exact match per source-length bucket, from
beam-search translations (beam 4).

    python experiments/encoding_bottleneck.py             # ~25 min on 2 CPU cores
    python experiments/encoding_bottleneck.py --bible     # also WEB -> RV1909 (apt: sword-text-web sword-text-sparv libsword-utils)
    python experiments/encoding_bottleneck.py --models --bible          # the Bible rows alone
    python experiments/encoding_bottleneck.py --quick     # seconds: the pulse test's form

Writes experiments/results/encoding_bottleneck.jsonl (one line per model: overall and per-bucket BLEU,
exact match, parameters, wall time), encoding_bottleneck.png (BLEU against source length) and
encoding_bottleneck_attention.png (the attention of both attention models over one long test number).
Measured: see experiments/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import tyro

from jaxseq.config import OptimConfig, Seq2SeqConfig, TrainConfig, TransformerConfig
from jaxseq.run import load_run
from jaxseq.tasks import Translation
from jaxseq.tasks.seq2seq_common import scores
from jaxseq.train import train

RESULTS = Path(__file__).parent / "results"
MODELS = ("lstm-seq2seq", "lstm-bahdanau", "lstm-luong", "transformer")
BUCKETS = (0, 20, 40, 60, 80, 100, 1000)  # source length in characters; training sources are <= 60


@dataclass(frozen=True)
class Args:
    models: tuple[str, ...] = MODELS
    """Which models to train (names from the model table)."""
    steps: int = 1500
    """Optimizer steps per model."""
    batch_size: int = 64
    d_hidden: int = 128
    """RNN width (the bidirectional encoder's two directions share it)."""
    d_model: int = 64
    """Transformer width (chosen so its parameter count is close to the RNNs')."""
    train_pairs: int = 40000
    """Numbers drawn for training, before the length filter keeps those of <= train_max_chars characters."""
    train_max_chars: int = 60
    test_pairs: int = 2000
    max_digits: int = 9
    bible: bool = False
    """Also train (b) and (d) on the English-Spanish Bible (when the apt packages are installed)."""
    bible_steps: int = 1500
    run_root: str = "runs/encoding_bottleneck"
    out: str = str(RESULTS / "encoding_bottleneck.jsonl")
    quick: bool = False
    """Seconds, tiny sizes: what tests/test_experiments.py runs."""


def number_task(args: Args) -> Translation:
    if args.quick:
        return Translation(train_pairs=200, val_pairs=16, test_pairs=24, max_digits=4, test_max_digits=4,
                           train_max_source_len=30, batch_size=16, beam_size=2)
    return Translation(train_pairs=args.train_pairs, val_pairs=500, test_pairs=args.test_pairs,
                       max_digits=args.max_digits, test_max_digits=args.max_digits,
                       train_max_source_len=args.train_max_chars, batch_size=args.batch_size, beam_size=4)


def config_for(args: Args, task: Translation, model: str, name: str, steps: int) -> TrainConfig:
    quick = args.quick
    return TrainConfig(
        task="translation", model=model, translation=task,
        seq2seq=Seq2SeqConfig(d_embed=16 if quick else 64, d_hidden=16 if quick else args.d_hidden,
                              d_attention=8 if quick else 64),
        transformer=TransformerConfig(num_layers=1 if quick else 2, num_heads=2 if quick else 4,
                                      d_model=16 if quick else args.d_model, d_ff=32 if quick else 4 * args.d_model,
                                      max_len=256),
        optim=OptimConfig(lr=3e-3, warmup_steps=2 if quick else 100),
        steps=3 if quick else steps, eval_every=3 if quick else 500, eval_batches=2 if quick else 8,
        checkpoint_every=3 if quick else 500, progress=False, run_dir=str(Path(args.run_root) / name))


def bucket_of(length: int) -> str:
    i = int(np.searchsorted(BUCKETS, length, side="right")) - 1
    return f"{BUCKETS[i]}-{BUCKETS[i + 1] - 1}"


def by_length(task, pairs, hypotheses) -> dict:
    """{bucket: {"bleu", "chrf", "exact_match", "count"}} by source length in characters."""
    groups: dict[str, list[int]] = {}
    for i, (source, _) in enumerate(pairs):
        groups.setdefault(bucket_of(len(source)), []).append(i)
    out = {}
    for bucket in sorted(groups, key=lambda b: int(b.split("-")[0])):
        idx = groups[bucket]
        s = scores([hypotheses[i] for i in idx], [pairs[i][1] for i in idx], bleu_tokenize=task.resolved_bleu_tokenize)
        out[bucket] = {**s, "count": len(idx)}
    return out


def run_model(args: Args, task, model: str, name: str, steps: int, data) -> tuple[dict, object, dict]:
    """Train `model`, then decode the test set once: overall and per-length scores from the same translations."""
    task = dataclasses.replace(task, decode_test=False)
    config = config_for(args, task, model, name, steps)
    shutil.rmtree(config.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train(None, None, config, data=data)
    run = load_run(config.run_dir)
    params = sum(x.size for x in jax.tree.leaves(run.variables["params"]))
    pairs = data["test"]["text"]
    hypotheses = task.translate(run.model, run.variables, data, [s for s, _ in pairs])
    wall = time.perf_counter() - t0  # training and decoding the test set
    overall = scores(hypotheses, [t for _, t in pairs], bleu_tokenize=task.resolved_bleu_tokenize)
    row = {"data": task.data, "model": model, "params": int(params), "steps": summary["steps"],
           "train_pairs": len(data["train"]["src"]), "test_pairs": len(pairs), **overall,
           "loss": summary["report"]["loss"],
           "by_length": by_length(task, pairs, hypotheses) if task.data == "numbers" else None,
           "wall_s": round(wall, 1), "quick": args.quick}
    print(json.dumps(row), flush=True)
    return row, run, {"pairs": pairs, "hypotheses": hypotheses}


def main(args: Args) -> list[dict]:
    task = number_task(args)
    data = task.prepare() if args.models else None
    rows, attention = [], {}
    for model in args.models:
        row, run, decoded = run_model(args, task, model, model, args.steps, data)
        rows.append(row)
        if model.endswith(("bahdanau", "luong")):
            attention[model] = (run, decoded)
    if args.bible:
        rows += bible_rows(args)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        if args.models:
            _plot_bleu(rows, Path(args.out).with_suffix(".png"))
        if attention:
            _plot_attention(task, data, attention, Path(args.out).with_name(Path(args.out).stem + "_attention.png"))
    return rows


def bible_rows(args: Args) -> list[dict]:
    """(b) and (d) on the verse-aligned Bible, subword tokens; skipped with a note when it is not installed."""
    if shutil.which("mod2imp") is None:
        print("the Bible row needs: apt-get install sword-text-web sword-text-sparv libsword-utils; skipped")
        return []
    task = Translation(data="bible", tokenizer="bpe", bpe_vocab_size=4000, val_pairs=500, test_pairs=1000,
                       max_source_len=64, max_target_len=72, drop_long=True, batch_size=args.batch_size, beam_size=4)
    data = task.prepare()
    return [run_model(args, task, model, f"bible-{model}", args.bible_steps, data)[0]
            for model in ("lstm-bahdanau", "transformer")]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'jaxseq[experiments]'); no plot written")
        return None
    return plt


def _plot_bleu(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        if row["by_length"] is None:
            continue
        buckets = list(row["by_length"])
        x = np.arange(len(buckets))
        for ax, key in zip(axes, ("bleu", "exact_match")):
            ax.plot(x, [row["by_length"][b][key] for b in buckets], marker="o",
                    label=f"{row['model']} ({row['params'] / 1e3:.0f}k params)")
            ax.set_xticks(x, buckets)
    for ax, label in zip(axes, ("test BLEU (character n-grams)", "test exact match (%)")):
        trained = sum(int(b.split("-")[1]) < 60 for b in buckets)
        ax.axvspan(trained - 0.5, len(buckets) - 0.5, color="0.9", label="longer than any training source")
        ax.set_xlabel("source length (characters)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("English -> German number words: translation quality against source length")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_attention(task, data, attention: dict, path: Path) -> None:
    """Each attention model's weights over the longest test source, while it writes its own translation."""
    plt = _pyplot()
    if plt is None:
        return
    import jax.numpy as jnp

    from jaxseq.tasks.seq2seq_common import pad_tokens, target_arrays

    src_vocab, tgt_vocab = data["vocabs"]
    fig, axes = plt.subplots(len(attention), 1, figsize=(12, 5.5 * len(attention)), squeeze=False)
    for ax, (model, (run, decoded)) in zip(axes[:, 0], attention.items()):
        i = int(np.argmax([len(s) for s, _ in decoded["pairs"]]))
        source, hypothesis = decoded["pairs"][i][0], decoded["hypotheses"][i]
        src, src_mask = pad_tokens([src_vocab.encode(source)], len(source))
        tgt = target_arrays([tgt_vocab.encode(hypothesis) if hypothesis else np.zeros(0, np.int32)],
                            len(hypothesis) + 1)
        w = np.asarray(run.model.apply(run.variables, jnp.asarray(src), jnp.asarray(tgt["tgt_in"]),
                                       jnp.asarray(src_mask), None, method="attention_weights"))[0]
        ax.imshow(w, aspect="auto", cmap="gray_r")
        ax.set_xticks(range(len(source)), list(source), fontsize=6)
        ax.set_yticks(range(len(hypothesis) + 1), list(hypothesis) + ["</s>"], fontsize=6)
        ax.set_title(f"{model}, the longest test source\n{source}\n-> {hypothesis}\n(reference: "
                     f"{decoded['pairs'][i][1]})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(tyro.cli(Args))
