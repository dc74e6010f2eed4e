"""`jaxseq sample RUN_DIR` for --task music: generated tunes and chorales as .abc / .mid / .wav files.

folk: `num_samples` continuations of the prompt "M:" (every tune starts with its metre), each cut at its
first blank line (the tune separator), parsed by music21 (`music_data.parse_tune`); a tune that parses
is written as .abc, .mid and .wav, one that does not (or that music21 parses but cannot export to MIDI,
counted as valid_not_rendered) as .abc only. chorales: Bach-style piano rolls
drawn from the model's recurrent form (`sample_frames`), written as .mid and .wav (and the roll as .npy).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.errors import ConfigError

PROMPT = "M:"


def generate_tunes(model, variables, tokenizer, num_samples: int, max_new_tokens: int, seed: int,
                   temperature: float = 1.0, top_k=None, top_p=None, batch_size: int = 64) -> list[tuple[str, bool]]:
    """(tune text, complete) per sample from a folk LM and its `CharTokenizer`: the prompt "M:" and its
    continuation up to the first blank line (complete False when none came within max_new_tokens)."""
    from jaxseq import decoding

    prompt_ids = tokenizer.encode(PROMPT)
    out = []
    for i in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - i)
        prompt = jnp.asarray(np.tile(prompt_ids[None, :], (n, 1)), jnp.int32)
        res = decoding.sample(model, variables, prompt, max_new_tokens=max_new_tokens,
                              key=jax.random.fold_in(jax.random.key(seed), i), temperature=temperature,
                              top_k=top_k, top_p=top_p)
        for row in np.asarray(res.tokens):
            text = tokenizer.decode(row)
            cut = text.find("\n\n")
            out.append((text[: cut + 1] if cut >= 0 else text.rstrip("\n") + "\n", cut >= 0))
    return out


def write_folk_samples(task, run, args, out: Path) -> tuple[list[str], dict]:
    from jaxseq.data import music_data as M

    from jaxseq.data import CharTokenizer
    from jaxseq.tasks.char_lm import TOKENIZER_FILE

    tokenizer = CharTokenizer.load(Path(args.run_dir) / TOKENIZER_FILE)
    tunes = generate_tunes(run.model, run.variables, tokenizer, args.num_samples, args.max_new_tokens, args.seed,
                           args.temperature, args.top_k, args.top_p)
    paths, valid, complete, unrendered = [], 0, 0, 0
    for i, (tune, done) in enumerate(tunes):
        complete += done
        abc = out / f"tune_{i:03d}.abc"
        abc.write_text(f"X:{i + 1}\nT:jaxseq sample {i}\n{tune}")
        paths.append(str(abc))
        score = M.parse_tune(tune) if M.structure_ok(tune) else None
        if score is None:
            continue
        valid += 1
        try:
            M.write_midi_wav(score, out / f"tune_{i:03d}.mid", out / f"tune_{i:03d}.wav")
        except Exception:  # noqa: BLE001 -- music21 parses some scores it cannot export (e.g. a doubled metre)
            unrendered += 1
            (out / f"tune_{i:03d}.mid").unlink(missing_ok=True)
            continue
        paths += [str(out / f"tune_{i:03d}.mid"), str(out / f"tune_{i:03d}.wav")]
    return paths, {"samples": len(tunes), "complete": complete, "valid": valid, "valid_not_rendered": unrendered,
                   "out": str(out)}


def write_chorale_samples(task, run, args, out: Path) -> tuple[list[str], dict]:
    from jaxseq.data import music_data as M
    from jaxseq.models.frames import sample_frames

    num_frames = args.max_new_tokens
    limit = getattr(run.model, "max_len", None)
    if limit is not None and getattr(run.model, "positional", "") == "learned" and num_frames > limit:
        raise ConfigError(f"--max-new-tokens {num_frames} frames is longer than the Transformer's learned "
                          f"positions (--transformer.max-len {limit}); sample at most {limit} frames.")
    rolls = np.asarray(sample_frames(run.model, run.variables, num_samples=args.num_samples, num_frames=num_frames,
                                     key=jax.random.key(args.seed), temperature=args.temperature))
    paths = []
    for i, roll in enumerate(rolls):
        stem = out / f"chorale_{i:03d}"
        np.save(f"{stem}.npy", roll.astype(np.uint8))
        M.write_midi_wav(M.roll_to_stream(roll, task.grid, task.low_pitch), Path(f"{stem}.mid"), Path(f"{stem}.wav"))
        paths += [f"{stem}.npy", f"{stem}.mid", f"{stem}.wav"]
    notes = float(rolls.sum(-1).mean())
    return paths, {"samples": len(rolls), "frames": num_frames, "mean_notes_per_frame": round(notes, 2),
                   "out": str(out)}
