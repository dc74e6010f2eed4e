"""Sentence-pair sources (number words, the Bible, files) and the seq2seq vocabularies."""

import json
import shutil
import sys
import types

import numpy as np
import pytest

from jaxseq.errors import ConfigError, DataError
from jaxseq.tasks import text_pairs as T
from jaxseq.tasks.vocab import BOS, EOS, PAD, SPECIALS, Vocab


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSEQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _digits(n: int) -> int:
    return len(str(n))


# ---------------------------------------------------------------------------------------------------
# Number words


def test_number_pair_known_values():
    assert T.number_pair(97) == ("ninety-seven", "siebenundneunzig")
    assert T.number_pair(321007) == ("three hundred and twenty-one thousand and seven",
                                     "dreihunderteinundzwanzigtausendsieben")
    assert T.number_pair(0) == ("zero", "null")
    assert T.number_pair(1001) == ("one thousand and one", "eintausendeins")


def test_number_pair_unknown_language_names_it():
    with pytest.raises(ConfigError, match="target_lang='xx'"):
        T.number_pair(5, "xx")


def test_draw_numbers_digits_in_range_distinct_and_uniform_over_digit_counts():
    numbers = T.draw_numbers(600, 3, 5, np.random.default_rng(0))
    assert numbers.dtype == np.int64 and numbers.shape == (600,)
    assert len(set(numbers.tolist())) == 600
    counts = np.bincount([_digits(n) for n in numbers.tolist()], minlength=6)[3:]
    assert counts.sum() == 600 and all(140 <= c <= 260 for c in counts), counts  # ~200 each


def test_draw_numbers_one_digit_includes_zero_and_exhausts_its_class():
    numbers = T.draw_numbers(10, 1, 1, np.random.default_rng(3))
    assert sorted(numbers.tolist()) == list(range(10))
    # 50 numbers over 1..2 digits: the 1-digit class (10 numbers) fills up, its overflow goes to 2 digits.
    numbers = T.draw_numbers(50, 1, 2, np.random.default_rng(3))
    assert len(set(numbers.tolist())) == 50 and set(range(10)) <= set(numbers.tolist())


def test_draw_numbers_respects_exclude_and_counts_it_against_capacity():
    exclude = set(range(10, 60))
    numbers = T.draw_numbers(40, 2, 2, np.random.default_rng(1), exclude=exclude)
    assert not exclude & set(numbers.tolist()) and all(60 <= n <= 99 for n in numbers.tolist())
    with pytest.raises(ConfigError, match="count=41 .* only 40 .* lower count"):
        T.draw_numbers(41, 2, 2, np.random.default_rng(1), exclude=exclude)


@pytest.mark.parametrize("lo, hi", [(0, 3), (3, 2), (1, 19)])
def test_draw_numbers_rejects_bad_digit_ranges(lo, hi):
    with pytest.raises(ConfigError, match="min_digits"):
        T.draw_numbers(1, lo, hi, np.random.default_rng(0))


def test_split_numbers_disjoint_reproducible_and_test_runs_longer():
    kw = {"min_digits": 1, "max_digits": 3, "seed": 5, "test_max_digits": 5}
    s = T.split_numbers(300, 50, 80, **kw)
    assert {k: len(v) for k, v in s.items()} == {"train": 300, "val": 50, "test": 80}
    train, val, test = (set(s[k].tolist()) for k in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert max(_digits(n) for n in train | val) <= 3 and max(_digits(n) for n in test) > 3
    again = T.split_numbers(300, 50, 80, **kw)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    # val and test are drawn first: a different train size leaves them as they were.
    other = T.split_numbers(100, 50, 80, **kw)
    assert np.array_equal(other["val"], s["val"]) and np.array_equal(other["test"], s["test"])
    assert not np.array_equal(T.split_numbers(300, 50, 80, **{**kw, "seed": 6})["test"], s["test"])


def test_split_numbers_too_many_names_the_split():
    with pytest.raises(ConfigError, match="train=950 .* lower train"):
        T.split_numbers(950, 50, 10, min_digits=1, max_digits=3, seed=0)


def test_number_splits_are_the_pairs_of_split_numbers_and_disjoint_as_text():
    kw = {"min_digits": 1, "max_digits": 3, "seed": 2, "test_max_digits": 4}
    pairs = T.number_splits(60, 10, 10, **kw)
    numbers = T.split_numbers(60, 10, 10, **kw)
    for k in ("train", "val", "test"):
        assert pairs[k] == [T.number_pair(n) for n in numbers[k].tolist()]
    sources = {k: {s for s, _ in v} for k, v in pairs.items()}
    assert not sources["train"] & (sources["val"] | sources["test"])


def test_number_pairs_match_draw_numbers_and_are_cached(_cache, monkeypatch):
    pairs = T.number_pairs(40, 1, 4, 7)
    assert pairs == [T.number_pair(n) for n in T.draw_numbers(40, 1, 4, np.random.default_rng(7)).tolist()]
    files = list(_cache.glob("number_pairs_*.json"))
    assert len(files) == 1
    real = T.number_pair
    monkeypatch.setattr(T, "number_pair", lambda *a: pytest.fail("a second call must read the cache"))
    assert T.number_pairs(40, 1, 4, 7) == pairs
    files[0].write_text("[[\"half a fi")  # a torn write: regenerated, and the file made whole again
    monkeypatch.setattr(T, "number_pair", real)
    assert T.number_pairs(40, 1, 4, 7) == pairs
    assert json.loads(files[0].read_text()) == [list(p) for p in pairs]
    assert T.number_pairs(40, 1, 4, 8) != pairs and len(list(_cache.glob("number_pairs_*.json"))) == 2


def test_number_pairs_with_an_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("JAXSEQ_CACHE", str(blocker))
    assert T.number_pairs(5, 1, 2, 0) == T.number_pairs(5, 1, 2, 0)


# ---------------------------------------------------------------------------------------------------
# Vocabularies


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_vocab_round_trips(kind, tmp_path):
    texts = [s for p in T.number_pairs(200, 1, 6, 0) for s in p]
    vocab = Vocab.build(texts, kind, vocab_size=300)
    for text in texts[:50]:
        ids = vocab.encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1 and ids.min() >= len(SPECIALS) and ids.max() < vocab.size
        assert vocab.decode(ids) == text
    vocab.save(tmp_path / "vocab.json")
    again = Vocab.load(tmp_path / "vocab.json")
    assert again == Vocab.from_json(vocab.to_json()) == vocab
    assert np.array_equal(again.encode(texts[0]), vocab.encode(texts[0])) and again.size == vocab.size


def test_vocab_char_and_word_symbols_sorted_from_the_texts():
    v = Vocab.build(["ba", "ca b"], "char")
    assert v.symbols == (" ", "a", "b", "c") and v.size == 7
    assert v.encode("cab").tolist() == [6, 4, 5]
    w = Vocab.build(["two one", "one  three"], "word")
    assert w.symbols == ("one", "three", "two")
    assert w.decode(w.encode(" three   one ")) == "three one"


def test_vocab_bpe_specials_bytes_and_determinism():
    texts = [s for p in T.number_pairs(200, 1, 6, 0) for s in p]
    vocab = Vocab.build(texts, "bpe", vocab_size=300)
    tok = vocab._bpe
    assert [tok.token_to_id(s) for s in SPECIALS] == [PAD, BOS, EOS] and vocab.size <= 300
    for unseen in ["Ünïcödé ✓ 中文", "<s> is text, not BOS </s>"]:  # byte-level: nothing is out of vocabulary
        ids = vocab.encode(unseen)
        assert ids.min() >= len(SPECIALS) and vocab.decode(ids) == unseen
    assert Vocab.build(texts, "bpe", vocab_size=300) == vocab
    with pytest.raises(ConfigError, match="vocab_size=100 .* at least 259"):
        Vocab.build(texts, "bpe", vocab_size=100)


@pytest.mark.parametrize("kind, shown", [("char", "3 char(s) not in the vocabulary ('x', 'y', 'z')"),
                                         ("word", "1 word(s) not in the vocabulary ('xyz')")])
def test_vocab_out_of_vocabulary_names_argument_symbol_and_fix(kind, shown):
    vocab = Vocab.build(["abc def"], kind)
    with pytest.raises(DataError) as e:
        vocab.encode("abc xyz", name="target")
    assert str(e.value).startswith(f"target holds {shown} in 'abc xyz'; the vocabulary is built from the training split")
    assert "--translation.tokenizer bpe" in str(e.value)


def test_vocab_out_of_vocabulary_shows_at_most_five_and_truncates_the_text():
    vocab = Vocab.build(["a"], "char")
    with pytest.raises(DataError) as e:
        vocab.encode("bcdefgh" + "a" * 100)
    msg = str(e.value)
    assert msg.startswith("source holds 7 char(s)") and "'f'" in msg and "'g'" not in msg and "a" * 60 not in msg


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_vocab_empty_text_raises(kind):
    vocab = Vocab.build(["some text"] * 3, kind, vocab_size=300)
    for empty in ["", "  \t"]:
        with pytest.raises(DataError, match="^target is empty"):
            vocab.encode(empty, name="target")


def test_vocab_decode_stops_at_eos_skips_pad_bos_and_rejects_out_of_range():
    vocab = Vocab.build(["ab"], "char")  # a=3, b=4
    assert vocab.decode([BOS, 3, PAD, 4, EOS, 3, 3]) == "ab"
    assert vocab.decode(np.array([], np.int32)) == ""
    with pytest.raises(DataError, match="id 5 is outside"):
        vocab.decode([3, 5])
    with pytest.raises(DataError, match="1-D"):
        vocab.decode([[3]])


def test_vocab_rejects_bad_kinds_and_documents():
    with pytest.raises(ConfigError, match="--translation.tokenizer"):
        Vocab.build(["a"], "sentencepiece")
    with pytest.raises(DataError, match="no non-empty training text"):
        Vocab.build(["", " "], "char")
    with pytest.raises(DataError, match="not a Vocab JSON"):
        Vocab.from_json('{"chars": "abc"}')
    with pytest.raises(DataError, match="no vocabulary file"):
        Vocab.load("/nonexistent/vocab.json")


# ---------------------------------------------------------------------------------------------------
# Files, hub datasets, splits


def test_load_pairs_tsv_jsonl_csv(tmp_path):
    (tmp_path / "p.tsv").write_text("en\tes\n Hello \tHola\n\n \t\nGood night\tBuenas noches\n", encoding="utf-8")
    assert T.load_pairs(str(tmp_path / "p.tsv"), source_column="en", target_column="es") == [
        ("Hello", "Hola"), ("Good night", "Buenas noches")]
    rows = [{"source": "One", "target": "Uno"}, {"source": "", "target": "x"}, {"source": "Two", "target": "Dos"},
            {"source": "Three"}, {"source": "Four", "target": None}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 3 of 5 rows"):  # empty rows are dropped, not silently
        assert T.load_pairs(str(tmp_path / "p.jsonl")) == [("One", "Uno"), ("Two", "Dos")]
    (tmp_path / "p.csv").write_text('source,target\n"Yes, sir","Sí, señor"\n', encoding="utf-8")
    assert T.load_pairs(str(tmp_path / "p.csv")) == [("Yes, sir", "Sí, señor")]


def test_load_pairs_nested_field(tmp_path):
    rows = [{"translation": {"en": "House", "de": "Haus"}}, {"translation": {"en": "Tree", "de": "Baum"}}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    got = T.load_pairs(str(tmp_path / "p.jsonl"), source_column="translation.en", target_column="translation.de")
    assert got == [("House", "Haus"), ("Tree", "Baum")]
    with pytest.raises(DataError, match=r"no field 'fr' \(its fields: \['de', 'en'\]\).*--translation.target-column"):
        T.load_pairs(str(tmp_path / "p.jsonl"), source_column="translation.en", target_column="translation.fr")


def test_load_pairs_missing_column_names_the_columns_present_and_the_flag(tmp_path):
    (tmp_path / "p.tsv").write_text("en\tes\nHello\tHola\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no column 'source'; its columns are \['en', 'es'\].*--translation.source-column"):
        T.load_pairs(str(tmp_path / "p.tsv"))
    with pytest.raises(DataError, match=r"no column 'de'.*\['en', 'es'\].*--translation.target-column"):
        T.load_pairs(str(tmp_path / "p.tsv"), source_column="en", target_column="de")
    (tmp_path / "p.jsonl").write_text('{"en": "Hello", "n": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no column 'source'; its columns are \['en', 'n'\]"):
        T.load_pairs(str(tmp_path / "p.jsonl"))
    with pytest.raises(DataError, match="column 'n' holds int values"):
        T.load_pairs(str(tmp_path / "p.jsonl"), source_column="en", target_column="n")


def test_load_pairs_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        T.load_pairs(str(tmp_path / "missing.tsv"))
    (tmp_path / "ragged.tsv").write_text("source\ttarget\na\tb\tc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged.tsv:2 has 3 fields but the header names 2"):
        T.load_pairs(str(tmp_path / "ragged.tsv"))
    (tmp_path / "empty.tsv").write_text("source\ttarget\n \t x\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no pair with a non-empty"):
        T.load_pairs(str(tmp_path / "empty.tsv"))
    (tmp_path / "bad.jsonl").write_text('{"source": "a", "target": "b"}\n[1]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2 is a JSON list"):
        T.load_pairs(str(tmp_path / "bad.jsonl"))
    (tmp_path / "p.txt").write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read"):
        T.load_pairs(str(tmp_path / "p.txt"))
    with pytest.raises(ConfigError, match="split='test'"):
        T.load_pairs(str(tmp_path / "ragged.tsv"), split="test")


def _fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_load_pairs_hub_failure_explains_offline_use(monkeypatch):
    def load(name, split):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(DataError, match=r"'someone/pairs' is neither a file .*no network.*HF_DATASETS_OFFLINE=1.*\.tsv"):
        T.load_pairs("someone/pairs")


def test_load_pairs_hub_columns_and_split(monkeypatch):
    class Split:
        column_names = ("id", "translation")

        def __getitem__(self, name):
            return {"id": [1, 2], "translation": [{"en": "Hi", "es": "Hola"}, {"en": "Bye", "es": ""}]}[name]

    seen = []
    _fake_datasets(monkeypatch, lambda name, split: seen.append((name, split)) or Split())
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        got = T.load_pairs("someone/pairs", source_column="translation.en", target_column="translation.es", split="test")
    assert got == [("Hi", "Hola")] and seen == [("someone/pairs", "test")]
    with pytest.raises(DataError, match=r"no column 'source'; its columns are \['id', 'translation'\]"):
        T.load_pairs("someone/pairs")


def test_split_pairs_sizes_disjoint_reproducible():
    pairs = [(str(i), str(-i)) for i in range(100)]
    s = T.split_pairs(pairs, val=10, test=20, seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(pairs)
    assert s == T.split_pairs(pairs, val=10, test=20, seed=0) != T.split_pairs(pairs, val=10, test=20, seed=1)
    with pytest.raises(ConfigError, match="val=50 and test=50 pairs leave no training pairs out of 100"):
        T.split_pairs(pairs, val=50, test=50, seed=0)


# ---------------------------------------------------------------------------------------------------
# The Bible

IMP = """$$$[ Module Heading ]
<milestone type="x-importer"/>
$$$Genesis 0:0
<title type="main">Genesis</title> Introduction text.
$$$Genesis 1:0
<chapter n="1" osisID="Gen.1" sID="Gen.1"/>
$$$Genesis 1:1
<w lemma="strong:H0430">In</w> <w lemma="strong:H7225">beginning</w>, <w>God</w><note placement="foot"><reference \
type="annotateRef">1:1 </reference>The Hebrew word rendered “God” is “אֱלֹהִ֑ים”.</note><w>created</w> \
the earth.<note placement="foot">a note before a full stop</note>
$$$Genesis 1:2
<title type="section">A heading</title><speaker>Beloved</speaker><l level="1" sID="x"/>Salt &amp; light,<lb/>\
<l eID="x"/>here<note>n</note>.
$$$Genesis 1:3
<div type="x-milestone" eID="pv1"/> <note>only a note</note>
$$$Psalms 3:1
<title canonical="true" type="psalm">A Psalm by David.</title> Yahweh, how<note>n</note>, said he.
$$$Revelation 22:21
Amen. <div canonical="true" eID="gen1" osisID="Rev" type="book"/> <div type="glossary"/> Glossary text.
"""


def test_parse_imp_strips_markup_and_aligns_by_key():
    assert T.parse_imp(IMP) == {
        "Genesis 1:1": "In beginning, God created the earth.",
        "Genesis 1:2": "Salt & light, here.",
        "Psalms 3:1": "A Psalm by David. Yahweh, how, said he.",
        "Revelation 22:21": "Amen.",
    }


@pytest.mark.skipif(shutil.which("mod2imp") is None, reason="needs " + T.BIBLE_APT)
def test_bible_pairs_known_verses(_cache):
    pairs = T.bible_pairs()
    verses = dict(pairs)
    assert verses["In the beginning, God created the heavens and the earth."] == (
        "EN el principio crió Dios los cielos y la tierra.")
    john = next(s for s, t in pairs if s.startswith("For God so loved the world"))
    assert verses[john].startswith("Porque de tal manera amó Dios al mundo")
    assert all(s and t and "<" not in s + t for s, t in pairs)
    assert len(list(_cache.glob("bible_*.json"))) == 1 and T.bible_pairs() == pairs


def test_held_out_numbers_leave_every_digit_count_to_training(tmp_path, monkeypatch):
    """Validation and test take at most a tenth of a digit count: 1 of the 10 one-digit numbers each, so
    training still sees short numbers."""
    monkeypatch.setenv("JAXSEQ_CACHE", str(tmp_path))
    split = T.split_numbers(500, 50, 50, min_digits=1, max_digits=3, seed=0)
    one_digit = {k: int((v < 10).sum()) for k, v in split.items()}
    assert one_digit["test"] <= 1 and one_digit["val"] <= 1 and one_digit["train"] >= 8
    assert int(((split["test"] >= 10) & (split["test"] < 100)).sum()) <= 9
    with pytest.raises(ConfigError, match="at most 10% of each digit count"):
        T.split_numbers(500, 50, 200, min_digits=1, max_digits=3, seed=0)
