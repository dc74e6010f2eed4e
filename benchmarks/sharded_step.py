"""One train step of `jaxseq train`'s LSTM and TransformerLM on 1 and on 8 (fake) CPU devices.

The step is `jaxseq.steps.make_sharded_step` over the char-LM task's loss, exactly what `train()` jits: state created sharded, batch
split over the mesh, state donated. Models, batch (32 x 128) and data (the stdlib corpus) are the
`jaxseq train` defaults; only --model, --mesh.* and --compute-dtype vary:

  * 1 device:  float32, and bfloat16 compute (params float32)
  * 8 devices: data parallel (--mesh.data 8) and FSDP (--mesh.fsdp 8)

The device count is fixed when JAX starts, so each count runs in its own subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=N). Fake CPU devices share the same cores: on a
2-core machine 8 devices cannot be faster than 1; this measures the overhead of the sharded program
(collectives, per-device dispatch), not a speed-up. Each row: compile seconds, median step ms over
--steps timed steps (after 2 warm-up steps, each blocked on), tokens/s = batch * seq_len / step, the
process's peak RSS, and the load average around it (the CPU is shared).

Measured (results/cpu-sharding.jsonl, jax 0.10.2, 2 cores, quiet machine, 2026-11-23), tokens/s:
LSTM 1 device 13.0k, bfloat16 compute 2.1k (XLA:CPU has no fast bf16 matmul: use it on GPU/TPU);
8 devices DP 2.4k, FSDP 6.9k. Under DP each fake device runs the recurrence on 4 rows, a
[4, 512] @ [512, 2048] matmul per step, 8 at once on 2 cores; under FSDP XLA partitions the loop along
the gate axis instead, which suits this CPU better. Transformer: 8.4k (1 device), 7.2k bf16, 10.4k DP-8
(eight small per-device programs keep both cores busier than one), 5.2k FSDP-8 (all-gathers of every
layer). Losses agree across all rows. (Runs at load 14-19 gave figures ~5x lower.)

    python benchmarks/sharded_step.py                 # writes results/cpu-sharding.jsonl
    python benchmarks/sharded_step.py --steps 5 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = {1: [("data", 1, 1, "float32"), ("data", 1, 1, "bfloat16")],
         8: [("data", 8, 1, "float32"), ("fsdp", 1, 8, "float32")]}


def worker(devices: int, steps: int, models: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import run_record, setup_process

    process = setup_process()  # before JAX's first computation, as every benchmark
    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import jax.numpy as jnp

    from jaxseq.config import MeshConfig, TrainConfig
    from jaxseq.models import build_model
    from jaxseq.sharding import make_mesh, shard_batch
    from jaxseq.steps import make_optimizer, make_sharded_step
    from jaxseq.steps import compute_dtype_of, task_loss_fn, with_compute_dtype
    from jaxseq.xla_options import compiler_options

    assert len(jax.devices()) == devices, (jax.devices(), devices)
    bundle = TrainConfig().char_lm.prepare()
    for kind in models:
        for name, data_axis, fsdp_axis, dtype_name in CASES[devices]:
            config = TrainConfig(model=kind, mesh=MeshConfig(data=data_axis, fsdp=fsdp_axis), compute_dtype=dtype_name)
            dc = task = config.char_lm
            mesh = make_mesh(config.mesh)
            dtype = compute_dtype_of(config)
            model = with_compute_dtype(build_model(config, task.model_spec(bundle)), dtype)
            init_inputs = task.example_inputs(bundle)

            def init_params(model=model, shape=init_inputs.shape, dt=init_inputs.dtype, seed=config.seed):
                return model.init(jax.random.key(seed), jnp.zeros(shape, dt))["params"]

            sharded = make_sharded_step(task_loss_fn(task, model, dtype), init_params,
                                        make_optimizer(config.optim, config.steps), mesh, seed=config.seed,
                                        compiler_options=compiler_options(model, config.cpu_dots))
            batches = [shard_batch(task.batch(bundle, "train", i, 0), mesh) for i in range(4)]
            load_before = os.getloadavg()[0]
            state = sharded.init()
            t0 = time.perf_counter()
            step = sharded.step.lower(state, batches[0]).compile()
            compile_s = time.perf_counter() - t0
            times = []
            for i in range(steps + 2):
                t0 = time.perf_counter()
                state, metrics = step(state, batches[i % len(batches)])
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times[2:])
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
            print(json.dumps({
                "bench": "sharded_step", "model": kind, "devices": devices, "mesh": name,
                "mesh_shape": dict(mesh.shape), "compute_dtype": dtype_name, "batch": dc.batch_size,
                "seq_len": dc.seq_len, "params": n_params, "compile_s": round(compile_s, 2),
                "step_ms": round(1e3 * step_s, 2), "step_ms_min": round(1e3 * min(times[2:]), 2),
                "step_ms_max": round(1e3 * max(times[2:]), 2),
                "tokens_per_s": round(dc.batch_size * dc.seq_len / step_s),
                "loss": round(float(metrics["loss"]), 4), "timed_steps": steps,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                **run_record(**process),
            }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (after 2 warm-up steps)")
    parser.add_argument("--models", default="lstm,transformer")
    parser.add_argument("--devices", default="1,8")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results/ alone")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.split(",")
    if args.worker:
        worker(args.worker, args.steps, models)
        return
    rows = []
    for n in (int(d) for d in args.devices.split(",")):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, __file__, "--worker", str(n), "--steps", str(args.steps), "--models", args.models]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"{n}-device worker failed:\n{out.stderr[-4000:]}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                rows.append(json.loads(line))
    if rows and not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "cpu-sharding.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
