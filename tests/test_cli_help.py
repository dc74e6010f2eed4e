"""`jaxseq {train,sample,eval} --help`: every option shows its own description.

tyro gives a comment above a dataclass field to the undescribed fields after it as well; `jaxseq train
--help` once described --steps, --seed, --run-dir and five more as "Which library runs the matmuls on CPU".
"""

import re

import pytest

from jaxseq.cli import main


def _help(capsys, monkeypatch, command: str) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: no wrapping inside a description
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_train_help_describes_each_option_once(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, "train")
    assert out.count("Which library runs the matmuls on CPU") == 1
    assert out.count('"stdlib" (built from') == 1
    assert out.count("Pseudo-count added at every order") == 1
    for flag, words in [("--steps", "Optimizer steps"), ("--seed", "Seed of the initialisation"),
                        ("--run-dir", "Where checkpoints"), ("--resume", "Continue the run"),
                        ("--data.text-column", "column that holds the text"),
                        ("--ngram.order", "longest context"), ("--optim.grad-clip", "global norm")]:
        # A wide terminal may set two columns of options side by side: look at each column's cell.
        cells = [cell for row in out.splitlines() for cell in row.split("││")]
        cell = next(c for c in cells if re.search(re.escape(flag) + r"[ ,]", c))
        assert words in cell, (flag, cell)


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_help_describe_the_run_dir(capsys, monkeypatch, command):
    out = _help(capsys, monkeypatch, command)
    assert "The run directory `jaxseq train` wrote" in out
