"""Markdown tables of the latest results (what benchmarks/README.md shows), from benchmarks/results/*.jsonl.

    python benchmarks/summarize.py                # all tables, printed
    python benchmarks/summarize.py --prefix cpu   # the files of one device prefix
    python benchmarks/summarize.py --write        # rewrite benchmarks/README.md's generated section

`--write` replaces what lies between the `<!-- tables:begin -->` and `<!-- tables:end -->` lines of the
README (`--readme` for another file) and leaves the rest alone; without both markers it changes
nothing and says so. Each table names where and when its rows were measured (device, AVX-512, commit,
load average) when the rows record it (`_common.run_record`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"


def load(name: str, results: Path = RESULTS) -> list[dict]:
    path = Path(results) / name
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


def ms(r: dict) -> str:
    """Median step ms with the min-max over the rounds, "12.3 (11.9-14.0)" (older rows: the median)."""
    med = r.get("step_ms", r.get("step_ms_median"))
    if med is None:
        return ""
    lo, hi = r.get("step_ms_min"), r.get("step_ms_max")
    return f"{med:.4g} ({lo:.4g}-{hi:.4g})" if lo is not None and hi is not None else f"{med:.4g}"


def provenance(rows: list[dict]) -> str:
    """One line naming where and when `rows` were measured, from their machine record; '' without one."""
    recs = [r for r in rows if "cpu_flags" in r]
    if not recs:
        return ""
    r = recs[0]
    avx = r["cpu_flags"].get("avx512")
    commits = sorted({(x.get("commit") or "unknown")[:12] for x in recs})
    loads = [x["load_avg"][0] for x in recs if x.get("load_avg")]
    parts = [r.get("device", "?"), "AVX-512: " + ("unknown" if avx is None else "yes" if avx else "no"),
             "commit " + ", ".join(commits), r.get("time", "")[:10]]
    if loads:
        parts.append(f"1-min load average {min(loads):.1f}-{max(loads):.1f}")
    return "Measured on " + "; ".join(p for p in parts if p) + "."


def best_torch(impls: dict) -> tuple[str, dict] | tuple[None, None]:
    """The fastest PyTorch row of a case (name, row)."""
    torch_rows = {n: r for n, r in impls.items() if n.startswith("torch")}
    if not torch_rows:
        return None, None
    name = max(torch_rows, key=lambda n: torch_rows[n]["tokens_per_s"])
    return name, torch_rows[name]


def rnn_layers(prefix: str, results: Path = RESULTS) -> str:
    rows = [r for r in load(f"{prefix}-rnn-layers.jsonl", results) if "impl" in r]
    by_case = defaultdict(dict)
    for r in rows:
        by_case[(r["layer"], r["hidden"], r["mode"])][r["impl"]] = r
    out = []
    for (layer, hidden, mode), impls in by_case.items():
        j, t = impls.get("jaxseq"), impls.get("torch")
        tname, tbest = best_torch(impls)
        flax = {n: r for n, r in impls.items() if n.startswith("flax")}
        best_flax = max(flax.values(), key=lambda r: r["tokens_per_s"]) if flax else None
        path = f" ({t['torch_path']})" if t and t.get("torch_path") else ""
        compiled = impls.get("torch-compile-cell")
        out.append([
            layer, hidden, mode, k(j["tokens_per_s"]),
            k(impls["jaxseq-fused"]["tokens_per_s"]) if "jaxseq-fused" in impls else "",
            k(impls["jaxseq-scan"]["tokens_per_s"]),
            f"{k(best_flax['tokens_per_s'])} ({best_flax['impl'][5:]})" if best_flax else "",
            k(t["tokens_per_s"]) + path if t else "",
            k(compiled["tokens_per_s"]) if compiled else "",
            f"**{j['tokens_per_s'] / tbest['tokens_per_s']:.2f}x** ({tname})" if tbest else "",
            f"{j['tokens_per_s'] / best_flax['tokens_per_s']:.2f}x" if best_flax else "",
            f"{j['frac_peak']:.0%}", mb(j, t),
        ])
    header = ["layer", "hidden", "mode", "jaxseq", "jaxseq XLA path", "jaxseq plain scan", "best Flax",
              "PyTorch nn module (path)", "PyTorch compiled cell loop", "jaxseq / best PyTorch",
              "jaxseq / best Flax", "jaxseq % of peak", "peak MiB, jaxseq / PyTorch"]
    return table(header, out)


def attention(prefix: str, suffix: str = "", results: Path = RESULTS) -> str:
    rows = [r for r in load(f"{prefix}-attention{suffix}.jsonl", results) if "impl" in r]
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


def linear_scan(prefix: str, results: Path = RESULTS) -> str:
    rows = [r for r in load(f"{prefix}-linear-scan.jsonl", results) if r.get("bench") == "linear_scan"]
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


def gpt_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """{config label: [run, ...]}, each run {impl: row}, in file order. A run is one invocation of
    gpt_step.py: its rows share the `time` of their record (older rows have none: a run ends where an
    impl repeats)."""
    runs = defaultdict(list)
    for r in rows:
        c = r["config"]
        label = f"{c['layers']}L d{c['d_model']} ctx{c['context']} b{c['batch']}"
        last = runs[label][-1] if runs[label] else None
        same = last is not None and r["impl"] not in last and next(iter(last.values())).get("time") == r.get("time")
        if not same:
            runs[label].append({})
        runs[label][-1][r["impl"]] = r
    return runs


def gpt_step(prefix: str, results: Path = RESULTS) -> str:
    """One row per (config, impl) over the config's runs of the latest commit (rows without a commit:
    the last run alone): the median over runs of tokens/s and of the ratio to each run's fastest
    PyTorch form, with the min-max over runs when there are several (run gpt_step.py 3 times with the
    same --out for a sceptic's table), else the run's median step with its min-max over rounds."""
    rows = [r for r in load(f"{prefix}-gpt-step.jsonl", results) if "impl" in r]
    out = []
    for config, runs in gpt_runs(rows).items():
        commit = next(iter(runs[-1].values())).get("commit")
        if commit:
            runs = [run for run in runs if next(iter(run.values())).get("commit") == commit]
        else:
            runs = runs[-1:]
        for name in runs[-1]:
            per_run = [run for run in runs if name in run]
            toks = [run[name]["tokens_per_s"] for run in per_run]
            ratios = []
            for run in per_run:
                tname, tbest = best_torch(run)
                if tbest:
                    ratios.append((run[name]["tokens_per_s"] / tbest["tokens_per_s"], tname))
            r = runs[-1][name]
            if len(per_run) > 1:
                spread = f"{k(statistics.median(toks))} ({k(min(toks))}-{k(max(toks))}, {len(toks)} runs)"
                step = f"{statistics.median(x['step_ms'] for x in (run[name] for run in per_run)):.4g}"
            else:
                spread, step = k(toks[0]), ms(r)
            ratio = f"**{statistics.median(x for x, _ in ratios):.2f}x**" if ratios else ""
            forms = ", ".join(sorted({t for _, t in ratios}))
            out.append([config, name, spread, step, r["compile_or_first_step_s"], f"{r['mfu']:.0%}", ratio, forms, mb(r)])
    return table(["config", "impl", "tokens/s", "step ms", "compile / first step s",
                  "% of matmul peak", "vs best PyTorch", "best PyTorch form", "peak MiB"], out)


SECTIONS = [("LSTM / GRU layers", "rnn-layers", rnn_layers),
            ("causal attention", "attention", lambda p, r: attention(p, "", r)),
            ("causal attention, bfloat16", "attention-bf16", lambda p, r: attention(p, "-bf16", r)),
            ("causal attention (1 core)", "attention-1thread", lambda p, r: attention(p, "-1thread", r)),
            ("linear recurrences, training tokens/s", "linear-scan", linear_scan),
            ("GPT train step", "gpt-step", gpt_step)]


def render(prefix: str = "cpu", results: Path = RESULTS) -> str:
    """All tables of one device prefix as markdown: a `####` heading, the provenance line, the table."""
    parts = []
    for title, stem, make in SECTIONS:
        text = make(prefix, results)
        if text.count("\n") > 1:  # a header alone: no results file for this device
            where = provenance(load(f"{prefix}-{stem}.jsonl", results))
            parts.append(f"#### {title}\n\n" + (f"{where}\n\n" if where else "") + text + "\n")
    return "\n".join(parts)


def write_section(readme: Path, text: str) -> None:
    """Replace the lines between the README's BEGIN and END markers with `text` (markers kept)."""
    doc = Path(readme).read_text()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise SystemExit(f"{readme}: needs exactly one '{BEGIN}' line before one '{END}' line around the generated "
                         "tables; add them where the tables belong and run again")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    note = "<!-- generated by `python benchmarks/summarize.py --write` from results/: edit the generator, not this -->"
    Path(readme).write_text(f"{head}{BEGIN}\n{note}\n\n{text.strip()}\n\n{END}{tail}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", default="cpu")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the directory of the .jsonl files")
    ap.add_argument("--write", action="store_true", help="rewrite the README's section between the markers")
    ap.add_argument("--readme", type=Path, default=README, help="the file --write rewrites")
    args = ap.parse_args(argv)
    text = render(args.prefix, args.results)
    if args.write:
        write_section(args.readme, text)
        print(f"wrote the tables into {args.readme}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
