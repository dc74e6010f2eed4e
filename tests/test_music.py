"""--task music: ABC tunes (split, check, skip and count), piano rolls, the frames interface and its models."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("music21")

from jaxseq.cells import GRU, LSTM  # noqa: E402
from jaxseq.config import RNNConfig, TrainConfig, TransformerConfig  # noqa: E402
from jaxseq.data import music_data as M  # noqa: E402
from jaxseq.errors import ConfigError, DataError, ShapeError  # noqa: E402
from jaxseq.models import build_model  # noqa: E402
from jaxseq.models.frames import FrameRNN, FrameTransformer, sample_frames  # noqa: E402
from jaxseq.tasks.music import ChoraleData, Music, frames_loss  # noqa: E402

GOOD = "X:{i}\nT: Tune {i}\nN: K{i}\nO: Europa\nM: 4/4\nL: 1/8\nK: G\nGABc d2B2 | c2A2 B2G2 |\ndcBA G4 |]\n\n"
BAD_PARSE = "X:98\nT: Broken\nM: 4/4\nL: 1/8\nK: C\nC2/0D EF |]\n\n"  # a note length of 2/0: music21 fails
BAD_STRUCTURE = "X:99\nT: No key\nM: 3/4\nL: 1/4\nC D E |]\n\n"  # no K: field


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSEQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "music"


def test_split_tunes_keeps_music_drops_ids():
    tunes = M.split_tunes(GOOD.format(i=1) + GOOD.format(i=2))
    assert tunes == ["M:4/4\nL:1/8\nK:G\nGABc d2B2 | c2A2 B2G2 |\ndcBA G4 |]\n"] * 2
    assert M.structure_ok(tunes[0])
    assert not M.structure_ok(M.split_tunes(BAD_STRUCTURE)[0])  # M:, L: but no K:
    # In the body: an information field is dropped, a key change kept, "A:|" is a note and a repeat sign.
    body = M.split_tunes("X:1\nM:2/4\nL:1/8\nK:C\nCDEF|\nN: a remark\nK:G\nA:|B2|]\n")
    assert body == ["M:2/4\nL:1/8\nK:C\nCDEF|\nK:G\nA:|B2|]\n"]


def test_bad_tunes_are_skipped_counted_and_cached(tmp_path, cache, monkeypatch):
    abc = tmp_path / "songs.abc"
    abc.write_text(GOOD.format(i=1) + BAD_PARSE + GOOD.format(i=2) + BAD_STRUCTURE + GOOD.format(i=3))
    tunes, stats = M.folk_tunes(str(abc))
    assert len(tunes) == 3 and stats == {"files": 1, "tunes": 5, "skipped_structure": 1, "skipped_parse": 1}
    assert len(list(cache.glob("abc_check_songs_*.json"))) == 1
    with pytest.raises(DataError, match="--music.source"):
        M.folk_tunes(str(tmp_path / "missing.abc"))
    only_bad = tmp_path / "bad.abc"
    only_bad.write_text(BAD_PARSE)
    with pytest.raises(DataError, match="none of its 1 tunes"):
        M.folk_tunes(str(only_bad))
    # The verdicts come from the cache now: music21 is not called again.
    monkeypatch.setattr(M, "parse_tune", lambda t: pytest.fail("parsed again despite the cache"))
    assert M.folk_tunes(str(abc)) == (tunes, stats)


def test_music_config_errors():
    with pytest.raises(ConfigError, match="--music.dataset"):
        Music(dataset="jazz")
    with pytest.raises(ConfigError, match="--music.low-pitch"):
        Music(low_pitch=90, high_pitch=80)


def test_roll_round_trip_through_music21():
    """roll -> music21 stream -> roll gives the same roll (held notes merge, chords sound together)."""
    roll = np.zeros((16, 12), np.uint8)
    roll[0:4, 0] = roll[0:4, 4] = roll[0:4, 7] = 1  # a C major chord, one quarter note
    roll[4:6, 2] = 1
    roll[8:16, 11] = 1
    stream = M.roll_to_stream(roll, 0.25, low=60)
    from music21 import stream as m21stream

    score = m21stream.Score([stream])
    back = M.score_to_roll(score, 0.25, 60, 71)
    np.testing.assert_array_equal(back, roll)


def _bce_reference(logits, targets, mask):
    x, z = logits.astype(np.float64), targets.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    nll = -(z * np.log(p) + (1 - z) * np.log1p(-p)).sum(-1)
    return (nll * mask).sum() / mask.sum()


class _Fixed:
    """A stand-in whose apply returns given logits, to test frames_loss alone against NumPy."""

    def __init__(self, logits):
        self.logits = logits

    def apply(self, variables, inputs, mask=None, deterministic=True, rngs=None):
        return self.logits


def test_frames_loss_is_the_summed_bernoulli_nll():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = (rng.random((3, 5, 7)) < 0.3).astype(np.float32)
    mask = rng.random((3, 5)) < 0.7
    batch = {"inputs": targets, "targets": targets, "mask": mask}
    loss, sums = frames_loss(_Fixed(jnp.asarray(logits)), {}, batch)
    assert float(loss) == pytest.approx(_bce_reference(logits, targets, mask), rel=1e-5)
    assert int(sums["count"]) == mask.sum()
    assert float(sums["sum_bits"]) == pytest.approx(float(sums["sum_loss"]) / math.log(2), rel=1e-6)


def _frame_models(P):
    return {
        "lstm": FrameRNN(P, LSTM(8, 16), d_embed=8),
        "gru": FrameRNN(P, GRU(8, 16), d_embed=8),
        "transformer": FrameTransformer(P, num_layers=2, num_heads=2, d_model=8, d_ff=16, max_len=8),
    }


@pytest.mark.parametrize("name", ["lstm", "gru", "transformer"])
def test_frame_models_parallel_and_recurrent_forms_agree(name):
    P, B, T = 6, 2, 7
    model = _frame_models(P)[name]
    frames = (jax.random.uniform(jax.random.key(1), (B, T, P)) < 0.4).astype(jnp.float32)
    variables = model.init(jax.random.key(0), frames)
    parallel = model.apply(variables, frames)
    state = model.apply(variables, B, T, method="init_state")
    step = jax.jit(lambda state, x: model.apply(variables, state, x, method="step"))
    steps = []
    for t in range(T):
        state, logits = step(state, frames[:, t])
        steps.append(logits)
    # Equal at every position: so the parallel form is causal too (the step never sees later frames).
    np.testing.assert_allclose(np.stack(steps, 1), parallel, rtol=1e-4, atol=1e-5)


def test_frame_models_check_shapes_and_sample_binary_frames():
    model = _frame_models(6)["gru"]
    frames = jnp.zeros((1, 4, 6))
    variables = model.init(jax.random.key(0), frames)
    with pytest.raises(ShapeError, match="d_frame=6"):
        model.apply(variables, jnp.zeros((1, 4, 5)))
    out = sample_frames(model, variables, num_samples=3, num_frames=10, key=jax.random.key(2))
    assert out.shape == (3, 10, 6) and set(np.unique(np.asarray(out))) <= {0.0, 1.0}


def test_model_table_builds_frame_models_for_every_family():
    spec = {"interface": "frames", "d_frame": 46}
    for name in ("rnn", "lstm", "gru", "mingru", "transformer"):
        model = build_model(TrainConfig(task="music", model=name, rnn=RNNConfig(d_embed=8, d_hidden=8),
                                        transformer=TransformerConfig(num_layers=1, d_model=16, d_ff=16)), spec)
        x = jax.ShapeDtypeStruct((2, 3, 46), jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)  # traced, not run: shapes only
        assert jax.eval_shape(model.apply, variables, x).shape == (2, 3, 46), name
    # Learned positions shorter than the chorales the task evaluates: refused before any training.
    with pytest.raises(ConfigError, match="--transformer.max-len is 256"):
        build_model(TrainConfig(task="music", model="transformer"), {**spec, "max_len": 773})


def _toy_chorales(n=12, P=5):
    """Rolls of a repeating 4-frame pattern (one pitch per frame), random lengths: learnable exactly."""
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(n):
        L = int(rng.integers(20, 40))
        roll = np.zeros((L + 1, P), np.float32)
        phase = int(rng.integers(0, 4))
        roll[np.arange(1, L + 1), (np.arange(L) + phase) % 4] = 1.0
        seqs.append(roll)
    return ChoraleData(seqs[:10], seqs[10:], {"chorales": n, "skipped_parts": 0, "notes_out_of_range": 0})


def test_chorale_batches_are_shifted_windows_and_pure():
    task = Music(dataset="chorales", seq_len=8, batch_size=4, low_pitch=60, high_pitch=64)
    data = _toy_chorales()
    b = task.batch(data, "train", 3, seed=1)
    assert b["inputs"].shape == (4, 8, 5) and b["mask"].all()
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    again = task.batch(data, "train", 3, seed=1)
    assert all(np.array_equal(b[k], again[k]) for k in b)
    (ev,) = task.eval_batches(data, "val", 10)  # whole chorales, padded rows masked
    lengths = [len(s) - 1 for s in data.val]
    assert ev["mask"].sum(1).tolist()[:2] == lengths and not ev["mask"][2:].any()
    with pytest.raises(ConfigError, match="split"):
        task.batch(data, "val", 0, 0)


def test_chorales_train_learns_pattern_and_sample_writes_midi(tmp_path):
    """A GRU learns the toy pattern (the first frame's pitch is a guess, then each next one is certain)
    through train(), and `jaxseq sample` writes MIDI and WAV files."""
    from jaxseq.cli import SampleArgs, sample_command
    from jaxseq.train import train

    task = Music(dataset="chorales", seq_len=16, batch_size=8, low_pitch=60, high_pitch=64)
    config = TrainConfig(task="music", model="gru", music=task, rnn=RNNConfig(d_embed=16, d_hidden=32),
                         steps=150, eval_every=150, checkpoint_every=150, run_dir=str(tmp_path / "run"),
                         progress=False)
    summary = train(task, None, config, data=_toy_chorales())
    # Uniform over 5 Bernoullis is 5 ln 2 = 3.47 nats a frame; the pattern costs ~ln 4 / 30 a frame.
    assert summary["report"]["loss"] < 0.5, summary["report"]
    paths = sample_command(SampleArgs(run_dir=str(tmp_path / "run"), num_samples=2, max_new_tokens=32,
                                      temperature=1.0, out=str(tmp_path / "samples")))
    assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["mid", "mid", "npy", "npy", "wav", "wav"]
    notes = np.load(tmp_path / "samples" / "chorale_000.npy").sum(1)
    assert 0.7 < notes.mean() < 1.4, notes  # one note a frame as trained (untrained: 2.5 on average)
    import pretty_midi

    assert len(pretty_midi.PrettyMIDI(str(tmp_path / "samples" / "chorale_000.mid")).instruments[0].notes) > 0


def test_folk_trains_through_lm_path_and_samples_tunes(tmp_path, cache):
    from jaxseq.cli import SampleArgs, sample_command
    from jaxseq.train import train

    abc = tmp_path / "songs.abc"
    abc.write_text("".join(GOOD.format(i=i) for i in range(1, 31)) + BAD_PARSE)
    task = Music(source=str(abc), seq_len=32, batch_size=8, val_fraction=0.2)
    config = TrainConfig(task="music", model="lstm", music=task, rnn=RNNConfig(d_embed=16, d_hidden=64),
                         steps=200, eval_every=200, checkpoint_every=200, run_dir=str(tmp_path / "run"),
                         progress=False, optim=dataclasses.replace(TrainConfig().optim, lr=1e-2))
    summary = train(task, None, config)
    report = summary["report"]
    assert report["skipped_parse"] == 1 and report["skipped_structure"] == 0
    assert report["bits"] < 1.0, report  # one tune repeated: near-deterministic text
    metrics = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert metrics[-1]["split"] == "report" and metrics[-1]["skipped_parse"] == 1
    paths = sample_command(SampleArgs(run_dir=str(tmp_path / "run"), num_samples=3, max_new_tokens=80,
                                      temperature=0.5, out=str(tmp_path / "samples")))
    assert sum(p.endswith(".abc") for p in paths) == 3
    assert sum(p.endswith(".mid") for p in paths) >= 2 and sum(p.endswith(".wav") for p in paths) >= 2
    tune = (tmp_path / "samples" / "tune_000.abc").read_text()
    assert tune.startswith("X:1\nT:") and "\nM:4/4\nL:1/8\nK:G\n" in tune
