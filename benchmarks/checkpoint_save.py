"""How long `CheckpointManager.save` blocks the training loop (async saving), and what the write costs.

Two TrainStates (params + AdamW state, every leaf filled with random values so nothing compresses away):
  * lstm-default: the model `jaxseq train` builds with its defaults (LSTM, d_embed 64, d_hidden 512,
                  stdlib corpus vocabulary);
  * gpt-50m:      a GPT-style TransformerLM with ~50M parameters (7 layers, d_model 768, d_ff 3072).

For each, `--repeats` saves in steady state (the previous save finished, as when checkpoints are further
apart than one write): `blocking_s` is how long `save` held the caller (what the loop loses), `write_s`
how long the background write took after that (till `wait_until_finished`). The first save is reported
apart (it compiles the fingerprint function). `fingerprint_sync_s` is what computing the fingerprints
in `save` (instead of awaiting them in the background writer) would add to the blocking time.

    python benchmarks/checkpoint_save.py                 # JSON lines on stdout
    python benchmarks/checkpoint_save.py --models lstm-default --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_record, setup_process  # noqa: E402
from jaxseq import checkpoint as C  # noqa: E402
from jaxseq.config import TrainConfig, TransformerConfig  # noqa: E402
from jaxseq.fingerprints import fingerprints  # noqa: E402
from jaxseq.models import build_model  # noqa: E402
from jaxseq.steps import init_train_state, make_optimizer  # noqa: E402

CONFIGS = {
    "lstm-default": TrainConfig(),
    "gpt-50m": TrainConfig(model="transformer", transformer=TransformerConfig(
        num_layers=7, num_heads=12, d_model=768, d_ff=3072, max_len=256)),
}


def random_state(config: TrainConfig, spec: dict):
    model = build_model(config, spec)
    opt = make_optimizer(config.optim, config.steps)

    def init():
        tokens = jnp.zeros((1, config.char_lm.seq_len), jnp.int32)
        return init_train_state(model.init(jax.random.key(0), tokens)["params"], opt)

    abstract = jax.eval_shape(init)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    filled = [jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, x.dtype)
              for k, x in zip(keys, leaves)]
    state = jax.tree.unflatten(treedef, filled)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return jax.block_until_ready(state), n_params, n_bytes


PROCESS: dict = {}  # what setup_process set, for the rows' record


def measure(name: str, config: TrainConfig, spec: dict, repeats: int) -> dict:
    state, n_params, n_bytes = random_state(config, spec)
    with tempfile.TemporaryDirectory() as tmp, C.CheckpointManager(tmp, keep=2, config=config) as ckpt:
        blocking, writes = [], []
        for step in range(1, repeats + 2):
            t0 = time.perf_counter()
            ckpt.save(step, state, data_position=step)
            t1 = time.perf_counter()
            ckpt.wait_until_finished()
            blocking.append(t1 - t0)
            writes.append(time.perf_counter() - t1)
        sync = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fingerprints(state)
            sync.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.restore(state)
        restore_s = time.perf_counter() - t0
    return {
        "bench": "checkpoint_save", "model": name, "params": n_params, "state_mb": round(n_bytes / 2**20, 1),
        "backend": jax.default_backend(), "devices": jax.device_count(), "cpu": platform.processor() or platform.machine(),
        "first_blocking_s": round(blocking[0], 4), "first_write_s": round(writes[0], 4),
        "blocking_s": round(statistics.median(blocking[1:]), 4), "blocking_max_s": round(max(blocking[1:]), 4),
        "write_s": round(statistics.median(writes[1:]), 4),
        "fingerprint_sync_s": round(statistics.median(sync), 4),
        "restore_verified_s": round(restore_s, 4), "repeats": repeats, **run_record(**PROCESS),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default malloc")
    args = ap.parse_args()
    PROCESS.update(setup_process(args.system_malloc))  # before JAX's first computation, as every benchmark
    task = TrainConfig().char_lm
    spec = task.model_spec(task.prepare())  # the default corpus's vocabulary
    for name in args.models.split(","):
        print(json.dumps(measure(name, CONFIGS[name], spec, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
