"""The `jaxseq` command: train, sample, eval, rl.

    jaxseq train --model lstm --rnn.d-hidden 512 --char-lm.source notes.txt --run-dir runs/lstm
    jaxseq train --run-dir runs/lstm --resume          # continue exactly where it stopped
    jaxseq train --task mnist1d --model gru --run-dir runs/mnist1d
    jaxseq sample runs/lstm --prompt "The " --max-new-tokens 300 --temperature 0.8
    jaxseq eval runs/lstm
    jaxseq train --task translation --model lstm-bahdanau --run-dir runs/numbers
    jaxseq sample runs/numbers --source "three hundred and twenty-one thousand and seven"
    jaxseq rl --env MemoryChain-bsuite --core lstm --run-dir runs/memory     # PPO, a recurrent policy

An expected error (bad input, a missing file, a mismatched checkpoint) prints one line,
`jaxseq: error: ...`, and exits with status 2; `--debug` (or JAXSEQ_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import tyro

from jaxseq.config import TrainConfig
from jaxseq.errors import ConfigError, JaxseqError
from jaxseq.malloc import keep_freed_memory


@dataclass(frozen=True)
class SampleArgs:
    """Generate text from a trained run directory (it holds config, tokenizer and weights), or translate
    --source with a translation run."""

    # Each field's description is the string below it (tyro's --help); see jaxseq/config.py.
    run_dir: tyro.conf.Positional[str]
    """The run directory `jaxseq train` wrote."""
    prompt: str = "\n"
    """Text to continue (at least one character; the default is a newline)."""
    source: str | None = None
    """A translation run: the sentence to translate (beam search, the run's --translation.beam-size
    unless --beam is given)."""
    max_new_tokens: int = 400
    """Tokens to generate after the prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy (argmax)."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Nucleus sampling: only among the most likely tokens whose probabilities sum to p."""
    num_samples: int = 1
    """Independent samples of the same prompt."""
    beam: int = 0
    """> 0: beam search with this many beams instead of sampling (prints the best beam per prompt)."""
    seed: int = 0
    """Seed of the sampling."""
    speaker: int | None = None
    """An audio run: generate only this speaker id (None: every speaker of the run)."""
    seconds: float = 0.0
    """An audio run: seconds of audio per WAV file (0: the run's --audio.sample-seconds)."""
    out: str = ""
    """Where a run of a task that renders files (images: PNG, audio: WAV, music: MIDI) writes them;
    empty: RUN_DIR/samples."""


@dataclass(frozen=True)
class EvalArgs:
    """Validation loss of a trained run on its own data split (or on --source)."""

    run_dir: tyro.conf.Positional[str]
    """The run directory `jaxseq train` wrote."""
    source: str | None = None
    """Evaluate on the validation split of this text instead (as --char-lm.source); None: the run's own."""
    max_batches: int = 0
    """Validation batches to evaluate; 0: the whole validation split."""


def train_command(config: TrainConfig) -> dict:
    from jaxseq.train import train

    summary = train(None, None, config)
    print(json.dumps({"summary": summary}))
    return summary


def sample_command(args: SampleArgs) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxseq import decoding
    from jaxseq.run import load_run
    from jaxseq.tasks.char_lm import CharLM
    from jaxseq.tasks.translation import Translation

    run = load_run(args.run_dir)
    if hasattr(run.task, "write_samples"):  # tasks whose samples are files: images, audio, music
        return run.task.write_samples(run, args)
    if isinstance(run.task, Translation):
        return [translate_command(run, args)]
    if args.source is not None:
        raise ConfigError(f"--source translates with a --task translation run; {args.run_dir} is a "
                          f"--task {run.config.task} run (use --prompt).")
    if not isinstance(run.task, CharLM):
        raise ConfigError(f"jaxseq sample generates text from a --task char_lm run or translates with a "
                          f"--task translation run; {args.run_dir} is a --task {run.config.task} run (use jaxseq eval).")
    tokenizer = run.task.prepare_tokenizer(args.run_dir)
    prompt_ids = tokenizer.encode(args.prompt)
    if len(prompt_ids) == 0:
        raise ConfigError("--prompt must hold at least one character (the default is a newline).")
    prompt = jnp.asarray(np.tile(prompt_ids[None, :], (args.num_samples, 1)), jnp.int32)
    if args.beam > 0:
        seqs, scores = decoding.beam_search(run.model, run.variables, prompt, beam_size=args.beam,
                                            max_new_tokens=args.max_new_tokens)
        rows = [np.asarray(seqs[i, 0]) for i in range(seqs.shape[0])]
    else:
        out = decoding.sample(run.model, run.variables, prompt, max_new_tokens=args.max_new_tokens,
                              key=jax.random.key(args.seed), temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p)
        rows = [np.asarray(out.tokens[i]) for i in range(out.tokens.shape[0])]
    texts = [tokenizer.decode(r) for r in rows]
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} ---")
        print(text)
    return texts


def translate_command(run, args: SampleArgs) -> str:
    """Translate --source with a translation run; prints and returns the translation."""
    if args.source is None:
        raise ConfigError(f"{args.run_dir} is a translation run: give the sentence to translate with --source.")
    data = run.task.prepare(args.run_dir)
    [text] = run.task.translate(run.model, run.variables, data, [args.source], beam_size=args.beam or None)
    print(text)
    return text


def eval_command(args: EvalArgs) -> dict:
    from jaxseq.run import load_run
    from jaxseq.tasks.char_lm import CharLM

    run = load_run(args.run_dir)
    task = run.task
    if args.source is not None:
        if not isinstance(task, CharLM):
            raise ConfigError(f"--source replaces a char_lm run's text; {args.run_dir} is a --task {run.config.task} run.")
        task = dataclasses.replace(task, source=args.source)
    data = task.prepare(args.run_dir)
    kwargs = {"max_batches": args.max_batches} if args.max_batches else {}
    result = task.evaluate(run.model, run.variables, data, **kwargs)
    print(json.dumps(result))
    return result


def rl_command(config) -> dict:
    from jaxseq.rl import summary_line, train_rl

    summary = train_rl(config)
    print(summary_line(summary), flush=True)
    return summary


def main(argv: list[str] | None = None):
    commands = {
        "train": train_command,
        "sample": sample_command,
        "eval": eval_command,
        "rl": rl_command,
    }
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("JAXSEQ_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not args or args[0] not in commands:
        names = ", ".join(commands)
        print(f"usage: jaxseq {{{names}}} [--help] [--debug]\n{__doc__}", file=sys.stderr)
        raise SystemExit(2 if args and args[0] not in ("-h", "--help") else 0)
    command, rest = args[0], args[1:]
    keep_freed_memory()  # before JAX's first computation (jaxseq/malloc.py)
    if command == "train":
        parsed = tyro.cli(TrainConfig, args=rest, prog="jaxseq train", description=TrainConfig.__doc__)
    elif command == "rl":
        from jaxseq.rl import RLConfig

        parsed = tyro.cli(RLConfig, args=rest, prog="jaxseq rl", description=RLConfig.__doc__)
    else:
        cls = SampleArgs if command == "sample" else EvalArgs
        parsed = tyro.cli(cls, args=rest, prog=f"jaxseq {command}", description=cls.__doc__)
    try:
        commands[command](parsed)
    except JaxseqError as e:
        if debug:
            raise
        # One line: the message names the argument and the fix; --debug shows where it came from.
        print(f"jaxseq: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
