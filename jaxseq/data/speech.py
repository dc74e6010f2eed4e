"""Speech for the audio task: espeak-ng synthesis (pip `espeakng-loader`), resampling, mu-law, WAV files.

`synthesize(text, voice)` -> int16 samples at espeak-ng's own rate (22,050 Hz), through a small ctypes
binding to the `libespeak-ng.so` that espeakng-loader bundles (synchronous output, a synth callback
that collects the chunks). `resample` is a windowed-sinc resampler (22,050 -> 16,000 Hz and back);
`mu_law_encode` / `mu_law_decode` map [-1, 1] to 256 classes and back (ITU-T G.711's curve, mu = 255,
as in WaveNet). `sentences(n)` draws English sentences from the built-in docstring corpus.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import threading
import wave
from pathlib import Path

import numpy as np

from jaxseq.errors import DataError
from jaxseq.files import save_npz_cache

ESPEAK_RATE = 22050  # what espeak_Initialize returns for synchronous output
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_lock = threading.Lock()  # espeak-ng keeps global state: one synthesis at a time
_lib = None
_chunks: list = []
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@_CALLBACK
def _collect(wav, num_samples, events):
    if num_samples > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0  # 0: go on synthesising


def _library():
    global _lib
    if _lib is not None:
        return _lib
    try:
        import espeakng_loader
    except ImportError as e:
        raise DataError("--task audio synthesises speech with espeak-ng: pip install 'jaxseq[tasks]' "
                        "(or pip install espeakng-loader).") from e
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    # the path is the folder that holds espeak-ng-data
    data_dir = str(Path(espeakng_loader.get_data_path()).parent).encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir, 0)
    if rate != ESPEAK_RATE:
        raise DataError(f"espeak-ng initialised at {rate} Hz, expected {ESPEAK_RATE}; check espeakng-loader's install.")
    lib.espeak_SetSynthCallback(_collect)
    _lib = lib
    return lib


def synthesize(text: str, voice: str) -> np.ndarray:
    """`text` spoken by espeak-ng `voice` (e.g. "en-us", "en-us+f3"): int16 [N] at ESPEAK_RATE Hz."""
    with _lock:
        lib = _library()
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataError(f"espeak-ng has no voice {voice!r}; --audio.voices takes names such as "
                            f"en-us, en, en-us+f3, en+m3, en-gb-scotland, de, fr.")
        _chunks.clear()
        data = text.encode("utf-8") + b"\0"
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        out = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
        _chunks.clear()
    if err != 0 or out.size == 0:
        raise DataError(f"espeak-ng produced no audio for {text[:40]!r} with voice {voice!r} (error {err}).")
    return out.astype(np.int16)


def resample(x: np.ndarray, rate_in: int, rate_out: int, taps: int = 32) -> np.ndarray:
    """Band-limited resampling of a 1-D signal (float64 out, N * rate_out // rate_in samples).

    Output n sits at input position p = n * rate_in / rate_out; y[n] = sum_k x[k] h(p - k) with h a
    Kaiser-windowed sinc whose cutoff is the lower Nyquist frequency (so downsampling does not alias),
    over `taps` (scaled by the cutoff) input samples either side of p; zeros outside the signal. The
    ratio is rational, so p's fractional part takes only rate_out / gcd values: h is tabulated once per
    phase (a polyphase filter).
    """
    x = np.asarray(x, np.float64)
    if rate_in == rate_out:
        return x.copy()
    g = math.gcd(int(rate_in), int(rate_out))
    up, down = rate_out // g, rate_in // g  # p = n * down / up
    cutoff = min(1.0, rate_out / rate_in)  # in units of the input's Nyquist frequency
    half = int(np.ceil(taps / cutoff))
    offsets = np.arange(-half + 1, half + 1)  # input index k = floor(p) + offset
    dist = (np.arange(up) / up)[:, None] - offsets[None, :]  # [up, 2 * half]: p - k for each phase
    window = np.i0(8.0 * np.sqrt(np.clip(1.0 - (dist / half) ** 2, 0.0, 1.0))) / np.i0(8.0)  # Kaiser, beta 8
    table = cutoff * np.sinc(cutoff * dist) * window
    n_out = len(x) * up // down
    n = np.arange(n_out)
    base, phase = (n * down) // up, (n * down) % up
    xp = np.concatenate([np.zeros(half), x, np.zeros(half + 1)])  # so every k + half indexes xp
    y = np.zeros(n_out)
    for lo in range(0, n_out, 8192):  # in blocks: the [n_out, 2 * half] gather at once would be large
        s = slice(lo, lo + 8192)
        y[s] = np.sum(xp[base[s, None] + offsets[None, :] + half] * table[phase[s]], axis=1)
    return y


def mu_law_encode(x, levels: int = 256) -> np.ndarray:
    """x in [-1, 1] (clipped) -> int32 codes 0..levels-1: sign(x) ln(1 + mu|x|) / ln(1 + mu), mu = levels-1,
    quantised into `levels` equal bins of [-1, 1]."""
    mu = levels - 1
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.clip(np.floor((y + 1.0) / 2.0 * levels), 0, levels - 1).astype(np.int32)


def mu_law_decode(codes, levels: int = 256) -> np.ndarray:
    """int codes 0..levels-1 -> float64 in [-1, 1]: the centre of each bin, expanded by the inverse curve."""
    mu = levels - 1
    y = (np.asarray(codes, np.float64) + 0.5) / levels * 2.0 - 1.0
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def trim_silence(x: np.ndarray, threshold: float = 0.01, margin: int = 400) -> np.ndarray:
    """x without the leading and trailing samples below `threshold` of full scale (keeping `margin`)."""
    loud = np.flatnonzero(np.abs(x) >= threshold * 32768)
    if loud.size == 0:
        return x[:0]
    return x[max(0, loud[0] - margin): loud[-1] + 1 + margin]


_SENTENCE = re.compile(r"(?<![\w.])([A-Z][a-z]+(?: [a-zA-Z][a-z]*,?){4,20} [a-z]+\.)(?=\s|$)")


def sentences(n: int, text: str | None = None) -> list[str]:
    """`n` plain English sentences (words and commas, 5 to 22 words) from the docstring corpus, in a fixed
    order (sorted by a hash: a deterministic function of the corpus, not of its file order)."""
    if text is None:
        from jaxseq.data.corpus import stdlib_text

        text = stdlib_text()
    found = sorted(set(_SENTENCE.findall(" ".join(text.split()))))
    found.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    if len(found) < n:
        raise DataError(f"--audio.sentences {n}: the corpus holds only {len(found)} plain sentences; ask for fewer.")
    return found[:n]


def write_wav(path, samples: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV from float samples in [-1, 1] (clipped)."""
    pcm = np.round(np.clip(np.asarray(samples, np.float64), -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(pcm.tobytes())


def read_wav(path, rate: int, *, argument: str = "--audio.sample-rate") -> np.ndarray:
    """A mono 16-bit WAV file at `rate` Hz as float64 [-1, 1]; DataError for another rate or format."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, file_rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            frames = f.readframes(f.getnframes())
    except (OSError, wave.Error, EOFError) as e:
        raise DataError(f"{path}: not a readable WAV file ({e}).") from e
    if file_rate != rate:
        raise DataError(f"{path} is sampled at {file_rate} Hz but {argument} is {rate}; resample the file to "
                        f"{rate} Hz or set {argument} {file_rate}.")
    if channels != 1 or width != 2:
        raise DataError(f"{path}: expected mono 16-bit PCM, got {channels} channel(s) of {8 * width} bits.")
    return np.frombuffer(frames, "<i2").astype(np.float64) / 32768.0


_CORPUS_FORMAT = 1  # bump when the corpus builder changes, so stale caches are not read


def speech_corpus(voices: tuple, num_sentences: int, sample_rate: int) -> dict:
    """Every one of `num_sentences` corpus sentences read by every voice, at `sample_rate` Hz, cached as .npz.

    Returns {"audio": int16 [N] (all utterances end to end), "starts", "lengths": int64 [U],
    "speaker": int32 [U] (index into `voices`), "sentence": int32 [U] (index into `sentences(n)`)},
    utterances ordered by sentence, then voice. Silence before and after each is trimmed.
    """
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        loader = version("espeakng-loader")
    except PackageNotFoundError:
        loader = "?"
    settings = {"voices": list(voices), "n": num_sentences, "rate": sample_rate, "format": _CORPUS_FORMAT,
                "espeakng_loader": loader, "python": list(sys.version_info[:3])}
    key = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:12]
    root = os.environ.get("JAXSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxseq")
    path = Path(root) / f"speech_{key}.npz"
    names = ("audio", "starts", "lengths", "speaker", "sentence")
    try:
        with np.load(path) as f:
            return {k: f[k] for k in names}
    except (OSError, KeyError, ValueError):
        pass
    pieces, speaker, sentence = [], [], []
    for i, text in enumerate(sentences(num_sentences)):
        for s, voice in enumerate(voices):
            x = resample(trim_silence(synthesize(text, voice)), ESPEAK_RATE, sample_rate)
            pieces.append(np.clip(np.round(x), -32768, 32767).astype(np.int16))
            speaker.append(s)
            sentence.append(i)
    lengths = np.array([len(p) for p in pieces], np.int64)
    arrays = {"audio": np.concatenate(pieces), "starts": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
              "lengths": lengths, "speaker": np.array(speaker, np.int32), "sentence": np.array(sentence, np.int32)}
    save_npz_cache(path, arrays)
    return arrays
