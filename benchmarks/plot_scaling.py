"""The length-scaling plot: training time per token vs sequence length, recurrences and attention together.

Reads the JSON lines of `linear_scan.py` (LSTM, and minGRU / minLSTM / LRU in their parallel and
sequential forms; batch 8, hidden 256) and of `attention_scaling.py` (one causal self-attention layer,
batch 8, 4 heads x 64 = width 256: jaxseq.attention (the native kernel on CPU), its JAX flash
path, XLA's dense op, PyTorch SDPA), and draws
microseconds per token of a forward + backward pass against T on log-log axes. A flat line is a cost
linear in T; attention's line rises with T (its work per token is O(T)).

    python benchmarks/plot_scaling.py            # -> benchmarks/results/cpu-length-scaling.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from summarize import latest_code  # the script's folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"


def load(path: Path) -> list[dict]:
    """The rows of the file's latest code version (the results files collect runs of several commits)."""
    return latest_code([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def series(recurrent_rows: list[dict], attention_rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{label: [(T, microseconds per token), ...]} sorted by T; the median over runs at each T."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in recurrent_rows:
        if r.get("bench") != "linear_scan":
            continue
        label = "LSTM (jaxseq: native kernels on CPU)" if r["model"] == "lstm" else f"{r['model']} ({r['form']})"
        out.setdefault(label, []).append((r["length"], 1e6 / r["tokens_per_s"]))
    names = {"jaxseq-attention": "attention: jaxseq (native kernel on CPU)", "jaxseq-flash": "attention: jaxseq flash (JAX)",
             "jax-xla": "attention: jax.nn (XLA)",
             "torch-sdpa": "attention: PyTorch SDPA", "torch-sdpa-compile": "attention: PyTorch SDPA, torch.compile"}
    for r in attention_rows:
        if r.get("impl") in names:
            out.setdefault(names[r["impl"]], []).append((r["length"], 1e6 / r["tokens_per_s"]))
    by_length = {k: {} for k in out}
    for k, points in out.items():
        for length, us in points:
            by_length[k].setdefault(length, []).append(us)
    return {k: sorted((t, statistics.median(v)) for t, v in pts.items()) for k, pts in by_length.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recurrent", default=str(RESULTS / "cpu-linear-scan.jsonl"))
    ap.add_argument("--attention", default=str(RESULTS / "cpu-attention.jsonl"))
    ap.add_argument("--out", default=str(RESULTS / "cpu-length-scaling.png"))
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = series(load(Path(args.recurrent)), load(Path(args.attention)))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in lines.items():
        style = "--" if "sequential" in label else ("-." if label.startswith("attention") else "-")
        ax.plot([t for t, _ in points], [us for _, us in points], style, marker="o", label=label)
    lengths = sorted({t for points in lines.values() for t, _ in points})
    ax.set(xscale="log", yscale="log", xlabel="sequence length T",
           ylabel="microseconds per token (forward + backward)",
           title="training cost per token vs length, batch 8, width 256, float32, 2-core CPU")
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
