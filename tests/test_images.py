"""The images task: data (digits split, requantising, Fashion-MNIST's IDX files), exact bits/dim, PNG grids,
and `jaxseq train --task images` then `jaxseq sample` end to end."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq.errors import ConfigError, DataError, ShapeError, TokenRangeError
from jaxseq.models.pixelrnn import PixelRNN
from jaxseq.tasks.images import Images, image_grid, read_idx, write_png


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: 0, 0, 0x08, ndim, big-endian dims, values."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "b-idx1-ubyte").write_bytes(idx_bytes(np.array([7, 1, 9])))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "b-idx1-ubyte"), [7, 1, 9])
    (tmp_path / "short").write_bytes(idx_bytes(images)[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0\0\0\0")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "float")


def test_fashion_mnist_from_idx_files_and_its_absence(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        Images(dataset="fashion-mnist", fashion_dir=str(tmp_path)).prepare()
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (2, 28, 28))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(train)))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(test)))
    task = Images(dataset="fashion-mnist", fashion_dir=str(tmp_path), levels=4)
    data = task.prepare()
    np.testing.assert_array_equal(data["train"], train // 64)  # 256 levels -> 4: floor(v * 4 / 256)
    np.testing.assert_array_equal(data["test"], test // 64)
    assert task.model_spec(data) == {"interface": "images", "height": 28, "width": 28, "levels": 4}


def test_fashion_mnist_package():
    """Debian's dataset-fashion-mnist, where installed: the standard 60,000 + 10,000 images."""
    task = Images(dataset="fashion-mnist")
    if not (Path(task.fashion_dir) / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    data = task.prepare()
    assert data["train"].shape == (60000, 28, 28) and data["test"].shape == (10000, 28, 28)
    assert data["train"].dtype == np.uint8 and data["train"].max() == 255 and data["test"].min() == 0


def test_digits_split_and_levels():
    from sklearn.datasets import load_digits

    data = Images().prepare()
    assert data["train"].shape == (1500, 8, 8) and data["test"].shape == (297, 8, 8)
    np.testing.assert_array_equal(data["test"], load_digits().images[1500:])  # the last 297, exact 0..16
    assert Images().model_spec(data)["levels"] == 17
    coarse = Images(levels=2).prepare()
    np.testing.assert_array_equal(coarse["train"], data["train"] >= 9)  # floor(v * 2 / 17)
    with pytest.raises(ConfigError, match="--images.levels"):
        Images(levels=18).prepare()


def test_batches_are_pure_and_checked():
    task = Images(batch_size=4)
    data = task.prepare()
    a, b = task.batch(data, "train", 7, 3), task.batch(data, "train", 7, 3)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert a["inputs"].dtype == np.int32 and a["inputs"].shape == (4, 8, 8)
    batches = task.eval_batches(data, "val", 1 << 30)
    assert len(batches) == 75 and batches[-1]["weight"].sum() == 297 - 74 * 4
    model = PixelRNN(17, 8, 8, d_hidden=2, num_layers=1, d_head=4, first_kernel=3)
    with pytest.raises(ShapeError, match="holds 8x8 images"):  # refused before the model runs
        task.loss(model, None, {"inputs": np.zeros((2, 28, 28), np.int32), "weight": np.ones(2, bool)})
    with pytest.raises(TokenRangeError, match="holds id 17, outside \\[0, 17\\)"):  # deeper than 17 levels
        task.loss(model, None, {"inputs": np.full((2, 8, 8), 17, np.int32), "weight": np.ones(2, bool)})


def test_bits_per_dim_is_exact_over_the_test_set():
    """task.evaluate's bits/dim equals a float64 NumPy sum of -log softmax over all 297 x 64 test pixels,
    with the last, padded batch counted only for its real images."""
    task = Images(batch_size=128)
    data = task.prepare()
    model = PixelRNN(17, 8, 8, d_hidden=2, num_layers=1, d_head=4, first_kernel=3)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8), jnp.int32))
    report = task.evaluate(model, variables, data)
    logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(data["test"], jnp.int32)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nats = -np.take_along_axis(logp, data["test"][..., None].astype(np.int64), -1).sum()
    assert report["count"] == 297 * 64 and report["images"] == 297
    assert report["bits_per_dim"] == pytest.approx(nats / (297 * 64) / math.log(2), rel=1e-5)
    assert report["loss"] == pytest.approx(nats / (297 * 64), rel=1e-5)


def test_png_grid(tmp_path):
    from PIL import Image

    images = np.arange(5 * 2 * 3).reshape(5, 2, 3) % 4
    canvas = image_grid(images, 4, scale=2)
    assert canvas.shape == (2 * 5 + 1, 3 * 7 + 1)  # 3 columns, 2 rows of 4x6 tiles and 1-pixel gaps
    np.testing.assert_array_equal(canvas[6:10, 8:14], np.kron(images[4] * 85, np.ones((2, 2))))  # tile 4: row 1, col 1
    assert (canvas[6:10, 15:21] == 255).all()  # the empty sixth place stays white
    write_png(tmp_path / "g.png", canvas)
    with Image.open(tmp_path / "g.png") as im:  # an independent decoder
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), canvas)


def test_train_then_sample_a_png_grid(tmp_path):
    """`jaxseq train --task images --model row-lstm` on the digits through train(), then `jaxseq sample`."""
    from jaxseq.cli import SampleArgs, sample_command
    from jaxseq.config import OptimConfig, PixelRNNConfig, TrainConfig
    from jaxseq.train import train

    config = TrainConfig(task="images", model="row-lstm", images=Images(batch_size=16), steps=40, eval_every=40,
                         checkpoint_every=40, eval_batches=2, progress=False, run_dir=str(tmp_path / "run"),
                         pixelrnn=PixelRNNConfig(d_hidden=4, num_layers=1, d_head=16, first_kernel=3),
                         optim=OptimConfig(lr=1e-2, warmup_steps=5))
    summary = train(None, None, config)
    # Uniform over 17 levels is log2(17) = 4.09 bits/dim; 40 steps learn the dark border and more.
    assert summary["report"]["bits_per_dim"] < 3.0, summary["report"]
    paths = sample_command(SampleArgs(run_dir=str(tmp_path / "run"), num_samples=6, seed=1, temperature=1.0))
    from PIL import Image

    with Image.open(paths[0]) as im:
        grid = np.asarray(im)
    assert grid.shape == (2 * 65 + 1, 3 * 65 + 1)  # 6 images of 8x8 at scale 8, 3 columns, 1-pixel gaps
    assert set(np.unique(grid)) <= {round(v * 255 / 16) for v in range(17)}
    lines = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert lines[-1]["split"] == "report" and lines[-1]["images"] == 297

