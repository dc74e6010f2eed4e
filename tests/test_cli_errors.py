"""At the command line an expected error is one line, `jaxseq: error: ...`, and status 2 (DESIGN: loud at the edges)."""

from __future__ import annotations

import pytest

from jaxseq.cli import main
from jaxseq.errors import CheckpointError, DataError


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    return exc.value.code, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxseq: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def ngram_run(tmp_path_factory):
    """A fitted bigram run (counting takes no compile) on a tiny corpus of lowercase letters."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = tmp / "corpus.txt"
    corpus.write_text("abc def ghi jkl " * 200)
    main(["train", "--model", "ngram", "--ngram.order", "2", "--char-lm.source", str(corpus),
          "--char-lm.seq-len", "8", "--char-lm.batch-size", "4", "--run-dir", str(tmp / "run"), "--no-progress"])
    return tmp / "run"


def test_missing_data_path(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--char-lm.source", str(tmp_path / "nope.txt"), "--run-dir", str(tmp_path / "r"))
    line = one_error_line(err)
    assert code == 2 and "nope.txt" in line and "no such file" in line


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, err = run_cli(capsys, "train", "--char-lm.source", str(tmp_path / "empty.txt"), "--run-dir", str(tmp_path / "r"))
    line = one_error_line(err)
    assert code == 2 and "empty" in line and "--char-lm.source" in line


def test_prompt_character_outside_the_vocabulary(ngram_run, capsys):
    code, err = run_cli(capsys, "sample", str(ngram_run), "--prompt", "abcZ", "--max-new-tokens", "4")
    line = one_error_line(err)
    assert code == 2 and "'Z'" in line and "vocabulary" in line


def test_missing_run_directory(tmp_path, capsys):
    code, err = run_cli(capsys, "sample", str(tmp_path / "no-run"))
    line = one_error_line(err)
    assert code == 2 and "no-run" in line and "does not exist" in line
    code, err = run_cli(capsys, "eval", str(tmp_path))  # a folder, but not a run directory
    assert code == 2 and "config.json is missing" in one_error_line(err)


def test_debug_shows_the_traceback(tmp_path, monkeypatch, ngram_run):
    with pytest.raises(CheckpointError):
        main(["sample", str(tmp_path / "no-run"), "--debug"])
    monkeypatch.setenv("JAXSEQ_DEBUG", "1")
    with pytest.raises(DataError):
        main(["sample", str(ngram_run), "--prompt", "Z"])


def test_the_run_still_samples_and_evaluates(ngram_run, capsys):
    main(["sample", str(ngram_run), "--prompt", "abc", "--max-new-tokens", "8", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.startswith("abc") and len(out.strip()) == 11
    main(["eval", str(ngram_run)])
    assert '"bits"' in capsys.readouterr().out
