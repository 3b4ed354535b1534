"""Audio in and out: audio file bytes -> mono float32 samples, checks, resampling to Whisper's 16 kHz.

`decode_audio` reads PCM WAV with the standard library's `wave` and FLAC, MP3 (what Common Voice
ships) and OGG through libsndfile (the `soundfile` wheel bundles it, so no ffmpeg is needed).
Samples are float32 in [-1, 1], shape `[N]` (mono).
"""

from __future__ import annotations

import io
import math
import wave
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

TARGET_RATE = 16_000  # what Whisper's feature extractor expects
MIN_RATE, MAX_RATE = 8_000, 96_000
MAX_SECONDS = 30.0  # Whisper sees one 30 s window; longer clips would be cut silently
SAMPLE_WIDTHS = {1: "8-bit", 2: "16-bit", 4: "32-bit"}
ACCEPTED = "a WAV (PCM 8/16/32-bit), FLAC, MP3 or OGG file, mono or stereo, 8-96 kHz"


class AudioError(ValueError):
    """Audio that cannot be used: the message names the problem and what is accepted."""


def decode_audio(data: bytes, *, max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, int]:
    """WAV, FLAC, MP3 or OGG bytes -> (samples [N] float32 in [-1, 1], mono; sample rate in Hz)."""
    if not data:
        raise AudioError(f"audio is empty (0 bytes); expected {ACCEPTED}")
    if data[:4] == b"RIFF":
        return decode_wav(data, max_seconds=max_seconds)
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            _check_rate(rate)
            _check_duration(f.frames, rate, max_seconds)  # from the header: long files are refused cheaply
            samples = f.read(dtype="float32", always_2d=True)  # [N, C]
    except soundfile.LibsndfileError as err:
        raise AudioError(f"audio is not in a format read here (starts with {data[:12]!r}: {err}); expected {ACCEPTED}") from err
    if not samples.size:
        raise AudioError(f"audio has no frames; expected {ACCEPTED}")
    _check_duration(len(samples), rate, max_seconds)  # an MP3 header's frame count is an estimate
    return samples.mean(axis=1).astype(np.float32), rate


def decode_wav(data: bytes, *, max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, int]:
    """PCM WAV bytes -> (samples [N] float32 in [-1, 1], mono; sample rate in Hz).

    Channels are averaged into one. 8-bit WAV is unsigned (silence at 128), wider is signed.
    """
    if not data:
        raise AudioError(f"audio is empty (0 bytes); expected {ACCEPTED}")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"audio is not a WAV file (no RIFF/WAVE header, starts with {data[:12]!r}); expected {ACCEPTED}")
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate, n_frames = wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
            if width not in SAMPLE_WIDTHS:
                raise AudioError(f"unsupported sample width {8 * width}-bit; expected {ACCEPTED}")
            _check_rate(rate)
            # Checked on the header before reading, so an hour-long file is refused cheaply.
            _check_duration(n_frames, rate, max_seconds)
            raw = wav.readframes(n_frames)
    except (wave.Error, EOFError) as err:
        # e.g. "unknown format: 3" for IEEE-float WAV, or a truncated header.
        raise AudioError(f"cannot read WAV: {err}; expected {ACCEPTED}") from err
    frame_bytes = channels * width
    raw = raw[: len(raw) - len(raw) % frame_bytes]  # a truncated file may end mid-frame
    if not raw:
        raise AudioError(f"WAV has no audio frames (header says {n_frames}); expected {ACCEPTED}")
    samples = _pcm_to_float(raw, width).reshape(-1, channels).mean(axis=1)  # [N, C] -> [N]
    return samples.astype(np.float32), rate


def check_samples(samples, sample_rate: int, *, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """An array of samples from elsewhere (a dataset's decoded audio) -> checked float32 [N].

    Integer arrays are scaled by their type's range; 2-D arrays are taken as [N, C] and mixed.
    """
    array = np.asarray(samples)
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        array = (array.astype(np.float64) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    elif array.dtype.kind != "f":
        raise AudioError(f"audio array has dtype {array.dtype}; expected numbers (float or integer PCM)")
    if array.ndim == 2:
        array = array.mean(axis=1)
    if array.ndim != 1:
        raise AudioError(f"audio array has shape {array.shape}; expected [samples] or [samples, channels]")
    if array.size == 0:
        raise AudioError("audio array is empty (0 samples)")
    if not np.isfinite(array).all():
        raise AudioError("audio array holds NaN or infinite samples")
    _check_rate(sample_rate)
    _check_duration(array.size, sample_rate, max_seconds)
    return array.astype(np.float32)


def to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resample [N] samples from `sample_rate` to 16 kHz: [round(N * 16000 / sample_rate)].

    resample_poly low-pass filters before decimating, so content above 8 kHz is removed instead
    of folding back into the speech band.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if sample_rate == TARGET_RATE:
        return samples.copy()
    _check_rate(sample_rate)
    divisor = math.gcd(TARGET_RATE, sample_rate)
    return resample_poly(samples, TARGET_RATE // divisor, sample_rate // divisor).astype(np.float32)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write [N] float samples as a mono 16-bit PCM WAV (values beyond [-1, 1] are clipped)."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    dtype = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(raw, dtype=dtype).astype(np.float64) / float(2 ** (8 * width - 1))


def _check_rate(rate: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz; expected {ACCEPTED}")


def _check_duration(n_samples: int, rate: int, max_seconds: float) -> None:
    seconds = n_samples / rate
    if seconds > max_seconds:
        raise AudioError(
            f"audio is {seconds:.1f} s long, more than max_seconds={max_seconds:g} "
            f"(Whisper sees {MAX_SECONDS:g} s at a time); cut it into shorter clips"
        )
