"""Checkpoints: bitwise roundtrip, keep-N, checked restores, uncommitted and corrupt steps."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseq.checkpoint import CheckpointManager
from jaxseq.config import RNNConfig, TrainConfig, architecture_hash, to_dict
from jaxseq.errors import CheckpointError
from jaxseq.train import TrainState

CONFIG = TrainConfig(model="lstm", rnn=RNNConfig(d_embed=4, d_hidden=8))


def make_state(seed: int = 0, d: int = 8, dtype=jnp.float32) -> TrainState:
    """A TrainState with AdamW moments off zero (one real update), so every leaf is distinctive."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"dense": {"kernel": jax.random.normal(k1, (3, d), dtype), "bias": jax.random.normal(k2, (d,), dtype)}}
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: p * 0.5 + 1, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return TrainState(jnp.int32(7), params, opt_state, jnp.int32(2))


def template(d: int = 8, dtype=jnp.float32) -> TrainState:
    return jax.tree.map(lambda x: jnp.zeros_like(x), make_state(99, d, dtype))


def same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb)
    )


def save_steps(run_dir, steps, keep=5, config=CONFIG) -> dict[int, TrainState]:
    states = {s: make_state(s) for s in steps}
    with CheckpointManager(run_dir, keep=keep, config=config) as ckpt:
        for s in steps:
            ckpt.save(s, states[s], data_position=s * 10)
    return states


def test_roundtrip_is_bitwise_and_meta_is_complete(tmp_path):
    states = save_steps(tmp_path, [3])
    with CheckpointManager(tmp_path, config=CONFIG) as ckpt:
        assert ckpt.latest_step() == 3
        state, meta = ckpt.restore(template())
    assert same_bits(state, states[3])
    assert jax.tree.structure(state) == jax.tree.structure(states[3])  # NamedTuples come back as NamedTuples
    assert isinstance(state, TrainState) and isinstance(state.opt_state[0], optax.ScaleByAdamState)
    assert meta["step"] == 3 and meta["data_position"] == 30
    assert meta["config"] == to_dict(CONFIG) and meta["architecture_hash"] == architecture_hash(CONFIG)


def test_restore_into_abstract_template(tmp_path):
    states = save_steps(tmp_path, [1])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template())
    with CheckpointManager(tmp_path, config=CONFIG, read_only=True) as ckpt:
        state, _ = ckpt.restore(abstract)
    assert same_bits(state, states[1])


def test_keep_n_keeps_the_newest(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4], keep=2)
    with CheckpointManager(tmp_path, keep=2, config=CONFIG) as ckpt:
        assert ckpt.all_steps() == [3, 4]


def test_other_architecture_is_refused_naming_the_field(tmp_path):
    save_steps(tmp_path, [1])
    other = TrainConfig(model="lstm", rnn=RNNConfig(d_embed=4, d_hidden=16))
    with CheckpointManager(tmp_path, config=other) as ckpt:
        with pytest.raises(CheckpointError, match=r"rnn\.d_hidden: checkpoint 8, config 16"):
            ckpt.restore(template())
    gru = TrainConfig(model="gru", rnn=CONFIG.rnn)
    with CheckpointManager(tmp_path, config=gru) as ckpt:
        with pytest.raises(CheckpointError, match=r"model: checkpoint 'lstm', config 'gru'"):
            ckpt.restore(template())
    # Fields outside the architecture (steps, lr, ...) may change on resume.
    longer = TrainConfig(model="lstm", rnn=CONFIG.rnn, steps=CONFIG.steps * 2)
    with CheckpointManager(tmp_path, config=longer) as ckpt:
        ckpt.restore(template())


def test_shape_and_dtype_mismatch_name_the_leaf(tmp_path):
    save_steps(tmp_path, [1])
    with CheckpointManager(tmp_path, config=CONFIG) as ckpt:
        with pytest.raises(CheckpointError, match=r"params/dense/kernel: checkpoint float32\[3, 8\], model float32\[3, 16\]"):
            ckpt.restore(template(d=16))
        with pytest.raises(CheckpointError, match=r"params/dense/bias: checkpoint float32\[8\], model bfloat16\[8\]"):
            ckpt.restore(template(dtype=jnp.bfloat16))
        bad = template()._replace(params={"dense": template().params["dense"], "extra": jnp.zeros(2)})
        with pytest.raises(CheckpointError, match=r"params/extra: missing from the checkpoint"):
            ckpt.restore(bad)
        # Nothing was set aside: a mismatch is not corruption.
        assert ckpt.all_steps() == [1]


def test_empty_step_directory_is_ignored(tmp_path):
    states = save_steps(tmp_path, [2])
    (tmp_path / "checkpoints" / "9").mkdir()  # e.g. a copy that died, or a crash mid-rsync
    with pytest.warns(UserWarning, match="step 9 .* never committed"):
        ckpt = CheckpointManager(tmp_path, config=CONFIG)
    with ckpt:
        assert ckpt.latest_step() == 2
        state, meta = ckpt.restore(template())
        assert same_bits(state, states[2]) and meta["step"] == 2
        ckpt.save(9, states[2], data_position=90)  # the step number is usable again
    assert (tmp_path / "checkpoints" / "9.uncommitted").is_dir()
    with CheckpointManager(tmp_path, config=CONFIG, read_only=True) as ckpt:
        assert ckpt.all_steps() == [2, 9]


def corrupt(step_dir: Path) -> None:
    """Overwrite every array file of the step with garbage of the same size."""
    for root, _, files in os.walk(step_dir / "state" / "d"):
        for f in files:
            p = Path(root, f)
            p.write_bytes(b"\x00garbage" * (p.stat().st_size // 8 + 1))


def test_corrupt_newest_step_falls_back_to_the_previous_one(tmp_path):
    states = save_steps(tmp_path, [1, 2])
    corrupt(tmp_path / "checkpoints" / "2")
    with CheckpointManager(tmp_path, config=CONFIG) as ckpt:
        with pytest.warns(UserWarning, match="checkpoint step 2: .* could not be restored"):
            state, meta = ckpt.restore(template())
        assert meta["step"] == 1 and same_bits(state, states[1])
        assert ckpt.all_steps() == [1]
        ckpt.save(2, states[2], data_position=20)  # the resumed run can save step 2 again
    assert (tmp_path / "checkpoints" / "2.corrupt").is_dir()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax internals, after the failed read
def test_read_only_fallback_leaves_files_alone(tmp_path):
    states = save_steps(tmp_path, [1, 2])
    corrupt(tmp_path / "checkpoints" / "2")
    with CheckpointManager(tmp_path, config=CONFIG, read_only=True) as ckpt:
        with pytest.warns(UserWarning, match="step 2"):
            state, _ = ckpt.restore(template())
    assert same_bits(state, states[1])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_read_only_open_logs_no_orbax_notices(tmp_path, caplog):
    """`jaxseq sample` / `eval` open runs read-only on purpose; Orbax's notices about it are dropped."""
    save_steps(tmp_path, [1])
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, config=CONFIG, read_only=True) as ckpt:
        assert ckpt.latest_step() == 1
    notices = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")
    assert not [r.getMessage() for r in caplog.records if any(n in r.getMessage() for n in notices)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax internals, after the failed read
def test_no_readable_step_raises(tmp_path):
    save_steps(tmp_path, [1])
    corrupt(tmp_path / "checkpoints" / "1")
    with CheckpointManager(tmp_path, config=CONFIG) as ckpt:
        with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no readable checkpoint .* step 1"):
            ckpt.restore(template())
    with CheckpointManager(tmp_path / "fresh", config=CONFIG) as ckpt:
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            ckpt.restore(template())


def test_saving_an_existing_step_is_an_error(tmp_path):
    states = save_steps(tmp_path, [1])
    with CheckpointManager(tmp_path, config=CONFIG) as ckpt:
        with pytest.raises(CheckpointError, match="step 1 already exists"):
            ckpt.save(1, states[1], data_position=10)
