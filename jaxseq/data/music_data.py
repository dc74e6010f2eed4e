"""Music data from the `music21` wheel: Essen folk tunes as ABC text, Bach chorales as piano rolls.

Folk (`folk_tunes`): the 8,514 tunes of `music21/corpus/essenFolksong/*.abc` (or any local .abc file or
folder), split at their `X:` lines. Each tune keeps its musical header fields (M: metre, L: unit note
length, K: key, the last header line) and its body; ids and titles (X:, T:, N:, O:, R:, ...) are dropped,
so the model learns music, not catalogue numbers. Every tune is checked: a cheap structural check (the
three fields, a body with at least one note letter), then a full `music21` parse, whose verdict per
tune is cached once per source file under the JAXSEQ_CACHE folder (parsing takes ~17 ms a tune, ~2.5
min for the whole corpus, so it is never repeated). Tunes that fail either check are skipped and
counted, never a crash half-way.

Chorales (`chorale_rolls`): `music21.corpus.chorales.Iterator()`, the four-part chorales only, as binary
piano rolls [T, P] on a grid of `grid` quarter notes (0.25: sixteenth notes), pitches low..high (MIDI);
chorales with another number of parts, and notes outside the range, are counted and left out. The rolls
are cached as one .npz (parsing all takes ~48 s cold).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from jaxseq.errors import DataError

ESSEN = "essen"
# The header fields kept: metre, unit note length, key (K: ends the header in ABC).
KEEP_FIELDS = ("M", "L", "K")
_FIELD = re.compile(r"^([A-Za-z]):\s*(.*)$")
_NOTE = re.compile(r"[A-Ga-g]")
_ABC_FORMAT = 2  # bump when the tune splitting or the checks change (cached verdicts)
_ROLL_FORMAT = 1  # bump when the piano rolls change (cached .npz)
# Information fields that may also sit inside a tune body and are not music (M:, L:, K: changes are).
# Never A-G: a body line such as "A:|" is a note and a repeat sign, not a field.
_BODY_INFO = frozenset("HINOPQRSTWZ")


def cache_dir() -> Path:
    """`$JAXSEQ_CACHE/music` or `~/.cache/jaxseq/music` (as jaxseq.data.corpus)."""
    root = os.environ.get("JAXSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxseq")
    return Path(root) / "music"


def music21_version() -> str:
    import music21

    return music21.__version__


def essen_dir() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus" / "essenFolksong"


def abc_files(source: str) -> list[Path]:
    """The .abc files of `source`: "essen" (the Essen collection in music21), a file, or a folder."""
    if source == ESSEN:
        path = essen_dir()
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.abc") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"--music.source {source!r}: no such file or folder; use 'essen' (the Essen folk songs "
                        f"in music21) or a local .abc file or folder of .abc files.")
    if not files:
        raise DataError(f"--music.source {source!r} holds no .abc files.")
    return files


# ---------------------------------------------------------------------------------------------------
# Folk tunes (ABC)


def split_tunes(text: str) -> list[str]:
    """An ABC file's text -> its tunes as 'M:..\\nL:..\\nK:..\\n<body lines>\\n'.

    A tune starts at an `X:` line; within it, header lines until `K:` keep only KEEP_FIELDS; body lines
    are kept as they are (stripped), comment lines (%) and blank lines dropped. A tune whose header lacks
    a kept field comes back without it (the structural check then rejects it).
    """
    tunes, cur = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("X:"):
            if cur is not None:
                tunes.append(cur)
            cur = {"fields": {}, "body": [], "in_header": True}
            continue
        if cur is None or not line or line.startswith("%"):
            continue
        m = _FIELD.match(line)
        if cur["in_header"] and m:
            key, value = m.group(1), m.group(2).strip()
            if key in KEEP_FIELDS:
                cur["fields"].setdefault(key, value)
            if key == "K":
                cur["in_header"] = False
            continue
        if m and m.group(1) in _BODY_INFO:
            continue  # information fields inside the body (e.g. a second title or a note): not music
        cur["body"].append(line)
    if cur is not None:
        tunes.append(cur)
    return [_join(t) for t in tunes]


def _join(t: dict) -> str:
    head = "".join(f"{k}:{t['fields'][k]}\n" for k in KEEP_FIELDS if k in t["fields"])
    return head + "".join(line + "\n" for line in t["body"])


def structure_ok(tune: str) -> bool:
    """Cheap check: the M:, L:, K: header lines, then a body holding at least one note letter, ASCII only."""
    lines = tune.splitlines()
    if len(lines) < 4 or [ln[:2] for ln in lines[:3]] != ["M:", "L:", "K:"]:
        return False
    body = "\n".join(lines[3:])
    return tune.isascii() and bool(_NOTE.search(body))


def parse_tune(tune: str):
    """The music21 Score of one tune (as `split_tunes` gives it), or None when music21 cannot read it or
    it holds no note."""
    from music21 import converter

    try:
        score = converter.parse("X:1\n" + tune, format="abc")
        return score if len(score.flatten().notes) > 0 else None
    except Exception:  # noqa: BLE001 -- music21 raises many types on bad ABC; all mean "not a valid tune"
        return None


def folk_tunes(source: str = ESSEN) -> tuple[list[str], dict]:
    """(valid tunes in file order, stats). stats: {"files", "tunes", "skipped_structure", "skipped_parse"}.

    The music21 verdicts are cached per file (keyed by its content and the music21 version).
    """
    tunes, stats = [], {"files": 0, "tunes": 0, "skipped_structure": 0, "skipped_parse": 0}
    for path in abc_files(source):
        raw = path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        file_tunes = split_tunes(text)
        verdicts = _cached_verdicts(path.name, raw, file_tunes)
        stats["files"] += 1
        stats["tunes"] += len(file_tunes)
        for tune, verdict in zip(file_tunes, verdicts):
            if verdict == "ok":
                tunes.append(tune)
            else:
                stats[f"skipped_{verdict}"] += 1
    if not tunes:
        raise DataError(f"--music.source {source!r}: none of its {stats['tunes']} tunes is valid ABC that music21 "
                        f"parses ({stats}); point it at ABC tunes with M:, L: and K: header lines.")
    return tunes, stats


def _cached_verdicts(name: str, raw: bytes, tunes: list[str]) -> list[str]:
    """Per tune "ok" | "structure" | "parse", computed once per file content and music21 version."""
    digest = hashlib.sha256(raw + f"|{music21_version()}|{_ABC_FORMAT}".encode()).hexdigest()[:16]
    path = cache_dir() / f"abc_check_{Path(name).stem}_{digest}.json"
    try:
        verdicts = json.loads(path.read_text())
        if isinstance(verdicts, list) and len(verdicts) == len(tunes):
            return verdicts
    except (OSError, ValueError):
        pass
    verdicts = [("ok" if parse_tune(t) is not None else "parse") if structure_ok(t) else "structure" for t in tunes]
    _write_atomically(path, json.dumps(verdicts).encode())
    return verdicts


def split_by_tune(tunes: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A fixed permutation of the tunes (seed 0: the same for every run), the last val_fraction held out."""
    order = np.random.default_rng(seed).permutation(len(tunes))
    n_val = max(1, int(round(len(tunes) * val_fraction)))
    if n_val >= len(tunes):
        raise DataError(f"{len(tunes)} valid tunes cannot be split with val_fraction={val_fraction}; "
                        f"use more tunes or a smaller --music.val-fraction.")
    return [tunes[i] for i in order[:-n_val]], [tunes[i] for i in order[-n_val:]]


# ---------------------------------------------------------------------------------------------------
# Chorales (piano rolls)


def chorale_rolls(grid: float, low: int, high: int, max_chorales: int = 0) -> tuple[list[np.ndarray], dict]:
    """(rolls: uint8 [T_i, high - low + 1] per four-part chorale, stats), cached as .npz.

    stats: {"chorales", "skipped_parts", "notes", "notes_out_of_range"}. max_chorales > 0 reads only the
    first that many of the iterator (quick runs).
    """
    key = f"{music21_version()}|{grid}|{low}|{high}|{max_chorales}|{_ROLL_FORMAT}"
    path = cache_dir() / f"chorales_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    try:
        with np.load(path) as z:
            lengths, frames = z["lengths"], z["frames"]
            stats = json.loads(str(z["stats"]))
        return np.split(frames, np.cumsum(lengths)[:-1]), stats
    except (OSError, ValueError, KeyError):
        pass
    from music21 import corpus

    rolls, stats = [], {"chorales": 0, "skipped_parts": 0, "notes": 0, "notes_out_of_range": 0}
    for i, score in enumerate(corpus.chorales.Iterator()):
        if max_chorales and i >= max_chorales:
            break
        if len(score.parts) != 4:
            stats["skipped_parts"] += 1
            continue
        rolls.append(score_to_roll(score, grid, low, high, stats))
        stats["chorales"] += 1
    if not rolls:
        raise DataError("no four-part chorale was read from music21's corpus; check the music21 install.")
    lengths = np.array([len(r) for r in rolls], np.int64)
    buf = _npz_bytes(frames=np.concatenate(rolls), lengths=lengths, stats=np.array(json.dumps(stats)))
    _write_atomically(path, buf)
    return rolls, stats


def score_to_roll(score, grid: float, low: int, high: int, stats: dict | None = None) -> np.ndarray:
    """A music21 score -> uint8 [T, high - low + 1]: frame t is on for pitch p when a note sounds during
    [t * grid, (t + 1) * grid) quarter notes. Notes shorter than one frame keep one frame."""
    notes = []
    for part in score.parts:
        for n in part.flatten().notes:
            start = int(round(float(n.offset) / grid))
            end = max(start + 1, int(round(float(n.offset + n.quarterLength) / grid)))
            if n.quarterLength == 0:
                continue  # grace notes take no time
            for p in n.pitches:
                notes.append((start, end, int(p.midi)))
    T = max((e for _, e, _ in notes), default=0)
    roll = np.zeros((T, high - low + 1), np.uint8)
    for start, end, midi in notes:
        if stats is not None:
            stats["notes"] = stats.get("notes", 0) + 1
        if low <= midi <= high:
            roll[start:end, midi - low] = 1
        elif stats is not None:
            stats["notes_out_of_range"] = stats.get("notes_out_of_range", 0) + 1
    return roll


def roll_to_stream(roll: np.ndarray, grid: float, low: int, bpm: float = 80.0):
    """A binary roll [T, P] -> a music21 Part of notes (notes at one offset sound together); a pitch on in
    consecutive frames is one held note (a piano roll cannot tell a repeated note from a held one)."""
    from music21 import note, stream, tempo

    part = stream.Part()
    part.insert(0, tempo.MetronomeMark(number=bpm))
    roll = np.asarray(roll, bool)
    T, P = roll.shape
    padded = np.vstack([np.zeros((1, P), bool), roll, np.zeros((1, P), bool)])
    for p in range(P):
        on = np.flatnonzero(padded[1:-1, p] & ~padded[:-2, p])
        off = np.flatnonzero(~padded[2:, p] & padded[1:-1, p]) + 1
        for s, e in zip(on, off):
            n = note.Note(midi=low + p, quarterLength=(e - s) * grid)
            part.insert(float(s * grid), n)
    if not len(part.notes):
        part.insert(0, note.Rest(quarterLength=max(T, 1) * grid))
    return part


# ---------------------------------------------------------------------------------------------------
# Rendering


def write_midi_wav(score, midi_path: Path, wav_path: Path | None, fs: int = 8000) -> None:
    """Write a music21 stream to a MIDI file and (wav_path) its sine-wave rendering (pretty_midi) as 16-bit WAV.

    8 kHz: sine tones of these pitches (up to ~1.5 kHz) need no more, and a minute of audio stays under 1 MB.
    """
    from music21 import midi

    try:
        mf = midi.translate.music21ObjectToMidiFile(score)
    except Exception:  # noqa: BLE001 -- music21 parses some ABC it cannot export as is (e.g. metres such as
        # 4/2 whose TimeSignature lands twice in the conductor track): the same notes and rests, no metre.
        mf = midi.translate.music21ObjectToMidiFile(score.flatten().notesAndRests.stream())
    mf.open(str(midi_path), "wb")
    try:
        mf.write()
    finally:
        mf.close()
    if wav_path is None:
        return
    import wave

    import pretty_midi

    audio = pretty_midi.PrettyMIDI(str(midi_path)).synthesize(fs=fs)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    pcm = (audio / peak * 0.9 * 32767).astype(np.int16) if peak > 0 else np.zeros(max(audio.size, 1), np.int16)
    with wave.open(str(wav_path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(fs)
        w.writeframes(pcm.tobytes())


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """A concurrent reader sees no cache or the whole file; an unwritable cache only costs a rebuild."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        pass
