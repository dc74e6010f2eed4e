"""Training: loss against a NumPy reference, the pure step, non-finite steps, learning, bit-exact resume."""

from __future__ import annotations

import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
import jaxseq.data
from jaxseq.checkpoint import CheckpointManager
from jaxseq.config import OptimConfig, RNNConfig, TrainConfig
from jaxseq.data import CharTokenizer, DataBundle
from jaxseq.errors import ConfigError, NonFiniteError
from jaxseq.losses import lm_loss_fn, token_nll
from jaxseq.run import load_run
from jaxseq.steps import init_train_state, make_optimizer, make_schedule, make_train_step
from jaxseq.tasks import CharLM
from jaxseq.train import train


class TinyLM(nn.Module):
    """Embed -> dropout -> Dense: a bigram model under the model protocol (parallel form only)."""

    vocab_size: int
    d: int = 16
    dropout: float = 0.0
    poison: bool = False  # logits * NaN: every step is non-finite

    @nn.compact
    def __call__(self, tokens, mask=None, deterministic: bool = True):
        x = nn.Dropout(self.dropout)(nn.Embed(self.vocab_size, self.d)(tokens), deterministic=deterministic)
        logits = nn.Dense(self.vocab_size)(x)
        return logits * jnp.nan if self.poison else logits


def cyclic_bundle(vocab: int = 8, stride: int = 3, n: int = 2000) -> DataBundle:
    """Text whose next character is a function of the current one: char[(k * stride) % vocab]."""
    chars = "abcdefghijklmnopqrstuvwxyz"[:vocab]
    text = "".join(chars[(k * stride) % vocab] for k in range(n))
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    cut = int(0.9 * n)
    return DataBundle(tok, ids[:cut], ids[cut:])


def tiny_config(tmp_path, name="run", **kw) -> TrainConfig:
    defaults = dict(
        char_lm=CharLM(seq_len=16, batch_size=4),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        steps=8, eval_every=4, eval_batches=2, checkpoint_every=4, progress=False, run_dir=str(tmp_path / name),
    )
    defaults.update(kw)
    return TrainConfig(**defaults)


def read_metrics(run_dir, split="train") -> dict[int, dict]:
    lines = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r for r in lines if r["split"] == split}


def tree_bytes(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def batch_for(tokens_np):
    return {"inputs": tokens_np[:, :-1], "targets": tokens_np[:, 1:], "mask": np.ones_like(tokens_np[:, 1:], bool)}


# -- losses ---------------------------------------------------------------------------------------------


def test_token_nll_matches_float64_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(3, 5)).astype(np.int32)
    mask = rng.random((3, 5)) < 0.6
    logits[0, 0] = -np.inf  # a padded position with -inf logits must add exactly 0, not NaN
    mask[0, 0] = False
    s, n = token_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    x = logits.astype(np.float64)
    with np.errstate(invalid="ignore"):  # the -inf row is NaN here; it is masked out below
        m = x.max(-1, keepdims=True)
        logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ref = np.where(mask, nll, 0.0).sum()
    assert int(n) == mask.sum()
    np.testing.assert_allclose(float(s), ref, rtol=1e-5)


def test_empty_batch_loss_is_zero_not_nan():
    model = TinyLM(vocab_size=5)
    tokens = np.zeros((2, 4), np.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    batch = {"inputs": tokens, "targets": tokens, "mask": np.zeros((2, 4), bool)}
    (loss, aux), grads = jax.jit(jax.value_and_grad(lambda p: lm_loss_fn(model)(p, batch, None), has_aux=True))(params)
    assert float(loss) == 0.0 and int(aux["count"]) == 0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_schedule_warmup_then_cosine():
    oc = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    sched = make_schedule(oc, total_steps=20)
    lrs = np.array([float(sched(s)) for s in range(21)])
    np.testing.assert_allclose(lrs[:5], [0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)  # lr*(s+1)/(w+1)
    t = (np.arange(4, 21) - 4) / 16
    np.testing.assert_allclose(lrs[4:], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)), rtol=1e-5)


def test_weight_decay_spares_vectors():
    oc = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, min_lr_ratio=1.0)
    opt = make_optimizer(oc, total_steps=10)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    assert np.all(np.asarray(updates["bias"]) == 0)


# -- the step -------------------------------------------------------------------------------------------


def test_pulse_two_steps():
    data = cyclic_bundle()
    model = TinyLM(vocab_size=data.tokenizer.vocab_size)
    oc = OptimConfig(lr=1e-2, warmup_steps=2)
    opt = make_optimizer(oc, total_steps=10)
    batch = jaxseq.data.lm_batch(data.train_ids, batch_size=4, seq_len=16, seed=0, index=0)
    state = init_train_state(model.init(jax.random.key(0), batch["inputs"])["params"], opt)
    step_fn = jax.jit(make_train_step(lm_loss_fn(model), opt, seed=0))
    new, m1 = step_fn(state, batch)
    new, m2 = step_fn(new, batch)
    assert int(new.step) == 2 and int(new.nonfinite_count) == 0
    assert np.isfinite(float(m1["loss"])) and np.isfinite(float(m2["loss"]))
    assert float(m2["loss"]) < float(m1["loss"])
    assert int(m1["count"]) == 4 * 16 and int(m1["nonfinite"]) == 0
    np.testing.assert_allclose([float(m1["lr"]), float(m2["lr"])], [1e-2 / 3, 2e-2 / 3], rtol=1e-6)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]
    assert all(changed)


def test_dropout_key_is_fold_in_of_seed_and_step():
    """The step hands loss_fn the key fold_in(key(seed), state.step): nothing else (no hidden RNG state)."""

    def loss_fn(params, batch, rng):  # the "loss" is a draw from the key it was given
        return params["w"] * 0 + jax.random.uniform(rng), {}

    opt = make_optimizer(OptimConfig(), total_steps=10)
    state = init_train_state({"w": jnp.zeros(())}, opt)
    for seed in (0, 3):
        step_fn = jax.jit(make_train_step(loss_fn, opt, seed=seed))
        for step in (0, 5):
            _, m = step_fn(state._replace(step=jnp.int32(step)), {})
            expect = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), step))
            assert float(m["loss"]) == float(expect)


def test_nonfinite_step_leaves_params_and_opt_state_bitwise_unchanged():
    data = cyclic_bundle()
    model = TinyLM(vocab_size=data.tokenizer.vocab_size)
    base = lm_loss_fn(model)

    def loss_fn(params, batch, rng):  # batch["scale"] = NaN poisons the loss and every gradient
        loss, aux = base(params, batch, rng)
        return loss * batch["scale"], aux

    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    good = dict(jaxseq.data.lm_batch(data.train_ids, batch_size=4, seq_len=16, seed=0, index=0), scale=np.float32(1))
    bad = dict(good, scale=np.float32(np.nan))
    step_fn = jax.jit(make_train_step(loss_fn, opt))
    state = init_train_state(model.init(jax.random.key(0), good["inputs"])["params"], opt)
    state, _ = step_fn(state, good)  # move Adam's moments off zero first
    before = tree_bytes((state.params, state.opt_state))
    for k in (1, 2):
        state, m = step_fn(state, bad)
        assert np.isnan(float(m["loss"])) and int(m["nonfinite"]) == 1 and int(m["nonfinite_count"]) == k
        assert tree_bytes((state.params, state.opt_state)) == before
    assert int(state.step) == 3
    state, m = step_fn(state, good)
    assert int(m["nonfinite_count"]) == 0 and int(state.step) == 4
    assert tree_bytes(state.params) != tree_bytes(jax.tree.leaves(before))  # a good step updates again


def test_eval_matches_manual_mean():
    data = cyclic_bundle()
    model = TinyLM(vocab_size=data.tokenizer.vocab_size)
    task = CharLM(seq_len=16, batch_size=5)
    batches = jaxseq.data.eval_batches(data.val_ids, batch_size=5, seq_len=16, max_batches=3)
    params = model.init(jax.random.key(1), batches[0]["inputs"])["params"]
    res = task.evaluate(model, {"params": params}, data, max_batches=3)
    sums = [token_nll(model.apply({"params": params}, b["inputs"]), b["targets"], b["mask"]) for b in batches]
    expect = sum(float(s) for s, _ in sums) / sum(int(n) for _, n in sums)
    assert res["count"] == sum(int(b["mask"].sum()) for b in batches)
    np.testing.assert_allclose(res["loss"], expect, rtol=1e-6)
    np.testing.assert_allclose(res["bits"], expect / np.log(2), rtol=1e-6)


# -- the loop -------------------------------------------------------------------------------------------


def test_learns_deterministic_sequence(tmp_path):
    data = cyclic_bundle()
    model = TinyLM(vocab_size=data.tokenizer.vocab_size)
    config = tiny_config(tmp_path, steps=120, eval_every=60, checkpoint_every=60, optim=OptimConfig(lr=3e-2, warmup_steps=5))
    out = train(None, model, config, data=data)
    # The next character is a function of this one, so a bigram model can reach ~0 nats (uniform: ln 8 = 2.08).
    assert out["val"]["loss"] < 0.05, out
    assert out["steps"] == 120 and out["val"]["bits"] == pytest.approx(out["val"]["loss"] / np.log(2))
    val = read_metrics(config.run_dir, "val")
    assert sorted(val) == [60, 120] and val[120]["loss"] == out["val"]["loss"]
    assert sorted(read_metrics(config.run_dir)) == list(range(1, 121))
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["steps"] == 120 and saved["optim"]["lr"] == 3e-2
    assert CharTokenizer.load(tmp_path / "run" / "tokenizer.json") == data.tokenizer
    with CheckpointManager(config.run_dir, config=config, read_only=True) as ckpt:
        assert ckpt.all_steps() == [60, 120]


# Shared by the two resume tests: dropout on (so the per-step keys matter) and a schedule that does not
# depend on `steps` (warm-up, then constant), since the kill-free test's first half is a run of its own.
RESUME_OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=1.0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """8 steps in one run: (bundle, model, run_dir, summary)."""
    data = cyclic_bundle()
    model = TinyLM(vocab_size=data.tokenizer.vocab_size, dropout=0.2)
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return data, model, tmp / "full", train(None, model, tiny_config(tmp, "full", optim=RESUME_OPTIM), data=data)


def test_resume_continues_bit_for_bit(tmp_path, uninterrupted):
    """A run of 4 steps, then a resumed run to 8: the losses after step 4 equal the uninterrupted run's."""
    data, model, full_dir, full = uninterrupted
    train(None, model, tiny_config(tmp_path, "split", optim=RESUME_OPTIM, steps=4), data=data)
    resumed = train(None, model, tiny_config(tmp_path, "split", optim=RESUME_OPTIM, resume=True), data=data)
    a, b = read_metrics(full_dir), read_metrics(tmp_path / "split")
    assert sorted(b) == list(range(1, 9))
    for s in range(5, 9):
        assert a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"], s
    assert resumed["val"] == full["val"]


def test_resume_drops_the_lost_runs_lines_and_a_torn_last_line(tmp_path, uninterrupted):
    """A run killed after its step-4 checkpoint logged steps 5-6 and half a line: resume replaces them."""
    data, model, full_dir, _ = uninterrupted
    train(None, model, tiny_config(tmp_path, "torn", optim=RESUME_OPTIM, steps=4), data=data)
    metrics = tmp_path / "torn" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "split": "train", "loss": 123.0}\n{"step": 6, "split": "train", "loss": 1')
    train(None, model, tiny_config(tmp_path, "torn", optim=RESUME_OPTIM, resume=True), data=data)
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()]  # every line parses again
    steps = [r["step"] for r in lines if r["split"] == "train"]
    assert steps == list(range(1, 9))
    a = read_metrics(full_dir)
    assert all(a[r["step"]]["loss"] == r["loss"] for r in lines if r["split"] == "train")


def test_sigterm_saves_exits_143_and_resumes_bit_for_bit(tmp_path, monkeypatch, uninterrupted):
    data, model, full_dir, full = uninterrupted
    optim = RESUME_OPTIM

    real_lm_batch = jaxseq.data.lm_batch

    def lm_batch_with_sigterm(*args, index, **kw):
        if index == 5:  # fetched while step 5 runs: the flag is seen at the end of step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lm_batch(*args, index=index, **kw)

    before = signal.getsignal(signal.SIGTERM)
    config = tiny_config(tmp_path, "killed", optim=optim, checkpoint_every=100, eval_every=100)
    monkeypatch.setattr(jaxseq.data, "lm_batch", lm_batch_with_sigterm)
    with pytest.raises(SystemExit) as exc:
        train(None, model, config, data=data)
    monkeypatch.setattr(jaxseq.data, "lm_batch", real_lm_batch)
    assert exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    with CheckpointManager(config.run_dir, config=config, read_only=True) as ckpt:
        assert ckpt.all_steps() == [5]
    resumed = train(None, model, tiny_config(tmp_path, "killed", optim=optim, resume=True), data=data)
    a, b = read_metrics(full_dir), read_metrics(tmp_path / "killed")
    assert all(a[s]["loss"] == b[s]["loss"] for s in range(1, 9))
    assert resumed["val"] == full["val"]


def test_nonfinite_steps_in_a_row_raise_naming_the_step(tmp_path):
    data = cyclic_bundle()
    model = TinyLM(vocab_size=data.tokenizer.vocab_size, poison=True)
    config = tiny_config(tmp_path, max_nonfinite_steps=3, checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=r"step 3: .*3 steps in a row"):
        train(None, model, config, data=data)
    with CheckpointManager(config.run_dir, config=config, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]  # no checkpoint was written for the failing step


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    data = cyclic_bundle()
    model = TinyLM(vocab_size=data.tokenizer.vocab_size)
    train(None, model, tiny_config(tmp_path, steps=2), data=data)
    with pytest.raises(ConfigError, match="--resume"):
        train(None, model, tiny_config(tmp_path, steps=2), data=data)


def test_time_limit_stops_with_checkpoint_and_eval(tmp_path):
    data = cyclic_bundle()
    model = TinyLM(vocab_size=data.tokenizer.vocab_size)
    out = train(None, model, tiny_config(tmp_path, steps=10_000, time_limit_s=1e-9), data=data)
    assert out["stopped"] == "time_limit" and out["steps"] == 1 and np.isfinite(out["val"]["loss"])
    assert sorted(read_metrics(tmp_path / "run", "val")) == [1]
    with CheckpointManager(tmp_path / "run", config=None, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1]


def test_end_to_end_lstm_on_a_text_file(tmp_path):
    """The real path: prepare_data on a file, build_model, train, then load_run for sampling."""
    text_file = tmp_path / "tiny.txt"
    text_file.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    config = TrainConfig(
        model="lstm", rnn=RNNConfig(d_embed=8, d_hidden=16), char_lm=CharLM(source=str(text_file), seq_len=16, batch_size=4),
        steps=2, eval_every=2, eval_batches=2, checkpoint_every=2, progress=False, run_dir=str(tmp_path / "run"),
    )
    out = train(None, None, config)
    assert out["steps"] == 2 and np.isfinite(out["val"]["loss"]) and out["val"]["loss"] < np.log(28) + 0.5
    run = load_run(tmp_path / "run")
    tok, params = run.task.prepare_tokenizer(tmp_path / "run"), run.variables["params"]
    assert run.config == config and tok.vocab_size == len(set(text_file.read_text()))
    assert run.spec == {"interface": "lm", "vocab_size": tok.vocab_size}
    with CheckpointManager(tmp_path / "run", config=config, read_only=True) as ckpt:
        meta = ckpt.read_meta(2)
    assert meta["data_position"] == 2 and meta["step"] == 2
    assert isinstance(params, dict) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_count_model_is_fitted_not_trained_and_resumes_from_its_checkpoint(tmp_path):
    from jaxseq.config import NGramConfig
    from jaxseq.models.ngram import NGramLM

    data = cyclic_bundle()
    model = NGramLM(vocab_size=data.tokenizer.vocab_size, order=2)
    config = tiny_config(tmp_path, model="ngram", ngram=NGramConfig(order=2))
    out = train(None, model, config, data=data)
    # A bigram sees the rule exactly; only add-k smoothing and the unigram share keep the loss above 0.
    assert out["steps"] == 0 and out["val"]["loss"] < 0.05
    with CheckpointManager(config.run_dir, config=config, read_only=True) as ckpt:
        assert ckpt.all_steps() == [0]
    # Resume with other training text: the restored tables (data-dependent shapes) are used, not refitted.
    rng = np.random.default_rng(0)
    other = data._replace(train_ids=rng.integers(0, data.tokenizer.vocab_size, len(data.train_ids)).astype(np.int32))
    again = train(None, model, tiny_config(tmp_path, model="ngram", ngram=NGramConfig(order=2), resume=True), data=other)
    assert again["val"] == out["val"]


# -- kernels: the policy is part of the run, the implementations chosen are checked on resume ------------


def rnn_config(tmp_path, name, **kw):
    return tiny_config(tmp_path, name, model="lstm", rnn=RNNConfig(d_embed=8, d_hidden=16), **kw)


def test_start_reports_the_implementations_and_saves_them(tmp_path, capsys):
    from jaxseq.kernels import explain
    from jaxseq.models.rnn_lm import RecurrentLM

    data = cyclic_bundle()
    config = rnn_config(tmp_path, "run", steps=2, eval_every=2, checkpoint_every=2)
    train(None, None, config, data=data)
    assert "kernels: recurrence=fused-xla (--kernels auto)" in capsys.readouterr().out
    with CheckpointManager(config.run_dir, config=config, read_only=True) as ckpt:
        meta = ckpt.read_meta(2)
    assert meta["implementations"] == {"recurrence": "fused-xla"} and meta["architecture"]["kernels"] == "auto"
    # What --kernels reference would report, asked of the model the table builds.
    model = RecurrentLM(vocab_size=8, cell=jaxseq.LSTM(8, 16), d_embed=8, kernels="reference")
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    assert explain(model.apply, variables, tokens) == {"recurrence": "reference"}


def test_resume_with_another_kernels_policy_is_refused(tmp_path):
    from jaxseq.errors import CheckpointError

    data = cyclic_bundle()
    train(None, None, rnn_config(tmp_path, "run", steps=2, eval_every=2, checkpoint_every=2), data=data)
    with pytest.raises(CheckpointError, match=r"kernels: checkpoint 'auto', config 'reference'"):
        train(None, None, rnn_config(tmp_path, "run", steps=4, kernels="reference", resume=True), data=data)


def test_resume_warns_when_this_machine_chooses_another_implementation(tmp_path, monkeypatch):
    """A machine without the fused path (simulated: its table entry removed) resumes on the reference path."""
    from jaxseq.kernels import dispatch

    data = cyclic_bundle()
    train(None, None, rnn_config(tmp_path, "run", steps=2, eval_every=2, checkpoint_every=2), data=data)
    without_fused = tuple(e for e in dispatch.TABLES["recurrence"] if e.name != "fused-xla")
    monkeypatch.setitem(dispatch.TABLES, "recurrence", without_fused)
    with pytest.warns(UserWarning, match=r"trained with kernels \{'recurrence': 'fused-xla'\} but this machine "
                                         r"chooses \{'recurrence': 'reference'\}"):
        out = train(None, None, rnn_config(tmp_path, "run", steps=4, resume=True), data=data)
    assert out["steps"] == 4


def read_tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under `folder` (record: u64 length, u32 crc, data, u32 crc)."""
    import struct
    from pathlib import Path

    from tensorboardX.proto import event_pb2

    scalars: dict = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_also_go_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboardX")
    data = cyclic_bundle()
    config = tiny_config(tmp_path, steps=4, eval_every=2, checkpoint_every=4)
    train(None, TinyLM(vocab_size=data.tokenizer.vocab_size), config, data=data)
    scalars = read_tensorboard_scalars(tmp_path / "run" / "tensorboard")
    lines = read_metrics(config.run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [lines[s]["loss"] for s in range(1, 5)], rtol=1e-6)
    assert [s for s, _ in scalars["val/bits"]] == [2, 4] and [s for s, _ in scalars["report/bits"]] == [4]
