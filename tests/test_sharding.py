"""The same train step on 1 device and on 8 fake CPU devices (data parallel and FSDP).

pytest's own process has already imported JAX with one CPU device, so every run here happens in a
subprocess: this file run as a script (`python tests/test_sharding.py SPEC.json OUT.json`) with
XLA_FLAGS=--xla_force_host_platform_device_count=N. It parses `jaxseq train` flags with tyro exactly as
the CLI does, trains on a tiny in-memory corpus, and reports the train losses from metrics.jsonl, the
shardings of the state that `train()` handed to the checkpoint manager, and any error message.

Three processes, in order: 1 device (references), 8 devices (DP, FSDP, the 1-device run continued from
its step-CUT checkpoint, mesh errors), 1 device (the FSDP run continued from its step-CUT checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

STEPS, CUT = 6, 3  # every run trains STEPS steps; moved checkpoints are taken at step CUT
COMMON = [
    "--char-lm.seq-len", "16", "--char-lm.batch-size", "8", "--optim.lr", "1e-2", "--optim.warmup-steps", "2",
    "--steps", str(STEPS), "--eval-every", "100", "--eval-batches", "1", "--checkpoint-every", str(CUT),
    "--no-progress",
]
LSTM = ["--model", "lstm", "--rnn.d-embed", "16", "--rnn.d-hidden", "32"]
GPT = ["--model", "transformer", "--transformer.num-layers", "1", "--transformer.num-heads", "2",
       "--transformer.d-model", "32", "--transformer.d-ff", "64", "--transformer.max-len", "16"]


def corpus() -> str:
    words = "the cat sat on a mat while dogs ran in parks and birds sang over quiet rivers".split()
    rng = np.random.default_rng(0)
    return " ".join(words[i] for i in rng.integers(0, len(words), 600)) + "\n"


# -- the subprocess side ------------------------------------------------------------------------------------


def _drive(spec_path: str, out_path: str, cache_dir: str) -> None:
    """Run every scenario of the spec in this process; write {name: {losses, specs, shard_shapes, error}}.

    A scenario {"name", "argv", "resume_copy_of": RUN_DIR} first copies RUN_DIR to its own run directory
    without the checkpoints after step CUT (as if the run had been stopped there), then resumes it.
    """
    import shutil

    import jax
    import tyro

    # Runs with the same mesh and config compile the same programs: share them through the disk cache
    # (also between the subprocesses), it is most of the time here.
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from jaxseq.checkpoint import CheckpointManager
    from jaxseq.config import TrainConfig
    from jaxseq.data import CharTokenizer, DataBundle
    from jaxseq.errors import JaxseqError
    from jaxseq.fingerprints import path_str
    from jaxseq.train import train

    text = corpus()
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    cut = int(0.9 * len(ids))
    bundle = DataBundle(tok, ids[:cut], ids[cut:])

    seen = {}
    original_save = CheckpointManager.save

    def recording_save(self, step, state, data_position):  # the live state train() built, with its shardings
        leaves, _ = jax.tree_util.tree_flatten_with_path(state.params)
        seen["specs"] = {path_str(p): list(x.sharding.spec) for p, x in leaves}  # e.g. [None, "fsdp"]
        seen["shard_shapes"] = {path_str(p): list(x.addressable_shards[0].data.shape) for p, x in leaves}
        seen["devices"] = len(jax.devices())
        return original_save(self, step, state, data_position)

    CheckpointManager.save = recording_save
    results = {}
    for scenario in json.loads(Path(spec_path).read_text()):
        seen.clear()
        config = tyro.cli(TrainConfig, args=scenario["argv"])
        if "resume_copy_of" in scenario:
            shutil.copytree(scenario["resume_copy_of"], config.run_dir)
            for d in Path(config.run_dir, "checkpoints").iterdir():
                if d.name.isdigit() and int(d.name) > CUT:
                    shutil.rmtree(d)
        t0 = time.perf_counter()
        try:
            train(None, None, config, data=bundle)
            error = None
        except JaxseqError as e:
            error = f"{type(e).__name__}: {e}"
        lines = Path(config.run_dir, "metrics.jsonl")
        losses = {}
        if lines.exists():
            for ln in lines.read_text().splitlines():
                r = json.loads(ln)
                if r["split"] == "train":
                    losses[r["step"]] = r["loss"]
        results[scenario["name"]] = {"losses": losses, "error": error, "wall_s": time.perf_counter() - t0, **seen}
    Path(out_path).write_text(json.dumps(results))


# -- the pytest side ----------------------------------------------------------------------------------------


def run_devices(n: int, scenarios: list[dict], tmp: Path, timeout: float = 420) -> dict:
    spec, out = tmp / f"spec{n}_{len(scenarios)}.json", tmp / f"out{n}_{len(scenarios)}.json"
    spec.write_text(json.dumps(scenarios))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSEQ_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    cache = tmp / "xla_cache"
    proc = subprocess.run([sys.executable, __file__, str(spec), str(out), str(cache)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{n}-device run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")

    def scenario(name, model, *extra, copy=None):
        return {"name": name, "argv": [*COMMON, *model, "--run-dir", str(tmp / name), *extra],
                **({"resume_copy_of": str(tmp / copy)} if copy else {})}

    fsdp = ["--mesh.data", "2", "--mesh.fsdp", "4"]
    one = run_devices(1, [scenario("lstm_1", LSTM)], tmp)
    eight = run_devices(8, [
        scenario("lstm_dp", LSTM, "--mesh.data", "8"),
        scenario("lstm_fsdp", LSTM, *fsdp),
        scenario("lstm_1_to_8", LSTM, *fsdp, "--resume", copy="lstm_1"),
        scenario("bad_mesh", LSTM, "--mesh.data", "3"),
        scenario("bad_batch", LSTM, "--mesh.data", "8", "--char-lm.batch-size", "12"),
    ], tmp)
    again = run_devices(1, [scenario("lstm_8_to_1", LSTM, "--resume", copy="lstm_fsdp")], tmp)
    return {**one, **eight, **again}


def trajectory(run: dict) -> np.ndarray:
    assert run["error"] is None, run["error"]
    return np.array([run["losses"][str(s)] for s in range(1, STEPS + 1)])


def test_reference_run_learns(runs):
    losses = trajectory(runs["lstm_1"])
    assert runs["lstm_1"]["devices"] == 1
    assert losses[-1] < losses[0] - 0.1, losses  # the comparisons below are about a moving trajectory


def test_data_parallel_matches_one_device(runs):
    np.testing.assert_allclose(trajectory(runs["lstm_dp"]), trajectory(runs["lstm_1"]), rtol=1e-5)


def test_fsdp_matches_one_device(runs):
    np.testing.assert_allclose(trajectory(runs["lstm_fsdp"]), trajectory(runs["lstm_1"]), rtol=1e-5)


def test_params_replicated_under_dp_and_split_under_fsdp(runs):
    dp, fsdp = runs["lstm_dp"], runs["lstm_fsdp"]
    assert dp["devices"] == 8 and all(s == [] for s in dp["specs"].values())
    # LSTM w_hh is [32, 4*32]: split over fsdp=4 along its largest axis; each device holds a quarter.
    key = "rnn/cell/w_hh"
    assert fsdp["specs"][key] == [None, "fsdp"], fsdp["specs"]
    assert fsdp["shard_shapes"][key] == [32, 32] and dp["shard_shapes"][key] == [32, 128]


@pytest.mark.slow  # ~40% of this file's time again (two more compiles of a Transformer step)
def test_transformer_fsdp_matches_one_device(tmp_path):
    argv = [*COMMON, *GPT, "--checkpoint-every", "100"]
    one = run_devices(1, [{"name": "gpt", "argv": [*argv, "--run-dir", str(tmp_path / "one")]}], tmp_path)["gpt"]
    eight = run_devices(8, [{"name": "gpt", "argv": [*argv, "--run-dir", str(tmp_path / "eight"),
                                                     "--mesh.data", "1", "--mesh.fsdp", "8"]}], tmp_path)["gpt"]
    ref = trajectory(one)
    assert ref[-1] < ref[0] - 0.1, ref
    np.testing.assert_allclose(trajectory(eight), ref, rtol=1e-5)
    # Most leaves are split; the MLP's [32, 64] kernel along its 64 axis, 8 columns per device.
    assert sum("fsdp" in s for s in eight["specs"].values()) >= len(eight["specs"]) // 2, eight["specs"]
    assert [64 // 8] in [shape[-1:] for key, shape in eight["shard_shapes"].items() if key.endswith("kernel")]


def test_checkpoint_moves_between_one_and_eight_devices(runs):
    # Steps 1..CUT come from the copied run's metrics; CUT+1..STEPS were trained after the restore.
    ref = trajectory(runs["lstm_1"])
    to_eight, to_one = runs["lstm_1_to_8"], runs["lstm_8_to_1"]
    assert to_eight["devices"] == 8 and to_eight["specs"]["rnn/cell/w_hh"] == [None, "fsdp"]
    np.testing.assert_allclose(trajectory(to_eight), ref, rtol=1e-5)
    assert runs["lstm_fsdp"]["specs"]["rnn/cell/w_hh"] == [None, "fsdp"]  # saved split over 4 devices
    assert to_one["devices"] == 1 and to_one["specs"]["rnn/cell/w_hh"] == []
    np.testing.assert_allclose(trajectory(to_one), ref, rtol=1e-5)


def test_mesh_errors_name_the_flag(runs):
    bad = runs["bad_mesh"]["error"]
    assert bad.startswith("ConfigError") and "--mesh.data" in bad and "8 available devices" in bad, bad
    bad = runs["bad_batch"]["error"]
    assert bad.startswith("ConfigError") and "--char-lm.batch-size 12 must be divisible" in bad, bad
    assert runs["bad_mesh"]["losses"] == {} and runs["bad_batch"]["losses"] == {}


# -- mixed precision (in pytest's own process: one device is enough) ---------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_bfloat16_compute_policy(kind):
    import jax
    import jax.numpy as jnp

    from jaxseq.config import RNNConfig, TrainConfig, TransformerConfig
    from jaxseq.models import build_model
    from jaxseq.tasks import CharLM
    from jaxseq.steps import compute_dtype_of, task_loss_fn, with_compute_dtype

    config = TrainConfig(model=kind, compute_dtype="bfloat16", rnn=RNNConfig(d_embed=16, d_hidden=32),
                         transformer=TransformerConfig(num_layers=1, num_heads=2, d_model=32, d_ff=64, max_len=16))
    vocab = 23
    model = build_model(config, {"interface": "lm", "vocab_size": vocab})
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (4, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((4, 16), bool)}
    params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
    dtype = compute_dtype_of(config)
    task = CharLM(seq_len=16, batch_size=4)
    # the loss train() differentiates: the task's loss with the model and the compute dtype bound
    f32 = jax.value_and_grad(lambda p: task_loss_fn(task, model, None)(p, batch, None)[0])
    mixed = jax.value_and_grad(lambda p: task_loss_fn(task, with_compute_dtype(model, dtype), dtype)(p, batch, None)[0])
    (loss32, g32), (loss16, g16) = jax.jit(f32)(params), jax.jit(mixed)(params)
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=1e-2)
    assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}  # grads of float32 params
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):  # bfloat16 has ~3 significant digits
        assert float(jnp.linalg.norm(a - b)) <= 0.05 * float(jnp.linalg.norm(a)) + 1e-6
    # The matmuls really ran in bfloat16 (and none in float32 for the Transformer, whose Dense layers
    # would otherwise promote back).
    hlo = jax.jit(mixed).lower(params).as_text()
    dots = [ln for ln in hlo.splitlines() if "dot_general" in ln]
    assert dots and sum("bf16" in ln for ln in dots) >= len(dots) // 2, dots[:5]


def test_bfloat16_refused_for_lru():
    from jaxseq.config import TrainConfig
    from jaxseq.errors import ConfigError
    from jaxseq.steps import compute_dtype_of

    assert compute_dtype_of(TrainConfig()) is None  # float32: nothing is cast
    with pytest.raises(ConfigError, match="--compute-dtype float32"):
        compute_dtype_of(TrainConfig(model="lru", compute_dtype="bfloat16"))


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2], sys.argv[3])
