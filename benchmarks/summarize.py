"""Markdown tables of the latest results (what benchmarks/README.md shows), from benchmarks/results/*.jsonl.

    python benchmarks/summarize.py                # all tables, printed
    python benchmarks/summarize.py --prefix cpu   # the files of one device prefix
    python benchmarks/summarize.py --write        # rewrite the READMEs' generated sections

`--write` replaces what lies between the `<!-- tables:begin -->` and `<!-- tables:end -->` lines of
benchmarks/README.md (`--readme` for another file) and leaves the rest alone; without both markers it
changes nothing and says so. It also rewrites the Results table of the repository's README between its
`<!-- results:begin -->` and `<!-- results:end -->` lines. Each table names where and when its rows were measured (device, AVX-512, commit,
load average) when the rows record it (`_common.run_record`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import code_version  # noqa: E402  (git only)

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
ROOT_README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"  # the root README's "Results"


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
    """Thousands with one decimal ("45.1k"); below a thousand, whole numbers ("240")."""
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


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


UNRECORDED = ("Machine, commit and load not recorded: an older run, from before rows carried their record; "
              "not comparable with the tables that name theirs")


def provenance(rows: list[dict]) -> str:
    """One line naming where and when `rows` were measured, from their machine record; without one, a
    line that says so ('' for no rows)."""
    recs = [r for r in rows if "cpu_flags" in r]
    if not recs:
        return (UNRECORDED + (f" ({rows[-1]['time'][:10]})" if rows[-1].get("time") else "") + "."
                if rows else "")
    r = recs[0]
    avx = r["cpu_flags"].get("avx512")
    commits = sorted({(c := x.get("commit") or "unknown")[:12] + ("+dirty" if c.endswith("+dirty") else "")
                      for x in recs})
    versions = sorted({v for x in recs if (v := version_of(x)) and v != x.get("commit")})
    loads = [x["load_avg"][0] for x in recs if x.get("load_avg")]
    parts = [r.get("device", "?"), "AVX-512: " + ("unknown" if avx is None else "yes" if avx else "no"),
             "commit " + ", ".join(commits)]
    if versions:
        parts.append("measured code " + ", ".join(v[:12] for v in versions))
    parts.append(r.get("time", "")[:10])
    if loads:
        parts.append(f"1-min load average {min(loads):.1f}-{max(loads):.1f}")
    return "Measured on " + "; ".join(p for p in parts if p) + "."


# ------------------------------------------------------------------------------------- runs
# A run is one invocation of a script (its rows share `run_id`; older rows: the `time` of their
# record). Tables use the runs of the latest code in each file (`latest_code`) and show, per competitor, the median
# over runs with the min-max over runs; ratios are taken within each run, then their median is shown.

PEERS = ("torch", "hf-", "nanogpt")  # row names of the PyTorch competitors


def is_torch(impl: str) -> bool:
    return impl.startswith(PEERS)


def version_of(row: dict) -> str | None:
    """The code a row measured: its `code_version`, else the digest of its commit's tree (for a
    "+dirty" commit, of the commit it was based on), else the commit string itself; None without one."""
    if row.get("code_version"):
        return row["code_version"]
    commit = row.get("commit")
    if not commit:
        return None
    return _commit_version(commit.removesuffix("+dirty")) or commit


@functools.lru_cache(maxsize=None)
def _commit_version(commit: str) -> str | None:
    return code_version(commit)


def latest_code(rows: list[dict]) -> list[dict]:
    """The rows that measured the same code as the last row (a results file collects the runs of many
    commits; those that changed only results, docs or this summarizer measured the same code); all rows
    if the last records no commit."""
    latest = version_of(rows[-1]) if rows else None
    return [r for r in rows if version_of(r) == latest] if latest else rows


def runs_by_case(rows: list[dict], case_of) -> dict:
    """{case: {run key: {impl: row}}} over the rows of the latest code version (all rows if none records a commit),
    cases and runs in file order."""
    rows = latest_code([r for r in rows if "impl" in r])
    out = defaultdict(dict)
    for r in rows:
        run = (r.get("run_id") or r.get("time") or "file", r.get("repeat"))  # a driver may repeat within one run id
        out[case_of(r)].setdefault(run, {})[r["impl"]] = r
    return out


def spread(values: list[float], fmt=lambda x: f"{x:.3g}", runs: bool = True) -> str:
    """"m (lo-hi, n runs)" over runs; one value alone."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return fmt(values[0])
    tail = f", {len(values)} runs" if runs else ""
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))}{tail})"


def column(runs: dict, impl: str, key: str, fmt=lambda x: f"{x:.3g}", runs_note: bool = True) -> str:
    """`key` of `impl` over the runs of one case, as `spread` shows it ('' where it did not run)."""
    return spread([run[impl].get(key) for run in runs.values() if impl in run], fmt, runs_note)


def best_torch(impls: dict, key: str = "tokens_per_s", higher: bool = True) -> tuple[str, dict] | tuple[None, None]:
    """The best PyTorch row of one run of a case (name, row): the largest `key`, or the smallest."""
    torch_rows = {n: r for n, r in impls.items() if is_torch(n) and r.get(key) is not None}
    if not torch_rows:
        return None, None
    pick = max if higher else min
    name = pick(torch_rows, key=lambda n: torch_rows[n][key])
    return name, torch_rows[name]


def vs_best_torch(runs: dict, impl: str, key: str = "tokens_per_s", higher: bool = True) -> tuple[str, str]:
    """(ratio cell, best forms): `impl`'s advantage over each run's best PyTorch form (>1: ahead; for
    `higher=False` metrics, time or memory, the peer's value over ours), median over runs with min-max."""
    ratios, forms = [], set()
    for run in runs.values():
        name, best = best_torch(run, key, higher)
        if best is None or impl not in run or run[impl].get(key) is None:
            continue
        mine, theirs = run[impl][key], best[key]
        ratios.append(mine / theirs if higher else theirs / mine)
        forms.add(name)
    if not ratios:
        return "", ""
    cell = f"**{statistics.median(ratios):.2f}x**"
    if len(ratios) > 1:
        cell += f" ({min(ratios):.2f}-{max(ratios):.2f})"
    return cell, ", ".join(sorted(forms))


def rnn_layers(prefix: str, results: Path = RESULTS) -> str:
    rows = load(f"{prefix}-rnn-layers.jsonl", results)
    out = []
    for (layer, hidden, mode), runs in runs_by_case(rows, lambda r: (r["layer"], r["hidden"], r["mode"])).items():
        last = list(runs.values())[-1]
        flax = [n for n in last if n.startswith("flax")]
        best_flax = max(flax, key=lambda n: statistics.median(
            run[n]["tokens_per_s"] for run in runs.values() if n in run)) if flax else None
        t = last.get("torch")
        path = f" ({t['torch_path']})" if t and t.get("torch_path") else ""
        ratio, forms = vs_best_torch(runs, "jaxseq")
        flax_ratios = [run["jaxseq"]["tokens_per_s"] / run[best_flax]["tokens_per_s"]
                       for run in runs.values() if best_flax in run and "jaxseq" in run]
        out.append([
            layer, hidden, mode, len(runs), column(runs, "jaxseq", "tokens_per_s", k, False),
            column(runs, "jaxseq-fused", "tokens_per_s", k, False), column(runs, "jaxseq-scan", "tokens_per_s", k, False),
            f"{column(runs, best_flax, 'tokens_per_s', k, False)} ({best_flax[5:]})" if best_flax else "",
            column(runs, "torch", "tokens_per_s", k, False) + path,
            column(runs, "torch-compile-cell", "tokens_per_s", k, False),
            f"{ratio} ({forms})" if ratio else "", spread(flax_ratios, lambda x: f"{x:.2f}x", False),
            mb(last.get("jaxseq"), t),
        ])
    header = ["layer", "hidden", "mode", "runs", "jaxseq tokens/s", "jaxseq XLA path", "jaxseq plain scan",
              "best Flax", "PyTorch nn module (path)", "PyTorch compiled cell loop", "jaxseq / best PyTorch",
              "jaxseq / best Flax", "peak MiB, jaxseq / PyTorch"]
    return table(header, out)


def attention(prefix: str, suffix: str = "", results: Path = RESULTS) -> str:
    rows = load(f"{prefix}-attention{suffix}.jsonl", results)
    out = []
    for length, runs in sorted(runs_by_case(rows, lambda r: r["length"]).items()):
        last = list(runs.values())[-1]
        # jaxseq's entry point: the native kernel on CPU, cuDNN on a GPU when eligible (files from
        # before the entry point had a row: the JAX flash path).
        main = "jaxseq-attention" if "jaxseq-attention" in last else "jaxseq-flash"
        flash = "jaxseq-flash" if main == "jaxseq-attention" else None
        ratio, forms = vs_best_torch(runs, main)
        err = last[main].get("max_abs_err_vs_torch")

        def col(impl):
            return column(runs, impl, "tokens_per_s", k, False) or "not run" if impl else "not run"

        out.append([length, len(runs), col(main), col(flash), col("jax-xla"), col("torch-sdpa"),
                    col("torch-sdpa-compile"), f"{ratio} ({forms})" if ratio else "",
                    "" if err is None else f"{err:.1e}", mb(last[main], last.get("torch-sdpa"))])
    header = ["length", "runs", "jaxseq.attention", "jaxseq.flash_attention (JAX)",
              "jax.nn.dot_product_attention (XLA)", "PyTorch SDPA", "PyTorch SDPA, torch.compile",
              "jaxseq / best PyTorch", "max abs err vs torch", "peak MiB, jaxseq / PyTorch"]
    return table(header, out)


def linear_scan(prefix: str, results: Path = RESULTS) -> str:
    rows = [r for r in load(f"{prefix}-linear-scan.jsonl", results) if r.get("bench") == "linear_scan"]
    rows = [{**r, "impl": r["model"] if r["model"] == "lstm" else f"{r['model']}-{r['form']}"} for r in rows]
    names = ["lstm", "mingru-parallel", "mingru-sequential", "minlstm-parallel", "minlstm-sequential",
             "lru-parallel", "lru-sequential"]
    out = []
    for length, runs in sorted(runs_by_case(rows, lambda r: r["length"]).items()):
        out.append([length] + [column(runs, n, "tokens_per_s", k, False) for n in names])
    return table(["length"] + names, out)


def per_impl_table(cases: dict, columns: list[tuple[str, callable]], key: str = "tokens_per_s",
                   higher: bool = True) -> list[list]:
    """One line per (case, impl): the case label, the impl, then each `columns` cell(runs, impl), then
    the ratio to each run's best PyTorch form and which forms those were."""
    out = []
    for label, runs in cases.items():
        impls = list(dict.fromkeys(n for run in runs.values() for n in run))
        for impl in impls:
            ratio, forms = vs_best_torch(runs, impl, key, higher)
            out.append([label, impl] + [cell(runs, impl) for _, cell in columns] + [ratio, forms])
    return out


def gpt_step(prefix: str, results: Path = RESULTS) -> str:
    """One row per (config, impl) over the config's runs of the latest code version: the median over runs of
    tokens/s and of the ratio to each run's fastest PyTorch form, with the min-max over runs when there
    are several (run gpt_step.py 3 times with the same --out), else the run's median step with its
    min-max over rounds."""
    rows = load(f"{prefix}-gpt-step.jsonl", results)

    def label(r):
        c = r["config"]
        return f"{c['layers']}L d{c['d_model']} ctx{c['context']} b{c['batch']}"

    def step(runs, impl):
        per_run = [run[impl] for run in runs.values() if impl in run]
        return f"{statistics.median(r['step_ms'] for r in per_run):.4g}" if len(per_run) > 1 else ms(per_run[0])

    def last(runs, impl, key, fmt):
        r = [run[impl] for run in runs.values() if impl in run][-1]
        return fmt(r[key]) if r.get(key) is not None else ""

    columns = [("tokens/s", lambda runs, i: column(runs, i, "tokens_per_s", k)), ("step ms", step),
               ("compile / first step s", lambda runs, i: last(runs, i, "compile_or_first_step_s", str)),
               ("% of matmul peak", lambda runs, i: last(runs, i, "mfu", lambda x: f"{x:.0%}")),
               ("peak MiB", lambda runs, i: mb([run[i] for run in runs.values() if i in run][-1]))]
    out = per_impl_table(runs_by_case(rows, label), columns)
    out = [line[:6] + line[7:] + [line[6]] for line in out]  # peak MiB last, as before
    return table(["config", "impl"] + [c for c, _ in columns[:4]] + ["vs best PyTorch", "best PyTorch form", "peak MiB"], out)


def generation(prefix: str, results: Path = RESULTS) -> str:
    """Tokens/s of each generation call (sampling at batch 1 and 16, beam search), per competitor."""
    rows = load(f"{prefix}-generation.jsonl", results)

    def label(r):
        what = f"beam {r.get('beam')}" if r["mode"] == "beam" else "sampling"
        return f"{r['model'].upper()} {what}, batch {r['batch']}"

    columns = [("tokens/s", lambda runs, i: column(runs, i, "tokens_per_s", k)),
               ("ms / token", lambda runs, i: column(runs, i, "ms_per_token", lambda x: f"{x:.3g}", False)),
               ("compile / first call s", lambda runs, i: column(runs, i, "compile_or_first_s", lambda x: f"{x:.3g}", False))]
    out = per_impl_table(runs_by_case(rows, label), columns)
    return table(["case", "impl"] + [c for c, _ in columns] + ["vs best PyTorch", "best PyTorch form"], out)


def memory(prefix: str, results: Path = RESULTS) -> str:
    """Peak RSS of each competitor alone in a fresh process (memory.py)."""
    rows = load(f"{prefix}-memory.jsonl", results)
    columns = [("peak RSS MiB", lambda runs, i: column(runs, i, "rss_peak_mb", lambda x: f"{x:.0f}")),
               ("of which before the first call", lambda runs, i: column(runs, i, "rss_base_mb", lambda x: f"{x:.0f}", False)),
               ("growth MiB", lambda runs, i: column(runs, i, "rss_growth_mb", lambda x: f"{x:.0f}", False))]
    out = per_impl_table(runs_by_case(rows, lambda r: r["case"]), columns, key="rss_peak_mb", higher=False)
    return table(["case", "impl"] + [c for c, _ in columns] + ["best PyTorch peak / ours", "best PyTorch form"], out)


def with_common_target(runs: dict) -> dict:
    """Each run's rows with `common_loss` (the lowest validation loss every competitor of the run
    reached: the largest of their best losses) and `time_to_common_s` (the wall time of each one's first
    evaluation at or below it) added, read off their `val_curve`s."""
    out = {}
    for key, run in runs.items():
        best = [min(loss for _, _, loss in r["val_curve"]) for r in run.values() if r.get("val_curve")]
        common = max(best) if best else None
        out[key] = {}
        for impl, r in run.items():
            hit = [t for _, t, loss in r.get("val_curve") or [] if common is not None and loss <= common]
            out[key][impl] = {**r, "common_loss": common, "time_to_common_s": hit[0] if hit else None}
    return out


def time_to_quality(prefix: str, results: Path = RESULTS) -> str:
    """Wall time from launch to the first evaluation at or below the target validation loss, and to the
    lowest loss every competitor of the run reached (where some never reach the target), per competitor."""
    rows = [r for r in load(f"{prefix}-time-to-quality.jsonl", results) if r.get("bench") == "time_to_quality"]

    def label(r):
        return f"{r['model']}, target {r['target']}"

    def secs(x):
        return f"{x:.0f}"

    # the run count goes with the final loss, which every run has (some never reach the target)
    columns = [("time to target s", lambda runs, i: column(runs, i, "time_to_target_s", secs, False)),
               ("final val loss", lambda runs, i: column(runs, i, "final_val_loss", lambda x: f"{x:.3f}")),
               ("common loss", lambda runs, i: column(runs, i, "common_loss", lambda x: f"{x:.3f}", False)),
               ("time to common loss s", lambda runs, i: column(runs, i, "time_to_common_s", secs, False)),
               ("steps", lambda runs, i: column(runs, i, "steps", lambda x: f"{x:.0f}", False)),
               ("training steps / s", lambda runs, i: column(runs, i, "train_steps_per_s", lambda x: f"{x:.2f}", False)),
               ("first step s", lambda runs, i: column(runs, i, "first_step_s", secs, False)),
               ("total wall s", lambda runs, i: column(runs, i, "wall_s", secs, False)),
               ("peak RSS MiB", lambda runs, i: column(runs, i, "rss_peak_mb", secs, False))]
    cases = {case: with_common_target(runs) for case, runs in runs_by_case(rows, label).items()}
    out = per_impl_table(cases, columns, key="time_to_target_s", higher=False)
    common = per_impl_table(cases, [], key="time_to_common_s", higher=False)
    out = [line + common_line[2:] for line, common_line in zip(out, common)]
    return table(["case", "impl"] + [c for c, _ in columns] + ["best PyTorch time / ours, to target", "form",
                                                              "best PyTorch time / ours, to common loss", "form"], out)


def sharding(prefix: str, results: Path = RESULTS) -> str:
    """`jaxseq train`'s step on 1 and 8 (fake) devices: tokens/s per model, mesh and dtype."""
    rows = [r for r in load(f"{prefix}-sharding.jsonl", results) if r.get("bench") == "sharded_step"]
    cols = {}
    for r in rows:
        col = (f"{r['devices']} device{'s' if r['devices'] > 1 else ''}"
               + (f", {'FSDP' if r['mesh'] == 'fsdp' else 'data parallel'}" if r["devices"] > 1 else "")
               + (", bf16 compute" if r["compute_dtype"] == "bfloat16" else ""))
        cols.setdefault(col, {})[r["model"]] = r
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = [[m] + [k(cols[c][m]["tokens_per_s"]) if m in cols[c] else "" for c in cols] for m in models]
    return table(["model"] + list(cols), out)


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def compare(prefix: str, results: Path = RESULTS) -> str:
    """The lecture's comparison (experiments/compare_models.py) and, beside it, the Transformer of the
    time-to-quality runs (nanoGPT's small CPU configuration): validation loss and wall time."""
    names = {"ngram": "n-gram", "additive": "additive (mean of the context's embeddings)", "rnn": "Elman RNN",
             "lstm": "LSTM", "gru": "GRU", "transformer": "Transformer"}
    out = []
    for r in load(f"{prefix}-compare-tinyshakespeare.jsonl", results):
        out.append([names.get(r["model"], r["model"]) + ", `jaxseq train` defaults", f"{r['val_loss']:.3f}",
                    minutes(r["wall_s"]), r.get("steps", "")])
    ttq = runs_by_case([r for r in load(f"{prefix}-time-to-quality.jsonl", results) if r.get("impl") == "jaxseq"],
                       lambda r: r["model"])
    for model, runs in ttq.items():
        if model != "transformer":
            continue
        last = list(runs.values())[-1]["jaxseq"]
        c = last.get("config", {})
        out.append([f"Transformer, nanoGPT's small CPU config ({c.get('layers')} x {c.get('d_model')}, "
                    f"context {c.get('context')}, batch {c.get('batch')})", column(runs, "jaxseq", "final_val_loss", lambda x: f"{x:.3f}"),
                    column(runs, "jaxseq", "wall_s", minutes), last.get("steps", "")])
    return table(["model", "val nats/char", "wall", "steps"], out)


SECTIONS = [("LSTM / GRU layers", "rnn-layers", rnn_layers),
            ("causal attention", "attention", lambda p, r: attention(p, "", r)),
            ("causal attention, bfloat16", "attention-bf16", lambda p, r: attention(p, "-bf16", r)),
            ("causal attention (1 core)", "attention-1thread", lambda p, r: attention(p, "-1thread", r)),
            ("linear recurrences, training tokens/s", "linear-scan", linear_scan),
            ("GPT train step", "gpt-step", gpt_step),
            ("sharded train step, tokens/s", "sharding", sharding),
            ("generation", "generation", generation),
            ("peak resident memory (RSS), each competitor alone in a fresh process", "memory", memory),
            ("time to quality, tinyshakespeare", "time-to-quality", time_to_quality)]


def render(prefix: str = "cpu", results: Path = RESULTS) -> str:
    """All tables of one device prefix as markdown: a `####` heading, the provenance line, the table."""
    parts = []
    for title, stem, make in SECTIONS:
        text = make(prefix, results)
        if text.count("\n") > 1:  # a header alone: no results file for this device
            where = provenance(latest_code(load(f"{prefix}-{stem}.jsonl", results)))
            parts.append(f"#### {title}\n\n" + (f"{where}\n\n" if where else "") + text + "\n")
    return "\n".join(parts)


def write_section(readme: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the lines between the README's `begin` and `end` markers with `text` (markers kept)."""
    doc = Path(readme).read_text()
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise SystemExit(f"{readme}: needs exactly one '{begin}' line before one '{end}' line around the generated "
                         "tables; add them where the tables belong and run again")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    note = "<!-- generated by `python benchmarks/summarize.py --write` from results/: edit the generator, not this -->"
    Path(readme).write_text(f"{head}{begin}\n{note}\n\n{text.strip()}\n\n{end}{tail}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", default="cpu")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the directory of the .jsonl files")
    ap.add_argument("--write", action="store_true", help="rewrite the README's section between the markers")
    ap.add_argument("--readme", type=Path, default=README, help="the file --write rewrites")
    ap.add_argument("--root-readme", type=Path, default=None,
                    help="the file whose 'Results' section --write rewrites, between its results markers (default: "
                         "the repository's README when --readme is the default)")
    args = ap.parse_args(argv)
    text = render(args.prefix, args.results)
    results_text = compare(args.prefix, args.results)
    if args.write:
        write_section(args.readme, text)
        print(f"wrote the tables into {args.readme}", file=sys.stderr)
        root = args.root_readme or (ROOT_README if args.readme == README else None)
        if root is not None and root.exists() and RESULTS_BEGIN in root.read_text():
            write_section(root, results_text, RESULTS_BEGIN, RESULTS_END)
            print(f"wrote the results table into {root}", file=sys.stderr)
    else:
        print(text + "\n#### README.md, Results\n\n" + results_text)


if __name__ == "__main__":
    main()
