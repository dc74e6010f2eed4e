"""The stdlib_docs task (docstring -> package, split by module), its pretraining corpus, and TokenClassifier."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.config import AdditiveConfig, OptimConfig, RNNConfig, TrainConfig, TransformerConfig
from jaxseq.data.corpus import DOC_PACKAGES, build_stdlib_text, load_text
from jaxseq.errors import ConfigError
from jaxseq.models import build_model
from jaxseq.tasks import StdlibDocs
from jaxseq.tasks.stdlib_docs import split_by_module, stdlib_documents
from jaxseq.train import train


@pytest.fixture(scope="module")
def data():
    return StdlibDocs().prepare()


def test_documents_are_labelled_by_their_package(data):
    docs = stdlib_documents()
    assert len(docs) > 2000 and {p for _, p, _ in docs} == set(DOC_PACKAGES)
    by_module = collections.defaultdict(list)
    for module, package, doc in docs:
        assert module.split("/")[0] == package and len(doc) >= 40
        by_module[module].append(doc)
    # Hand-checked: the module docstrings of logging and of email.mime.text.
    assert by_module["logging/__init__.py"][0].startswith("Logging package for Python.")
    assert any(d.startswith("Class representing text/* type MIME documents.") for d in by_module["email/mime/text.py"])
    assert len({d for _, _, d in docs}) == len(docs)  # exact repeats kept once


def test_the_test_split_holds_whole_modules_of_every_package(data):
    train_modules, test_modules = set(data["modules_train"]), set(data["modules_test"])
    assert not train_modules & test_modules
    for split in ("train", "test"):
        assert set(np.unique(data[f"y_{split}"])) == set(range(10))
    share = len(data["y_test"]) / (len(data["y_test"]) + len(data["y_train"]))
    assert 0.15 < share < 0.35
    again = split_by_module(stdlib_documents(), 0.25)  # deterministic
    assert [m for m, _, _ in again[1]] == data["modules_test"]


def test_encoding_padding_and_batches(data):
    task = StdlibDocs()
    tok = data["tokenizer"]
    first = [d for m, _, d in split_by_module(stdlib_documents(), 0.25)[0]][0]
    row = data["x_train"][0][data["mask_train"][0]]
    assert tok.decode(row) == first[:256] and data["mask_train"][0].sum() == min(len(first), 256)
    assert not data["x_train"][~data["mask_train"]].any()  # padding is id 0 under a False mask
    b = task.batch(data, "train", 3, seed=1)
    assert b["inputs"].shape == (32, 256) and b["mask"].shape == (32, 256) and b["labels"].shape == (32,)
    assert np.array_equal(b["inputs"], task.batch(data, "train", 3, seed=1)["inputs"])
    evals = task.eval_batches(data, "val", 1 << 30)
    assert sum(int(e["weight"].sum()) for e in evals) == len(data["y_test"])
    assert not evals[-1]["mask"][~evals[-1]["weight"]].any()  # padded rows hold no valid position


def test_train_examples_takes_a_fixed_subset_and_says_when_it_is_too_many(data):
    few = StdlibDocs(train_examples=50).prepare()
    assert few["x_train"].shape == (50, 256)
    rows = {r.tobytes() for r in data["x_train"]}
    assert all(r.tobytes() in rows for r in few["x_train"])
    assert np.array_equal(few["y_train"], StdlibDocs(train_examples=50).prepare()["y_train"])
    assert not np.array_equal(few["x_train"], StdlibDocs(train_examples=50, subset_seed=1).prepare()["x_train"])
    with pytest.raises(ConfigError, match="train-examples 100000 exceeds the \\d+ training documents"):
        StdlibDocs(train_examples=100_000).prepare()


def test_the_unlabelled_corpus_leaves_the_packages_out(tmp_path):
    for rel, text in (("email/a.py", '"""Email prose here."""\n'), ("json/b.py", '"""Json prose here."""\n')):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert build_stdlib_text(str(tmp_path)) == "Email prose here.\n\nJson prose here.\n"
    assert build_stdlib_text(str(tmp_path), exclude_packages=("email",)) == "Json prose here.\n"
    unlabelled = load_text("stdlib-unlabelled")
    assert 700_000 < len(unlabelled) < len(load_text("stdlib"))
    assert "Logging package for Python." not in unlabelled and "JSON (JavaScript Object Notation)" in unlabelled


@pytest.mark.parametrize("model,section", [
    ("lstm", {"rnn": RNNConfig(d_embed=8, d_hidden=12)}),
    ("transformer", {"transformer": TransformerConfig(num_layers=1, num_heads=2, d_model=8, d_ff=16, max_len=24)}),
    ("additive", {"additive": AdditiveConfig(d_embed=8)}),
])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_token_classifier_pools_the_bodys_features_and_ignores_padding(model, section, pool):
    config = TrainConfig(task="stdlib_docs", model=model, **section)
    spec = {"interface": "documents", "num_classes": 3, "vocab_size": 11, "pool": pool}
    clf = build_model(config, spec)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 11)
    mask = jnp.arange(12)[None, :] < jnp.array([[7], [12]])
    variables = clf.init(jax.random.key(0), tokens, mask)
    logits = clf.apply(variables, tokens, mask)
    # Against the pooling done by hand on the body's own features (float64).
    feats = np.asarray(clf.apply(variables, tokens, mask, method=lambda m, t, k: m.body.features(t, k)), np.float64)
    m = np.asarray(mask)
    pooled = np.stack([feats[b, m[b]].mean(0) if pool == "mean" else feats[b, m[b]][-1] for b in range(2)])
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, pooled @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"]),
                               rtol=1e-4, atol=1e-5)
    # More padding after a document changes nothing.
    longer = jnp.concatenate([tokens, jnp.full((2, 12), 5)], axis=1)
    pad_mask = jnp.concatenate([mask, jnp.zeros((2, 12), bool)], axis=1)
    np.testing.assert_allclose(clf.apply(variables, longer, pad_mask), logits, rtol=1e-5, atol=1e-6)


def test_feature_series_tasks_refuse_token_only_models():
    spec = {"interface": "classifier", "num_classes": 10, "d_input": 1}
    with pytest.raises(ConfigError, match="--model transformer does not serve the classifier interface.*gru"):
        build_model(TrainConfig(task="mnist1d", model="transformer"), spec)
    with pytest.raises(ConfigError, match="--model ngram does not serve the documents interface.*additive, rnn"):
        build_model(TrainConfig(task="stdlib_docs", model="ngram"), {**spec, "interface": "documents"})


def test_a_bag_of_characters_learns_more_than_the_label_frequencies(tmp_path, data):
    # The cross-entropy of predicting every test document with the training set's class frequencies.
    prior = np.bincount(data["y_train"], minlength=10) / len(data["y_train"])
    prior_nats = -np.mean(np.log(prior[data["y_test"]]))
    task = StdlibDocs(max_len=128, pool="last")  # "last": the mean of all the document's embeddings
    config = TrainConfig(task="stdlib_docs", model="additive", additive=AdditiveConfig(d_embed=32), steps=150,
                         eval_every=150, checkpoint_every=150, progress=False, run_dir=str(tmp_path / "bow"),
                         stdlib_docs=task, optim=OptimConfig(lr=3e-2, warmup_steps=10))
    report = train(config=config)["report"]
    assert report["count"] == len(data["y_test"]) and report["loss"] < prior_nats - 0.1
