"""Tasks beyond text: MNIST-1D's data, batches and evaluation; the many-to-one classifier; the model table."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.cells import GRU
from jaxseq.config import OptimConfig, RNNConfig, TrainConfig
from jaxseq.errors import ConfigError, ShapeError
from jaxseq.models import MODELS, build_model
from jaxseq.models.classifier import SequenceClassifier, last_valid
from jaxseq.tasks import MNIST1D
from jaxseq.train import train

pytest.importorskip("mnist1d")


@pytest.fixture(scope="module")
def plain():
    return MNIST1D().prepare()


def test_mnist1d_is_the_papers_set(plain):
    assert plain["x_train"].shape == (4000, 40, 1) and plain["x_test"].shape == (1000, 40, 1)
    assert plain["x_train"].dtype == np.float32 and plain["y_train"].dtype == np.int32
    assert set(np.unique(plain["y_train"])) == set(range(10))
    counts = np.bincount(np.concatenate([plain["y_train"], plain["y_test"]]))
    assert np.all(counts == 500)  # 500 examples of each digit, as the generator makes them
    x = np.concatenate([plain["x_train"], plain["x_test"]])
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3  # the generator standardises the whole set
    again = MNIST1D().prepare()  # from the cache: the same arrays
    assert all(np.array_equal(plain[k], again[k]) for k in plain)


def test_shuffled_variant_is_one_fixed_permutation_of_the_positions(plain):
    shuffled = MNIST1D(shuffle=True).prepare()
    a, b = plain["x_train"][..., 0], shuffled["x_train"][..., 0]
    assert np.array_equal(plain["y_train"], shuffled["y_train"])
    # Column j of the shuffled set is exactly one column of the plain set: a permutation, not the identity.
    perm = [int(np.flatnonzero(np.all(np.isclose(a, b[:, [j]], atol=1e-6), axis=0))[0]) for j in range(40)]
    assert sorted(perm) == list(range(40)) and perm != list(range(40))
    np.testing.assert_allclose(shuffled["x_test"][..., 0], plain["x_test"][..., 0][:, perm], atol=1e-6)


def test_training_batches_are_pure_and_cover_each_epoch_once(plain):
    task = MNIST1D(batch_size=100)
    b0 = task.batch(plain, "train", 7, seed=3)
    assert all(np.array_equal(b0[k], task.batch(plain, "train", 7, seed=3)[k]) for k in b0)
    assert not np.array_equal(b0["inputs"], task.batch(plain, "train", 7, seed=4)["inputs"])
    assert b0["inputs"].shape == (100, 40, 1) and b0["labels"].shape == (100,) and b0["weight"].all()
    # One epoch (40 batches of 100) sees each of the 4,000 training signals exactly once.
    rows = np.concatenate([task.batch(plain, "train", i, seed=0)["inputs"][:, :, 0] for i in range(40)])
    assert len(np.unique(rows, axis=0)) == 4000
    # A batch straddling two epochs (batch 3 of 1,500 rows): 1,000 rows of epoch 0, 500 of epoch 1.
    big = MNIST1D(batch_size=1500).batch(plain, "train", 2, seed=0)
    assert len(np.unique(big["inputs"][:1000, :, 0], axis=0)) == 1000


def test_eval_batches_cover_the_test_set_once_with_padding_weighted_out(plain):
    batches = MNIST1D(batch_size=300).eval_batches(plain, "val", 100)
    assert len(batches) == 4 and [int(b["weight"].sum()) for b in batches] == [300, 300, 300, 100]
    got = np.concatenate([b["labels"][b["weight"]] for b in batches])
    assert np.array_equal(got, plain["y_test"])
    with pytest.raises(ConfigError, match="split"):
        MNIST1D().batch(plain, "val", 0, 0)


def test_last_valid_matches_a_numpy_loop():
    rng = np.random.default_rng(0)
    ys = rng.normal(size=(6, 7, 3)).astype(np.float32)
    mask = rng.random((6, 7)) < 0.5
    mask[0] = False  # an empty row gives zeros
    mask[1] = True
    got = np.asarray(last_valid(jnp.asarray(ys), jnp.asarray(mask)))
    for b in range(6):
        valid = np.flatnonzero(mask[b])
        expect = ys[b, valid[-1]] if len(valid) else np.zeros(3, np.float32)
        np.testing.assert_array_equal(got[b], expect)


def test_classifier_ignores_padding():
    model = SequenceClassifier(num_classes=4, cell=GRU(8, 16), d_embed=8)
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(3, 9, 2)).astype(np.float32)
    variables = model.init(jax.random.key(0), xs)
    padded = np.concatenate([xs, rng.normal(size=(3, 5, 2)).astype(np.float32) * 1e3], axis=1)
    mask = np.arange(14)[None] < 9
    a = model.apply(variables, xs)
    b = model.apply(variables, padded, mask=np.repeat(mask, 3, 0))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ShapeError, match="features"):
        model.apply(variables, xs[..., 0])


def test_model_table_serves_the_task_interfaces():
    config = TrainConfig(task="mnist1d", model="transformer")
    spec = MNIST1D().model_spec(None)
    with pytest.raises(ConfigError, match="does not serve the classifier"):
        build_model(config, spec)
    for name, entry in MODELS.items():
        if "classifier" in entry.serves:
            model = build_model(TrainConfig(task="mnist1d", model=name, rnn=RNNConfig(d_embed=8, d_hidden=32)), spec)
            x = jax.ShapeDtypeStruct((2, 40, 1), jnp.float32)
            logits = jax.eval_shape(lambda v, x: model.apply(v, x), jax.eval_shape(model.init, jax.random.key(0), x), x)
            assert logits.shape == (2, 10), name


def small_config(tmp_path, name, **kw):
    base = dict(task="mnist1d", model="gru", rnn=RNNConfig(d_embed=8, d_hidden=16, dropout=0.1),
                mnist1d=MNIST1D(batch_size=50), optim=OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=1.0),
                steps=8, eval_every=4, eval_batches=1, checkpoint_every=4, progress=False,
                run_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def train_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(ln) for ln in open(f"{run_dir}/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}


def test_classifier_resumes_bit_for_bit(tmp_path):
    full = train(None, None, small_config(tmp_path, "full"))
    train(None, None, small_config(tmp_path, "split", steps=4))
    resumed = train(None, None, small_config(tmp_path, "split", resume=True))
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(b) == list(range(1, 9)) and all(a[s] == b[s] for s in range(1, 9))
    assert resumed["report"] == full["report"] and resumed["report"]["count"] == 1000


def test_gru_learns_mnist1d(tmp_path):
    """A small GRU well above chance (10%) in a few hundred steps: the task, the classifier and the loop together."""
    config = small_config(tmp_path, "learn", steps=300, eval_every=300, checkpoint_every=300, eval_batches=20,
                          rnn=RNNConfig(d_embed=32, d_hidden=64), optim=OptimConfig(lr=1e-2, warmup_steps=20))
    out = train(None, None, config)
    assert out["report"]["accuracy"] > 0.5, out["report"]
    assert out["val"]["accuracy"] == out["report"]["accuracy"]  # the last evaluation saw the whole test set


def test_command_line_trains_and_evaluates_mnist1d(tmp_path, capsys):
    from jaxseq.cli import main

    run = str(tmp_path / "run")
    main(["train", "--task", "mnist1d", "--model", "gru", "--rnn.d-embed", "8", "--rnn.d-hidden", "8", "--steps", "3",
          "--eval-every", "3", "--checkpoint-every", "3", "--mnist1d.shuffle", "--run-dir", run, "--no-progress"])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])["summary"]
    assert "kernels: recurrence=" in out and summary["report"]["count"] == 1000
    main(["eval", run])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary["report"]
