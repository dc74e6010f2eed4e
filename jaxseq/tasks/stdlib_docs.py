"""Document classification: which standard-library package does a docstring come from?

The documents are the docstrings (module, class, function; at least `min_chars` long, exact repeats
kept once) of ten large packages of Python's standard library (`jaxseq.data.corpus.DOC_PACKAGES`:
asyncio, email, http, importlib, logging, multiprocessing, tkinter, unittest, urllib, xml), read with
`ast` from the running Python, so the data is always there and offline. About 2,300 documents; the
label is the top-level package.

The test split is held out by module (file), never by document: docstrings of one module share
names and phrasing, so a split by document would leak near-duplicates. For each package, modules in
a fixed hash order join the test split until it holds about `test_fraction` of that package's
documents. `train_examples` keeps a random subset of the training documents (the few-label regime).

The characters are those of a character tokenizer: built from these documents for a run from
scratch, or a pretrained run's (`--init-from`), when characters it does not know are dropped and
counted. `jaxseq.data.corpus.STDLIB_UNLABELLED` ("stdlib-unlabelled") is the stdlib corpus without
these ten packages: text to pretrain on that no document of this task is part of.

Like MNIST-1D, there is no validation split: the loop's periodic evaluation ("val") and the final
report use the test documents, and the report is of the last step's model (no selection on them).
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.errors import ConfigError, DataError
from jaxseq.tasks.char_lm import TOKENIZER_FILE, CharLM
from jaxseq.tasks.common import classification_loss, epoch_rows, evaluate_sums, padded_rows

@dataclass(frozen=True)
class StdlibDocs:
    """Docstring -> its stdlib package, 10 classes (--task stdlib_docs); a split by module."""

    max_len: int = 256
    """Characters of each docstring the model reads (the rest is cut)."""
    min_chars: int = 40
    """Shorter docstrings are not documents of the task."""
    test_fraction: float = 0.25
    """Share of each package's documents held out for testing, by whole modules."""
    train_examples: int = 0
    """Labelled training documents to use, a random subset (0 = all of them)."""
    subset_seed: int = 0
    """Seed of that subset (its own, so that runs of other seeds see the same labelled documents)."""
    pool: Literal["mean", "last"] = "mean"
    """How the classifier pools the body's outputs: mean over the document, or the last position."""
    batch_size: int = 32
    """Documents per step (the global batch, split over the mesh's data axis)."""

    unit = "doc"

    def prepare(self, run_dir=None) -> dict:
        """{"x_train": int32 [N, L], "mask_train": bool [N, L], "y_train": int32 [N], the same for "test",
        "tokenizer", "classes": [10 names], "dropped_chars": int}. With `run_dir`: its tokenizer."""
        from jaxseq.data import CharTokenizer

        self._check()
        docs = stdlib_documents(self.min_chars)
        train, test = split_by_module(docs, self.test_fraction)
        if self.train_examples:
            if self.train_examples > len(train):
                raise ConfigError(f"--stdlib-docs.train-examples {self.train_examples} exceeds the {len(train)} "
                                  f"training documents; use at most that (0 = all).")
            keep = np.sort(np.random.default_rng(self.subset_seed).permutation(len(train))[:self.train_examples])
            train = [train[i] for i in keep]
        if run_dir is None:
            tokenizer = CharTokenizer.from_text("".join(doc for _, _, doc in docs))
        else:
            tokenizer = CharLM().prepare_tokenizer(run_dir)  # the same tokenizer.json a char_lm run saves
        data = {"tokenizer": tokenizer, "classes": list(_classes()), "dropped_chars": 0}
        for split, rows in (("train", train), ("test", test)):
            x, mask, dropped = _encode([doc for _, _, doc in rows], tokenizer, self.max_len)
            data.update({f"x_{split}": x, f"mask_{split}": mask, f"modules_{split}": [m for m, _, _ in rows],
                         f"y_{split}": np.array([_classes().index(p) for _, p, _ in rows], np.int32)})
            data["dropped_chars"] += dropped
        if data["dropped_chars"]:
            warnings.warn(f"stdlib_docs: dropped {data['dropped_chars']} character(s) that the tokenizer of "
                          f"{run_dir} does not know.", stacklevel=2)
        return data

    def save(self, data, run_dir) -> None:
        data["tokenizer"].save(Path(run_dir) / TOKENIZER_FILE)

    def model_spec(self, data) -> dict:
        return {"interface": "documents", "num_classes": len(_classes()),
                "vocab_size": data["tokenizer"].vocab_size, "pool": self.pool}

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """Training batch `index`: {"inputs": int32 [B, L], "mask": bool [B, L], "labels": int32 [B],
        "weight": bool [B]}; epochs of fresh permutations, a pure function of (seed, index)."""
        if split != "train":
            raise ConfigError(f"StdlibDocs.batch serves split 'train'; evaluation uses eval_batches (got {split!r}).")
        rows = epoch_rows(len(data["y_train"]), self.batch_size, index, seed)
        return {"inputs": data["x_train"][rows], "mask": data["mask_train"][rows], "labels": data["y_train"][rows],
                "weight": np.ones(self.batch_size, bool)}

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        """The test documents in order, in batches of batch_size; the last one padded with weight False."""
        if split != "val":
            raise ConfigError(f"StdlibDocs.eval_batches serves split 'val' (the test documents), got {split!r}.")
        return [{"inputs": data["x_test"][rows], "mask": data["mask_test"][rows] & valid[:, None],
                 "labels": data["y_test"][rows], "weight": valid}
                for rows, valid in padded_rows(len(data["y_test"]), self.batch_size, max_batches)]

    def loss(self, model, variables, batch, rng=None):
        """Mean cross-entropy over weighted documents; sums: count, sum_loss, sum_accuracy."""
        rngs = None if rng is None else {"dropout": rng}
        logits = model.apply(variables, batch["inputs"], batch["mask"], deterministic=rng is None, rngs=rngs)
        return classification_loss(logits, batch["labels"], batch["weight"])

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """Test loss and accuracy over the test documents: {"loss", "accuracy", "count"}."""
        return evaluate_sums(self, model, variables, self.eval_batches(data, "val", max_batches))

    def example_inputs(self, data):
        return jax.ShapeDtypeStruct((1, self.max_len), jnp.int32)

    def _check(self) -> None:
        if self.max_len < 1 or self.batch_size < 1 or self.min_chars < 1:
            raise ConfigError("--stdlib-docs.max-len, --stdlib-docs.batch-size and --stdlib-docs.min-chars must "
                              f"be >= 1, got {self.max_len}, {self.batch_size}, {self.min_chars}.")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--stdlib-docs.test-fraction must be in (0, 1), got {self.test_fraction}.")
        if self.train_examples < 0:
            raise ConfigError(f"--stdlib-docs.train-examples must be >= 0 (0 = all), got {self.train_examples}.")


def _classes() -> tuple:
    from jaxseq.data.corpus import DOC_PACKAGES

    return DOC_PACKAGES


@functools.lru_cache(maxsize=4)  # parsing the packages takes seconds; experiments prepare many runs
def stdlib_documents(min_chars: int = 40, root: str | None = None) -> tuple[tuple[str, str, str], ...]:
    """(module, package, docstring) of the DOC_PACKAGES, in walk order; exact repeats kept once."""
    from jaxseq.data.corpus import stdlib_docstrings

    seen, docs = set(), []
    for module, doc in stdlib_docstrings(root):
        package = module.split("/")[0]
        if package in _classes() and "/" in module and len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            docs.append((module, package, doc))
    missing = set(_classes()) - {p for _, p, _ in docs}
    if missing:
        raise DataError(f"the standard library at hand has no documents of package(s) {sorted(missing)}; "
                        f"--task stdlib_docs needs all of {', '.join(_classes())}.")
    return tuple(docs)


def split_by_module(docs, test_fraction: float):
    """(train, test) lists of documents; whole modules go to test until each package has ~test_fraction.

    Modules are taken in the order of a hash of their path (stable across machines); a module that would
    take the package's test share past 1.5x the target is passed over, unless the test share is empty.
    """
    test_modules = set()
    for package in _classes():
        sizes: dict[str, int] = {}
        for module, p, _ in docs:
            if p == package:
                sizes[module] = sizes.get(module, 0) + 1
        target, taken = test_fraction * sum(sizes.values()), 0
        order = sorted(sizes, key=lambda m: hashlib.sha256(m.encode()).hexdigest())
        for module in order[:-1] if len(order) > 1 else order:  # one module always stays for training
            if taken >= target:
                break
            if taken + sizes[module] <= 1.5 * target:
                test_modules.add(module)
                taken += sizes[module]
        if taken == 0:
            smallest = min(order[:-1] or order, key=lambda m: sizes[m])
            test_modules.add(smallest)
    train = [d for d in docs if d[0] not in test_modules]
    test = [d for d in docs if d[0] in test_modules]
    return train, test


def _encode(docs: list[str], tokenizer, max_len: int):
    """Right-padded ids int32 [N, max_len], mask bool [N, max_len], and how many characters were dropped."""
    known = set(tokenizer.chars)
    x = np.zeros((len(docs), max_len), np.int32)
    mask = np.zeros((len(docs), max_len), bool)
    dropped = 0
    for i, doc in enumerate(docs):
        kept = "".join(c for c in doc if c in known)
        dropped += len(doc) - len(kept)
        ids = tokenizer.encode(kept[:max_len])
        x[i, :len(ids)] = ids
        mask[i, :len(ids)] = True
    return x, mask, dropped

