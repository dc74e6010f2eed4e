"""What the tasks share: epochs of shuffled rows, padded evaluation batches, summed metrics and their means."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq.errors import DataError


def means(totals: dict) -> dict:
    """{"count": n, "sum_loss": s, ...} summed over batches -> {"loss": s / n, ..., "count": n}."""
    count = totals["count"]
    if count == 0:
        raise DataError("evaluation saw no valid item (count 0); check the evaluation split and its masks.")
    out = {k[len("sum_"):]: v / count for k, v in totals.items() if k.startswith("sum_")}
    out["count"] = int(count)
    return out


def sum_over(results) -> dict:
    """Add the `sums` dicts of several batches (device values) in float64 on the host."""
    totals: dict = {}
    for sums in jax.device_get(list(results)):
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + np.float64(v)
    return totals


def evaluate_sums(task, model, variables, batches) -> dict:
    """Means of `task.loss`'s sums over `batches`, without dropout, jitted on the default device."""
    fn = jax.jit(lambda v, b: task.loss(model, v, b, None)[1])
    return means(sum_over(fn(variables, b) for b in batches))


def classification_loss(logits, labels, weight):
    """logits [B, C], labels int [B], weight bool [B] -> (mean cross-entropy over the weighted rows, sums
    {"count", "sum_loss", "sum_accuracy"}) as a task's `loss` returns them."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    count = jnp.sum(weight, dtype=jnp.int32)
    sum_loss = jnp.sum(jnp.where(weight, ce, 0.0))
    sums = {"count": count, "sum_loss": sum_loss, "sum_accuracy": jnp.sum(weight & correct, dtype=jnp.float32)}
    return sum_loss / jnp.maximum(count, 1).astype(jnp.float32), sums


def epoch_rows(n: int, batch_size: int, index: int, seed: int) -> np.ndarray:
    """Rows of training batch `index`: epochs of fresh permutations of n items, a pure function of (seed, epoch)."""
    pos = index * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs = pos // n
    rows = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        rows[epochs == e] = perm[pos[epochs == e] % n]
    return rows


def padded_rows(n: int, batch_size: int, max_batches: int):
    """(rows, valid) of each evaluation batch over items 0..n-1 in order; the last batch padded with row 0."""
    count = min(-(-n // batch_size), max_batches)
    for i in range(count):
        rows = np.arange(i * batch_size, (i + 1) * batch_size)
        valid = rows < n
        yield np.where(valid, rows, 0), valid
