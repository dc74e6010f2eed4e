"""Small file helpers shared by the run directory's writers and the data caches."""

from __future__ import annotations

import os


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename: a reader never sees half a file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_npz_cache(path, arrays: dict) -> None:
    """Write a cache of arrays (.npz) through a temporary file and a rename, so a concurrent reader sees no
    file or the whole one; an unwritable cache directory is not an error (it only costs a rebuild)."""
    import numpy as np

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass
