"""Probe tasks: synthetic, seeded sequences that each test one desideratum of a sequence model.

The desiderata of the DeepMind/UCL lecture on sequences (order matters, variable length, pairwise
encoding, long-term dependencies) as tasks any language model can be trained on and scored by. Every
probe is a token sequence ending in a query token; the model must predict the answer token right after
it. Only that prediction counts in the loss and the accuracy, so the same model that reads text serves
(n-gram, additive, RNNs, convolutions, Transformers: the "lm" interface).

- recall (the "Tim ... grew up in France ... speaks fluent French" pattern): `num_pairs` key-value
  pairs, then `distance` distractor tokens, then QUERY and one of the keys; the answer is its value.
      k3 v5 k0 v2 d7 d1 ... d4 ? k0 -> v2
- order: `length` filler tokens with the markers A and B at two random positions; the answer is YES
  when A comes first. The multiset of tokens says nothing: an order-blind model sits at 50%.
- pairwise: `length` distinct symbols, or (half the time) the same with one symbol repeated; the answer
  is YES when some symbol appears twice: a relation between pairs of positions.
- length: a string of a's and b's of length 1..`length` (training); the answer is YES when the a's
  outnumber the b's (rule "majority") or their count is odd ("parity"). The evaluation also scores
  strings of exactly 2x and 4x the longest training length (length generalisation).

Training batches are generated afresh from (seed, index), so the data position is the batch index
and a resumed run sees the same batches. The test set is generated once from `test_seed`; its
sequences are of the same distribution (for "length": lengths 1..L), and "length" adds test sets at
2L and 4L.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq.errors import ConfigError
from jaxseq.tasks.common import evaluate_sums

ProbeKind = Literal["recall", "order", "pairwise", "length"]


@dataclass(frozen=True)
class Probes:
    """Synthetic probes of a sequence model (--task probes): recall over a distance, order, pairwise, length."""

    probe: ProbeKind = "recall"
    """Which desideratum: "recall" (long-range memory), "order", "pairwise" (any symbol twice?) or
    "length" (train up to --probes.length, test at 2x and 4x)."""
    distance: int = 50
    """recall: distractor tokens between the last key-value pair and the query."""
    num_pairs: int = 1
    """recall: key-value pairs before the distractors (the query asks for one of them)."""
    length: int = 16
    """order / pairwise: tokens before the query; length: the longest training string."""
    num_symbols: int = 16
    """Size of each symbol alphabet (keys, values, distractors, fillers). pairwise needs >= length."""
    rule: Literal["majority", "parity"] = "majority"
    """length: YES when a's outnumber b's ("majority") or their count is odd ("parity")."""
    batch_size: int = 32
    """Sequences per training step."""
    test_size: int = 1024
    """Sequences in each test set."""
    test_seed: int = 12345
    """Seed of the test sets (training batches come from --seed)."""

    unit = "ex"

    # ----------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        S = self.num_symbols
        return {"recall": 3 * S + 1, "order": S + 5, "pairwise": S + 3, "length": 5}[self.probe]

    def _specials(self) -> dict:
        """Token ids of QUERY, NO and YES (and the markers), after the symbol alphabets."""
        S = self.num_symbols
        base = {"recall": 3 * S, "order": S + 2, "pairwise": S, "length": 2}[self.probe]
        return {"query": base, "no": base + 1, "yes": base + 2, "a": S, "b": S + 1}

    def check(self) -> None:
        if self.probe not in ("recall", "order", "pairwise", "length"):
            raise ConfigError(f"--probes.probe must be recall, order, pairwise or length, got {self.probe!r}.")
        if self.num_symbols < 2:
            raise ConfigError(f"--probes.num-symbols must be >= 2, got {self.num_symbols}.")
        if self.probe == "recall":
            if self.distance < 0:
                raise ConfigError(f"--probes.distance must be >= 0, got {self.distance}.")
            if not 1 <= self.num_pairs <= self.num_symbols:
                raise ConfigError(f"--probes.num-pairs must be in 1..{self.num_symbols} (--probes.num-symbols), "
                                  f"got {self.num_pairs}.")
        elif self.length < (2 if self.probe != "length" else 1):
            raise ConfigError(f"--probes.length must be >= 2, got {self.length}.")
        if self.probe == "pairwise" and self.num_symbols < self.length:
            raise ConfigError(f"the pairwise probe needs --probes.num-symbols >= --probes.length "
                              f"({self.num_symbols} < {self.length}) to draw sequences without repeats.")
        if self.batch_size < 1 or self.test_size < 1:
            raise ConfigError("--probes.batch-size and --probes.test-size must be >= 1.")

    # ----------------------------------------------------------------- generation

    def generate(self, rng: np.random.Generator, n: int, length: int | None = None) -> list[tuple[np.ndarray, int]]:
        """n examples (sequence ending in QUERY [and the key], answer token), drawn with `rng`.

        length: for the "length" probe, the exact string length (None: uniform in 1..--probes.length).
        """
        return [self._one(rng, length) for _ in range(n)]

    def _one(self, rng, length):
        S, sp = self.num_symbols, self._specials()
        if self.probe == "recall":
            keys = rng.choice(S, size=self.num_pairs, replace=False)
            values = S + rng.integers(0, S, size=self.num_pairs)
            pairs = np.stack([keys, values], axis=1).reshape(-1)
            asked = rng.integers(0, self.num_pairs)
            distractors = 2 * S + rng.integers(0, S, size=self.distance)
            seq = np.concatenate([pairs, distractors, [sp["query"], keys[asked]]])
            return seq, int(values[asked])
        if self.probe == "order":
            seq = rng.integers(0, S, size=self.length)
            i, j = rng.choice(self.length, size=2, replace=False)
            seq[i], seq[j] = sp["a"], sp["b"]
            return np.append(seq, sp["query"]), sp["yes"] if i < j else sp["no"]
        if self.probe == "pairwise":
            seq = rng.choice(S, size=self.length, replace=False)
            repeat = bool(rng.integers(0, 2))
            if repeat:
                i, j = rng.choice(self.length, size=2, replace=False)
                seq[j] = seq[i]
            return np.append(seq, sp["query"]), sp["yes"] if repeat else sp["no"]
        n = int(rng.integers(1, self.length + 1)) if length is None else length
        seq = rng.integers(0, 2, size=n)  # 0 = a, 1 = b
        a = int(np.sum(seq == 0))
        yes = a > n - a if self.rule == "majority" else a % 2 == 1
        return np.append(seq, sp["query"]), sp["yes"] if yes else sp["no"]

    @staticmethod
    def pack(examples, T: int) -> dict:
        """Right-padded to T (fixed per split, so one compiled step serves every batch): {"inputs": int32 [B, T], "mask": bool [B, T], "answer": int32 [B],
        "answer_pos": int32 [B] (the query's last position, where the answer is predicted),
        "weight": bool [B]}."""
        inputs = np.zeros((len(examples), T), np.int32)
        mask = np.zeros((len(examples), T), bool)
        for b, (seq, _) in enumerate(examples):
            inputs[b, :len(seq)], mask[b, :len(seq)] = seq, True
        return {"inputs": inputs, "mask": mask,
                "answer": np.array([a for _, a in examples], np.int32),
                "answer_pos": np.array([len(s) - 1 for s, _ in examples], np.int32),
                "weight": np.ones(len(examples), bool)}

    # ----------------------------------------------------------------- task protocol

    def prepare(self, run_dir=None) -> dict:
        """The test sets {name: batch-ready (sequences, answers)}: "test" (and, for length, "test_2x", "test_4x")."""
        self.check()
        rng = np.random.default_rng([self.test_seed, 7])
        data = {"test": self.generate(rng, self.test_size)}
        if self.probe == "length":
            for k in (2, 4):
                data[f"test_{k}x"] = self.generate(rng, self.test_size, length=k * self.length)
        return data

    def save(self, data, run_dir) -> None:
        pass  # regenerated exactly from the config

    def model_spec(self, data) -> dict:
        return {"interface": "lm", "vocab_size": self.vocab_size}

    def max_len(self, split: str = "test_4x") -> int:
        """The longest input of `split` ("train", "test", ... ; query included); by default of any split."""
        if self.probe == "recall":
            return 2 * self.num_pairs + self.distance + 2
        scale = {"test_2x": 2, "test_4x": 4}.get(split, 1) if self.probe == "length" else 1
        return scale * self.length + 1

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """Training batch `index`: fresh examples from (seed, index); see `pack`."""
        if split != "train":
            raise ConfigError(f"Probes.batch serves split 'train'; evaluation uses eval_batches (got {split!r}).")
        return self.pack(self.generate(np.random.default_rng([seed, index, 1]), self.batch_size), self.max_len("train"))

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        """The test set `split` ("val" = "test") in fixed batches of batch_size."""
        split = "test" if split == "val" else split
        examples, T = data[split], self.max_len(split)
        out = []
        for start in range(0, len(examples), self.batch_size):
            if len(out) >= max_batches:
                break
            chunk = examples[start:start + self.batch_size]
            batch = self.pack(chunk + [chunk[0]] * (self.batch_size - len(chunk)), T)
            batch["weight"][len(chunk):] = False
            out.append(batch)
        return out

    def loss(self, model, variables, batch, rng=None):
        """Cross-entropy of the answer at the query position; sums: count, sum_loss, sum_accuracy."""
        rngs = None if rng is None else {"dropout": rng}
        logits = model.apply(variables, batch["inputs"], mask=batch["mask"], deterministic=rng is None, rngs=rngs)
        at = jnp.take_along_axis(logits, batch["answer_pos"][:, None, None], axis=1)[:, 0].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(at, batch["answer"])
        w = batch["weight"]
        count = jnp.sum(w, dtype=jnp.int32)
        sums = {"count": count, "sum_loss": jnp.sum(jnp.where(w, ce, 0.0)),
                "sum_accuracy": jnp.sum(w & (jnp.argmax(at, -1) == batch["answer"]), dtype=jnp.float32)}
        return sums["sum_loss"] / jnp.maximum(count, 1).astype(jnp.float32), sums

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """{"loss", "accuracy", "count"} on the test set; "length" adds accuracy_2x and accuracy_4x."""
        report = evaluate_sums(self, model, variables, self.eval_batches(data, "val", max_batches))
        for name in data:
            if name != "test":
                sub = evaluate_sums(self, model, variables, self.eval_batches(data, name, max_batches))
                report[f"accuracy_{name[len('test_'):]}"] = sub["accuracy"]
        return report

    def fit(self, model, data):
        """Count-based models (the n-gram): counts over one stream of 4,096 training examples, answers included."""
        examples = self.generate(np.random.default_rng([0, 0, 1]), 4096)
        return model.fit_variables(np.concatenate([np.append(s, a) for s, a in examples]))

    def example_inputs(self, data):
        return jax.ShapeDtypeStruct((1, self.max_len()), jnp.int32)
