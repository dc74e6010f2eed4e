"""PixelRNN on 8x8 digits: Row LSTM and Diagonal BiLSTM against one LSTM over the flattened pixels.

Claim (van den Oord, Kalchbrenner & Kavukcuoglu, "Pixel Recurrent Neural Networks", ICML 2016, tables
3-5): two-dimensional recurrences model images better than a sequence model of the raster-order pixels;
the Diagonal BiLSTM, whose context is the whole past, is best, the Row LSTM, whose context is a
triangle above the pixel, next (CIFAR-10: 3.00 and 3.07 bits/dim; binarised MNIST: 79.20 and 80.54
nats, Diagonal BiLSTM with 7 and 1 layers).

    python experiments/pixelrnn.py            # three models, 2,000 steps of 32 images each, seed 0
    python experiments/pixelrnn.py --quick    # seconds: the pulse test's form

Data: scikit-learn's digits, 17 grey levels (`--task images`: the first 1,500 train, the last 297
test). Every model trains for the same number of steps on the same batches; the test NLL of the last
step is reported in bits per dimension, next to two references computed here: uniform over 17 levels
(log2 17 = 4.09) and independent pixels (each position's own histogram of the training images, add-one).
Samples: 16 images per model, drawn pixel by pixel through the recurrent form (temperature 1).

Writes experiments/results/pixelrnn.jsonl (one line per model) and pixelrnn.png (test bits/dim against
steps, and each model's samples).

Measured (the command above, seed 0; test bits/dim at step 2,000, lowest on the curve in brackets):
Row LSTM (86,929 parameters) 1.833 (1.795 at step 1,000); Diagonal BiLSTM (79,249) 1.831 (1.793 at
1,000); flattened-pixel LSTM, 128 wide (136,593) 1.852 (1.820 at 1,200). Independent pixels 2.366,
uniform 4.087. The order is the paper's, but the gaps are small: 0.02 bits/dim between the baseline and
the 2-D models, 0.002 between the two (one seed). On 64-pixel images one LSTM carries the whole past
well; all three overfit the 1,500 training images after about 1,000 steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import tyro

from jaxseq.config import OptimConfig, PixelRNNConfig, TrainConfig
from jaxseq.run import load_run
from jaxseq.tasks.images import Images, image_grid
from jaxseq.train import train

RESULTS = Path(__file__).parent / "results"
PAPER = {"cifar10_bits_per_dim": {"row-lstm": 3.07, "diagonal-bilstm": 3.00},
         "mnist_nats": {"row-lstm": 80.54, "diagonal-bilstm": 79.20}}


@dataclass(frozen=True)
class Args:
    models: tuple[str, ...] = ("row-lstm", "diagonal-bilstm", "pixel-lstm")
    """Image models of the table, each trained the same number of steps."""
    steps: int = 2000
    """Optimizer steps per model."""
    pixelrnn: PixelRNNConfig = field(default_factory=PixelRNNConfig)
    """Sizes of the Row LSTM and Diagonal BiLSTM (h = 32, 2 layers)."""
    baseline_hidden: int = 128
    """Width of the flattened-pixel LSTM (one layer)."""
    batch_size: int = 32
    samples: int = 16
    """Images sampled from each model for the figure."""
    seed: int = 0
    run_root: str = "runs/pixelrnn"
    out: str = str(RESULTS / "pixelrnn.jsonl")
    quick: bool = False
    """Seconds, tiny sizes: what tests/test_experiments.py runs (writes nothing to results/)."""


def config_for(args: Args, model: str) -> TrainConfig:
    sizes = args.pixelrnn
    if model == "pixel-lstm":
        sizes = dataclasses.replace(sizes, d_hidden=args.baseline_hidden, num_layers=1)
    steps = 6 if args.quick else args.steps
    if args.quick:
        sizes = PixelRNNConfig(d_hidden=4, num_layers=1, d_head=8, first_kernel=3)
    return TrainConfig(task="images", model=model, images=Images(batch_size=args.batch_size), pixelrnn=sizes,
                       optim=OptimConfig(lr=3e-3, warmup_steps=min(100, steps // 10)), steps=steps,
                       eval_every=steps if args.quick else max(steps // 10, 1), checkpoint_every=steps, eval_batches=1 if args.quick else 64,
                       seed=args.seed, run_dir=str(Path(args.run_root) / model), progress=False)


def independent_pixels_bits(data: dict, levels: int) -> float:
    """Test bits/dim of independent pixels: each position's histogram over the training images, add-one."""
    train, test = data["train"].reshape(len(data["train"]), -1), data["test"].reshape(len(data["test"]), -1)
    counts = np.stack([np.bincount(train[:, k], minlength=levels) for k in range(train.shape[1])]) + 1.0
    logp = np.log2(counts / counts.sum(1, keepdims=True))  # [positions, levels]
    return float(-logp[np.arange(test.shape[1])[None, :], test].mean())


def main(args: Args) -> list[dict]:
    rows = []
    task = Images(batch_size=args.batch_size)
    data = task.prepare()
    levels = task.shape()[2]
    references = {"uniform_bits_per_dim": math.log2(levels), "independent_bits_per_dim": independent_pixels_bits(data, levels)}
    for model in args.models:
        config = config_for(args, model)
        t0 = time.perf_counter()
        summary = train(None, None, config, data=data)
        wall = time.perf_counter() - t0
        run = load_run(config.run_dir)
        t1 = time.perf_counter()
        samples = task.sample_images(run.model, run.variables, 2 if args.quick else args.samples,
                                     key=jax.random.key(args.seed), temperature=1.0)
        report = summary["report"]
        rows.append({"model": model, "test_bits_per_dim": report["bits_per_dim"],
                     "train_bits_per_dim": summary["train_loss"] / math.log(2), "steps": summary["steps"],
                     "params": int(sum(np.size(x) for x in jax.tree.leaves(run.variables))),
                     "sizes": dataclasses.asdict(config.pixelrnn), "batch_size": args.batch_size, "seed": args.seed,
                     "train_wall_s": round(wall, 1), "sample_wall_s": round(time.perf_counter() - t1, 1),
                     **references, "quick": args.quick, "curve": _curve(config.run_dir),
                     "samples": samples.tolist()})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("curve", "samples")}), flush=True)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        _plot(rows, levels, Path(args.out).with_suffix(".png"))
    return rows


def _curve(run_dir: str) -> list[tuple[int, float]]:
    lines = [json.loads(ln) for ln in open(Path(run_dir) / "metrics.jsonl")]
    return [(r["step"], r["bits_per_dim"]) for r in lines if r["split"] == "val"]


def _plot(rows: list[dict], levels: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'jaxseq[experiments]'); no plot written")
        return
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(4 * (len(rows) + 1), 4))
    ax = axes[0]
    for row in rows:
        steps, bits = zip(*row["curve"])
        ax.plot(steps, bits, label=f"{row['model']} ({row['params']:,} params)")
    ax.axhline(rows[0]["independent_bits_per_dim"], color="grey", linestyle="--", label="independent pixels")
    ax.set_xlabel("step")
    ax.set_ylabel("test bits/dim")
    ax.set_title("8x8 digits, 17 levels")
    ax.legend(fontsize=7)
    for ax, row in zip(axes[1:], rows):
        ax.imshow(image_grid(np.asarray(row["samples"]), levels), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{row['model']}: {row['test_bits_per_dim']:.3f} bits/dim", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main(tyro.cli(Args))
