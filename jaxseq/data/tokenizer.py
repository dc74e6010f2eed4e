"""Character-level tokenizer: one id per character, the vocabulary is the sorted set of the training corpus.

Saved with every run (as a small JSON file), so `jaxseq sample RUN_DIR` and a resumed run decode and
encode exactly as the run was trained.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np

from jaxseq.errors import DataError, TokenRangeError
from jaxseq.files import write_text_atomically

_FORMAT = "jaxseq.CharTokenizer"


@dataclass(frozen=True)
class CharTokenizer:
    """`chars[i]` is the character with id `i`; `chars` is sorted and has no repeats."""

    chars: tuple[str, ...]

    def __post_init__(self):
        chars = tuple(self.chars)
        object.__setattr__(self, "chars", chars)
        if not chars:
            raise DataError("CharTokenizer needs at least one character; build it with CharTokenizer.from_text(corpus).")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise DataError(f"CharTokenizer.chars must be single characters, got {bad[:5]!r}.")
        if list(chars) != sorted(set(chars)):
            raise DataError("CharTokenizer.chars must be sorted and unique; build it with CharTokenizer.from_text(corpus).")

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of `text`: every character that occurs in it, sorted by code point."""
        if not isinstance(text, str) or not text:
            raise DataError("CharTokenizer.from_text needs a non-empty string (the training corpus).")
        return cls(tuple(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @functools.cached_property
    def _lookup(self) -> np.ndarray:
        # A table indexed by code point (-1 = not in the vocabulary): encoding a 1.5 MB corpus is then
        # one vectorized gather instead of a Python loop over characters.
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        table = np.full(int(codes.max()) + 1, -1, dtype=np.int32)
        table[codes] = np.arange(len(codes), dtype=np.int32)
        return table

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of `text` that are not in the vocabulary, sorted."""
        return sorted(set(text) - set(self.chars))

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 ids [len(text)]. A character outside the vocabulary raises DataError."""
        if not isinstance(text, str):
            raise DataError(f"CharTokenizer.encode takes a str, got {type(text).__name__}.")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        table = self._lookup
        ids = table[np.minimum(codes, len(table) - 1)]
        # Code points past the table are unknown too (the clipped lookup above may have hit a real id).
        bad = (ids < 0) | (codes >= len(table))
        if bad.any():
            unknown = self.unknown_chars(text)
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise DataError(
                f"text holds {len(unknown)} character(s) not in the tokenizer's vocabulary of {self.vocab_size}: "
                f"{shown}. The vocabulary comes from the training corpus; use only its characters, or build "
                f"the tokenizer from a corpus that contains them."
            )
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """ids [N] (list, NumPy or JAX array; a scalar is one id) -> str."""
        arr = np.asarray(ids)
        if arr.ndim > 1:
            raise DataError(f"CharTokenizer.decode takes a 1-D sequence of ids, got shape {arr.shape}; decode rows one at a time.")
        arr = arr.reshape(-1)
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"CharTokenizer.decode takes integer ids, got dtype {arr.dtype}.")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise TokenRangeError(f"ids hold {bad}, outside [0, {self.vocab_size}) for this tokenizer.")
        return "".join(np.asarray(self.chars, dtype=object)[arr])

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, "chars": "".join(self.chars)}, ensure_ascii=True)

    @classmethod
    def from_json(cls, s: str) -> CharTokenizer:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise DataError(f"not a CharTokenizer JSON document ({e}); it should come from CharTokenizer.to_json().") from e
        if not isinstance(d, dict) or d.get("format") != _FORMAT or not isinstance(d.get("chars"), str):
            raise DataError(f"not a CharTokenizer JSON document: expected {{'format': {_FORMAT!r}, 'chars': str}}.")
        return cls(tuple(d["chars"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON to `path` (atomically: a reader never sees half a file)."""
        write_text_atomically(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        try:
            with open(path, encoding="utf-8") as f:
                s = f.read()
        except FileNotFoundError as e:
            raise DataError(f"no tokenizer file at {os.fspath(path)!r}; it is written by CharTokenizer.save().") from e
        return cls.from_json(s)
