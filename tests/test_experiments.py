"""The pulse test: every experiment's --quick form runs end to end through the library (DESIGN: experiments)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


def load(name: str):
    if str(EXPERIMENTS) not in sys.path:  # experiments import their shared helpers (experiments/common.py)
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_mnist1d_order_quick(tmp_path):
    pytest.importorskip("mnist1d")
    exp = load("mnist1d_order")
    rows = exp.main(exp.Args(quick=True, run_root=str(tmp_path), out=str(tmp_path / "out.jsonl")))
    assert [r["variant"] for r in rows] == ["plain", "shuffled"]
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["steps"] == 20 and row["quick"]
        assert [s for s, _ in row["curve"]] == [10, 20]
    assert not (tmp_path / "out.jsonl").exists()  # a quick run never writes the results file


def test_compare_models_quick(tmp_path):
    exp = load("compare_models")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 40)
    rows = exp.main(exp.Args(quick=True, source=str(corpus), models=("ngram", "lstm"),
                             run_root=str(tmp_path / "runs"), out=str(tmp_path / "out.jsonl")))
    assert [r["model"] for r in rows] == ["ngram", "lstm"]
    uniform = float(np.log(len(set(corpus.read_text()))))
    for row in rows:  # every model scored on the same held-out text, all of it
        assert row["val_tokens"] == rows[0]["val_tokens"] and 0 < row["val_loss"] < uniform + 1.0, row
    assert rows[0]["val_loss"] < 1.0  # the trigram sees this text's regularity at once
    assert not (tmp_path / "out.jsonl").exists()


def test_encoding_bottleneck_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSEQ_CACHE", str(tmp_path / "cache"))
    exp = load("encoding_bottleneck")
    rows = exp.main(exp.Args(quick=True, models=("lstm-bahdanau",), run_root=str(tmp_path / "runs"),
                             out=str(tmp_path / "out.jsonl")))
    assert [r["model"] for r in rows] == ["lstm-bahdanau"]
    for row in rows:  # every test pair lands in one length bucket, all scored
        assert sum(b["count"] for b in row["by_length"].values()) == row["test_pairs"] == 24
        assert all(0 <= b["bleu"] <= 100 for b in row["by_length"].values()) and row["params"] > 0
    assert exp.bucket_of(59) == "40-59" and exp.bucket_of(60) == "60-79"
    assert not (tmp_path / "out.jsonl").exists()


def test_show_attend_tell_quick(tmp_path):
    exp = load("show_attend_tell")
    rows = exp.main(exp.Args(quick=True, models=("lstm-bahdanau",), run_root=str(tmp_path / "runs"),
                             out=str(tmp_path / "out.jsonl")))
    assert rows[0]["attention"] and 0 <= rows[0]["exact_match"] <= 100 and rows[0]["steps"] == 3
    assert not (tmp_path / "out.jsonl").exists()


def test_memory_policy_quick(tmp_path):
    exp = load("memory_policy")
    rows = exp.main(exp.Args(quick=True, run_root=str(tmp_path / "runs"), out=str(tmp_path / "out.jsonl")))
    assert [(r["env"], r["core"], r["delay"]) for r in rows] == [("DelayedCue", "lstm", 2), ("DelayedCue", "ff", 2)]
    for row in rows:
        assert 0.0 <= row["success"] <= 1.0 and row["env_steps"] == len(row["curve"]) * 4 * 8 == 64
        assert row["params"] > 0 and -1.0 <= row["return"] <= 1.0
    assert not (tmp_path / "out.jsonl").exists()


def test_wavenet_speech_quick(tmp_path):
    pytest.importorskip("espeakng_loader")
    exp = load("wavenet_speech")
    rows = exp.main(exp.Args(quick=True, run_root=str(tmp_path), out=str(tmp_path / "out.jsonl")))
    assert [r["model"] for r in rows] == ["wavenet", "lstm"]
    for row in rows:  # both scored on the same held-out windows, near the 8 bits of a uniform guess
        assert row["test_samples"] == rows[0]["test_samples"] > 0 and 6.0 < row["test_bits"] < 9.0, row
        assert row["steps"] == 4 and [s for s, _ in row["curve"]] == [2, 4] and row["params"] > 0
    assert rows[0]["receptive_field"] == 9
    assert (tmp_path / "wavenet_speech.png").is_file() and (tmp_path / "wavenet_speech_spectrograms.png").is_file()
    assert not (tmp_path / "out.jsonl").exists()  # a quick run never writes the results file


def test_transfer_quick(tmp_path):
    pytest.importorskip("sklearn")
    exp = load("transfer")
    rows = exp.main(exp.Args(quick=True, run_root=str(tmp_path), out=str(tmp_path / "out.jsonl")))
    assert [r["kind"] for r in rows] == ["calibration", "pretrain", "classifier", "classifier", "classifier"]
    assert rows[0]["chars_per_s"] > 0 and rows[1]["steps"] == rows[0]["pretrain_steps"] >= 1
    tfidf, scratch, tuned = rows[2:]
    assert tfidf["family"] == "tfidf-logreg" and (scratch["init"], tuned["init"]) == ("scratch", "pretrained")
    for row in rows[2:]:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["test_count"] > 600 and row["labels"] == 50
    record = json.loads((tmp_path / "cls-lstm-pretrained-50-4" / "init_from.json").read_text())
    assert record["step"] == rows[1]["steps"]
    assert not (tmp_path / "out.jsonl").exists()  # a quick run never writes the results file


def test_long_range_quick(tmp_path):
    exp = load("long_range")
    rows = exp.main(exp.Args(quick=True, run_root=str(tmp_path), out=str(tmp_path / "out.jsonl")))
    recall = [r for r in rows if r["kind"] == "recall"]
    assert [r["family"] for r in recall] == ["ngram", "conv"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["distance"] == 3 for r in recall)
    assert recall[0]["params"] == 0 and recall[1]["params"] > 0  # the n-gram is counted, not trained
    cost = [r for r in rows if r["kind"] == "cost"]
    assert {(r["family"], r["length"]) for r in cost} == {(f, T) for f in ("lstm", "conv") for T in (16, 32)}
    assert all(r["s_per_1k_tokens"] > 0 for r in cost)
    assert not (tmp_path / "out.jsonl").exists()


def test_music_quick(tmp_path):
    pytest.importorskip("music21")
    exp = load("music")
    rows = exp.main(exp.Args(quick=True, families=("gru",), run_root=str(tmp_path), out=str(tmp_path / "out.jsonl")))
    assert [(r["table"], r["model"]) for r in rows] == [("folk", "lstm"), ("chorales", "gru")]
    folk, gru = rows
    assert folk["tunes_sampled"] == 4 and 0.0 <= folk["valid_fraction"] <= 1.0 and folk["skipped_parse"] >= 0
    assert abs(gru["params"] - 20_000) <= 1_000 and np.isfinite(gru["val_nll_frame"]) and gru["steps"] == 4
    assert not (tmp_path / "out.jsonl").exists()  # a quick run never writes the results file


def test_desiderata_quick(tmp_path):
    exp = load("desiderata")
    rows = exp.main(exp.Args(quick=True, run_root=str(tmp_path), out=str(tmp_path / "out.jsonl")))
    probes = [r for r in rows if r["kind"] == "probe"]
    assert {(r["family"], r["column"]) for r in probes} == {("ngram", "order"), ("gru", "order")}
    assert all(0.0 <= r["score"] <= 1.0 for r in probes)
    lm = {r["family"]: r for r in rows if r["kind"] == "lm"}
    assert lm["ngram"]["steps_per_s"] is None and lm["gru"]["steps"] >= 1 and lm["gru"]["curve"]
    text = exp.table(rows, exp.Args(families=("ngram", "gru")))
    assert "Disagreements with the lecture" in text and "(lecture ✗)" in text
    rows_text = text.splitlines()[2:4]
    assert [r.split(" | ")[0] for r in rows_text] == ["| ngram", "| gru"]
    assert all(r.split(" | ")[2] == "-" for r in rows_text)  # columns not measured show "-", not a cross
    assert not (tmp_path / "out.jsonl").exists()


def test_pixelrnn_quick(tmp_path):
    pytest.importorskip("sklearn")
    exp = load("pixelrnn")
    rows = exp.main(exp.Args(quick=True, models=("row-lstm",), run_root=str(tmp_path), out=str(tmp_path / "out.jsonl")))
    [row] = rows
    assert row["model"] == "row-lstm" and row["steps"] == 6 and [s for s, _ in row["curve"]] == [6]
    # near a uniform guess after 6 steps; independent pixels (per-position histograms) already far below it
    assert 2.0 < row["test_bits_per_dim"] < row["uniform_bits_per_dim"] + 0.5 and row["independent_bits_per_dim"] < 3.0
    samples = np.asarray(row["samples"])
    assert samples.shape == (2, 8, 8) and samples.min() >= 0 and samples.max() < 17
    assert not (tmp_path / "out.jsonl").exists()  # a quick run never writes the results file


def test_vanishing_gradients_quick(tmp_path):
    exp = load("vanishing_gradients")
    rows = exp.main(exp.Args(quick=True, run_root=str(tmp_path), out=str(tmp_path / "out.jsonl")))
    scalar = {(r["regime"], r["w"]): r["norms"] for r in rows if r["kind"] == "scalar"}
    # zero inputs keep h at 0: the gradient over k steps is exactly w^k (vanishing below 1, exploding above)
    np.testing.assert_allclose(scalar["zero inputs", 0.9], 0.9 ** np.arange(1, 11), rtol=1e-3)
    np.testing.assert_allclose(scalar["zero inputs", 1.1], 1.1 ** np.arange(1, 11), rtol=1e-3)
    family = [r for r in rows if r["kind"] == "family"]
    assert [(r["family"], r["stage"]) for r in family] == [("lstm", "init"), ("lstm", "trained")]
    assert all(len(r["state_jacobian"]) == len(r["input_grad"]) for r in family)  # one norm per step back
    assert all(r["input_grad"][0] > 0 for r in family)
    assert [r["grad_clip"] for r in rows if r["kind"] == "clipping"] == [1.0, 0.0]
    assert not (tmp_path / "out.jsonl").exists()
