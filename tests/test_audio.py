"""The audio task and its data: mu-law against its formula, the resampler against analytic sines, espeak-ng
synthesis, batches, bad input (sample rate, speaker id), and a tiny WaveNet learning through train()."""

import wave

import numpy as np
import pytest

from jaxseq.cli import SampleArgs, sample_command
from jaxseq.config import TrainConfig, WaveNetConfig
from jaxseq.data import speech as S
from jaxseq.errors import ConfigError, DataError
from jaxseq.tasks.audio import Audio


def test_mu_law_round_trip_within_one_quantisation_step():
    x = np.concatenate([np.linspace(-1, 1, 20001), np.random.default_rng(0).uniform(-1, 1, 5000)])
    codes = S.mu_law_encode(x)
    assert codes.dtype == np.int32 and codes.min() == 0 and codes.max() == 255
    assert np.all(np.diff(S.mu_law_encode(np.linspace(-1, 1, 20001))) >= 0)  # monotone
    # bin k spans y in [k/128 - 1, (k+1)/128 - 1] of the companded axis; its width in x, from the formula
    mu = 255.0
    expand = lambda y: np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu  # noqa: E731
    lo, hi = expand(codes / 128.0 - 1.0), expand((codes + 1) / 128.0 - 1.0)
    assert np.all((x >= lo - 1e-12) & (x <= hi + 1e-12))  # x lies in the bin it was given
    err = np.abs(S.mu_law_decode(codes) - x)
    assert np.all(err <= (hi - lo) + 1e-12)
    assert err.max() < 0.0216 and np.abs(S.mu_law_decode(S.mu_law_encode(1e-4)) - 1e-4) < 1e-4  # half the outermost bin; fine near 0
    np.testing.assert_array_equal(S.mu_law_encode(S.mu_law_decode(np.arange(256))), np.arange(256))
    assert S.mu_law_encode(0.0) == 128 and S.mu_law_encode(5.0) == 255  # out of range clips


@pytest.mark.parametrize("freq", [440.0, 3000.0, 7000.0])
def test_resample_22050_to_16000_matches_the_analytic_sine(freq):
    n = np.arange(22050)
    y = S.resample(np.sin(2 * np.pi * freq * n / 22050), 22050, 16000)
    assert y.shape == (16000,)
    ref = np.sin(2 * np.pi * freq * np.arange(16000) / 16000)
    assert np.abs(y - ref)[100:-100].max() < 1e-3  # edges see the zeros outside the signal


def test_resample_removes_what_the_new_rate_cannot_hold():
    n = np.arange(22050)
    y = S.resample(np.sin(2 * np.pi * 10000 * n / 22050), 22050, 16000)  # above 8 kHz: would alias to 6 kHz
    assert np.abs(y)[100:-100].max() < 1e-3
    up = S.resample(np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000, 22050)
    assert np.abs(up - np.sin(2 * np.pi * 440 * n / 22050))[100:-100].max() < 1e-3


def test_espeak_synthesises_distinct_voices():
    a = S.synthesize("Insert a blank line at cursor location.", "en-us")
    b = S.synthesize("Insert a blank line at cursor location.", "en-us+f3")
    assert a.dtype == np.int16 and 0.5 * S.ESPEAK_RATE < len(a) < 5 * S.ESPEAK_RATE
    assert np.abs(a).max() > 3000  # speech, not silence
    assert len(a) != len(b) or not np.array_equal(a, b)
    with pytest.raises(DataError, match="no voice 'xx-nope'"):
        S.synthesize("Hello there.", "xx-nope")


def test_sentences_are_plain_and_deterministic():
    text = "The quick brown fox jumps over the lazy dog. See x.y for more. Another plain sentence here, with a comma too."
    got = S.sentences(2, text)
    assert sorted(got) == ["Another plain sentence here, with a comma too.", "The quick brown fox jumps over the lazy dog."]
    assert S.sentences(2, text) == got
    with pytest.raises(DataError, match="--audio.sentences 3"):
        S.sentences(3, text)


SIGMAS = {"low": 0.005, "high": 0.3}  # each speaker: white Gaussian noise of this standard deviation


def _write_folder(root, rate=8000, seconds=0.5, files=6):
    """Two speakers of white Gaussian noise (SIGMAS), `files` WAVs each."""
    rng = np.random.default_rng(0)
    for name, sigma in SIGMAS.items():
        (root / name).mkdir(parents=True)
        for i in range(files):
            S.write_wav(root / name / f"{i}.wav", sigma * rng.normal(size=int(rate * seconds)), rate)
    return root


def _mu_law_probs(sigma):
    """P(code = k) for N(0, sigma^2) clipped to [-1, 1], from the mu-law bins' edges in x."""
    from math import erf, sqrt

    y = np.arange(1, 256) / 128.0 - 1.0
    edges = np.sign(y) * (256.0 ** np.abs(y) - 1) / 255.0
    return np.diff([0.0] + [0.5 * (1 + erf(e / (sigma * sqrt(2)))) for e in edges] + [1.0])


def _entropy_bits(p):
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_folder_at_another_sample_rate_is_refused(tmp_path):
    root = _write_folder(tmp_path / "wavs", rate=8000)
    with pytest.raises(DataError, match="sampled at 8000 Hz but --audio.sample-rate is 16000"):
        Audio(source=str(root), sample_rate=16000, segment_len=64).prepare()
    with pytest.raises(DataError, match="--audio.source"):
        Audio(source=str(tmp_path / "missing")).prepare()
    with pytest.raises(ConfigError, match="--audio.sample-rate"):
        Audio(sample_rate=44100).prepare()


def test_batches_and_evaluation_windows(tmp_path):
    task = Audio(source=str(_write_folder(tmp_path / "wavs")), sample_rate=8000, segment_len=100, batch_size=4,
                 test_windows=0)
    data = task.prepare()
    assert data["speakers"] == ["high", "low"] and data["test"].sum() == 2  # 6 files each, test_fraction 0.1:  # the last file of each speaker
    b = task.batch(data, "train", 7, seed=1)
    again = task.batch(data, "train", 7, seed=1)
    for k in b:
        np.testing.assert_array_equal(b[k], again[k])  # a pure function of (seed, index)
    assert b["inputs"].shape == b["targets"].shape == (4, 100) and b["speaker"].shape == (4,)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    batches = task.eval_batches(data, "val", 1 << 30)
    # every test sample but each utterance's first is a target exactly once
    assert sum(int(x["mask"].sum()) for x in batches) == int((data["lengths"][data["test"]] - 1).sum())


@pytest.mark.slow
def test_train_learns_each_speakers_distribution_and_sample_writes_wavs(tmp_path):
    from jaxseq.train import train

    task = Audio(source=str(_write_folder(tmp_path / "wavs")), sample_rate=8000, segment_len=128, batch_size=8,
                 test_windows=0, sample_seconds=0.25)
    config = TrainConfig(task="audio", model="wavenet", audio=task, steps=150, eval_every=150, eval_batches=4,
                         checkpoint_every=150, run_dir=str(tmp_path / "run"), progress=False,
                         wavenet=WaveNetConfig(channels=16, skip_channels=32, dilation_cycle=3, repeats=1))
    summary = train(task, None, config)
    # white noise: the best model predicts each speaker's quantised Gaussian, whatever the context
    best = np.mean([_entropy_bits(_mu_law_probs(s)) for s in SIGMAS.values()])  # 6.7 bits
    pooled = _entropy_bits(np.mean([_mu_law_probs(s) for s in SIGMAS.values()], axis=0))
    assert pooled > best + 0.5  # ignoring the speaker id would cost over half a bit
    assert summary["report"]["bits"] < best + 0.2, (summary["report"], best)
    paths = sample_command(SampleArgs(run_dir=str(tmp_path / "run"), speaker=1, num_samples=2,
                                      out=str(tmp_path / "samples")))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["low_0.wav", "low_1.wav"]
    with wave.open(paths[0]) as f:
        assert f.getframerate() == 8000 and f.getnframes() == 2000 and f.getnchannels() == 1
        x = np.frombuffer(f.readframes(2000), "<i2") / 32768.0
    assert 0.5 * SIGMAS["low"] < x.std() < 2 * SIGMAS["low"]  # the low speaker's level, not the high one's
    with pytest.raises(ConfigError, match="--speaker 2 is out of range"):
        sample_command(SampleArgs(run_dir=str(tmp_path / "run"), speaker=2))


def test_sample_speaker_out_of_range_names_the_flag(tmp_path):
    (tmp_path / "speakers.json").write_text('["en-us", "en+m3"]')
    task = Audio(voices=("en-us", "en+m3"))
    with pytest.raises(ConfigError, match=r"--speaker 2 is out of range: this run has 2 speakers, ids 0..1 \(0: en-us, 1: en\+m3\)"):
        task.write_samples(None, SampleArgs(run_dir=str(tmp_path), speaker=2))
    with pytest.raises(ConfigError, match="--seconds"):
        task.write_samples(None, SampleArgs(run_dir=str(tmp_path), seconds=-1.0))
