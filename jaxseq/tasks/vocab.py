"""Vocabularies for sequence-to-sequence tasks: characters, words, or byte-level BPE, with three specials.

Ids 0, 1, 2 are always `<pad>`, `<s>` (BOS) and `</s>` (EOS); the text's own symbols start at 3. A
vocabulary is built from the training texts only and saved with the run (`Vocab.save`, a small JSON
file), so evaluation, sampling and a resumed run encode exactly as training did.

- "char": every character is a symbol (sorted by code point).
- "word": whitespace-separated words are the symbols (sorted); decoding joins them with one space.
- "bpe": a byte-level BPE trained with the `tokenizers` package; any text encodes (no out-of-vocabulary).

Char and word vocabularies never map an unknown symbol to an UNK id: `encode` raises `DataError`, naming
the symbols, so a vocabulary that does not cover the evaluation data is found at once, not in the BLEU.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np

from jaxseq.errors import ConfigError, DataError
from jaxseq.files import write_text_atomically

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<s>", "</s>")
KINDS = ("char", "word", "bpe")

_FORMAT = "jaxseq.Vocab"
_BYTE_ALPHABET = 256  # byte-level BPE starts from one token per byte
_OOV_FIX = ("the vocabulary is built from the training split: add such text to the training data, "
            "or use --translation.tokenizer bpe")


@dataclass(frozen=True)
class Vocab:
    """A token vocabulary: `kind` says how text is cut; ids 0, 1, 2 are `SPECIALS`."""

    kind: str
    """"char", "word" or "bpe"."""
    symbols: tuple = ()
    """char/word: the symbols of ids 3, 4, ... (sorted, unique); bpe: ()."""
    bpe_json: str = ""
    """bpe: the `tokenizers.Tokenizer` serialised with `to_str()`; its ids 0, 1, 2 are the specials."""

    def __post_init__(self):
        object.__setattr__(self, "symbols", tuple(self.symbols))
        if self.kind not in KINDS:
            raise ConfigError(f"unknown tokenizer kind {self.kind!r}; --translation.tokenizer takes one of {KINDS}.")
        if self.kind == "bpe":
            if not self.bpe_json or self.symbols:
                raise DataError("a bpe Vocab needs bpe_json and no symbols; build it with Vocab.build(texts, 'bpe').")
            return
        if not self.symbols or self.bpe_json:
            raise DataError(f"a {self.kind} Vocab needs symbols and no bpe_json; build it with Vocab.build(texts, {self.kind!r}).")
        if list(self.symbols) != sorted(set(self.symbols)) or not all(isinstance(s, str) and s for s in self.symbols):
            raise DataError("Vocab.symbols must be non-empty strings, sorted and unique; build it with Vocab.build(texts).")
        if self.kind == "char" and any(len(s) != 1 for s in self.symbols):
            raise DataError("a char Vocab's symbols must be single characters; build it with Vocab.build(texts, 'char').")

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def build(cls, texts, kind: str = "char", *, vocab_size: int = 1000) -> Vocab:
        """The vocabulary of `texts` (an iterable of str: the training split only, so no test text leaks in).

        `vocab_size` bounds the bpe vocabulary (specials and the 256 byte tokens included); char and word
        vocabularies hold every symbol of `texts`.
        """
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise DataError("Vocab.build takes an iterable of str (the training texts of one side).")
        if not any(isinstance(t, str) and t.strip() for t in texts):
            raise DataError("Vocab.build got no non-empty training text; check --translation.data and its columns.")
        if kind == "char":
            return cls("char", tuple(sorted(set().union(*map(set, texts)))))
        if kind == "word":
            return cls("word", tuple(sorted({w for t in texts for w in t.split()})))
        if kind == "bpe":
            return cls("bpe", (), _train_bpe(texts, vocab_size))
        raise ConfigError(f"unknown tokenizer kind {kind!r}; --translation.tokenizer takes one of {KINDS}.")

    # -- the mapping ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of ids (specials included): every id is in [0, size)."""
        if self.kind == "bpe":
            return self._bpe.get_vocab_size()
        return len(SPECIALS) + len(self.symbols)

    @functools.cached_property
    def _ids(self) -> dict:
        return {s: i for i, s in enumerate(self.symbols, start=len(SPECIALS))}

    @functools.cached_property
    def _bpe(self):
        tok = _tokenizers().Tokenizer.from_str(self.bpe_json)
        tok.encode_special_tokens = True  # a literal "<s>" in the data is text, not BOS (not serialised: set on load)
        return tok

    def encode(self, text: str, *, name: str = "source") -> np.ndarray:
        """`text` -> int32 ids [n], no BOS/EOS added. `name` (e.g. "source", "target") is used in errors.

        Raises DataError for an empty text, and (char/word) for symbols outside the vocabulary.
        """
        if not isinstance(text, str):
            raise DataError(f"{name} must be a str, got {type(text).__name__}.")
        if not text.strip():
            raise DataError(f"{name} is empty; every sentence pair needs a non-empty source and target "
                            "(the loaders drop such rows: load pairs with jaxseq.tasks.text_pairs).")
        if self.kind == "bpe":
            return np.asarray(self._bpe.encode(text).ids, dtype=np.int32)
        pieces = list(text) if self.kind == "char" else text.split()
        ids = self._ids
        unknown = sorted({p for p in pieces if p not in ids})
        if unknown:
            shown = ", ".join(repr(p) for p in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            short = text if len(text) <= 60 else text[:57] + "..."
            raise DataError(f"{name} holds {len(unknown)} {self.kind}(s) not in the vocabulary ({shown}) in {short!r}; "
                            f"{_OOV_FIX}.")
        return np.fromiter((ids[p] for p in pieces), dtype=np.int32, count=len(pieces))

    def decode(self, ids) -> str:
        """ids [n] (list, NumPy or JAX array) -> text: stops at the first EOS, skips PAD and BOS."""
        arr = np.asarray(ids)
        if arr.ndim > 1:
            raise DataError(f"Vocab.decode takes a 1-D sequence of ids, got shape {arr.shape}; decode rows one at a time.")
        arr = arr.reshape(-1)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"Vocab.decode takes integer ids, got dtype {arr.dtype}.")
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise DataError(f"id {bad} is outside [0, {self.size}) for this {self.kind} vocabulary; "
                            "decode with the vocabulary the model was trained with (the run's saved vocab).")
        eos = np.flatnonzero(arr == EOS)
        arr = arr[: eos[0]] if eos.size else arr
        arr = arr[arr >= len(SPECIALS)]  # PAD and BOS
        if self.kind == "bpe":
            return self._bpe.decode(arr.tolist(), skip_special_tokens=True)
        pieces = [self.symbols[i - len(SPECIALS)] for i in arr.tolist()]
        return "".join(pieces) if self.kind == "char" else " ".join(pieces)

    # -- saving --------------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, "kind": self.kind, "symbols": list(self.symbols),
                           "bpe_json": self.bpe_json}, ensure_ascii=True)

    @classmethod
    def from_json(cls, s: str) -> Vocab:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise DataError(f"not a Vocab JSON document ({e}); it should come from Vocab.to_json().") from e
        if not isinstance(d, dict) or d.get("format") != _FORMAT or not isinstance(d.get("symbols"), list):
            raise DataError(f"not a Vocab JSON document: expected {{'format': {_FORMAT!r}, 'kind', 'symbols', 'bpe_json'}}.")
        return cls(d.get("kind"), tuple(d["symbols"]), d.get("bpe_json", ""))

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON to `path` (atomically: a reader never sees half a file)."""
        write_text_atomically(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except FileNotFoundError as e:
            raise DataError(f"no vocabulary file at {os.fspath(path)!r}; it is written by Vocab.save() with the run.") from e


def _tokenizers():
    """The `tokenizers` package, imported only when a bpe vocabulary is used."""
    try:
        import tokenizers
    except ImportError as e:
        raise ConfigError("--translation.tokenizer bpe needs the tokenizers package: pip install tokenizers "
                          "(or pick --translation.tokenizer char or word).") from e
    return tokenizers


def _train_bpe(texts: list, vocab_size: int) -> str:
    """A byte-level BPE trained on `texts`, serialised; specials at ids 0, 1, 2 and all 256 bytes in it."""
    if vocab_size < len(SPECIALS) + _BYTE_ALPHABET:
        raise ConfigError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
                          f"{len(SPECIALS) + _BYTE_ALPHABET} (3 specials and 256 bytes); raise the vocabulary size.")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE(unk_token=None))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)  # decode(encode(t)) == t exactly
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen in training or not
    )
    tok.train_from_iterator(texts, trainer)
    got = [tok.token_to_id(s) for s in SPECIALS]
    if got != [PAD, BOS, EOS]:
        raise ConfigError(f"the installed tokenizers gave the specials {SPECIALS} ids {got}, not [0, 1, 2]; "
                          "use a tokenizers release that numbers special_tokens first (pip install -U tokenizers).")
    return tok.to_str()
