"""benchmarks/_common.py: the peak memory each benchmark row reports (JAX: XLA's plan; torch: its allocator),
and the timing rounds."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import jax_peak_mb, timed_rounds, torch_peak_mb  # noqa: E402

MiB = 2**20


def test_jax_peak_counts_arguments_outputs_and_temporaries():
    x = jnp.ones((1024, 256), jnp.float32)  # 1 MiB

    def f(x):  # the sort works in a 1 MiB temporary (x itself is not donated); 8 floats come out
        return jnp.sort((x * 2.0).ravel())[:8]

    assert jax_peak_mb(jax.jit(f).lower(x).compile()) == pytest.approx(2.0, abs=0.01)


def test_jax_peak_subtracts_donated_outputs():
    x = jnp.ones((1024, 256), jnp.float32)  # 1 MiB
    plain = jax_peak_mb(jax.jit(lambda x: x + 1).lower(x).compile())
    donated = jax_peak_mb(jax.jit(lambda x: x + 1, donate_argnums=0).lower(x).compile())
    assert plain == pytest.approx(2.0, abs=0.01)
    assert donated == pytest.approx(1.0, abs=0.01)


def test_torch_peak_on_cpu_sees_a_temporary_and_the_inputs():
    torch = pytest.importorskip("torch")
    x = torch.ones(256, 1024)  # 1 MiB, alive before the call

    def call():
        tmp = torch.empty(8 * 256, 1024)  # 8 MiB, freed when the call returns
        tmp.fill_(2.0)
        return float((tmp[:256] * x).sum())

    peak = torch_peak_mb(torch, call, "cpu")
    assert peak is not None, "torch's profiler gave no memory timeline"
    assert 9.0 <= peak < 11.0


def test_timed_rounds_interleaves_and_times_only_the_call_after_its_own():
    log = []
    calls = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    (times,) = timed_rounds(calls, rounds=2, clocks=(lambda: len(log),), lead_in=1)
    assert log == ["a", "a", "b", "b"] * 2  # each timed call right after an untimed one of its own
    assert times == {"a": [1, 1], "b": [1, 1]}  # a window holds exactly one call


# ------------------------------------------------------------------- the record each row carries


def test_run_record_names_commit_device_flags_threads_and_load():
    import subprocess

    torch = pytest.importorskip("torch")
    from _common import run_record

    rec = run_record(torch, malloc="system")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True).stdout.strip()
    assert rec["commit"] is None if not head else rec["commit"].split("+")[0] == head
    assert isinstance(rec["device"], str) and rec["device"].startswith(jax.devices()[0].platform)
    flags = open("/proc/cpuinfo").read().split() if Path("/proc/cpuinfo").exists() else None
    for name in ("avx512", "avx512f", "avx2", "fma", "amx"):
        assert isinstance(rec["cpu_flags"][name], bool) or flags is None
    if flags is not None:  # /proc/cpuinfo read independently
        assert rec["cpu_flags"]["avx512f"] == ("avx512f" in flags)
        assert rec["cpu_flags"]["avx2"] == ("avx2" in flags)
    assert rec["threads"]["torch"] == torch.get_num_threads()
    assert isinstance(rec["threads"]["cpu_count"], int) and isinstance(rec["threads"]["xla_flags"], str)
    assert len(rec["load_avg"]) == 3 and all(isinstance(x, float) for x in rec["load_avg"])
    assert rec["malloc"] == "system" and rec["jax"] == jax.__version__ and rec["torch"] == torch.__version__


def test_setup_process_leaves_malloc_alone_when_asked(monkeypatch):
    from _common import setup_process

    assert setup_process(system_malloc=True) == {"malloc": "system"}
    monkeypatch.setenv("JAXSEQ_MALLOC", "system")
    assert setup_process() == {"malloc": "system"}


def test_time_stats_median_min_max():
    from _common import time_stats

    assert time_stats([0.003, 0.001, 0.002, 0.010]) == {"step_ms": 2.5, "step_ms_min": 1.0, "step_ms_max": 10.0, "n": 4}


# ------------------------------------------------------------------- FLOPs


def test_gpt_flops_count_the_causal_half_of_attention():
    from _common import gpt_flops_per_step

    # by hand: N = 0, 1 layer, d = 2, T = 3, batch 1: query t meets t + 1 keys, 1 + 2 + 3 = 6 pairs,
    # 12 d = 24 training FLOPs a pair (q.k and p.v, 2 d each forward, x3 for the backward) -> 144
    assert gpt_flops_per_step(0, layers=1, d=2, ctx=3, batch=1) == 144
    assert gpt_flops_per_step(0, layers=1, d=2, ctx=3, batch=1, causal=False) == 216  # 9 pairs
    # a loop over the (query, key) pairs a causal mask keeps, plus 6N per token
    N, L, d, T, B = 1000, 4, 8, 16, 3
    pairs = sum(1 for q in range(T) for key in range(T) if key <= q)
    assert gpt_flops_per_step(N, L, d, T, B) == 6 * N * T * B + 12 * d * L * pairs * B


# ------------------------------------------------------------------- summarize's tables


def _gpt_row(impl, tokens_per_s, **extra):
    config = dict(layers=1, heads=2, d_model=32, context=16, batch=2)
    row = dict(bench="gpt_step", impl=impl, config=config, tokens_per_s=tokens_per_s, step_ms=1e3 * 32 / tokens_per_s,
               step_ms_min=1.0, step_ms_max=9.0, compile_or_first_step_s=1.5, mfu=0.25, peak_mb=3.0,
               cpu_flags={"avx512": False}, device="cpu: Test CPU (2 cores), cpu", commit="abc1234def567890",
               load_avg=[0.5, 0.4, 0.3], time="2026-12-07T10:00:00Z")
    return {**row, **extra}


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summarize_gpt_table_compares_with_the_fastest_pytorch_form_over_the_latest_commits_runs(tmp_path):
    import summarize

    def run(when, commit, jaxseq, eager, compiled):
        extra = dict(time=when, commit=commit)
        return [_gpt_row("jaxseq", jaxseq, **extra), _gpt_row("flax-gpt", 900.0, **extra),
                _gpt_row("torch-eager", eager, **extra), _gpt_row("torch-compile", compiled, **extra)]

    older = run("2026-12-06T09:00:00Z", "0ld", 100.0, 50.0, 60.0)  # another commit: left out
    runs = (run("2026-12-07T10:00:00Z", "abc", 1000.0, 800.0, 1250.0)   # 0.80x torch-compile
            + run("2026-12-07T10:10:00Z", "abc", 1100.0, 1000.0, 900.0)  # 1.10x torch-eager
            + run("2026-12-07T10:20:00Z", "abc", 900.0, 800.0, 1000.0))  # 0.90x torch-compile
    _write_jsonl(tmp_path / "cpu-gpt-step.jsonl", older + runs)
    lines = summarize.gpt_step("cpu", tmp_path).splitlines()
    rows = {line.split(" | ")[1]: line for line in lines[2:]}
    assert set(rows) == {"jaxseq", "flax-gpt", "torch-eager", "torch-compile"}
    # medians over the 3 runs: tokens/s 1000 (900-1100); ratio to each run's fastest PyTorch form 0.90x
    assert "| 1.0k (900-1.1k, 3 runs) |" in rows["jaxseq"]
    assert "**0.90x** (0.80-1.10) | torch-compile, torch-eager |" in rows["jaxseq"]

    _write_jsonl(tmp_path / "cpu-gpt-step.jsonl", older + runs[:4])  # one run: its rounds' min-max
    rows = {line.split(" | ")[1]: line for line in summarize.gpt_step("cpu", tmp_path).splitlines()[2:]}
    assert "| 1.0k | 32 (1-9) |" in rows["jaxseq"] and "**0.80x** | torch-compile |" in rows["jaxseq"]
    assert "**0.64x**" in rows["torch-eager"] and "**1.00x**" in rows["torch-compile"]


def test_summarize_lower_is_better_tables_compare_with_the_leanest_or_fastest_pytorch_form(tmp_path):
    import summarize

    def mem(run, impl, peak):
        return dict(bench="memory", case="GPT step", impl=impl, rss_peak_mb=peak, rss_base_mb=400.0,
                    rss_growth_mb=peak - 400.0, run_id=run, commit="abc")

    _write_jsonl(tmp_path / "cpu-memory.jsonl", [
        mem("r1", "jaxseq", 600.0), mem("r1", "torch-eager", 500.0), mem("r1", "torch-compile", 800.0),
        mem("r2", "jaxseq", 500.0), mem("r2", "torch-eager", 550.0), mem("r2", "torch-compile", 450.0)])
    rows = {line.split(" | ")[1]: line for line in summarize.memory("cpu", tmp_path).splitlines()[2:]}
    # per run: 500/600 = 0.83 (eager the leanest), 450/500 = 0.90 (compile): median 0.87
    assert "| 550 (500-600, 2 runs) |" in rows["jaxseq"]
    assert "**0.87x** (0.83-0.90) | torch-compile, torch-eager |" in rows["jaxseq"]

    def ttq(run, impl, seconds, reached=True):
        return dict(bench="time_to_quality", model="transformer", target=1.88, impl=impl, run_id=run, commit="abc",
                    time_to_target_s=seconds if reached else None, final_val_loss=1.8, steps=2000, wall_s=300.0,
                    steps_per_s=7.0, step_at_target=1750, rss_peak_mb=900.0)

    _write_jsonl(tmp_path / "cpu-time-to-quality.jsonl", [
        ttq("r1", "jaxseq", 100.0), ttq("r1", "nanogpt", 150.0), ttq("r1", "nanogpt-compile", 0, reached=False)])
    rows = {line.split(" | ")[1]: line for line in summarize.time_to_quality("cpu", tmp_path).splitlines()[2:]}
    assert "**1.50x** | nanogpt |" in rows["jaxseq"]  # a form that never reached the target is no peer
    assert rows["nanogpt-compile"].split(" | ")[2] == ""


def test_summarize_write_rewrites_only_the_marked_section(tmp_path):
    import summarize

    results = tmp_path / "results"
    results.mkdir()
    _write_jsonl(results / "cpu-gpt-step.jsonl", [_gpt_row("jaxseq", 1000.0), _gpt_row("torch-eager", 500.0)])
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nintro\n\n{summarize.BEGIN}\nold table\n{summarize.END}\n\nafter\n")
    summarize.main(["--results", str(results), "--write", "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n" + summarize.BEGIN) and text.endswith(summarize.END + "\n\nafter\n")
    assert "old table" not in text and "#### GPT train step" in text and "**2.00x**" in text
    assert "AVX-512: no" in text and "commit abc1234def56" in text  # the rows' record, in the provenance line
    assert "LSTM / GRU layers" not in text  # no results file, no section
    summarize.main(["--results", str(results), "--write", "--readme", str(readme)])
    assert readme.read_text() == text  # idempotent

    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="tables:begin"):
        summarize.main(["--results", str(results), "--write", "--readme", str(readme)])
    assert readme.read_text() == "# no markers\n"


def _git(repo, *args):
    import subprocess
    out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def _commit(repo, files: dict) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "c")
    return _git(repo, "rev-parse", "HEAD")


def test_code_version_changes_with_measured_code_only(tmp_path):
    from _provenance import code_version

    _git(tmp_path, "init", "-q")
    first = _commit(tmp_path, {"jaxseq/cell.py": "a = 1\n", "benchmarks/gpt_step.py": "b = 1\n",
                               "benchmarks/summarize.py": "s = 1\n", "README.md": "r\n"})
    # results, docs and the summarizer change: the same measurement
    docs = _commit(tmp_path, {"benchmarks/results/cpu.jsonl": "{}\n", "benchmarks/summarize.py": "s = 2\n",
                              "README.md": "r2\n", "benchmarks/README.md": "t\n"})
    code = _commit(tmp_path, {"jaxseq/cell.py": "a = 2\n"})
    script = _commit(tmp_path, {"benchmarks/gpt_step.py": "b = 2\n"})
    versions = [code_version(c, root=tmp_path) for c in (first, docs, code, script)]
    assert versions[0] == versions[1] and len(set(versions[1:])) == 3
    assert code_version(root=tmp_path) == versions[3]  # the working tree, clean
    (tmp_path / "jaxseq/cell.py").write_text("a = 3\n")
    assert code_version(root=tmp_path) not in versions  # dirty code is other code
    assert code_version("0" * 40, root=tmp_path) is None


def test_summarize_takes_the_runs_of_the_latest_code_across_commits(tmp_path, monkeypatch):
    import functools

    import summarize
    from _provenance import code_version

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    old = _commit(repo, {"jaxseq/cell.py": "a = 1\n"})
    new = _commit(repo, {"jaxseq/cell.py": "a = 2\n"})
    docs = _commit(repo, {"README.md": "r\n"})
    monkeypatch.setattr(summarize, "code_version", functools.partial(code_version, root=repo))
    summarize._commit_version.cache_clear()
    rows = [_gpt_row("jaxseq", 100.0), _gpt_row("jaxseq", 200.0), _gpt_row("jaxseq", 300.0),
            _gpt_row("jaxseq", 400.0)]
    for r, commit, run in zip(rows, (old, new + "+dirty", docs, docs), "abcd"):
        r.update(commit=commit, run_id=run)
    kept = summarize.latest_code(rows)
    summarize._commit_version.cache_clear()
    assert [r["run_id"] for r in kept] == ["b", "c", "d"]  # the +dirty row counts as its base commit's code


def test_tables_without_a_machine_record_say_so():
    import summarize

    old = {"bench": "linear_scan", "length": 64, "tokens_per_s": 1.0, "time": "2026-11-30T10:00:00Z"}
    assert summarize.provenance([old]).startswith("Machine, commit and load not recorded")
    assert "(2026-11-30)" in summarize.provenance([old])
    assert summarize.provenance([]) == ""
    recorded = _gpt_row("jaxseq", 1.0)
    assert summarize.provenance([old, recorded]).startswith("Measured on cpu: Test CPU")
