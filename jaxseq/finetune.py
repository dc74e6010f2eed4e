"""Start a run from another run's weights (`jaxseq train --init-from RUN_DIR`).

    params, record = init_from_run(params, "runs/lm")   # params: the new model's freshly initialised tree

Every parameter of the new model that the pretrained run has is loaded from it, found by its path:
the same path (a language model fine-tuned as a language model), or its path under the new model's
"body" (a `TokenClassifier` over the pretrained LM: "body/embed/embedding" <- "embed/embedding"). The
rest (the classifier's "head") keeps its fresh initialisation. A body parameter the pretrained run lacks,
or one of another shape, is an error that names it: another family or other sizes than the pretrained
run's, or another vocabulary (the embedding's first axis).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from jaxseq.errors import ConfigError

BODY = "body"


def init_from_run(params, run_dir) -> tuple:
    """(params with the pretrained run's weights loaded, record of what was loaded).

    params: the new model's parameter tree (arrays or ShapeDtypeStructs: only shapes and dtypes are read
    for the fresh leaves' places; fresh leaves are returned as they were). record: {"run_dir", "step",
    "task", "model", "config" (the pretrained run's), "loaded": n arrays, "fresh": [paths]}.
    """
    from jaxseq.config import model_section, to_dict
    from jaxseq.run import load_run

    run = load_run(run_dir)
    source = run.variables["params"]
    section = to_dict(model_section(run.config))
    merged, loaded, fresh = load_matching(params, source, pretrained=f"{run_dir} (--model {run.config.model}, "
                                                                      f"{json.dumps(section)})")
    record = {"run_dir": str(run_dir), "step": run.step, "task": run.config.task, "model": run.config.model,
              "config": to_dict(run.config), "loaded": loaded, "fresh": fresh}
    return merged, record


def load_matching(params, source, *, pretrained: str = "the pretrained run") -> tuple:
    """(params with every leaf found in `source` replaced by it, number loaded, paths kept fresh).

    A leaf at path p is taken from source[p]; when `params` has a "body" and `source` has none (a language
    model into a classifier), only the body's leaves are, from source[p minus "body/"]. Raises ConfigError
    naming the parameter when a body leaf is missing or has another shape, or when nothing matches.
    """
    flat_source = {_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(source)}
    # A language model into a classifier's body: only the body is loaded; the LM's own head is not the new head.
    into_body = BODY in params and BODY not in source
    loaded, fresh = 0, []

    def take(key_path, leaf):
        nonlocal loaded
        path = _path(key_path)
        under_body = path.startswith(BODY + "/")
        name = path[len(BODY) + 1:] if into_body and under_body else None if into_body else path
        if name not in flat_source:
            if under_body:
                raise ConfigError(f"--init-from: the pretrained run has no parameter {name!r} for this model's "
                                  f"{path!r}; it is {pretrained}. Use the same --model and sizes.")
            fresh.append(path)
            return leaf
        value = np.asarray(flat_source[name])
        if value.shape != tuple(leaf.shape):
            raise ConfigError(_shape_message(path, value.shape, tuple(leaf.shape), pretrained))
        loaded += 1
        return value.astype(leaf.dtype)

    merged = jax.tree_util.tree_map_with_path(take, params)
    if loaded == 0:
        raise ConfigError(f"--init-from: no parameter of this model matches the pretrained run, {pretrained}.")
    return merged, loaded, fresh


def _shape_message(path: str, theirs: tuple, ours: tuple, pretrained: str) -> str:
    if path.endswith(("embed/embedding", "wte/embedding")) and theirs[1:] == ours[1:]:
        return (f"--init-from: the vocabularies differ: the pretrained run has {theirs[0]} tokens, this run "
                f"{ours[0]} ({path!r}). The vocabulary comes from the pretrained run: prepare the data with its "
                f"tokenizer (jaxseq train does), or pretrain on text with this task's characters.")
    return (f"--init-from: parameter {path!r} has shape {theirs} in the pretrained run and {ours} here; build "
            f"the model with the pretrained run's sizes, {pretrained}.")


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)

