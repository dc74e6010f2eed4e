"""MNIST-1D sequence classification (many-to-one): which digit template made a length-40 signal?

Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (ICML 2024): ten 1-D digit templates,
padded, sheared, scaled, translated, with correlated and i.i.d. noise, 4,000 training and 1,000 test
examples of length 40, generated offline from the templates by the `mnist1d` package (its
`make_dataset`, seed 42, exactly the paper's set; its `get_dataset` would download a pickle). The
shuffled variant applies one fixed permutation to the 40 positions (the package's `shuffle_seq`), which
destroys the order a recurrent model relies on. The paper's test accuracies: logistic regression 32%,
MLP 68%, CNN 94%, GRU 91%; shuffled: CNN 56%, GRU 57%.

The paper has no validation split; the loop's periodic evaluation ("val") and the final report both
use the 1,000 test examples, and the report is of the last step's model (no selection on the test set).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.errors import ConfigError, DataError
from jaxseq.files import save_npz_cache
from jaxseq.tasks.common import classification_loss, epoch_rows, evaluate_sums, padded_rows

NUM_CLASSES = 10
LENGTH = 40


@dataclass(frozen=True)
class MNIST1D:
    """MNIST-1D classification (--task mnist1d): 4,000 + 1,000 generated signals of length 40, 10 classes."""

    shuffle: bool = False
    """Permute the 40 positions with one fixed permutation (the paper's shuffled variant)."""
    batch_size: int = 100
    """Examples per step (the global batch, split over the mesh's data axis)."""

    unit = "ex"

    def prepare(self, run_dir=None) -> dict:
        """{"x_train": float32 [4000, 40, 1], "y_train": int32 [4000], "x_test": [1000, 40, 1], "y_test": [1000]}."""
        arrays = _generate(self.shuffle)
        return {k: v.astype(np.float32)[..., None] if k.startswith("x") else v.astype(np.int32)
                for k, v in arrays.items()}

    def save(self, data, run_dir) -> None:
        pass  # the data is regenerated exactly from the package; nothing to keep

    def model_spec(self, data) -> dict:
        return {"interface": "classifier", "num_classes": NUM_CLASSES, "d_input": 1}

    def batch(self, data, split: str, index: int, seed: int) -> dict:
        """Training batch `index`: {"inputs": float32 [B, 40, 1], "labels": int32 [B], "weight": bool [B]}.

        Epochs of a fresh permutation each, a pure function of (seed, epoch): batch `index` takes
        positions index * B ... index * B + B - 1 of the concatenated epochs.
        """
        if split != "train":
            raise ConfigError(f"MNIST1D.batch serves split 'train'; evaluation uses eval_batches (got {split!r}).")
        if self.batch_size < 1:
            raise ConfigError(f"--mnist1d.batch-size must be >= 1, got {self.batch_size}.")
        rows = epoch_rows(len(data["y_train"]), self.batch_size, index, seed)
        return {"inputs": data["x_train"][rows], "labels": data["y_train"][rows],
                "weight": np.ones(self.batch_size, bool)}

    def eval_batches(self, data, split: str, max_batches: int) -> list[dict]:
        """The test set in order, cut into batches of batch_size; the last one padded with weight False."""
        if split != "val":
            raise ConfigError(f"MNIST1D.eval_batches serves split 'val' (the test set), got {split!r}.")
        x, y = data["x_test"], data["y_test"]
        return [{"inputs": x[rows], "labels": y[rows], "weight": valid}
                for rows, valid in padded_rows(len(y), self.batch_size, max_batches)]

    def loss(self, model, variables, batch, rng=None):
        """Mean cross-entropy over weighted examples; sums: count, sum_loss, sum_accuracy (correct)."""
        rngs = None if rng is None else {"dropout": rng}
        logits = model.apply(variables, batch["inputs"], deterministic=rng is None, rngs=rngs)
        return classification_loss(logits, batch["labels"], batch["weight"])

    def evaluate(self, model, variables, data, max_batches: int = 1 << 30) -> dict:
        """Test loss and accuracy over the 1,000 test examples (or `max_batches`): {"loss", "accuracy", "count"}."""
        return evaluate_sums(self, model, variables, self.eval_batches(data, "val", max_batches))

    def example_inputs(self, data):
        return jax.ShapeDtypeStruct((1, LENGTH, 1), jnp.float32)


def _generate(shuffle: bool) -> dict:
    """The paper's arrays (float64 x, int64 y), generated once and cached as .npz."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise DataError("--task mnist1d needs the mnist1d package: pip install 'jaxseq[tasks]' "
                        "(or pip install mnist1d).") from e
    args = get_dataset_args()
    args.shuffle_seq = bool(shuffle)
    settings = {k: v for k, v in vars(args).items() if k != "url"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = os.environ.get("JAXSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxseq")
    path = Path(root) / f"mnist1d_{key}.npz"
    names = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path) as f:
            return {k: f[k] for k in names}
    except (OSError, KeyError, ValueError):
        pass
    state = np.random.get_state()  # make_dataset seeds NumPy's global generator; leave it as it was
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    arrays = {"x_train": d["x"], "y_train": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}
    save_npz_cache(path, arrays)
    return arrays
