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
                        ("--char-lm.text-column", "column that holds the text"),
                        ("--char-lm.batch-size", "Sequences per step"), ("--task", "What to learn"),
                        ("--kernels", "Which implementations"),
                        ("--ngram.order", "longest context"), ("--optim.grad-clip", "global norm")]:
        assert words in _description(out, flag), (flag, _description(out, flag))


def _description(out: str, flag: str) -> str:
    """The description next to `flag`, or right below it (where tyro puts it after a long flag and metavar)."""
    rows = out.splitlines()
    for r, row in enumerate(rows):
        cut = re.search(re.escape(flag) + r" \{[^}│]*(?:│|$)", row)  # a choice set wrapped onto the next lines
        if cut:
            end = next(k for k in range(r + 1, len(rows)) if "}" in rows[k][cut.start():cut.end()])
            return _cell(rows[end + 1][cut.start():])
        for m in re.finditer(re.escape(flag) + r"(?:, --\S+)?(?: (?:[A-Z_|]+|\{[^}]*\})(?=\s|$))?[ ,]", row):
            here = _cell(row[m.end():])
            if here:
                return here
            below = rows[r + 1][m.start():] if r + 1 < len(rows) else ""
            assert not below.strip().startswith("--"), (flag, row, below)  # no description of its own
            return _cell(below)
    raise AssertionError(f"{flag} is not in the help")


def _cell(text: str) -> str:
    """The description that starts `text` (after at most 30 blanks of alignment; a wide terminal may set a
    second column of options beside the first, farther away), up to a box border or that column's gap. A
    description never starts with "-": that is the next column's flag or rule."""
    m = re.match(r"[ ]{0,30}([^ │\-─].*?)(?=[ ]{3,}|│|$)", text)
    return m.group(1) if m else ""


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_help_describe_the_run_dir(capsys, monkeypatch, command):
    out = _help(capsys, monkeypatch, command)
    assert "The run directory `jaxseq train` wrote" in out
