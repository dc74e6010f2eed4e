"""Sentence pairs for translation tasks: number words, the English-Spanish Bible, or a file or hub dataset.

Every source gives a list of (source, target) string pairs, stripped of surrounding whitespace, none empty.

Number words (pip `num2words`): English words -> German (or another `target_lang`) words, a small task
with real reordering (97 -> "ninety-seven" / "siebenundneunzig").

    draw_numbers(count, min_digits, max_digits, rng, *, exclude=()) -> int64 [count]
    split_numbers(train, val, test, *, min_digits, max_digits, seed, test_max_digits=None)
        -> {"train": int64 [train], "val": int64 [val], "test": int64 [test]}
    number_pair(n, target_lang="de") -> (english words, target words)
    number_pairs(count, min_digits, max_digits, seed, *, target_lang="de", exclude=()) -> [(src, tgt)]
    number_splits(train, val, test, *, min_digits, max_digits, seed, test_max_digits=None, target_lang="de")
        -> {"train": [(src, tgt)], "val": [...], "test": [...]}

A number's digit count is uniform over [min_digits, max_digits], and the number uniform among those with
that many digits (1 digit: 0..9); the numbers of one draw are distinct. `split_numbers` draws test, then
val (without the test numbers), then train (without either), all from `numpy.random.default_rng(seed)`,
so the three sets are disjoint as numbers and val/test do not change with the train size; val and test
each take at most a tenth of the numbers of any digit count (one of the ten 1-digit numbers), so
training sees every digit count. Test numbers
may run to `test_max_digits` (> max_digits: the length-generalisation set). `number_splits` holds the
pairs of `split_numbers`' numbers, in the same order, so `split_numbers(...)["test"][i]` is the number
of `number_splits(...)["test"][i]` (e.g. for accuracy by digit count). Pairs cost ~100 us each to
generate, so they are cached as JSON under `$JAXSEQ_CACHE` (default `~/.cache/jaxseq`), keyed by the
arguments and num2words' version.

The Bible (apt `sword-text-web sword-text-sparv libsword-utils`): `bible_pairs()` aligns the World
English Bible with the Reina-Valera 1909 by verse key (`parse_imp` reads one `mod2imp` dump), cached.

Files and hub datasets: `load_pairs(data, source_column=..., target_column=..., split=None)` reads a
.tsv (header line names the columns), .jsonl or .csv file, "bible", or a Hugging Face dataset name (from
the local hub cache when offline). A nested field is named with a dot, e.g. "translation.en".

`split_pairs(pairs, val=, test=, seed=)` cuts any list of pairs into train / val / test.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np

from jaxseq.errors import ConfigError, DataError

MAX_DIGITS = 18  # every 18-digit number fits in int64
HELD_OUT_SHARE = 0.1  # the most of one digit count's numbers that validation or test may take
BIBLE_MODULES = ("engWEB2015eb", "spaRV1909eb")  # World English Bible, Reina-Valera 1909
BIBLE_APT = "apt-get install sword-text-web sword-text-sparv libsword-utils"
FILE_SUFFIXES = (".tsv", ".jsonl", ".csv")
_CACHE_FORMAT = 2  # bump when a cached file's content or layout changes

# ---------------------------------------------------------------------------------------------------
# The cache


def cache_dir() -> Path:
    """Where generated pairs are cached: `$JAXSEQ_CACHE` or `~/.cache/jaxseq`."""
    return Path(os.environ.get("JAXSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxseq"))


def _cached(name: str, key: dict, build, parse):
    """`parse(json)` of the cache file for (`name`, `key`), or of `build()`, written there (as JSON) first.

    `parse` returns None for a document it does not accept (a corrupt or foreign file): it is rebuilt.
    """
    digest = hashlib.sha256(json.dumps({"format": _CACHE_FORMAT, **key}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}_{digest}.json"
    try:
        got = parse(json.loads(path.read_text(encoding="utf-8")))
        if got is not None:
            return got
    except (OSError, ValueError):
        pass
    value = build()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shareable
        os.replace(tmp, path)  # atomic: a concurrent reader sees no file or the whole one
    except OSError:  # an unwritable cache only costs a regeneration; leave no partial file behind
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return parse(value)


def _pairs_or_none(doc):
    """A JSON list of [source, target] string lists -> list of tuples; None if it is anything else."""
    if not isinstance(doc, list):
        return None
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in doc):
        return None
    return [(s, t) for s, t in doc]


def _splits_or_none(doc):
    """A JSON {"train", "val", "test": pairs} -> the same with tuples; None if it is anything else."""
    if not isinstance(doc, dict) or set(doc) != {"train", "val", "test"}:
        return None
    out = {k: _pairs_or_none(doc[k]) for k in ("train", "val", "test")}
    return None if any(v is None for v in out.values()) else out


# ---------------------------------------------------------------------------------------------------
# Number words


def _check_digits(min_digits: int, max_digits: int, max_name: str = "max_digits") -> None:
    if not 1 <= min_digits <= max_digits <= MAX_DIGITS:
        raise ConfigError(f"digit counts min_digits={min_digits}, {max_name}={max_digits} must satisfy "
                          f"1 <= min_digits <= {max_name} <= {MAX_DIGITS}.")


def _digit_range(d: int) -> tuple[int, int]:
    """The smallest and largest number with `d` digits (1 digit: 0..9)."""
    return (0 if d == 1 else 10 ** (d - 1)), 10**d - 1


def draw_numbers(count: int, min_digits: int, max_digits: int, rng: np.random.Generator, *, exclude=(),
                 name: str = "count", max_share: float = 1.0) -> np.ndarray:
    """`count` distinct numbers, int64 [count], none in `exclude` (an iterable of int), in random order.

    The digit count of each is uniform over [min_digits, max_digits] and the number uniform among those
    with that many digits; when a digit count runs out of numbers its draws go to the others. At most
    `max_share` of the numbers of any digit count are drawn. `name` is the argument that `count` came
    from, for errors.
    """
    _check_digits(min_digits, max_digits)
    if count < 0:
        raise ConfigError(f"{name}={count} must be >= 0.")
    excluded = np.unique(np.fromiter(exclude, dtype=np.int64))
    ranges = [_digit_range(d) for d in range(min_digits, max_digits + 1)]
    banned = [excluded[np.searchsorted(excluded, lo): np.searchsorted(excluded, hi, side="right")] for lo, hi in ranges]
    capacity = np.array([min(hi - lo + 1 - len(b), int(max_share * (hi - lo + 1))) for (lo, hi), b in zip(ranges, banned)],
                        dtype=np.int64)
    if count > capacity.sum():
        raise ConfigError(f"{name}={count} distinct numbers asked for, but only {int(capacity.sum())} have "
                          f"{min_digits}..{max_digits} digits (less those excluded"
                          + (f", and {name} takes at most {max_share:.0%} of each digit count" if max_share < 1 else "")
                          + f"); lower {name} or raise max_digits.")
    per_class = _class_counts(count, capacity, rng)
    parts = [_distinct_in(lo, hi, int(k), b, rng) for (lo, hi), k, b in zip(ranges, per_class, banned)]
    return rng.permutation(np.concatenate(parts + [np.zeros(0, np.int64)]))


def _class_counts(count: int, capacity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How many of `count` draws fall in each digit class: uniform, with overflow past a class's capacity re-drawn."""
    counts = np.bincount(rng.integers(0, len(capacity), size=count), minlength=len(capacity))
    while (counts > capacity).any():
        excess = int((counts - capacity).clip(min=0).sum())
        counts = np.minimum(counts, capacity)
        open_classes = np.flatnonzero(counts < capacity)
        counts += np.bincount(rng.choice(open_classes, size=excess), minlength=len(capacity))
    return counts


def _distinct_in(lo: int, hi: int, k: int, banned: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`k` distinct numbers uniform in [lo, hi] and not in `banned` (sorted int64), int64 [k]."""
    if 2 * (k + len(banned)) >= hi - lo + 1:  # dense: drawing from the explicit list beats rejection
        pool = np.setdiff1d(np.arange(lo, hi + 1, dtype=np.int64), banned, assume_unique=True)
        return rng.choice(pool, size=k, replace=False)
    seen, got = set(banned.tolist()), []
    while len(got) < k:
        for n in rng.integers(lo, hi + 1, size=2 * (k - len(got)) + 8).tolist():
            if n not in seen and len(got) < k:
                seen.add(n)
                got.append(n)
    return np.array(got, dtype=np.int64)


def split_numbers(train: int, val: int, test: int, *, min_digits: int, max_digits: int, seed: int,
                  test_max_digits: int | None = None) -> dict[str, np.ndarray]:
    """Disjoint train / val / test numbers, int64 [train] / [val] / [test]; test may run to `test_max_digits`."""
    test_max = max_digits if test_max_digits is None else test_max_digits
    _check_digits(min_digits, test_max, "test_max_digits")
    rng = np.random.default_rng(seed)
    # Held-out sets take at most a tenth of any digit count, so the few short numbers are trained on too.
    test_n = draw_numbers(test, min_digits, test_max, rng, name="test", max_share=HELD_OUT_SHARE)
    val_n = draw_numbers(val, min_digits, max_digits, rng, exclude=test_n, name="val", max_share=HELD_OUT_SHARE)
    train_n = draw_numbers(train, min_digits, max_digits, rng, exclude=np.concatenate([test_n, val_n]), name="train")
    return {"train": train_n, "val": val_n, "test": test_n}


def _num2words():
    try:
        from num2words import num2words
    except ImportError as e:
        raise DataError("number-word pairs need the num2words package: pip install 'jaxseq[tasks]' (or pip install num2words).") from e
    return num2words


def _num2words_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("num2words")
    except PackageNotFoundError:
        return "unknown"


def number_pair(n: int, target_lang: str = "de") -> tuple[str, str]:
    """(English words, `target_lang` words) of `n`, e.g. 97 -> ("ninety-seven", "siebenundneunzig")."""
    words = _num2words()
    try:
        return words(int(n), lang="en"), words(int(n), lang=target_lang)
    except NotImplementedError as e:
        raise ConfigError(f"target_lang={target_lang!r} is not a num2words language; use e.g. 'de', 'fr', 'es'.") from e


def _pairs_of(numbers, target_lang: str) -> list[list[str]]:
    return [list(number_pair(n, target_lang)) for n in numbers.tolist()]


def number_pairs(count: int, min_digits: int, max_digits: int, seed: int, *, target_lang: str = "de",
                 exclude=()) -> list[tuple[str, str]]:
    """The pairs of `draw_numbers(count, min_digits, max_digits, default_rng(seed), exclude=exclude)`, cached."""
    excluded = np.unique(np.fromiter(exclude, dtype=np.int64))
    key = {"count": int(count), "min_digits": int(min_digits), "max_digits": int(max_digits), "seed": int(seed),
           "target_lang": target_lang, "exclude": hashlib.sha256(excluded.tobytes()).hexdigest(),
           "num2words": _num2words_version()}

    def build():
        numbers = draw_numbers(count, min_digits, max_digits, np.random.default_rng(seed), exclude=excluded)
        return _pairs_of(numbers, target_lang)

    return _cached("number_pairs", key, build, _pairs_or_none)


def number_splits(train: int, val: int, test: int, *, min_digits: int, max_digits: int, seed: int,
                  test_max_digits: int | None = None, target_lang: str = "de") -> dict[str, list[tuple[str, str]]]:
    """The pairs of `split_numbers(...)`'s numbers, in its order: {"train", "val", "test": [(src, tgt)]}, cached."""
    key = {"train": int(train), "val": int(val), "test": int(test), "min_digits": int(min_digits),
           "max_digits": int(max_digits), "seed": int(seed),
           "test_max_digits": None if test_max_digits is None else int(test_max_digits), "target_lang": target_lang,
           "num2words": _num2words_version()}

    def build():
        numbers = split_numbers(train, val, test, min_digits=min_digits, max_digits=max_digits, seed=seed,
                                test_max_digits=test_max_digits)
        return {k: _pairs_of(v, target_lang) for k, v in numbers.items()}

    return _cached("number_splits", key, build, _splits_or_none)


# ---------------------------------------------------------------------------------------------------
# The Bible

_IMP_KEY = re.compile(r"^\$\$\$(.*)$", re.MULTILINE)
# The end of a book: what follows in the same entry is back matter (the WEB's glossary after Revelation 22:21).
_BOOK_END = re.compile(r"<div\b(?=[^>]*\beID=)(?=[^>]*\btype=\"book\")[^>]*/>")
_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.DOTALL)
# Headings that are not verse text: section titles and Song of Solomon's speaker labels (a psalm's
# canonical title is verse text in both Bibles, so it stays).
_HEADING = re.compile(r"<(speaker|title)\b(?![^>]*canonical=\"true\")[^>]*(?<!/)>.*?</\1>", re.DOTALL)
_BLOCK = re.compile(r"</?(?:l|lb|lg|item|list|div|p|chapter|milestone|title|speaker)\b[^>]*>")  # line breaks
_TAG = re.compile(r"<[^>]*>")
_NOTE_MARK = "\x00"
# A note sits where a footnote mark would: a space unless punctuation follows ("God<note/>created").
_NOTE_BEFORE_PUNCT = re.compile(_NOTE_MARK + r"+(?=[.,;:!?)\]”’]|$)")


def clean_verse(markup: str) -> str:
    """One verse's OSIS markup -> plain text: notes, headings and back matter dropped, tags removed, entities unescaped."""
    if 'type="book"' in markup:  # rare; the regex costs more than this test
        markup = _BOOK_END.split(markup, maxsplit=1)[0]
    text = _NOTE.sub(_NOTE_MARK, markup)
    text = _HEADING.sub(" ", text)
    text = _BLOCK.sub(" ", text)
    text = html.unescape(_TAG.sub("", text))
    text = _NOTE_BEFORE_PUNCT.sub("", text).replace(_NOTE_MARK, " ")
    return " ".join(text.split())


def parse_imp(text: str) -> dict[str, str]:
    """A `mod2imp` dump -> {verse key ("John 3:16"): plain verse text}, in the dump's order.

    A line `$$$KEY` starts an entry. Headings (`[ ... ]` keys), chapter and book introductions (keys
    ending ":0") and verses left empty by cleaning are dropped; a repeated key keeps its first text.
    """
    parts = _IMP_KEY.split(text)
    verses: dict[str, str] = {}
    for key, body in zip(parts[1::2], parts[2::2]):
        key = key.strip()
        if key.startswith("[") or key.endswith(":0") or key in verses:
            continue
        verse = clean_verse(body)
        if verse:
            verses[key] = verse
    return verses


def _mod2imp(module: str) -> str:
    """The raw dump of a SWORD module (`mod2imp MODULE`)."""
    exe = shutil.which("mod2imp")
    if exe is None:
        raise DataError(f"the Bible pairs need SWORD's mod2imp and the Bible modules: {BIBLE_APT}.")
    proc = subprocess.run([exe, module], capture_output=True, check=False)
    out = proc.stdout.decode("utf-8", errors="replace")
    if proc.returncode != 0 or "$$$" not in out:
        err = (proc.stderr.decode("utf-8", errors="replace") + out).strip()[-300:]
        raise DataError(f"mod2imp {module} failed (exit {proc.returncode}: {err!r}); install the module: {BIBLE_APT}.")
    return out


def _module_stamp(module: str) -> str:
    """A hash of the module's .conf (its version) where SWORD keeps it, or "" if none is found."""
    roots = [os.environ.get("SWORD_PATH", ""), os.path.expanduser("~/.sword"), "/usr/share/sword", "/usr/local/share/sword"]
    for root in filter(None, roots):
        conf = Path(root) / "mods.d" / f"{module.lower()}.conf"
        for path in (conf, conf.with_name(f"{module}.conf")):
            try:
                return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            except OSError:
                continue
    return ""


def bible_pairs() -> list[tuple[str, str]]:
    """(English WEB verse, Spanish RV1909 verse) for every verse key both hold, in canonical order, cached."""
    key = {"modules": list(BIBLE_MODULES), "stamps": [_module_stamp(m) for m in BIBLE_MODULES]}

    def build():
        english, spanish = (parse_imp(_mod2imp(m)) for m in BIBLE_MODULES)
        return [[verse, spanish[k]] for k, verse in english.items() if k in spanish]

    return _cached("bible", key, build, _pairs_or_none)


# ---------------------------------------------------------------------------------------------------
# Files and hub datasets


def load_pairs(data: str, *, source_column: str = "source", target_column: str = "target",
               split: str | None = None) -> list[tuple[str, str]]:
    """(source, target) pairs from `data`: a .tsv / .jsonl / .csv file, "bible", or a hub dataset name.

    `split` picks a hub dataset's split (default "train"); a file or "bible" is one split and takes none.
    Text is stripped (case kept); rows with an empty source or target are dropped.
    """
    path = Path(data).expanduser()
    suffix = path.suffix.lower()
    if split is not None and (data == "bible" or suffix in FILE_SUFFIXES or path.is_file()):
        raise ConfigError(f"split={split!r} names a split of a hub dataset, but --translation.data {data!r} is one "
                          "split; leave split unset and cut it with split_pairs.")
    if data == "bible":
        return bible_pairs()
    if suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"--translation.data {data!r}: no such file ({path.resolve()}).")
        columns, get = _read_file(path, suffix)
    elif path.is_file():
        raise DataError(f"--translation.data {data!r} is a file jaxseq cannot read; give a {', '.join(FILE_SUFFIXES)} "
                        "file, 'bible', or a Hugging Face dataset name (or a folder `datasets` can load).")
    else:  # a hub name, or a local folder of data files that `datasets` reads
        columns, get = _hub_table(data, split)
    sources = _column(columns, get, source_column, "--translation.source-column", data)
    targets = _column(columns, get, target_column, "--translation.target-column", data)
    pairs = [(s.strip(), t.strip()) for s, t in zip(sources, targets) if s and t and s.strip() and t.strip()]
    if 0 < len(pairs) < len(sources):  # a stray blank line is common; a silent cut is not acceptable
        warnings.warn(f"--translation.data {data!r}: dropped {len(sources) - len(pairs)} of {len(sources)} rows "
                      f"whose {source_column!r} or {target_column!r} is empty.", stacklevel=2)
    if not pairs:
        raise DataError(f"--translation.data {data!r} holds no pair with a non-empty {source_column!r} and "
                        f"{target_column!r}; check the file and the column flags.")
    return pairs


def _read_file(path: Path, suffix: str):
    """(column names, column name -> list of values) of a .tsv, .csv or .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"--translation.data {str(path)!r} is not UTF-8 text ({e}); save it as UTF-8.") from e
    if suffix == ".jsonl":
        return _jsonl_table(text, path)
    lines = text.splitlines() if suffix == ".tsv" else list(csv.reader(text.splitlines()))
    rows = [line.split("\t") if suffix == ".tsv" else line for line in lines]
    if not rows:
        raise DataError(f"--translation.data {str(path)!r} is empty; its first line must name the columns.")
    header = [h.strip() for h in rows[0]]
    body = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(field.strip() for field in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{number} has {len(row)} fields but the header names {len(header)} "
                            f"({header}); fix the row (a stray {'tab' if suffix == '.tsv' else 'comma or quote'}?).")
        body.append(row)
    return header, lambda name: [row[header.index(name)] for row in body]


def _jsonl_table(text: str, path: Path):
    """(column names in order of first appearance, column name -> values; None where a row lacks it)."""
    objects = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number} is not JSON ({e}); a .jsonl file holds one object per line.") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number} is a JSON {type(obj).__name__}, not an object; write one object per line.")
        objects.append(obj)
    columns = list(dict.fromkeys(k for obj in objects for k in obj))
    return columns, lambda name: [obj.get(name) for obj in objects]


def _hub_table(data: str, split: str | None):
    """(column names, column name -> values) of a Hugging Face dataset split."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"--translation.data {data!r} is not a file, so it would be a Hugging Face dataset, which needs "
                        "the datasets package (pip install datasets); or give a local .tsv or .jsonl file.") from e
    try:
        ds = datasets.load_dataset(data, split=split or "train")
    except Exception as e:  # load_dataset raises many types (network, missing cache, bad name, bad split)
        raise DataError(
            f"--translation.data {data!r} is neither a file ({', '.join(FILE_SUFFIXES)}), nor 'bible', nor a dataset "
            f"that loads ({type(e).__name__}: {str(e)[:200]}). Hub datasets load offline only from a cached copy, with "
            "HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 set; otherwise save the pairs as a local .tsv or .jsonl file."
        ) from e
    return list(ds.column_names), lambda name: ds[name]


def _column(columns: list, get, column: str, flag: str, data: str) -> list:
    """The text of `column` (a nested field as "parent.key"); None stands for a missing value."""
    head, _, key = column.partition(".")
    if column in columns:
        values = list(get(column))
    elif key and head in columns:
        parents = list(get(head))
        values = [p.get(key) if isinstance(p, dict) else None for p in parents]
        if all(v is None for v in values):
            keys = sorted({k for p in parents if isinstance(p, dict) for k in p})
            raise DataError(f"--translation.data {data!r}: column {head!r} has no field {key!r} (its fields: {keys}); "
                            f"name the right one with {flag}.")
    else:
        raise DataError(f"--translation.data {data!r} has no column {column!r}; its columns are {list(columns)}. "
                        f"Name the right one with {flag} (a nested field as 'translation.en').")
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"--translation.data {data!r}: column {column!r} holds {type(bad).__name__} values "
                        f"(e.g. {bad!r:.60}), not text; name a text column with {flag}.")
    return values


def split_pairs(pairs: list, *, val: int, test: int, seed: int) -> dict[str, list]:
    """A seeded shuffle of `pairs`, cut into {"train": rest, "val": [val], "test": [test]} (sizes in pairs)."""
    n = len(pairs)
    if val < 0 or test < 0 or val + test >= n:
        raise ConfigError(f"val={val} and test={test} pairs leave no training pairs out of {n} (or are negative); "
                          "lower them or give more data.")
    order = np.random.default_rng(seed).permutation(n).tolist()
    cuts = {"train": order[test + val:], "val": order[test:test + val], "test": order[:test]}
    return {k: [pairs[i] for i in idx] for k, idx in cuts.items()}
