"""Translation (--task translation): sentence pairs, teacher-forced training, beam-search BLEU.

Data (`--translation.data`): "numbers" (the default, offline: English number words -> German number words
from num2words, e.g. "three hundred and twenty-one thousand and seven" ->
"dreihunderteinundzwanzigtausendsieben", with the digit count of the numbers, hence the source length,
set by --translation.min-digits / max-digits and, for the test set only, test-max-digits); "bible"
(the World English Bible -> the Reina-Valera 1909 by verse, ~31k pairs: apt-get install sword-text-web
sword-text-sparv libsword-utils); or a .tsv / .jsonl / .csv file or a Hugging Face dataset name with
--translation.source-column / target-column. Numbers get disjoint train / validation / test sets; other
data is shuffled and cut (`jaxseq.tasks.text_pairs`).

Tokens (`--translation.tokenizer`): "char" by default: the number task's vocabulary is ~30 letters a
side, German writes a number as one compound word that a word vocabulary could not split, and nothing
needs training; "bpe" (byte-level, trained on the training split, `--translation.bpe-vocab-size`) for
real text, where characters make sequences long; "word" splits on spaces. The vocabularies come from
the training split only and are saved in the run (`vocab_source.json`, `vocab_target.json`).

`evaluate` decodes the test set with beam search (--translation.beam-size, GNMT length penalty
--translation.length-penalty) and scores it with sacrebleu: BLEU, chrF and exact match. BLEU counts
word n-grams ("13a"), except on the number task, whose German targets are mostly one word: there it
counts character n-grams ("char"), which is what `--translation.bleu-tokenize auto` picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.errors import CheckpointError, ConfigError, DataError
from jaxseq.tasks import seq2seq_common as S
from jaxseq.tasks.common import epoch_rows, evaluate_sums, padded_rows
from jaxseq.tasks.vocab import Vocab

VOCAB_FILES = ("vocab_source.json", "vocab_target.json")


@dataclass(frozen=True)
class Translation:
    """Sequence-to-sequence translation (--task translation); see the module docstring."""

    data: str = "numbers"
    """"numbers", "bible", a .tsv/.jsonl/.csv file, or a Hugging Face dataset name."""
    source_column: str = "source"
    """The source column of a file or dataset."""
    target_column: str = "target"
    """The target column of a file or dataset."""
    tokenizer: Literal["char", "word", "bpe"] = "char"
    """How text is cut into tokens (both sides)."""
    bpe_vocab_size: int = 2000
    """Vocabulary size of each side's byte-level BPE (>= 259)."""
    min_digits: int = 1
    """Numbers: the fewest digits of a number."""
    max_digits: int = 6
    """Numbers: the most digits of a training or validation number."""
    test_max_digits: int = 6
    """Numbers: the most digits of a test number (above max-digits: longer sources than any trained on)."""
    train_pairs: int = 20000
    """Numbers: training pairs (other data: all pairs not held out)."""
    val_pairs: int = 500
    """Validation pairs (the loop's periodic evaluation)."""
    test_pairs: int = 1000
    """Test pairs, decoded by the final evaluation."""
    data_seed: int = 0
    """Seed of the numbers drawn and of the split of other data."""
    max_source_len: int = 0
    """The longest source, in tokens (0: the longest in the data)."""
    max_target_len: int = 0
    """The decoder's limit: the longest target in tokens, EOS included, where decoding stops
    (0: twice the longest source, plus 10)."""
    train_max_source_len: int = 0
    """Drop training (not validation or test) pairs whose source is longer, in tokens (0: keep all): train on
    short sentences and test on all lengths, as Bahdanau et al.'s RNNsearch-30."""
    drop_long: bool = False
    """Drop pairs over max-source-len / max-target-len instead of stopping with an error."""
    batch_size: int = 64
    """Sentence pairs per step (the global batch)."""
    beam_size: int = 4
    """Beams in the final evaluation and in `jaxseq sample` (1: greedy)."""
    length_penalty: float = 0.6
    """GNMT length penalty alpha of the beam search (0: plain log-probabilities)."""
    decode_test: bool = True
    """The final evaluation decodes the test set (BLEU, chrF, exact match); off: the test loss only."""
    bleu_tokenize: Literal["auto", "13a", "char", "intl"] = "auto"
    """sacrebleu's BLEU tokenizer; auto: "char" for the number task, "13a" (words) otherwise."""

    unit = "tok"

    # -- data ----------------------------------------------------------------------------------------

    def pairs(self) -> dict[str, list[tuple[str, str]]]:
        """The raw {"train", "val", "test": [(source, target)]} splits."""
        from jaxseq.tasks import text_pairs

        if self.data == "numbers":
            if self.test_max_digits < self.max_digits:
                raise ConfigError(f"--translation.test-max-digits ({self.test_max_digits}) must be >= "
                                  f"--translation.max-digits ({self.max_digits}).")
            return text_pairs.number_splits(self.train_pairs, self.val_pairs, self.test_pairs,
                                            min_digits=self.min_digits, max_digits=self.max_digits,
                                            seed=self.data_seed, test_max_digits=self.test_max_digits)
        pairs = text_pairs.load_pairs(self.data, source_column=self.source_column, target_column=self.target_column)
        return text_pairs.split_pairs(pairs, val=self.val_pairs, test=self.test_pairs, seed=self.data_seed)

    def prepare(self, run_dir=None) -> dict:
        """{"vocabs": (source, target), "<split>": {"src": [int32 [n]], "tgt": [...], "text": [(s, t)]},
        "widths": {"<split>": (S, T)}, "limits": (source, target)}; with run_dir, the run's saved vocabularies."""
        splits = self.pairs()
        vocabs = self.load_vocabs(run_dir) if run_dir is not None else self.build_vocabs(splits["train"])
        data = {"vocabs": vocabs, "limits": self._limits(splits, vocabs)}
        for name, pairs in splits.items():
            data[name] = self._encode_split(name, pairs, vocabs, data["limits"])
        if self.train_max_source_len:
            keep = [i for i, s in enumerate(data["train"]["src"]) if len(s) <= self.train_max_source_len]
            if not keep:
                raise DataError(f"no training source is within --translation.train-max-source-len "
                                f"{self.train_max_source_len}; raise it.")
            data["train"] = {k: [v[i] for i in keep] for k, v in data["train"].items()}
        data["widths"] = {name: _widths(data[name]) for name in splits}
        return data

    def build_vocabs(self, train_pairs) -> tuple[Vocab, Vocab]:
        """Each side's vocabulary from the training pairs. Numbers add their closed lexicon (0..100 and the
        scales in singular and plural, with English's commas): "zero" is the only number with a "z", and one
        held-out number must not be an error."""
        if self.data == "numbers":
            from jaxseq.tasks.text_pairs import MAX_DIGITS, number_pair

            scales = [m * 10 ** k + extra for k in range(MAX_DIGITS) for m, extra in ((1, 0), (2, 1001))]
            train_pairs = list(train_pairs) + [number_pair(n) for n in [*range(101), *scales]]
        return tuple(Vocab.build([p[i] for p in train_pairs], self.tokenizer, vocab_size=self.bpe_vocab_size)
                     for i in (0, 1))

    def _limits(self, splits, vocabs) -> tuple[int, int]:
        """(longest source, longest target with EOS) allowed, in tokens; see max-source-len / max-target-len.

        The automatic target limit is twice the longest source of any split plus 10: sources are inputs,
        so the limit is known without looking at a test target.
        """
        if self.max_source_len < 0 or self.max_target_len < 0:
            raise ConfigError("--translation.max-source-len and max-target-len must be >= 0 (0: see --help).")
        longest = max(len(vocabs[0].encode(s, name="a source")) for pairs in splits.values() for s, _ in pairs)
        max_src = self.max_source_len or longest
        return max_src, self.max_target_len or 2 * min(longest, max_src) + 10

    def _encode_split(self, name: str, pairs, vocabs, limits) -> dict:
        src = [vocabs[0].encode(s, name=f"the source of {name} pair {i}") for i, (s, _) in enumerate(pairs)]
        tgt = [vocabs[1].encode(t, name=f"the target of {name} pair {i}") for i, (_, t) in enumerate(pairs)]
        max_src, max_tgt = limits
        keep = [i for i in range(len(pairs)) if len(src[i]) <= max_src and len(tgt[i]) + 1 <= max_tgt]
        if len(keep) < len(pairs) and not self.drop_long:
            i = next(i for i in range(len(pairs)) if i not in set(keep))
            raise DataError(
                f"{name} pair {i} has a source of {len(src[i])} tokens and a target of {len(tgt[i]) + 1} with EOS; "
                f"the limits are {max_src} (--translation.max-source-len) and {max_tgt} "
                f"(--translation.max-target-len, the decoder's limit). Raise them, or pass --translation.drop-long "
                f"to drop the {len(pairs) - len(keep)} longer pairs.")
        if not keep:
            raise DataError(f"no {name} pair is within --translation.max-source-len / max-target-len; raise them.")
        return {"src": [src[i] for i in keep], "tgt": [tgt[i] for i in keep], "text": [pairs[i] for i in keep]}

    def save(self, data, run_dir) -> None:
        for vocab, name in zip(data["vocabs"], VOCAB_FILES):
            vocab.save(Path(run_dir) / name)

    def load_vocabs(self, run_dir) -> tuple[Vocab, Vocab]:
        paths = [Path(run_dir) / name for name in VOCAB_FILES]
        for path in paths:
            if not path.is_file():
                raise CheckpointError(f"{path} is missing; is {run_dir} a run directory written by `jaxseq train`?")
        return Vocab.load(paths[0]), Vocab.load(paths[1])

    def model_spec(self, data) -> dict:
        src, tgt = data["vocabs"]
        return {"interface": "seq2seq", "source": "tokens", "src_vocab_size": src.size, "vocab_size": tgt.size}

    # -- batches -------------------------------------------------------------------------------------

    def _arrays(self, split_data, rows, widths, valid=None) -> dict:
        S_w, T_w = widths
        src, src_mask = S.pad_tokens([split_data["src"][r] for r in rows], S_w)
        batch = {"src": src, "src_mask": src_mask, **S.target_arrays([split_data["tgt"][r] for r in rows], T_w)}
        batch["weight"] = np.ones(len(rows), bool) if valid is None else valid
        return batch

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """Training batch `index` (see `jaxseq.tasks.seq2seq_common`), epochs of fresh permutations."""
        if split != "train":
            raise ConfigError(f"Translation.batch serves split 'train'; evaluation uses eval_batches (got {split!r}).")
        if self.batch_size < 1:
            raise ConfigError(f"--translation.batch-size must be >= 1, got {self.batch_size}.")
        rows = epoch_rows(len(data["train"]["src"]), self.batch_size, index, seed)
        return self._arrays(data["train"], rows, data["widths"]["train"])

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        """The "val" (or "test") split in order, in batches of batch_size; the last padded with weight False."""
        if split not in ("val", "test"):
            raise ConfigError(f"Translation.eval_batches serves 'val' or 'test', got {split!r}.")
        n = len(data[split]["src"])
        return [self._arrays(data[split], rows, data["widths"][split], valid)
                for rows, valid in padded_rows(n, self.batch_size, max_batches)]

    def loss(self, model, variables, batch, rng=None):
        return S.seq2seq_loss(model, variables, batch, rng)

    def example_inputs(self, data):
        return (jax.ShapeDtypeStruct((1, 2), jnp.int32), jax.ShapeDtypeStruct((1, 2), jnp.int32))

    # -- decoding and evaluation ---------------------------------------------------------------------

    def translate(self, model, variables, data, sources: list[str], *, beam_size: int | None = None) -> list[str]:
        """Translate source strings with beam search (the task's beam size by default)."""
        src_vocab, tgt_vocab = data["vocabs"]
        if any(not s.strip() for s in sources):
            raise DataError("--source is empty; give a sentence to translate." if len(sources) == 1 else
                            "a source to translate is empty; every source needs at least one token.")
        ids = [src_vocab.encode(s, name="--source" if len(sources) == 1 else f"source {i}")
               for i, s in enumerate(sources)]
        max_src, max_tgt = data["limits"]
        too_long = [len(x) for x in ids if len(x) > max_src]
        if too_long:
            raise DataError(f"a source has {max(too_long)} tokens, over the run's source limit {max_src} "
                            "(--translation.max-source-len); shorten it.")
        width = max(len(x) for x in ids)
        out = []
        for rows, valid in padded_rows(len(ids), self.batch_size, 1 << 30):
            src, mask = S.pad_tokens([ids[r] for r in rows], width)
            tokens = S.decode(model, variables, src, mask, beam_size=beam_size or self.beam_size,
                              max_new_tokens=max_tgt, length_penalty=self.length_penalty)
            out += [tgt_vocab.decode(t) for t, ok in zip(tokens, valid) if ok]
        return out

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """Test loss (nats per target token) and the beam-search translations' BLEU, chrF and exact match."""
        report = evaluate_sums(self, model, variables, self.eval_batches(data, "test", max_batches))
        if not self.decode_test:
            return report
        n = min(len(data["test"]["text"]), max_batches * self.batch_size)
        sources = [s for s, _ in data["test"]["text"][:n]]
        references = [t for _, t in data["test"]["text"][:n]]
        hypotheses = self.translate(model, variables, data, sources)
        report.update(S.scores(hypotheses, references, bleu_tokenize=self.resolved_bleu_tokenize))
        return report

    @property
    def resolved_bleu_tokenize(self) -> str:
        if self.bleu_tokenize != "auto":
            return self.bleu_tokenize
        return "char" if self.data == "numbers" else "13a"


def _widths(split: dict) -> tuple[int, int]:
    """(S, T) of a split's batches: its longest source, and its longest target + 1 (BOS / EOS)."""
    return max(len(s) for s in split["src"]), max(len(t) for t in split["tgt"]) + 1
