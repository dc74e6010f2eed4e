"""WaveNet on synthetic speech: test NLL against a mu-law LSTM of the same size, samples per voice, and
generation speed with queues against naive recomputation.

Claims (van den Oord et al. 2016, "WaveNet: A Generative Model for Raw Audio"; Paine et al. 2016, "Fast
Wavenet Generation Algorithm"): (1) stacks of dilated causal convolutions with gated units model raw
audio sample by sample (16 kHz, 256 mu-law classes) better than recurrent baselines, and one network
conditioned on a speaker id speaks in every voice; (2) keeping one queue per layer makes a generated
sample cost O(layers) instead of O(receptive field).

    python experiments/wavenet_speech.py            # both models, 600 steps each, WAVs, spectrograms
    python experiments/wavenet_speech.py --quick    # seconds: the pulse test's form
    python benchmarks/wavenet_generation.py         # claim (2); its JSON lines feed this plot's right panel

Data: `jaxseq train --task audio` defaults: 100 sentences of the built-in corpus read by 4 espeak-ng
voices (the speakers), 16 kHz, the first 10 sentences held out for every voice. Both models are trained
through `train(task, model, config)` with the same batches (8 windows of 1,024 samples) and steps.

Writes experiments/results/wavenet_speech.jsonl (one line per model), wavenet_speech.png (test bits
against steps; generation speed against the receptive field), wavenet_speech_spectrograms.png (a test
utterance and each model's generated audio per voice) and wavenet_speech/<model>_<voice>.wav.
A run writes into --run-root/<model>; remove it to run again (a run directory is never overwritten).

Measured (seed 0, 600 steps each, 2 shared CPU cores, 20 min in all): test bits per sample over 512
windows of 1,024 held-out samples: WaveNet (152k parameters, receptive field 512) 4.56, mu-law LSTM
(149k, hidden 128) 5.02; uniform is 8. WaveNet is ahead at every evaluation (100 steps: 6.04 vs 6.18).
Its samples carry each voice's low-frequency energy but are babble, not words, at this size and
budget; the LSTM's fall into long silences. Generation speed: see benchmarks/wavenet_generation.py
and experiments/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from jaxseq.config import RNNConfig, TrainConfig, WaveNetConfig
from jaxseq.data.speech import mu_law_decode, write_wav
from jaxseq.models.wavenet import generate
from jaxseq.run import load_run
from jaxseq.train import train

RESULTS = Path(__file__).parent / "results"
BENCH = Path(__file__).parent.parent / "benchmarks" / "results" / "wavenet_generation-cpu.jsonl"


@dataclass(frozen=True)
class Args:
    models: tuple[str, ...] = ("wavenet", "lstm")
    """WaveNet (--wavenet.*) and the mu-law baseline (--rnn.*; any recurrent family)."""
    steps: int = 600
    """Optimizer steps of each model."""
    lstm_hidden: int = 128
    """The baseline's hidden size: 128 with d_embed 64 gives 149k parameters, WaveNet's defaults 152k."""
    seconds: float = 2.0
    """Seconds of audio generated per voice and model (temperature 1)."""
    run_root: str = "runs/wavenet_speech"
    out: str = str(RESULTS / "wavenet_speech.jsonl")
    bench: str = str(BENCH)
    """JSON lines of benchmarks/wavenet_generation.py for the speed panel (skipped when absent)."""
    quick: bool = False
    """Seconds, tiny sizes: what tests/test_experiments.py runs."""
    replot: bool = False
    """Only redraw the figures from the results file, the WAVs and the benchmark's JSON lines."""
    base: TrainConfig = field(default_factory=TrainConfig)


def config_for(args: Args, model: str) -> TrainConfig:
    c = dataclasses.replace(args.base, task="audio", model=model, steps=args.steps, eval_every=max(1, args.steps // 6),
                            eval_batches=8, checkpoint_every=args.steps, progress=False,
                            run_dir=str(Path(args.run_root) / model), rnn=RNNConfig(d_embed=64, d_hidden=args.lstm_hidden))
    if args.quick:
        c = dataclasses.replace(c, steps=4, eval_every=2, eval_batches=1, checkpoint_every=4,
                                audio=dataclasses.replace(c.audio, voices=("en-us", "en+m3"), sentences=4,
                                                          test_fraction=0.25, segment_len=64, batch_size=2,
                                                          test_windows=4),
                                wavenet=WaveNetConfig(channels=8, skip_channels=8, dilation_cycle=3, repeats=1),
                                rnn=RNNConfig(d_embed=8, d_hidden=8))
    return c


def main(args: Args) -> list[dict]:
    rows, audio = [], {}
    out_dir = Path(args.out).parent
    wav_dir = out_dir / "wavenet_speech"
    if args.replot:
        return replot(args, out_dir, wav_dir)
    for model in args.models:
        config = config_for(args, model)
        t0 = time.perf_counter()
        summary = train(None, None, config)
        wall = time.perf_counter() - t0
        run = load_run(config.run_dir)
        names = run.task.speakers(config.run_dir)
        n = int(round((0.05 if args.quick else args.seconds) * config.audio.sample_rate))
        t1 = time.perf_counter()
        codes = np.asarray(generate(run.model, run.variables, jnp.arange(len(names)), n, jax.random.key(config.seed)))
        gen_s = time.perf_counter() - t1
        audio[model] = {name: mu_law_decode(codes[i]) for i, name in enumerate(names)}
        curve = [(r["step"], r["bits"]) for r in map(json.loads, open(Path(config.run_dir) / "metrics.jsonl"))
                 if r.get("split") == "val"]
        params = sum(x.size for x in jax.tree.leaves(run.variables))
        rows.append({"model": model, "params": int(params), "steps": config.steps, "test_bits": summary["report"]["bits"],
                     "test_samples": summary["report"]["count"], "curve": curve, "train_wall_s": round(wall, 1),
                     "generate_samples_per_s": round(len(names) * n / gen_s, 1), "seed": config.seed,
                     "quick": args.quick, **({"receptive_field": run.model.receptive_field} if model == "wavenet" else {})})
        print(json.dumps(rows[-1]), flush=True)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        wav_dir.mkdir(parents=True, exist_ok=True)
        for model, voices in audio.items():
            for name, x in voices.items():
                write_wav(wav_dir / f"{model}_{_safe(name)}.wav", x, config.audio.sample_rate)
    figures = out_dir if not args.quick else Path(args.run_root)
    plot(rows, args.bench, figures / "wavenet_speech.png")
    real = _test_utterances(config)
    plot_spectrograms(real, audio, config.audio.sample_rate, figures / "wavenet_speech_spectrograms.png")
    return rows


def replot(args: Args, out_dir: Path, wav_dir: Path) -> list[dict]:
    from jaxseq.data.speech import read_wav

    rows = [json.loads(line) for line in open(args.out)]
    config = config_for(args, rows[0]["model"])
    names = list(config.audio.voices)
    audio = {r["model"]: {n: read_wav(wav_dir / f"{r['model']}_{_safe(n)}.wav", config.audio.sample_rate) for n in names}
             for r in rows}
    plot(rows, args.bench, out_dir / "wavenet_speech.png")
    plot_spectrograms(_test_utterances(config), audio, config.audio.sample_rate, out_dir / "wavenet_speech_spectrograms.png")
    return rows


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _test_utterances(config) -> dict:
    """The first held-out utterance of each voice, as floats in [-1, 1]."""
    task = config.audio
    data = task.prepare()
    out = {}
    for u in np.flatnonzero(data["test"]):
        name = data["speakers"][data["speaker"][u]]
        if name not in out:
            s, n = data["starts"][u], data["lengths"][u]
            out[name] = mu_law_decode(data["codes"][s: s + n])
    return out


def plot(rows, bench_path, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        steps, bits = zip(*r["curve"])
        a.plot(steps, bits, "o-", label=f"{r['model']} ({r['params'] / 1e3:.0f}k params); all {r['test_samples']:,} "
                                        f"test samples: {r['test_bits']:.2f}")
    a.set_xlabel("step")
    a.set_ylabel("bits / sample, first 64 test windows")
    a.set_title("mu-law speech, 4 espeak-ng voices, 16 kHz", fontsize=9)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    bench = [json.loads(line) for line in open(bench_path)] if Path(bench_path).is_file() else []
    for method, style in (("queue-ring", "o-"), ("queue-shift", "s--"), ("naive", "^-")):
        pts = sorted((r["receptive_field"], r["samples_per_s"]) for r in bench if r["method"] == method)
        if pts:
            b.plot(*zip(*pts), style, label=method)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("receptive field (samples)")
    b.set_ylabel("generated samples / s")
    b.set_title("generation speed (benchmarks/wavenet_generation.py)" if bench else "no benchmark results", fontsize=9)
    b.grid(True, which="both", alpha=0.3)
    if bench:
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_spectrograms(real: dict, generated: dict, rate: int, path) -> None:
    """One row per voice: a held-out utterance, then each model's generated audio (log-power spectrograms,
    one colour scale for all: the test utterances' loudest bin down to 90 dB below it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(real)
    cols = [("test utterance", real)] + [(f"{m} sample", v) for m, v in generated.items()]
    fig, axes = plt.subplots(len(names), len(cols), figsize=(3.3 * len(cols), 1.9 * len(names)), squeeze=False)
    images, top = [], -np.inf
    for i, name in enumerate(names):
        for j, (title, voices) in enumerate(cols):
            ax = axes[i, j]
            with np.errstate(divide="ignore"):  # a silent frame's power is 0 (-inf dB): drawn as the floor
                _, _, _, im = ax.specgram(voices[name][: int(2 * rate)], NFFT=256, Fs=rate, noverlap=128, cmap="magma")
            images.append(im)
            if j == 0:
                top = max(top, float(np.nanmax(np.ma.masked_invalid(im.get_array()))))
                ax.set_ylabel("Hz", fontsize=7)
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.tick_params(labelsize=6)
    for im in images:
        im.set_clim(top - 90.0, top)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
