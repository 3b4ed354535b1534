"""WAV decoding and resampling against WAVs written by the standard library and known tones."""

import io
import struct
import wave

import numpy as np
import pytest
import soundfile

from flora_platform.speech.audio import AudioError, check_samples, decode_audio, decode_wav, to_16k


def wav_bytes(frames: np.ndarray, rate: int, width: int = 2) -> bytes:
    """frames [N, C] of integer PCM values -> WAV bytes, written by `wave` (not the code under test)."""
    frames = np.asarray(frames)
    assert frames.ndim == 2, "frames are [N, C]"
    dtype = {1: "u1", 2: "<i2", 3: None, 4: "<i4"}[width]
    if width == 3:  # no numpy dtype: little-endian 3-byte ints
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in frames.ravel())
    else:
        raw = frames.astype(dtype).tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


def sine(freq_hz: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq_hz * t)


def peak_frequency_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100])
@pytest.mark.parametrize("channels", [1, 2])
def test_round_trip_keeps_length_and_frequency(rate, channels):
    tone = sine(440.0, rate)
    # Stereo: the tone on the left only, so the mix-down must halve it.
    frames = np.stack([tone] + [np.zeros_like(tone)] * (channels - 1), axis=1)
    samples, got_rate = decode_wav(wav_bytes(np.round(frames * 32767), rate))
    assert got_rate == rate and samples.dtype == np.float32 and samples.shape == (rate,)
    assert np.abs(samples).max() == pytest.approx(0.5 / channels, abs=1e-3)

    resampled = to_16k(samples, rate)
    assert resampled.dtype == np.float32 and resampled.shape == (16_000,)  # 1 s at 16 kHz
    assert peak_frequency_hz(resampled, 16_000) == pytest.approx(440.0, abs=2.0)
    assert np.abs(resampled[1000:-1000]).max() == pytest.approx(0.5 / channels, rel=0.02)


def test_content_above_8khz_is_filtered_not_aliased():
    # Dropping samples without a low-pass filter would fold a 10 kHz tone to 6 kHz at full amplitude.
    resampled = to_16k(sine(10_000.0, 44_100).astype(np.float32), 44_100)
    assert np.sqrt(np.mean(resampled[1000:-1000] ** 2)) < 0.01


@pytest.mark.parametrize("width,pcm,expected", [
    (1, [128, 255, 0], [0.0, 127 / 128, -1.0]),  # 8-bit is unsigned around 128
    (2, [0, 16384, -32768], [0.0, 0.5, -1.0]),
    (4, [0, 2**30, -(2**31)], [0.0, 0.5, -1.0]),
])
def test_sample_widths_scale_to_unit_range(width, pcm, expected):
    samples, _ = decode_wav(wav_bytes(np.array(pcm)[:, None], 16_000, width=width))
    np.testing.assert_allclose(samples, expected, atol=1e-6)


def float_wav_bytes() -> bytes:
    """An IEEE-float WAV (format tag 3), which `wave` cannot read."""
    data = np.zeros(100, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16_000, 64_000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("data,kwargs,message", [
    (b"", {}, r"empty \(0 bytes\).*WAV \(PCM 8/16/32-bit\), FLAC, MP3 or OGG"),
    (b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00mp3 frames", {}, r"not in a format read here.*ID3.*FLAC, MP3 or OGG"),
    (b"this is not audio at all", {}, r"not in a format read here"),
    (b"RIFF", {}, r"not a WAV file"),
    (wav_bytes(np.zeros((0, 1)), 16_000), {}, r"no audio frames"),
    (wav_bytes(np.zeros((10, 1)), 16_000, width=3), {}, r"unsupported sample width 24-bit.*8/16/32-bit"),
    (wav_bytes(np.zeros((10, 1)), 4_000), {}, r"sample rate 4000 Hz is outside 8000\.\.96000 Hz"),
    (wav_bytes(np.zeros((10, 1)), 192_000), {}, r"sample rate 192000 Hz"),
    (wav_bytes(np.zeros((16_000, 1)), 16_000), {"max_seconds": 0.5}, r"1\.0 s long, more than max_seconds=0\.5.*shorter clips"),
    (float_wav_bytes(), {}, r"cannot read WAV: unknown format: 3"),
])
def test_bad_audio_is_rejected_with_a_reason(data, kwargs, message):
    with pytest.raises(AudioError, match=message):
        decode_audio(data, **kwargs)


def encoded(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt, tolerance", [("FLAC", 1e-4), ("OGG", None), ("MP3", None)])
def test_flac_ogg_and_mp3_decode_to_the_same_tone(fmt, tolerance):
    """Common Voice ships MP3: compressed clips decode, mixed to mono, without ffmpeg."""
    rate = 22_050
    t = np.arange(rate) / rate
    tone = 0.4 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone, tone], axis=1)  # [N, 2]
    samples, got_rate = decode_audio(encoded(stereo, rate, fmt))
    assert got_rate == rate and samples.dtype == np.float32 and samples.ndim == 1
    if tolerance:  # lossless
        np.testing.assert_allclose(samples, tone, atol=tolerance)
    else:  # lossy, and MP3 adds encoder delay: compare the spectrum's peak and the level
        spectrum = np.abs(np.fft.rfft(samples[: rate // 2]))
        assert abs(np.argmax(spectrum) * 2 - 440) <= 4
        assert 0.2 < np.abs(samples).max() < 0.6
    with pytest.raises(AudioError, match=r"more than max_seconds=0\.5"):
        decode_audio(encoded(stereo, rate, fmt), max_seconds=0.5)
    with pytest.raises(AudioError, match=r"sample rate 4000 Hz is outside"):
        decode_audio(encoded(tone[:4000], 4000, "FLAC"))


def test_default_limit_is_whisper_window():
    decode_wav(wav_bytes(np.zeros((8_000 * 30, 1)), 8_000))  # exactly 30 s: accepted
    with pytest.raises(AudioError, match="30.1 s long"):
        decode_wav(wav_bytes(np.zeros((8_000 * 30 + 800, 1)), 8_000))


def test_arrays_from_datasets_are_checked_and_scaled():
    np.testing.assert_allclose(check_samples(np.array([0, 16384, -32768], dtype=np.int16), 16_000), [0.0, 0.5, -1.0])
    np.testing.assert_allclose(check_samples(np.array([[1.0, 0.0], [0.5, 0.5]]), 16_000), [0.5, 0.5])
    for bad, message in [(np.array([]), "empty"), (np.array([0.0, np.nan]), "NaN"), (np.zeros((2, 2, 2)), "shape")]:
        with pytest.raises(AudioError, match=message):
            check_samples(bad, 16_000)
    with pytest.raises(AudioError, match="sample rate 1000 Hz"):
        check_samples(np.zeros(10), 1_000)
