"""Captioned scenes for image captioning with attention ("show, attend and tell", Xu et al. 2015).

A scene is a square canvas cut into a grid x grid layout of cells, each cell the size of one item
image (8x8 for scikit-learn's digits, 28x28 for Fashion-MNIST). A scene holds k objects, k uniform in
[min_objects, max_objects], in k distinct cells; each object is an item image drawn uniformly from the
split's item images and pasted exactly into its cell (no shift inside the cell, no overlap), so the
crop of a cell is either zeros or exactly the item image placed there. The caption says what is where,
so a decoder must look at the right cell for each word: a CNN encoder's spatial grid is the attention
memory.

Caption grammar (lowercase words separated by single spaces, no punctuation):

    caption  := object ( " and " object )*       objects in reading order: row by row, left to right
    object   := NAME " " position
    NAME     := one word per item class (ITEM_NAMES[items], e.g. "seven", "sneaker")
    position := grid 3:     "top left" | "top" | "top right" | "left" | "centre" | "right"
                            | "bottom left" | "bottom" | "bottom right"
                other grids: "row " NUMBER " column " NUMBER      (1-based, spelled "one" ... "nineteen")

e.g. (digits, grid 3) "seven top left and two bottom right"; (grid 4) "seven row one column four".
The caption is a deterministic function of the layout, so exact match is meaningful. With digit
items on grids other than 3 the number words double as item names; the grammar still parses
unambiguously (a NAME starts the caption or follows "and").

Held out: "train" scenes use the source's training item images; "val" and "test" scenes use its
held-out item images (digits: the last 20% of each class in dataset order; fashion: the 10k test file),
each split with its own random stream, so test scenes are new images and (mostly) new layouts.

    images, captions = make_scenes(10_000, split="train")   # float32 [10000, 24, 24, 1], list[str]
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from jaxseq.errors import ConfigError, DataError

ITEM_NAMES = {
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    # Fashion-MNIST classes 0..9; "tshirt" for "T-shirt/top" since "top" is a position word.
    "fashion": ("tshirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                "boot"),
}
SPLITS = ("train", "val", "test")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MAX_GRID = 19  # the largest row/column number spelled as one word

_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                 "nineteen")
_GRID3_WORDS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
                "bottom right")
_TRAIN_FRACTION = 0.8  # digits: the first 80% of each class (dataset order) train, the rest test


# ---------------------------------------------------------------------------------------------------
# Item images


def load_items(items: str = "digits") -> dict:
    """{"train": (images float32 [n, h, w] in [0, 1], labels int64 [n]), "test": (...)}; cached, read-only.

    digits: scikit-learn's 1,797 8x8 images split per class (first 80% train: 1,433 + 364).
    fashion: Debian's Fashion-MNIST IDX files (60,000 + 10,000 28x28 images).
    """
    _check_items(items)
    return _load_items(items)


@functools.cache
def _load_items(items: str) -> dict:
    out = _load_digits() if items == "digits" else _load_fashion()
    for images, labels in out.values():
        images.flags.writeable = False  # shared by every caller through the cache
        labels.flags.writeable = False
    return out


def _load_digits() -> dict:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("--captioning.items digits needs scikit-learn: pip install 'jaxseq[tasks]' (or pip install scikit-learn).") from e
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)  # [1797, 8, 8], values 0..16
    labels = d.target.astype(np.int64)
    train = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        train[rows[: int(_TRAIN_FRACTION * len(rows))]] = True
    return {"train": (images[train], labels[train]), "test": (images[~train], labels[~train])}


def _load_fashion() -> dict:
    return {"train": _read_idx_pair("train"), "test": _read_idx_pair("t10k")}


def _read_idx_pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """One IDX image/label file pair -> (float32 [n, 28, 28] in [0, 1], int64 [n])."""
    image_path = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    label_path = FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (image_path, label_path):
        if not path.is_file():
            raise DataError(
                f"--captioning.items fashion needs {path}: install it with `apt-get install "
                f"dataset-fashion-mnist`, or use --captioning.items digits (needs only pip scikit-learn).")
    with gzip.open(image_path, "rb") as f:
        raw_images = f.read()
    with gzip.open(label_path, "rb") as f:
        raw_labels = f.read()
    # IDX headers: big-endian magic 2051 (images) / 2049 (labels), then the sizes.
    n, h, w = (int(v) for v in np.frombuffer(raw_images, ">u4", 3, offset=4))
    if int(np.frombuffer(raw_images, ">u4", 1)[0]) != 2051 or len(raw_images) != 16 + n * h * w:
        raise DataError(f"{image_path} is not an IDX image file of its stated size; reinstall "
                        f"dataset-fashion-mnist.")
    if int(np.frombuffer(raw_labels, ">u4", 1)[0]) != 2049 or len(raw_labels) != 8 + n:
        raise DataError(f"{label_path} is not an IDX label file matching {image_path.name}; reinstall "
                        f"dataset-fashion-mnist.")
    images = np.frombuffer(raw_images, np.uint8, offset=16).reshape(n, h, w)
    labels = np.frombuffer(raw_labels, np.uint8, offset=8).astype(np.int64)
    return (images / np.float32(255)).astype(np.float32), labels


# ---------------------------------------------------------------------------------------------------
# Layouts, images and captions


def position_words(grid: int) -> tuple[str, ...]:
    """The position phrase of each cell, in reading order: [grid * grid] strings."""
    _check_grid(grid)
    if grid == 3:
        return _GRID3_WORDS
    return tuple(f"row {_NUMBER_WORDS[r]} column {_NUMBER_WORDS[c]}"
                 for r in range(grid) for c in range(grid))


def caption_of(layout, names, grid: int) -> str:
    """The caption of a layout [(cell_index, label, item_index), ...] (any order) with item `names`."""
    positions = position_words(grid)
    return " and ".join(f"{names[label]} {positions[cell]}" for cell, label, _ in sorted(layout))


def compose(layout, item_images: np.ndarray, grid: int) -> np.ndarray:
    """One scene: layout [(cell_index, label, item_index), ...], item_images [n, c, c] -> [grid*c, grid*c]."""
    cells = np.array([[cell for cell, _, _ in layout]], np.int64).reshape(1, -1)
    items = np.array([[item for _, _, item in layout]], np.int64).reshape(1, -1)
    return _render(cells, items, np.ones(cells.shape, bool), item_images, grid)[0]


def make_layouts(count: int, *, split: str, items: str = "digits", grid: int = 3, min_objects: int = 1,
                 max_objects: int = 3, seed: int = 0) -> list[list[tuple[int, int, int]]]:
    """The layouts make_scenes draws with the same arguments: per scene [(cell_index, label, item_index)].

    Cells in reading order; item_index indexes load_items(items)["train"] for split "train" and
    load_items(items)["test"] for "val" and "test".
    """
    cells, item_idx, present, labels = _draw(count, split, items, grid, min_objects, max_objects, seed)
    return [[(int(c), int(labels[i]), int(i)) for c, i, p in zip(cs, its, ps) if p]
            for cs, its, ps in zip(cells, item_idx, present)]


def make_scenes(count: int, *, split: str, items: str = "digits", grid: int = 3, min_objects: int = 1,
                max_objects: int = 3, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(images float32 [count, H, W, 1] in [0, 1], captions list[str]), H = W = grid * cell size.

    A deterministic function of the arguments; see the module docstring for the scene and caption.
    """
    cells, item_idx, present, labels = _draw(count, split, items, grid, min_objects, max_objects, seed)
    item_images = load_items(items)[_source(split)][0]
    images = _render(cells, item_idx, present, item_images, grid)[..., None]
    names, positions = ITEM_NAMES[items], position_words(grid)
    words = np.array([f"{n} " for n in names], object)[labels[item_idx]] + np.array(positions, object)[
        np.minimum(cells, grid * grid - 1)]  # [count, max_objects] "<name> <position>"; absent ones unused
    captions = [" and ".join(ws[ps]) for ws, ps in zip(words, present)]
    return images, captions


def _source(split: str) -> str:
    """Which item images a split draws from: val and test share the held-out ones."""
    return "train" if split == "train" else "test"


def _draw(count, split, items, grid, min_objects, max_objects, seed):
    """Random layouts as arrays.

    Returns cells int64 [count, max_objects] (ascending: reading order), item indices [count, max_objects],
    present bool [count, max_objects] (the first k of each row), and the split's item labels [n].
    """
    _check_args(count, split, items, grid, min_objects, max_objects)
    labels = load_items(items)[_source(split)][1]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    k = rng.integers(min_objects, max_objects + 1, size=count)
    present = np.arange(max_objects) < k[:, None]
    # The first max_objects of a random permutation of the cells: distinct cells, uniform.
    cells = np.argsort(rng.random((count, grid * grid)), axis=1)[:, :max_objects]
    cells = np.sort(np.where(present, cells, grid * grid), axis=1)  # absent ones sort last
    item_idx = rng.integers(0, len(labels), size=(count, max_objects))
    return cells, item_idx, present, labels


def _render(cells, item_idx, present, item_images, grid) -> np.ndarray:
    """cells, item_idx, present [count, m], item_images [n, c, c] -> float32 [count, grid*c, grid*c]."""
    count, c = cells.shape[0], item_images.shape[1]
    canvas = np.zeros((count, grid * grid, c, c), np.float32)
    scene = np.broadcast_to(np.arange(count)[:, None], cells.shape)
    canvas[scene[present], cells[present]] = item_images[item_idx[present]]
    # [count, row, col, y, x] -> [count, row, y, col, x]: cells side by side.
    canvas = canvas.reshape(count, grid, grid, c, c).transpose(0, 1, 3, 2, 4)
    return canvas.reshape(count, grid * c, grid * c)


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_items(items):
    if items not in ITEM_NAMES:
        raise ConfigError(f"--captioning.items must be one of {sorted(ITEM_NAMES)}, got {items!r}.")


def _check_grid(grid):
    if not _is_int(grid) or not 1 <= grid <= MAX_GRID:
        raise ConfigError(f"--captioning.grid must be an integer in 1..{MAX_GRID} (cells per side), "
                          f"got {grid!r}.")


def _check_args(count, split, items, grid, min_objects, max_objects):
    _check_items(items)
    _check_grid(grid)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}.")
    if not _is_int(count) or count < 1:
        raise ConfigError(f"count (the number of scenes) must be an integer >= 1, got {count!r}.")
    cells = grid * grid
    if not _is_int(min_objects) or not 1 <= min_objects <= cells:
        raise ConfigError(f"--captioning.min-objects must be an integer in 1..{cells} (grid {grid} has "
                          f"{cells} cells), got {min_objects!r}.")
    if not _is_int(max_objects) or not min_objects <= max_objects <= cells:
        raise ConfigError(f"--captioning.max-objects must be an integer in {min_objects}..{cells} "
                          f"(>= --captioning.min-objects, <= grid * grid), got {max_objects!r}.")
