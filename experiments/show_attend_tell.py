"""Show, attend and tell: attention over a CNN's grid lets a caption say what is where.

Claim (Xu et al. 2015, "Show, attend and tell"; the lectures' captioning example): a decoder that
attends over the spatial grid of a CNN captions better than one that sees only a single image vector
(Vinyals et al. 2015), and its attention lands on the object each word names.

Measured on composed scenes (`--task captioning`): 2 to 4 of scikit-learn's 8x8 digits (or
Fashion-MNIST items, `--items fashion`) on a 3 x 3 grid, captioned "seven top left and two bottom
right ..."; test scenes use held-out digit images and new layouts. The same CNN encoder and LSTM
decoder with and without Bahdanau attention; test BLEU (word n-grams), exact match and loss from
beam-search captions (beam 3).

    python experiments/show_attend_tell.py               # ~10 min on 2 CPU cores
    python experiments/show_attend_tell.py --quick       # seconds: the pulse test's form

Writes experiments/results/show_attend_tell.jsonl (one line per model) and show_attend_tell.png (the
attention over each test image when the decoder writes each object's name). Measured: see
experiments/README.md.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from jaxseq.config import OptimConfig, Seq2SeqConfig, TrainConfig
from jaxseq.run import load_run
from jaxseq.tasks import Captioning
from jaxseq.tasks.scenes import ITEM_NAMES
from jaxseq.tasks.seq2seq_common import target_arrays
from jaxseq.train import train

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Args:
    models: tuple[str, ...] = ("lstm-seq2seq", "lstm-bahdanau")
    """Without and with attention (any -seq2seq / -bahdanau / -luong model)."""
    items: Literal["digits", "fashion"] = "digits"
    steps: int = 1500
    d_hidden: int = 128
    examples: int = 3
    """Test scenes in the attention plot."""
    run_root: str = "runs/show_attend_tell"
    out: str = str(RESULTS / "show_attend_tell.jsonl")
    quick: bool = False
    """Seconds, tiny sizes: what tests/test_experiments.py runs."""


def config_for(args: Args, model: str) -> TrainConfig:
    quick = args.quick
    task = Captioning(items=args.items, train_scenes=64 if quick else 10000, val_scenes=16 if quick else 500,
                      test_scenes=16 if quick else 1000, batch_size=16 if quick else 64)
    return TrainConfig(
        task="captioning", model=model, captioning=task,
        seq2seq=Seq2SeqConfig(d_embed=8 if quick else 32, d_hidden=16 if quick else args.d_hidden,
                              d_attention=8 if quick else 64, cnn_channels=8 if quick else 32),
        optim=OptimConfig(lr=3e-3, warmup_steps=2 if quick else 100),
        steps=3 if quick else args.steps, eval_every=3 if quick else 500, eval_batches=1 if quick else 8,
        checkpoint_every=3 if quick else 500, progress=False, run_dir=str(Path(args.run_root) / f"{args.items}-{model}"))


def main(args: Args) -> list[dict]:
    rows, runs = [], {}
    data = None
    for model in args.models:
        config = config_for(args, model)
        shutil.rmtree(config.run_dir, ignore_errors=True)
        task = config.captioning
        data = task.prepare() if data is None else data  # the same scenes for every model
        t0 = time.perf_counter()
        summary = train(None, None, config, data=data)
        run = load_run(config.run_dir)
        runs[model] = run
        report = summary["report"]
        rows.append({"items": args.items, "model": model, "attention": not model.endswith("-seq2seq"),
                     "params": int(sum(x.size for x in jax.tree.leaves(run.variables["params"]))),
                     "steps": summary["steps"], **{k: report[k] for k in ("bleu", "chrf", "exact_match", "loss")},
                     "token_accuracy": report["accuracy"], "wall_s": round(time.perf_counter() - t0, 1),
                     "quick": args.quick})
        print(json.dumps(rows[-1]), flush=True)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        attentive = [m for m in args.models if not m.endswith("-seq2seq")]
        if attentive:
            _plot_attention(runs[attentive[0]], data, args, Path(args.out).with_suffix(".png"))
    return rows


def _plot_attention(run, data, args: Args, path: Path) -> None:
    """For a few test scenes: the image, then the attention (upsampled grid) when each item name is written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'jaxseq[experiments]'); no plot written")
        return
    task, vocab = run.task, data["vocab"]
    images = data["test"]["images"][:args.examples]
    captions = task.caption(run.model, run.variables, data, images)
    names = set(ITEM_NAMES[args.items])
    cols = 1 + max(task.max_objects, 1)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.2 * cols, 2.4 * len(images)), squeeze=False)
    for r, (image, caption) in enumerate(zip(images, captions)):
        words = caption.split()
        tgt = target_arrays([vocab.encode(caption) if words else np.zeros(0, np.int32)], len(words) + 1)
        w = np.asarray(run.model.apply(run.variables, jnp.asarray(image[None]), jnp.asarray(tgt["tgt_in"]),
                                       None, None, method="attention_weights"))[0]  # [T, grid cells]
        side = int(round(np.sqrt(w.shape[1])))
        axes[r, 0].imshow(image[..., 0], cmap="gray")
        axes[r, 0].set_title(f"reference: {data['test']['text'][r]}\nmodel: {caption}", fontsize=6, wrap=True)
        # weights[t] are read while writing token t (the decoder's input at t is the previous word)
        named = [(t, word) for t, word in enumerate(words) if word in names]
        for c in range(1, cols):
            ax = axes[r, c]
            ax.axis("off")
            if c - 1 < len(named):
                t, word = named[c - 1]
                up = np.kron(w[t].reshape(side, side), np.ones((image.shape[0] // side,) * 2))
                ax.imshow(image[..., 0], cmap="gray")
                ax.imshow(up, cmap="magma", alpha=0.6)
                ax.set_title(f"writing {word!r}", fontsize=7)
        axes[r, 0].axis("off")
    fig.suptitle(f"{run.config.model}: attention while naming each object (captions by beam search)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(tyro.cli(Args))
