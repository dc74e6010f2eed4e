"""The checks a restore makes before and after reading a checkpoint's arrays: leaves, fingerprints, config diffs."""

from __future__ import annotations

import jax
import numpy as np

from jaxseq import fingerprints as fp
from jaxseq.errors import CheckpointError
from jaxseq.fingerprints import path_str


def saved_fingerprints(meta: dict) -> dict:
    if meta.get("fingerprint_method") != fp.METHOD or not isinstance(meta.get("fingerprints"), dict):
        raise CheckpointError(f"the metadata has no fingerprints of method {fp.METHOD!r} (got "
                              f"{meta.get('fingerprint_method')!r}), so its arrays cannot be verified")
    return meta["fingerprints"]


def stored_leaves(tree_metadata) -> dict:
    tree = getattr(tree_metadata, "tree", tree_metadata)
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves}


def with_stored_shapes(template, stored: dict):
    """`template` with every leaf that the checkpoint holds replaced by ShapeDtypeStruct(stored shape, template dtype)."""

    def leaf(path, x):
        key = path_str(path)
        return jax.ShapeDtypeStruct(stored[key][0], x.dtype) if key in stored else x

    return jax.tree_util.tree_map_with_path(leaf, template)


def check_leaves(stored: dict, template, step: int) -> None:
    """Every template leaf must be stored with the same shape and dtype, and nothing else stored."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(template)
    expected = {path_str(p): (tuple(np.shape(x)), np.dtype(x.dtype)) for p, x in leaves}
    problems = []
    for path, (shape, dtype) in expected.items():
        if path not in stored:
            problems.append(f"{path}: missing from the checkpoint")
        elif stored[path] != (shape, dtype):
            s_shape, s_dtype = stored[path]
            problems.append(f"{path}: checkpoint {s_dtype}{list(s_shape)}, model {dtype}{list(shape)}")
    problems += [f"{path}: in the checkpoint but not in the model" for path in stored if path not in expected]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise CheckpointError(
            f"checkpoint step {step} does not fit the freshly initialised state: {shown}. The vocabulary "
            f"(tokenizer/corpus) or the model code changed since it was saved; resume with the run's data and "
            f"config, or start a new run_dir."
        )


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def dict_diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    fa, fb = flatten(a), flatten(b)
    missing = object()
    diffs = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, missing), fb.get(k, missing)
        if va != vb:
            diffs.append((k, "(absent)" if va is missing else va, "(absent)" if vb is missing else vb))
    return diffs
