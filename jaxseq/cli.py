"""The `jaxseq` command: train, sample, eval.

    jaxseq train --model lstm --rnn.d-hidden 512 --data.source notes.txt --run-dir runs/lstm
    jaxseq train --run-dir runs/lstm --resume          # continue exactly where it stopped
    jaxseq sample runs/lstm --prompt "The " --max-new-tokens 300 --temperature 0.8
    jaxseq eval runs/lstm
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

import tyro

from jaxseq.config import TrainConfig
from jaxseq.malloc import keep_freed_memory


@dataclass(frozen=True)
class SampleArgs:
    """Generate text from a trained run directory (it holds config, tokenizer and weights)."""

    # Each field's description is the string below it (tyro's --help); see jaxseq/config.py.
    run_dir: tyro.conf.Positional[str]
    """The run directory `jaxseq train` wrote."""
    prompt: str = "\n"
    """Text to continue (at least one character; the default is a newline)."""
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


@dataclass(frozen=True)
class EvalArgs:
    """Validation loss of a trained run on its own data split (or on --source)."""

    run_dir: tyro.conf.Positional[str]
    """The run directory `jaxseq train` wrote."""
    source: str | None = None
    """Evaluate on the validation split of this text instead (as --data.source); None: the run's own."""
    max_batches: int = 0
    """Validation batches to evaluate; 0: the whole validation split."""


def train_command(config: TrainConfig) -> dict:
    from jaxseq.train import train

    summary = train(config)
    print(json.dumps({"summary": summary}))
    return summary


def sample_command(args: SampleArgs) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxseq import decoding
    from jaxseq.checkpoint import load_run
    from jaxseq.models import build_model

    config, tokenizer, params = load_run(args.run_dir)
    from jaxseq.train import model_variables

    model = build_model(config, tokenizer.vocab_size)
    variables = model_variables(model, params)  # {"params": params}, or a count model's whole variables
    prompt_ids = tokenizer.encode(args.prompt)
    if len(prompt_ids) == 0:
        raise SystemExit("--prompt must hold at least one character (the default is a newline).")
    prompt = jnp.asarray(np.tile(prompt_ids[None, :], (args.num_samples, 1)), jnp.int32)
    if args.beam > 0:
        seqs, scores = decoding.beam_search(model, variables, prompt, beam_size=args.beam,
                                            max_new_tokens=args.max_new_tokens)
        rows = [np.asarray(seqs[i, 0]) for i in range(seqs.shape[0])]
    else:
        out = decoding.sample(model, variables, prompt, max_new_tokens=args.max_new_tokens,
                              key=jax.random.key(args.seed), temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p)
        tokens = out.tokens if hasattr(out, "tokens") else out
        rows = [np.asarray(tokens[i]) for i in range(tokens.shape[0])]
    texts = [tokenizer.decode(r) for r in rows]
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} ---")
        print(text)
    return texts


def eval_command(args: EvalArgs) -> dict:
    from jaxseq.checkpoint import load_run
    from jaxseq.data import eval_batches, prepare_data
    from jaxseq.models import build_model
    from jaxseq.train import evaluate, make_eval_step

    config, tokenizer, params = load_run(args.run_dir)
    data_config = config.data if args.source is None else dataclasses.replace(config.data, source=args.source)
    data = prepare_data(data_config, tokenizer=tokenizer)
    max_batches = args.max_batches or sys.maxsize
    batches = eval_batches(data.val_ids, batch_size=data_config.batch_size, seq_len=data_config.seq_len,
                           max_batches=max_batches)
    model = build_model(config, tokenizer.vocab_size)
    result = evaluate(make_eval_step(model), params, batches)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None):
    commands = {
        "train": train_command,
        "sample": sample_command,
        "eval": eval_command,
    }
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in commands:
        names = ", ".join(commands)
        print(f"usage: jaxseq {{{names}}} [--help]\n{__doc__}", file=sys.stderr)
        raise SystemExit(2 if args and args[0] not in ("-h", "--help") else 0)
    command, rest = args[0], args[1:]
    fn = commands[command]
    keep_freed_memory()  # before JAX's first computation (jaxseq/malloc.py)
    if command == "train":
        parsed = tyro.cli(TrainConfig, args=rest, prog="jaxseq train", description=TrainConfig.__doc__)
    else:
        cls = SampleArgs if command == "sample" else EvalArgs
        parsed = tyro.cli(cls, args=rest, prog=f"jaxseq {command}", description=cls.__doc__)
    fn(parsed)


if __name__ == "__main__":
    main()
