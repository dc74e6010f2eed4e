"""Tests of jaxseq.data: tokenizer, corpora (stdlib, local files through HF datasets, hub errors), batches."""

import json
import os
import sys
import sysconfig

import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.data import (
    CharTokenizer,
    build_stdlib_text,
    eval_batches,
    lm_batch,
    load_text,
    prepare_data,
    split_ids,
    stdlib_cache_path,
    stdlib_text,
    validate_batch,
)
from jaxseq.data import corpus as corpus_mod
from jaxseq.errors import ConfigError, DataError, ShapeError, TokenRangeError
from jaxseq.tasks import CharLM


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSEQ_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def spy_load_dataset(monkeypatch):
    """Records every datasets.load_dataset call (the real function still runs)."""
    import datasets

    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_vocab():
    text = "hello, world!\nThe quick brown fox."
    tok = CharTokenizer.from_text(text)
    assert tok.chars == tuple(sorted(set(text)))
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    # Independent reference: id = position of the character in the sorted vocabulary.
    np.testing.assert_array_equal(ids, [sorted(set(text)).index(c) for c in text])
    assert tok.decode(ids) == text
    assert tok.decode(list(ids)) == text
    assert tok.decode(jnp.asarray(ids)) == text
    assert tok.decode([]) == ""
    assert tok.encode("").shape == (0,)


def test_tokenizer_json_and_file_round_trip(tmp_path):
    tok = CharTokenizer.from_text('quotes " \\ and newlines\n\tand ünïcode ✓')
    again = CharTokenizer.from_json(tok.to_json())
    assert again == tok
    assert json.loads(tok.to_json())["chars"] == "".join(tok.chars)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert CharTokenizer.load(path) == tok
    assert CharTokenizer.load(str(path)).encode("and").tolist() == tok.encode("and").tolist()


def test_tokenizer_unknown_char_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match=r"'z'.*training corpus") as e:
        tok.encode("abzcz\u2603")
    assert "'\u2603'" in str(e.value) and "2 character(s)" in str(e.value)
    # A code point above every vocabulary code point is unknown too (not clipped onto 'c').
    with pytest.raises(DataError, match="not in the tokenizer"):
        tok.encode("\U0001F600")


def test_tokenizer_rejects_bad_input(tmp_path):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenRangeError, match="outside"):
        tok.decode([0, 3])
    with pytest.raises(TokenRangeError):
        tok.decode(np.array([-1]))
    with pytest.raises(DataError, match="1-D"):
        tok.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(DataError, match="non-empty"):
        CharTokenizer.from_text("")
    with pytest.raises(DataError, match="sorted"):
        CharTokenizer(("b", "a"))
    with pytest.raises(DataError, match="not a CharTokenizer"):
        CharTokenizer.from_json('{"chars": "abc"}')
    with pytest.raises(DataError, match="not a CharTokenizer"):
        CharTokenizer.from_json("not json")
    with pytest.raises(DataError, match="no tokenizer file"):
        CharTokenizer.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------------
# Corpora


def test_local_text_file_goes_through_datasets(tmp_path, spy_load_dataset):
    body = "First line.\nSecond line\n\n  indented third\n"
    f = tmp_path / "corpus.txt"
    f.write_text(body, encoding="utf-8")
    assert load_text(str(f)) == body  # read verbatim: blank lines and indentation kept
    assert len(spy_load_dataset) == 1
    args, kwargs = spy_load_dataset[0]
    assert args[0] == "text" and kwargs.get("sample_by") == "document"


def test_local_folder_sorted_and_joined(tmp_path, spy_load_dataset):
    d = tmp_path / "books"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second", encoding="utf-8")
    (d / "a.txt").write_text("first\n", encoding="utf-8")
    (d / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (d / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_text(str(d)) == "first\nsecond\nthird"
    assert spy_load_dataset and spy_load_dataset[0][0][0] == "text"


def test_jsonl_csv_parquet_with_text_column(tmp_path, spy_load_dataset):
    rows = [{"id": 1, "body": "alpha"}, {"id": 2, "body": None}, {"id": 3, "body": "beta\n"}, {"id": 4, "body": "gamma"}]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_text(str(f), text_column="body") == "alpha\nbeta\ngamma"
    with pytest.raises(DataError, match=r"no column 'text'.*body.*--char-lm\.text-column"):
        load_text(str(f))
    with pytest.raises(DataError, match="holds int values"):
        load_text(str(f), text_column="id")

    c = tmp_path / "docs.csv"
    c.write_text('id,body\n1,"one, two"\n2,three\n', encoding="utf-8")
    assert load_text(str(c), text_column="body") == "one, two\nthree"

    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["x", "y"]}), p)
    assert load_text(str(p), text_column="body") == "x\ny"
    assert [a[0] for a, _ in spy_load_dataset] == ["json", "json", "json", "csv", "parquet"]


def test_empty_corpus_errors_name_the_source(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.txt.*empty"):
        load_text(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n ", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.txt"):
        load_text(str(blank))
    folder = tmp_path / "nothing_here"
    folder.mkdir()
    (folder / "data.csv").write_text("a\n1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"nothing_here.*no \*\.txt"):
        load_text(str(folder))


def test_unknown_source_errors_without_network(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode: datasets refuses at once, and load_text says what is accepted.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'someone/no-such-corpus' is neither a local path nor a reachable hub dataset") as e:
        load_text("someone/no-such-corpus")
    assert "'stdlib'" in str(e.value) and ".jsonl" in str(e.value)

    # Online mode with the hub unreachable: answered at once, load_dataset is never called.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(corpus_mod, "_hub_reachable", lambda endpoint, timeout=3.0: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not call the hub"))
    with pytest.raises(DataError, match="cannot be reached.*HF_HUB_OFFLINE=1"):
        load_text("someone/no-such-corpus")

    # Things that cannot be hub names fail as missing paths, without the hub.
    with pytest.raises(DataError, match="no such file or folder"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_text("./relative/missing")
    with pytest.raises(DataError, match="nor a valid hub dataset name"):
        load_text("two words")
    with pytest.raises(DataError, match="non-empty string"):
        load_text("")


def _write(root, rel, src):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(src, encoding="utf-8")


def test_stdlib_builder_on_a_fake_tree(tmp_path):
    root = tmp_path / "lib"
    _write(root, "b_mod.py", '"""Module b."""\n')
    _write(
        root,
        "a_mod.py",
        '"""Module a:\n    caf\u00e9\tend."""\n'
        "import os\n"
        "class K:\n"
        '    """Class K."""\n'
        "    def m(self):\n"
        '        """Method m."""\n'
        "        def inner():\n"
        '            """Inner."""\n'
        "if True:\n"
        "    def f():\n"
        '        """Method m."""\n'  # a repeat: kept once
        "x = lambda: 0\n",
    )
    _write(root, "pkg/__init__.py", '"""Package."""\n')
    _write(root, "test/test_x.py", '"""Skipped test suite."""\n')
    _write(root, "pkg/tests/t.py", '"""Skipped tests."""\n')
    _write(root, "idlelib/x.py", '"""Skipped idle."""\n')
    _write(root, "site-packages/y.py", '"""Skipped third party."""\n')
    _write(root, "broken.py", "def (:\n")
    text = build_stdlib_text(str(root))
    # Sorted files, then sorted folders; source order inside a file; cleandoc (tabs expanded, indent
    # removed); non-ASCII dropped; repeats kept once; tests, idlelib, site-packages and broken files skipped.
    assert text == "Module a:\ncaf        end.\n\nClass K.\n\nMethod m.\n\nInner.\n\nModule b.\n\nPackage.\n"
    assert text == build_stdlib_text(str(root))


def test_stdlib_cache_is_written_atomically_and_read(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "build_stdlib_text", lambda root=None: "Docs.\n")
    path = stdlib_cache_path()
    assert str(path).startswith(str(tmp_path / "cache")) and ".".join(map(str, sys.version_info[:3])) in path.name
    assert load_text("stdlib") == "Docs.\n"
    assert path.read_text(encoding="utf-8") == "Docs.\n"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    path.write_text("From the cache.\n", encoding="utf-8")
    monkeypatch.setattr(corpus_mod, "build_stdlib_text", lambda root=None: pytest.fail("cache not used"))
    assert stdlib_text() == "From the cache.\n"


def test_stdlib_corpus_for_real(monkeypatch):
    text = stdlib_text()  # builds (~4 s on one core) and caches
    assert 1_000_000 < len(text) < 3_000_000
    assert set(text) <= set(chr(c) for c in range(32, 127)) | {"\n"}
    assert 80 <= CharTokenizer.from_text(text).vocab_size <= 96
    assert "JSON (JavaScript Object Notation)" in text  # the json package's module docstring
    # Deterministic on real files (one package here; the whole corpus twice in the slow test below).
    email = os.path.join(sysconfig.get_paths()["stdlib"], "email")
    part = build_stdlib_text(email)
    assert len(part) > 10_000 and part == build_stdlib_text(email)
    assert stdlib_cache_path().read_text(encoding="utf-8") == text
    monkeypatch.setattr(corpus_mod, "build_stdlib_text", lambda root=None: pytest.fail("cache not used"))
    assert load_text("stdlib") == text


@pytest.mark.slow
def test_stdlib_corpus_builds_identically_twice():
    assert build_stdlib_text() == build_stdlib_text()


# ---------------------------------------------------------------------------------------------------
# Splits and batches


def test_split_ids_proportions_and_errors():
    ids = np.arange(1000, dtype=np.int32)
    train, val = split_ids(ids, 0.1, seq_len=8)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    train, val = split_ids(ids, 0.25)
    assert (len(train), len(val)) == (750, 250)
    with pytest.raises(DataError, match=r"1000 tokens.*val_fraction=0.01.*seq_len \+ 1 = 17"):
        split_ids(ids, 0.01, seq_len=16)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_ids(ids, 0.0)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_ids(ids, 1.0)
    with pytest.raises(ShapeError, match="1-D"):
        split_ids(ids.reshape(10, 100), 0.1)


def test_lm_batch_is_a_pure_function_of_seed_and_index():
    ids = (np.arange(5000) * 7 % 97).astype(np.int32)  # not just arange, so a wrong offset would show
    kw = dict(batch_size=8, seq_len=16)
    a = lm_batch(ids, seed=3, index=10, **kw)
    lm_batch(ids, seed=3, index=11, **kw)  # other calls in between change nothing (no hidden state)
    b = lm_batch(ids, seed=3, index=10, **kw)
    for k in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], lm_batch(ids, seed=3, index=11, **kw)["inputs"])
    assert not np.array_equal(a["inputs"], lm_batch(ids, seed=4, index=10, **kw)["inputs"])
    assert a["inputs"].dtype == np.int32 and a["targets"].dtype == np.int32 and a["mask"].dtype == np.bool_
    assert a["inputs"].shape == a["targets"].shape == a["mask"].shape == (8, 16)
    assert a["mask"].all()
    # Reference: nanoGPT's get_batch with the same window starts.
    starts = np.random.default_rng([3, 10]).integers(0, len(ids) - 16, size=8)
    for r, s in enumerate(starts):
        np.testing.assert_array_equal(a["inputs"][r], ids[s : s + 16])
        np.testing.assert_array_equal(a["targets"][r], ids[s + 1 : s + 17])
    np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])
    validate_batch(a, 97)


def test_lm_batch_covers_the_whole_range_and_validates_arguments():
    ids = np.arange(40, dtype=np.int32)
    firsts = np.concatenate([lm_batch(ids, batch_size=16, seq_len=8, seed=0, index=i)["inputs"][:, 0] for i in range(50)])
    # Every start 0 .. N - T - 1 is drawn, and none beyond (the last target is ids[N - 1]).
    assert set(firsts.tolist()) == set(range(40 - 8))
    with pytest.raises(DataError, match="seq_len"):
        lm_batch(np.arange(8), batch_size=2, seq_len=8, seed=0, index=0)
    with pytest.raises(ConfigError, match="batch_size"):
        lm_batch(ids, batch_size=0, seq_len=4, seed=0, index=0)
    with pytest.raises(ConfigError, match="index"):
        lm_batch(ids, batch_size=2, seq_len=4, seed=0, index=-1)


def test_eval_batches_non_overlapping_spread_and_deterministic():
    ids = np.arange(10_000, dtype=np.int32)
    batches = eval_batches(ids, batch_size=4, seq_len=10, max_batches=5)
    again = eval_batches(ids, batch_size=4, seq_len=10, max_batches=5)
    assert len(batches) == 5
    for x, y in zip(batches, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    inputs = np.concatenate([b["inputs"] for b in batches])
    assert all(b["mask"].all() for b in batches)
    positions = inputs.reshape(-1)
    assert len(np.unique(positions)) == positions.size  # no position appears twice
    np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches]), inputs + 1)
    starts = inputs[:, 0]
    assert starts[0] == 0 and starts[-1] > 0.9 * len(ids)  # spread over the whole split
    assert np.all(np.diff(starts) >= 10)


def test_eval_batches_pad_the_last_batch_with_masked_rows():
    ids = np.arange(53, dtype=np.int32)  # (53 - 1) // 10 = 5 windows
    batches = eval_batches(ids, batch_size=4, seq_len=10, max_batches=8)
    assert len(batches) == 2
    valid_rows = np.concatenate([b["mask"].all(axis=1) for b in batches])
    np.testing.assert_array_equal(valid_rows, [True] * 5 + [False] * 3)
    assert all(b["inputs"].shape == (4, 10) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[:5, 0], [0, 10, 20, 30, 40])
    assert batches[1]["targets"][0, -1] == 50  # the fifth window's last target
    for b in batches:
        validate_batch(b, 53)
    with pytest.raises(DataError, match="seq_len"):
        eval_batches(np.arange(10), batch_size=2, seq_len=10, max_batches=1)


def _batch(B=2, T=5, V=11):
    x = np.arange(B * T, dtype=np.int32).reshape(B, T) % V
    return {"inputs": x, "targets": (x + 1) % V, "mask": np.ones((B, T), bool)}


def test_validate_batch_errors():
    ok = _batch()
    assert validate_batch(ok, 11) is ok
    validate_batch({k: jnp.asarray(v) for k, v in ok.items()}, 11)

    with pytest.raises(TokenRangeError, match=r"batch\['targets'\].*11"):
        validate_batch({**ok, "targets": np.where(ok["targets"] == 3, 11, ok["targets"])}, 11)
    with pytest.raises(TokenRangeError, match=r"batch\['inputs'\] holds id -1"):
        validate_batch({**ok, "inputs": ok["inputs"] - 1}, 11)
    with pytest.raises(ShapeError, match="integer"):
        validate_batch({**ok, "inputs": ok["inputs"].astype(np.float32)}, 11)
    with pytest.raises(ShapeError, match="rank 2"):
        validate_batch({**ok, "inputs": ok["inputs"].reshape(-1)}, 11)
    with pytest.raises(ShapeError, match=r"batch\['targets'\] has shape"):
        validate_batch({**ok, "targets": ok["targets"][:, :-1]}, 11)
    with pytest.raises(ShapeError, match=r"batch\['mask'\] has shape \(2, 4\)"):
        validate_batch({**ok, "mask": ok["mask"][:, :-1]}, 11)
    with pytest.raises(ShapeError, match="bool"):
        validate_batch({**ok, "mask": ok["mask"].astype(np.float32)}, 11)
    with pytest.raises(DataError, match="empty"):
        validate_batch(_batch(B=0), 11)
    with pytest.raises(DataError, match="empty"):
        validate_batch(_batch(T=0), 11)
    with pytest.raises(DataError, match="all False"):
        validate_batch({**ok, "mask": np.zeros_like(ok["mask"])}, 11)
    with pytest.raises(DataError, match=r"missing key\(s\) \['mask'\]"):
        validate_batch({"inputs": ok["inputs"], "targets": ok["targets"]}, 11)


# ---------------------------------------------------------------------------------------------------
# prepare_data


def test_prepare_data_builds_and_reuses_a_tokenizer(tmp_path):
    f = tmp_path / "c.txt"
    text = "abcdefghij" * 20
    f.write_text(text, encoding="utf-8")
    cfg = CharLM(source=str(f), val_fraction=0.2, seq_len=8, batch_size=4)
    bundle = prepare_data(cfg)
    assert bundle.tokenizer.vocab_size == 10
    assert (len(bundle.train_ids), len(bundle.val_ids)) == (160, 40)
    assert bundle.tokenizer.decode(np.concatenate([bundle.train_ids, bundle.val_ids])) == text

    bigger = CharTokenizer.from_text(text + "xyz")  # a resumed run's tokenizer covering the corpus
    resumed = prepare_data(cfg, tokenizer=bigger)
    assert resumed.tokenizer is bigger
    assert bigger.decode(resumed.val_ids) == text[-40:]

    with pytest.raises(DataError, match=r"saved tokenizer.*'i', 'j'.*resumed run.*--char-lm\.source"):
        prepare_data(cfg, tokenizer=CharTokenizer.from_text("abcdefgh"))
