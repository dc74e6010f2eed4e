"""What every task's evaluation shares: summed metrics over batches, and their means."""

from __future__ import annotations

import jax
import numpy as np

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
