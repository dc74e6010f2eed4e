"""Image modelling pixel by pixel (PixelRNN's task): p(image) = prod_t p(x_t | x_<t) in raster order.

Data (`--images.dataset`):
- digits (default, pip scikit-learn): the 1,797 8x8 images of `load_digits`, 17 grey levels (0..16).
  Split by position, deterministically: the first 1,500 train, the last 297 test.
- fashion-mnist (Debian `dataset-fashion-mnist`): 60,000 train + 10,000 test 28x28 images, 256 levels,
  read from the IDX gz files in `--images.fashion-dir`.
`--images.levels L` requantises to L grey levels (v -> floor(v * L / depth)); 0 keeps the dataset's.

The loss is the exact negative log-likelihood: nats summed over pixels, averaged per pixel (the
"count" is pixels), and reported as bits per dimension = nats / (H * W) / ln 2 per image, i.e. the
test set's total nats / its number of pixels / ln 2. The report and the loop's "val" evaluations use
the test split (there is no validation split; the report is of the last step's model).

`jaxseq sample RUN_DIR --num-samples 16` draws that many images pixel by pixel through the model's
recurrent form (`jaxseq.decoding.sample`, a begin-of-image id first) and writes them as one PNG grid.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq.checks import check_tokens
from jaxseq.errors import ConfigError, DataError, ShapeError
from jaxseq.tasks.common import epoch_rows, evaluate_sums, padded_rows

SIZES = {"digits": (8, 8, 17), "fashion-mnist": (28, 28, 256)}  # height, width, grey levels
DIGITS_TRAIN = 1500  # the first 1,500 of load_digits' 1,797 images train, the last 297 test
FASHION_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}


@dataclass(frozen=True)
class Images:
    """Pixel-by-pixel image modelling (--task images): scikit-learn's 8x8 digits or Fashion-MNIST, bits/dim."""

    dataset: Literal["digits", "fashion-mnist"] = "digits"
    """digits: scikit-learn's 8x8 digits, 17 levels (pip); fashion-mnist: 28x28, 256 levels (apt-get install
    dataset-fashion-mnist)."""
    levels: int = 0
    """Grey levels of the softmax: 0 keeps the dataset's (17 or 256); fewer requantises the images."""
    batch_size: int = 32
    """Images per step (the global batch, split over the mesh's data axis)."""
    fashion_dir: str = "/usr/share/datasets/fashion-mnist"
    """Where the Fashion-MNIST IDX files are (the Debian package's folder)."""

    unit = "px"

    def shape(self) -> tuple[int, int, int]:
        """(height, width, levels) of this config's images."""
        if self.dataset not in SIZES:
            raise ConfigError(f"--images.dataset must be one of {', '.join(SIZES)}, got {self.dataset!r}.")
        h, w, depth = SIZES[self.dataset]
        if self.levels < 0 or self.levels == 1 or self.levels > depth:
            raise ConfigError(f"--images.levels must be 0 (the dataset's {depth}) or in [2, {depth}], got {self.levels}.")
        return h, w, self.levels or depth

    def prepare(self, run_dir=None) -> dict:
        """{"train": uint8 [n, H, W], "test": uint8 [m, H, W]}, values in [0, levels)."""
        h, w, levels = self.shape()
        raw = _load_digits() if self.dataset == "digits" else _load_fashion(Path(self.fashion_dir))
        depth = SIZES[self.dataset][2]
        out = {}
        for split, images in raw.items():
            if images.shape[1:] != (h, w) or images.max() >= depth:
                raise DataError(f"{self.dataset} {split} images have shape {images.shape[1:]} and maximum "
                                f"{images.max()}; expected {h}x{w} and values below {depth}.")
            out[split] = (images.astype(np.int64) * levels // depth).astype(np.uint8)
        return out

    def save(self, data, run_dir) -> None:
        pass  # the data is read again from its package; nothing to keep

    def model_spec(self, data) -> dict:
        h, w, levels = self.shape()
        return {"interface": "images", "height": h, "width": w, "levels": levels}

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """Training batch `index`: {"inputs": int32 [B, H, W], "weight": bool [B]}, epochs of fresh permutations."""
        if split != "train":
            raise ConfigError(f"Images.batch serves split 'train'; evaluation uses eval_batches (got {split!r}).")
        if self.batch_size < 1:
            raise ConfigError(f"--images.batch-size must be >= 1, got {self.batch_size}.")
        rows = epoch_rows(len(data["train"]), self.batch_size, index, seed)
        return {"inputs": data["train"][rows].astype(np.int32), "weight": np.ones(self.batch_size, bool)}

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        """The test images in order, in batches of batch_size; the last one padded with weight False."""
        if split != "val":
            raise ConfigError(f"Images.eval_batches serves split 'val' (the test set), got {split!r}.")
        x = data["test"]
        return [{"inputs": x[rows].astype(np.int32), "weight": valid}
                for rows, valid in padded_rows(len(x), self.batch_size, max_batches)]

    def loss(self, model, variables, batch, rng=None):
        """Mean NLL per pixel (nats) over weighted images; sums: count (pixels), sum_loss, sum_bits_per_dim."""
        images = batch["inputs"]
        h, w, levels = self.shape()
        if np.ndim(images) != 3 or tuple(images.shape[1:]) != (h, w):
            raise ShapeError(f"an images batch has shape {tuple(np.shape(images))}, but --images.dataset {self.dataset} "
                             f"holds {h}x{w} images ([batch, {h}, {w}]).")
        check_tokens(images, levels, name="an images batch", ndim=3)  # the depth, where the values are known
        logits = model.apply(variables, images).astype(jnp.float32)  # [B, H, W, levels]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, images).sum(axis=(1, 2))  # nats per image
        weight = batch["weight"]
        count = jnp.sum(weight, dtype=jnp.int32) * (h * w)
        sum_loss = jnp.sum(jnp.where(weight, nll, 0.0))
        sums = {"count": count, "sum_loss": sum_loss, "sum_bits_per_dim": sum_loss / math.log(2.0)}
        return sum_loss / jnp.maximum(count, 1).astype(jnp.float32), sums

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """Test NLL: {"loss" (nats/dim), "bits_per_dim", "count" (pixels), "images"}."""
        report = evaluate_sums(self, model, variables, self.eval_batches(data, "val", max_batches))
        h, w, _ = self.shape()
        report["images"] = report["count"] // (h * w)
        return report

    def example_inputs(self, data):
        h, w, _ = self.shape()
        return jax.ShapeDtypeStruct((1, h, w), jnp.int32)

    def sample_images(self, model, variables, num: int, *, key, temperature: float = 1.0, top_k=None,
                      top_p=None) -> np.ndarray:
        """`num` images drawn pixel by pixel through the model's step: int32 [num, H, W]."""
        from jaxseq.decoding import sample

        h, w, levels = self.shape()
        if num < 1:
            raise ConfigError(f"--num-samples must be >= 1 for an images run, got {num}.")
        bos = jnp.full((num, 1), levels, jnp.int32)  # the begin-of-image id
        out = sample(model, variables, bos, max_new_tokens=h * w, key=key, temperature=temperature,
                     top_k=top_k, top_p=top_p)
        return np.asarray(out.tokens[:, 1:]).reshape(num, h, w)

    def write_samples(self, run, args) -> list[str]:
        """`args.num_samples` images as one PNG grid in args.out (or RUN_DIR/samples); returns its path."""
        images = self.sample_images(run.model, run.variables, args.num_samples, key=jax.random.key(args.seed),
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        folder = Path(args.out) if args.out else Path(args.run_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"samples_step{run.step}_seed{args.seed}.png"
        write_png(path, image_grid(images, self.shape()[2]))
        print(path)
        return [str(path)]


# ---------------------------------------------------------------------------------------------------
# Data


def _load_digits() -> dict:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("--images.dataset digits needs scikit-learn: pip install 'jaxseq[tasks]' "
                        "(or pip install scikit-learn).") from e
    images = load_digits().images.astype(np.uint8)  # [1797, 8, 8], values 0..16 (exact integers)
    return {"train": images[:DIGITS_TRAIN], "test": images[DIGITS_TRAIN:]}


def _load_fashion(folder: Path) -> dict:
    out = {}
    for split, name in FASHION_FILES.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"--images.dataset fashion-mnist needs {path}: install it with `apt-get install "
                            f"dataset-fashion-mnist` (or point --images.fashion-dir at the IDX files), or use "
                            f"--images.dataset digits (pip scikit-learn only).")
        out[split] = read_idx(path)
    return out


def read_idx(path) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) -> its unsigned-byte array, e.g. uint8 [n, 28, 28].

    The format: two zero bytes, a type byte (0x08: unsigned byte), the number of dimensions, each
    dimension as a big-endian uint32, then the values in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read the IDX file {path}: {e}; reinstall dataset-fashion-mnist.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (its header is {raw[:4].hex()}, expected "
                        f"0000 08 then the number of dimensions).")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]) if len(raw) >= 4 + 4 * ndim else None
    if dims is None or len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise DataError(f"{path} holds {len(raw)} bytes, not the size its IDX header states ({dims}); the file is "
                        f"truncated or corrupt.")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


# ---------------------------------------------------------------------------------------------------
# PNG output


def image_grid(images, levels: int, *, scale: int = 0, gap: int = 1) -> np.ndarray:
    """Images int [n, H, W] in [0, levels) -> one uint8 grey canvas, ceil(sqrt(n)) columns, white gaps.

    scale: each pixel becomes scale x scale (0: enough that a tile is at least 64 pixels across).
    """
    images = np.asarray(images)
    n, h, w = images.shape
    scale = scale or max(1, -(-64 // max(h, w)))
    cols = math.ceil(math.sqrt(n))
    rows = -(-n // cols)
    th, tw = h * scale + gap, w * scale + gap
    canvas = np.full((rows * th + gap, cols * tw + gap), 255, np.uint8)
    grey = np.round(images.astype(np.float64) * 255.0 / (levels - 1)).astype(np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        tile = np.kron(grey[k], np.ones((scale, scale), np.uint8))
        canvas[gap + r * th: gap + r * th + h * scale, gap + c * tw: gap + c * tw + w * scale] = tile
    return canvas


def write_png(path, grey: np.ndarray) -> None:
    """Write a uint8 [height, width] grey image as an 8-bit greyscale PNG (no dependency but zlib)."""
    grey = np.ascontiguousarray(grey, np.uint8)
    height, width = grey.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + grey[r].tobytes() for r in range(height))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                           + chunk(b"IEND", b""))
