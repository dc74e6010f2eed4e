"""Markdown tables of the latest results (what benchmarks/README.md shows), from benchmarks/results/*.jsonl.

    python benchmarks/summarize.py                # all tables
    python benchmarks/summarize.py --prefix cpu   # the files of one device prefix
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> list[dict]:
    path = RESULTS / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def k(x: float) -> str:
    return f"{x / 1000:.1f}k"


def mb(*rows) -> str:
    """Peak MiB of each row, "a / b" (rows from before the benchmarks recorded memory: blank)."""
    vals = [r.get("peak_mb") if r else None for r in rows]
    return "" if any(v is None for v in vals) else " / ".join(f"{v:.0f}" for v in vals)


def rnn_layers(prefix: str) -> str:
    rows = [r for r in load(f"{prefix}-rnn-layers.jsonl") if "impl" in r]
    by_case = defaultdict(dict)
    for r in rows:
        by_case[(r["layer"], r["hidden"], r["mode"])][r["impl"]] = r
    out = []
    for (layer, hidden, mode), impls in by_case.items():
        j, t = impls.get("jaxseq"), impls.get("torch")
        flax = {n: r for n, r in impls.items() if n.startswith("flax")}
        best_flax = max(flax.values(), key=lambda r: r["tokens_per_s"]) if flax else None
        out.append([
            layer, hidden, mode, k(j["tokens_per_s"]),
            k(impls["jaxseq-fused"]["tokens_per_s"]) if "jaxseq-fused" in impls else "",
            k(impls["jaxseq-scan"]["tokens_per_s"]),
            f"{k(best_flax['tokens_per_s'])} ({best_flax['impl'][5:]})" if best_flax else "",
            k(t["tokens_per_s"]), f"**{j['tokens_per_s'] / t['tokens_per_s']:.2f}x**",
            f"{j['tokens_per_s'] / best_flax['tokens_per_s']:.2f}x" if best_flax else "",
            f"{j['frac_peak']:.0%}", mb(j, t),
        ])
    header = ["layer", "hidden", "mode", "jaxseq", "jaxseq XLA path", "jaxseq plain scan", "best Flax", "PyTorch",
              "jaxseq / PyTorch", "jaxseq / best Flax", "jaxseq % of peak", "peak MiB, jaxseq / PyTorch"]
    return table(header, out)


def attention(prefix: str, suffix: str = "") -> str:
    rows = [r for r in load(f"{prefix}-attention{suffix}.jsonl") if "impl" in r]
    by_len = defaultdict(dict)
    for r in rows:
        by_len[r["length"]][r["impl"]] = r
    out = []
    for length in sorted(by_len):
        impls = by_len[length]
        # jaxseq's entry point: the native kernel on CPU, cuDNN on a GPU when eligible (files from
        # before the entry point had a row: the JAX flash path).
        f = impls.get("jaxseq-attention") or impls.get("jaxseq-flash")
        jf = impls.get("jaxseq-flash") if f is impls.get("jaxseq-attention") else None
        t, x = impls.get("torch-sdpa"), impls.get("jax-xla")
        err = f.get("max_abs_err_vs_torch")
        out.append([length, k(f["tokens_per_s"]), k(jf["tokens_per_s"]) if jf else "not run",
                    k(x["tokens_per_s"]) if x else "not run",
                    k(t["tokens_per_s"]) if t else "not run",
                    f"**{f['tokens_per_s'] / t['tokens_per_s']:.2f}x**" if t else "",
                    "" if err is None else f"{err:.1e}", mb(f, t)])
    header = ["length", "jaxseq.attention (native kernel on CPU)", "jaxseq.flash_attention (JAX)",
              "jax.nn.dot_product_attention (XLA)", "PyTorch SDPA",
              "jaxseq / PyTorch", "max abs err vs torch", "peak MiB, jaxseq / PyTorch"]
    return table(header, out)


def linear_scan(prefix: str) -> str:
    rows = [r for r in load(f"{prefix}-linear-scan.jsonl") if r.get("bench") == "linear_scan"]
    by_len = defaultdict(dict)
    for r in rows:
        by_len[r["length"]][r["model"] if r["model"] == "lstm" else f"{r['model']}-{r['form']}"] = r
    names = ["lstm", "mingru-parallel", "mingru-sequential", "minlstm-parallel", "minlstm-sequential",
             "lru-parallel", "lru-sequential"]
    out = []
    for length in sorted(by_len):
        impls = by_len[length]
        out.append([length] + [k(impls[n]["tokens_per_s"]) if n in impls else "" for n in names])
    return table(["length"] + names, out)


def gpt_step(prefix: str) -> str:
    rows = load(f"{prefix}-gpt-step.jsonl")
    out = []
    for r in rows:
        c = r["config"]
        out.append([f"{c['layers']}L d{c['d_model']} ctx{c['context']} b{c['batch']}", r["impl"],
                    k(r["tokens_per_s"]), r["compile_or_first_step_s"], f"{r['mfu']:.0%}",
                    f"**{r['speedup_vs_torch']:.2f}x**", mb(r)])
    return table(["config", "impl", "tokens/s", "compile / first step s", "% of matmul peak", "vs PyTorch", "peak MiB"], out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", default="cpu")
    p = ap.parse_args(argv).prefix
    sections = [("LSTM / GRU layers", rnn_layers(p)), ("causal attention", attention(p)),
                ("causal attention, bfloat16", attention(p, "-bf16")),
                ("causal attention (1 core)", attention(p, "-1thread")),
                ("linear recurrences, training tokens/s", linear_scan(p)), ("GPT train step", gpt_step(p))]
    for title, text in sections:
        if text.count("\n") > 1:  # a header alone: no results file for this device
            print(f"### {title}\n\n{text}\n")


if __name__ == "__main__":
    main()
