"""Text corpora: the always-present stdlib-docstring corpus, local files and folders, Hugging Face hub datasets.

`load_text(source)` returns one string. Local files and hub datasets both go through HF `datasets`
(`load_dataset`), so every format it reads (text, JSON lines, CSV, Parquet) arrives the same way.
`datasets` is imported inside the functions that need it: `import jaxseq` stays fast.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import sys
import sysconfig
import tempfile
import urllib.parse
from pathlib import Path

from jaxseq.errors import DataError

STDLIB = "stdlib"
# The stdlib corpus without the packages that `--task stdlib_docs` classifies: text for pretraining a
# language model that has never read a document of that task.
STDLIB_UNLABELLED = "stdlib-unlabelled"
# Ten large packages present in every Python >= 3.11 (their docstrings are the classes of stdlib_docs).
DOC_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "tkinter", "unittest",
                "urllib", "xml")

# Bump when the stdlib corpus builder changes, so stale caches are not read.
_STDLIB_FORMAT = 1
# Folders of the standard library whose docstrings are not the library's own English prose
# (test suites, bundled third-party code, the IDLE and turtle demos, bundled wheels, generated data).
_STDLIB_SKIP = {
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
    "ensurepip", "pydoc_data", "__pycache__", "__phello__", "venv",
}
# Printable ASCII plus newline: keeps the character vocabulary at ~95 symbols.
_KEEP = frozenset(chr(c) for c in range(32, 127)) | {"\n"}

# Local files by suffix -> the `datasets` builder that reads them.
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(:[\w.\-]+)?$")

ACCEPTED = (
    "'stdlib' (docstrings of Python's standard library, always present); "
    "'stdlib-unlabelled' (the same without the packages that --task stdlib_docs classifies); "
    "a local text file, a folder of *.txt files, or a .jsonl/.json/.csv/.parquet file with a text column; "
    "or a Hugging Face hub dataset name such as 'owner/name' or 'name:config' (needs the network or the "
    "HF cache with HF_HUB_OFFLINE=1)"
)


def load_text(source: str, text_column: str = "text") -> str:
    """The corpus named by `source` as one string.

    `source` is "stdlib", a local path (file or folder), or a Hugging Face hub dataset name
    (`"owner/name"`, or `"name:config"` for datasets with several configurations; split "train").
    Raises DataError when the source cannot be found or holds no text.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source must be a non-empty string, got {source!r}; accepted: {ACCEPTED}.")
    if source == STDLIB:
        text = stdlib_text()
    elif source == STDLIB_UNLABELLED:
        text = stdlib_text(exclude_packages=DOC_PACKAGES)
    else:
        path = Path(source).expanduser()
        if path.exists():
            text = _load_local(path, text_column)
        elif _looks_like_path(source):
            raise DataError(f"data source {source!r}: no such file or folder. Accepted: {ACCEPTED}.")
        else:
            text = _load_hub(source, text_column)
    if not text.strip():
        raise DataError(f"data source {source!r} holds no text (the corpus is empty); point --char-lm.source at some text.")
    return text


# ---------------------------------------------------------------------------------------------------
# The stdlib corpus


def stdlib_cache_path(exclude_packages: tuple = ()) -> Path:
    """Where the stdlib corpus is cached: `$JAXSEQ_CACHE/` (a folder) or `~/.cache/jaxseq/`."""
    root = os.environ.get("JAXSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxseq")
    ver = ".".join(str(v) for v in sys.version_info[:3])
    without = "".join(f"-{p}" for p in exclude_packages)
    return Path(root) / f"stdlib_docstrings{without}_{ver}_v{_STDLIB_FORMAT}.txt"


def stdlib_text(exclude_packages: tuple = ()) -> str:
    """The stdlib docstring corpus (~1.5 MB of English; ~1 MB without DOC_PACKAGES), built on first use and
    then read from the cache. exclude_packages: top-level packages whose docstrings are left out."""
    path = stdlib_cache_path(tuple(exclude_packages))
    try:
        text = path.read_text(encoding="utf-8")
        if text:
            return text
    except (OSError, UnicodeDecodeError):
        pass
    text = build_stdlib_text(exclude_packages=tuple(exclude_packages)) if exclude_packages else build_stdlib_text()
    try:
        # Atomic: a concurrent reader sees either no cache or the whole file.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shareable
        os.replace(tmp, path)
    except OSError:
        pass  # An unwritable cache only costs a rebuild next time.
    return text


def build_stdlib_text(root: str | None = None, exclude_packages: tuple = ()) -> str:
    """Docstrings (module, class, function) of every stdlib `.py` file under `root`, in source order.

    Files are parsed with `ast`, never imported (importing the stdlib runs code and is slow). Walks
    folders and files in sorted order and keeps the first copy of repeated docstrings, so the text is
    a deterministic function of the Python installation. exclude_packages: top-level folders left out.
    """
    seen: set[str] = set()
    docs: list[str] = []
    for module, doc in stdlib_docstrings(root):
        if module.split("/")[0] in exclude_packages:
            continue
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return "\n\n".join(docs) + "\n"


def stdlib_docstrings(root: str | None = None):
    """Yield (module path relative to `root` with "/" separators, docstring) over the stdlib's `.py` files.

    The walk of `build_stdlib_text`: sorted, test suites and bundled code skipped, each docstring cleaned
    (cleandoc, printable ASCII and newlines only, stripped) and non-empty; repeats are not removed here.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith((".", "config-")))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, ValueError, OSError, RecursionError):
                continue
            module = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            for doc in _docstrings(tree):
                doc = "".join(c for c in doc if c in _KEEP).strip()
                if doc:
                    yield module, doc


def _docstrings(node):
    """Docstrings of `node` and of every def/class nested in it, in source order (cleaned by inspect.cleandoc)."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)  # clean=True is inspect.cleandoc
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.expr):  # defs live in statements (if/try/with bodies too)
            yield from _docstrings(child)


# ---------------------------------------------------------------------------------------------------
# Local files and hub datasets, through HF datasets


def _looks_like_path(source: str) -> bool:
    """A source that cannot be a hub name ("owner/name") is reported as a missing file, without the network."""
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or Path(source).suffix.lower() in _BUILDERS
    )


def _load_local(path: Path, text_column: str) -> str:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data source {str(path)!r} is a folder with no *.txt files in it; the corpus is empty.")
        builder = "text"
    else:
        files = [path]
        builder = _BUILDERS.get(path.suffix.lower(), "text")  # unknown suffix: read it as plain text
    import datasets

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        # Streaming reads the files directly, without writing an Arrow copy to the HF cache.
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs)
        rows = list(ds)
    except Exception as e:  # noqa: BLE001 -- datasets raises many types; all mean "could not read it"
        raise DataError(f"could not read data source {str(path)!r} as {builder!r} with HF datasets: {e}") from e
    column = "text" if builder == "text" else text_column
    if rows and column not in rows[0]:
        raise DataError(
            f"data source {str(path)!r} has no column {column!r} (columns: {sorted(rows[0])}); "
            f"pass --char-lm.text-column with the column that holds the text."
        )
    return _join([r[column] for r in rows], str(path), column)


def _load_hub(source: str, text_column: str) -> str:
    if not _HUB_NAME.match(source):
        raise DataError(f"data source {source!r} is neither a local path nor a valid hub dataset name. Accepted: {ACCEPTED}.")
    import datasets
    import huggingface_hub

    name, _, config = source.partition(":")
    offline = datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE
    if not offline and not _hub_reachable(huggingface_hub.constants.ENDPOINT):
        # Without this check an unreachable hub costs ~25 s of retries before the same answer.
        raise DataError(
            f"data source {source!r} is not a local path, and the Hugging Face hub "
            f"({huggingface_hub.constants.ENDPOINT}) cannot be reached to look it up as a dataset; if it is "
            f"in your HF cache, set HF_HUB_OFFLINE=1. Accepted: {ACCEPTED}."
        )
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # noqa: BLE001 -- not found, offline, gated: all mean "not reachable"
        raise DataError(
            f"data source {source!r} is neither a local path nor a reachable hub dataset "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Accepted: {ACCEPTED}."
        ) from e
    if text_column not in ds.column_names:
        raise DataError(
            f"hub dataset {source!r} has no column {text_column!r} (columns: {ds.column_names}); "
            f"pass --char-lm.text-column with the column that holds the text."
        )
    return _join(ds[text_column], source, text_column)


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _join(texts, source: str, column: str) -> str:
    """Documents joined into one text, each ending in a newline except possibly the last (None rows skipped)."""
    parts = []
    for t in texts:
        if t is None:
            continue
        if not isinstance(t, str):
            raise DataError(f"column {column!r} of data source {source!r} holds {type(t).__name__} values, not text.")
        if parts and not parts[-1].endswith("\n"):
            parts[-1] += "\n"
        parts.append(t)
    return "".join(parts)
