"""The translation and captioning tasks through the loop: learning, BLEU through `evaluate`, the command
line, and bad input named with its fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxseq.cli import main
from jaxseq.config import OptimConfig, Seq2SeqConfig, TrainConfig, TransformerConfig
from jaxseq.errors import ConfigError, DataError
from jaxseq.run import load_run
from jaxseq.tasks import Captioning, Translation
from jaxseq.train import train

WORDS = ["red", "green", "blue", "cyan", "black", "white"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSEQ_CACHE", str(tmp_path / "cache"))


def memorise_file(tmp_path, repeats=25):
    """8 distinct pairs "w1 .. w5" -> the same words reversed, each repeated, so the test split holds
    sentences the model trained on."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(8):
        words = list(rng.choice(WORDS, 5))
        rows.append((" ".join(words), " ".join(reversed(words))))
    path = tmp_path / "pairs.tsv"
    path.write_text("en\tde\n" + "".join(f"{s}\t{t}\n" for s, t in rows * repeats))
    return path, rows


def config(tmp_path, task, model="gru-bahdanau", name="run", **kw):
    base = dict(task="translation" if isinstance(task, Translation) else "captioning", model=model,
                seq2seq=Seq2SeqConfig(d_embed=16, d_hidden=32, cnn_channels=8),
                optim=OptimConfig(lr=1e-2, warmup_steps=10), steps=150, eval_every=150, eval_batches=2,
                checkpoint_every=150, progress=False, run_dir=str(tmp_path / name))
    base["translation" if isinstance(task, Translation) else "captioning"] = task
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("memorised")
    path, rows = memorise_file(tmp_path)
    task = Translation(data=str(path), source_column="en", target_column="de", tokenizer="word", val_pairs=16,
                       test_pairs=16, batch_size=16, beam_size=2, bleu_tokenize="13a")
    summary = train(None, None, config(tmp_path, task))
    return summary, rows


def test_memorised_pairs_score_100_through_evaluate(memorised):
    """Sentences seen in training come back exactly: BLEU, chrF and exact match all 100 from the task's own
    evaluate (beam search, detokenised text, sacrebleu)."""
    summary, _ = memorised
    report = summary["report"]
    assert report["exact_match"] == 100.0 and report["bleu"] == pytest.approx(100.0) and report["chrf"] == pytest.approx(100.0)
    assert report["loss"] < 0.05


def test_sample_translates_and_bad_input_is_one_line(memorised, capsys):
    summary, rows = memorised
    run = summary["run_dir"]
    main(["sample", run, "--source", rows[0][0]])
    assert capsys.readouterr().out.strip() == rows[0][1]
    for argv, match in [(["--source", ""], "--source is empty"),
                        (["--source", "red purple"], "not in the vocabulary"),
                        ([], "give the sentence to translate with --source")]:
        with pytest.raises(SystemExit) as e:
            main(["sample", run, *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("jaxseq: error:") and match in err and "\n" not in err


def test_bad_data_files_name_the_fix(tmp_path):
    path, _ = memorise_file(tmp_path, repeats=4)
    with pytest.raises(DataError, match="--translation.source-column"):
        Translation(data=str(path), source_column="english", target_column="de", val_pairs=4, test_pairs=4).prepare()
    too_long = Translation(data=str(path), source_column="en", target_column="de", tokenizer="word", val_pairs=4,
                           test_pairs=4, max_target_len=4)
    with pytest.raises(DataError, match="--translation.max-target-len"):
        too_long.prepare()
    with pytest.raises(DataError, match="no such file"):
        Translation(data=str(tmp_path / "missing.tsv")).prepare()


def test_numbers_have_a_closed_vocabulary_and_longer_test_sources():
    task = Translation(train_pairs=200, val_pairs=20, test_pairs=50, max_digits=3, test_max_digits=7)
    data = task.prepare()
    src_vocab, tgt_vocab = data["vocabs"]
    src_vocab.encode("zero"), tgt_vocab.encode("null")  # in every vocabulary, whatever numbers were drawn
    assert max(len(s.split()) for s, _ in data["test"]["text"]) > max(len(s.split()) for s, _ in data["train"]["text"])
    train_sources = {s for s, _ in data["train"]["text"]}
    assert not train_sources & {s for s, _ in data["test"]["text"]}
    with pytest.raises(ConfigError, match="test-max-digits"):
        Translation(max_digits=6, test_max_digits=4).pairs()


def test_transformer_trains_on_numbers_and_reloads(tmp_path):
    """The pulse: the Transformer encoder-decoder takes a few steps on the default number task; the run reloads."""
    task = Translation(train_pairs=64, val_pairs=16, test_pairs=8, max_digits=3, batch_size=8, beam_size=2)
    small = TransformerConfig(num_layers=1, num_heads=2, d_model=16, d_ff=32)
    out = train(None, None, config(tmp_path, task, model="transformer", steps=3, eval_every=3, checkpoint_every=3,
                                   transformer=small))  # the RNN encoder-decoders train in the tests above
    assert np.isfinite(out["report"]["loss"]) and 0 <= out["report"]["bleu"] <= 100
    run = load_run(out["run_dir"])  # the saved run rebuilds the encoder-decoder from its two example inputs
    data = run.task.prepare(out["run_dir"])
    assert run.task.evaluate(run.model, run.variables, data) == out["report"]


def test_captioning_trains_evaluates_and_reloads(tmp_path, capsys):
    task = Captioning(train_scenes=64, val_scenes=16, test_scenes=16, batch_size=16, beam_size=2)
    out = train(None, None, config(tmp_path, task, model="lstm-bahdanau", steps=3, eval_every=3, checkpoint_every=3))
    report = out["report"]
    assert {"bleu", "chrf", "exact_match", "loss", "accuracy"} <= set(report) and report["count"] > 16
    main(["eval", out["run_dir"]])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    with pytest.raises(ConfigError, match="token sources"):
        train(None, None, config(tmp_path, task, model="transformer", name="t", steps=1))
