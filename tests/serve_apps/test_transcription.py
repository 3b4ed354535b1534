"""Speech recognition through the Serve application: real multipart uploads over HTTP to
`/v1/audio/transcriptions` on a real local Ray cluster, the `openai` client included.

The served model is the embedded tiny Whisper (random weights) with language adapters far from
the identity; every answer is checked against an independent reference (Hugging Face
`generate` on the base model with that adapter merged into the weights), and every bad upload
is followed by a request that must still succeed.
"""

from __future__ import annotations

import io
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import soundfile
import torch

import flora
from flora_platform.speech.model import ensure_embedded_whisper, load_speech_model, transcribe
from tests.flora.test_models import merge_into, randomised

from .conftest import API_KEY, http, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SENTENCES = {"de": ["Der Hund schläft im Garten.", "Die Katze liest ein Buch."],
             "fr": ["Le chien dort dans le jardin.", "Le chat lit un livre."]}
WINDOW_S = 4
ADAPTERS = {"flora-speech-de": ("flora", 2), "flora-speech-fr": ("lora", 2), "custom": ("flora", 1)}
PREFIX = "/speech"


def tone_wav(seconds: float, hz: float, rate: int = 16_000, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV of two sines: distinct clips without any audio files."""
    import wave

    t = np.arange(int(seconds * rate)) / rate
    samples = 0.4 * np.sin(2 * np.pi * hz * t) + 0.2 * np.sin(2 * np.pi * 3.1 * hz * t)
    pcm = np.repeat(np.round(samples * 32767).astype("<i2"), channels)  # interleaved frames
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
    return out.getvalue()


def decoded(data: bytes) -> np.ndarray:
    from flora_platform.speech.audio import decode_wav, to_16k

    samples, rate = decode_wav(data)
    return to_16k(samples, rate)


@pytest.fixture(scope="module")
def speech(endpoint, tmp_path_factory):
    """The tiny Whisper, adapters on disk, and the speech app deployed beside the text app."""
    from ray import serve

    root = tmp_path_factory.mktemp("speech")
    model_dir = ensure_embedded_whisper(root / "cache", SENTENCES, vocab_size=300, d_model=32, ffn_dim=64,
                                        max_target_positions=32, window_seconds=WINDOW_S)
    base, processor = load_speech_model(str(model_dir))
    base.eval()
    shapes = flora.inject(load_speech_model(str(model_dir))[0], "whisper", max_slots=2, max_rank=4).module_shapes
    adapters = {}
    for i, (name, (kind, rank)) in enumerate(ADAPTERS.items()):
        adapters[name] = randomised(flora.init_adapter(kind, rank, shapes, seed=i), 40 + i)
        adapters[name].save(root / "adapters" / name)
    args = {
        "model": {"name": str(model_dir), "served_name": "whisper-tiny", "max_slots": 4, "max_rank": 4,
                  "max_lora_rank": 4, "torch_threads": 1},
        "engine": {"max_batch_rows": 8},
        "adapters": {"directory": str(root / "adapters"), "cache_dir": str(root / "cache")},
        "registry": {"enabled": False},
        "limits": {"max_queued_requests": 16, "request_timeout_s": 60, "max_audio_bytes": 400_000},
        "deployment": {"num_replicas": 1, "num_cpus": 1, "health_check_period_s": 2},
    }
    serve.run(endpoint["build_app"](args), name="speech", route_prefix=PREFIX)
    try:
        yield {"url": endpoint["url"] + PREFIX, "base": base, "processor": processor, "adapters": adapters, "merged": {}}
    finally:
        serve.delete("speech")


def reference(speech, data: bytes, adapter: str | None, locale: str) -> str:
    """Greedy `generate` alone, on the base model with the adapter merged into its weights."""
    merged = speech["merged"]
    if adapter not in merged:
        merged[adapter] = speech["base"] if adapter is None else merge_into(speech["base"], speech["adapters"][adapter]).eval()
    limit = speech["base"].config.max_target_positions - 4
    with torch.no_grad():
        return transcribe(merged[adapter], speech["processor"], [decoded(data)], [locale], limit)[0]


def upload(url: str, fields: dict, file: bytes | None, *, filename: str = "clip.wav", key: str | None = API_KEY):
    """(status, headers, body) of one multipart POST to /v1/audio/transcriptions."""
    import urllib.error
    import urllib.request

    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    if file is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: audio/wav\r\n\r\n".encode() + file + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + "/v1/audio/transcriptions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    import json

    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


CASES = [  # (adapter, language sent, locale used, clip)
    ("flora-speech-de", None, "de", (1.0, 220.0)),
    ("flora-speech-fr", None, "fr", (1.5, 330.0)),
    ("custom", "de", "de", (0.7, 440.0)),
    (None, "fr", "fr", (1.2, 550.0)),
    ("flora-speech-de", "fr", "fr", (0.9, 660.0)),  # an explicit language wins over the name
    ("flora-speech-fr", None, "fr", (2.0, 770.0)),
    ("custom", "fr", "fr", (1.1, 880.0)),
    ("flora-speech-de", None, "de", (1.3, 990.0)),
]


def test_concurrent_uploads_for_different_adapters_equal_their_references(speech):
    clips = [tone_wav(*clip) for *_, clip in CASES]

    def send(i):
        adapter, language, _, _ = CASES[i]
        fields = {"model": adapter or "whisper-tiny", "response_format": "verbose_json"}
        if language:
            fields["language"] = language
        return upload(speech["url"], fields, clips[i])

    with ThreadPoolExecutor(len(CASES)) as pool:
        answers = list(pool.map(send, range(len(CASES))))
    for (adapter, _, locale, (seconds, _)), clip, (status, body) in zip(CASES, clips, answers):
        assert status == 200, body
        assert body["language"] == locale and body["task"] == "transcribe"
        assert body["duration"] == pytest.approx(seconds, abs=1e-3)
        assert body["text"] == reference(speech, clip, adapter, locale), adapter
    # The adapters change the transcripts, so the comparison above could fail.
    assert reference(speech, clips[0], None, "de") != reference(speech, clips[0], "flora-speech-de", "de")
    health = http("GET", speech["url"] + "/health")[2]
    assert health["engine"]["rows"] > health["engine"]["batches"]  # uploads shared batches
    assert health["forwards"]["mixed_forwards"] > 0  # ... and forwards mixed adapters


def test_the_openai_client_transcribes(speech):
    client = openai.OpenAI(base_url=speech["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    clip = tone_wav(1.0, 300.0, rate=44_100, channels=2)  # resampled and mixed down by the server
    out = client.audio.transcriptions.create(model="flora-speech-fr", file=("clip.wav", clip, "audio/wav"))
    assert out.text == reference(speech, clip, "flora-speech-fr", "fr")
    text = client.audio.transcriptions.create(model="flora-speech-de", file=("clip.wav", clip), response_format="text")
    assert text.strip() == reference(speech, clip, "flora-speech-de", "de")
    # The same samples as FLAC (lossless, 16-bit like the WAV): the same transcript.
    samples, rate = soundfile.read(io.BytesIO(clip), dtype="int16")
    flac = io.BytesIO()
    soundfile.write(flac, samples, rate, format="FLAC", subtype="PCM_16")
    out = client.audio.transcriptions.create(model="flora-speech-fr", file=("clip.flac", flac.getvalue(), "audio/flac"))
    assert out.text == reference(speech, clip, "flora-speech-fr", "fr")


@pytest.mark.parametrize(
    "fields, file, status, needle",
    [
        ({"model": "flora-speech-de"}, b"", 400, "empty"),
        ({"model": "flora-speech-de"}, b"this is not audio at all, just some text", 400, "not in a format read here"),
        ({"model": "flora-speech-de"}, "rate", 400, "sample rate"),
        ({"model": "flora-speech-de"}, "long", 400, "s long"),
        ({"model": "flora-speech-de"}, None, 400, "file"),
        ({}, "ok", 400, "model"),
        ({"model": "no-such-adapter"}, "ok", 404, "no-such-adapter"),
        ({"model": "custom"}, "ok", 400, "language"),
        ({"model": "flora-speech-de", "language": "xx"}, "ok", 400, "language"),
        ({"model": "flora-speech-de", "response_format": "srt"}, "ok", 400, "response_format"),
        ({"model": "flora-speech-de", "temperature": "0.7"}, "ok", 400, "temperature"),
        ({"model": "flora-speech-de"}, "huge", 413, "limit"),
    ],
)
def test_bad_uploads_get_clear_errors_and_the_replica_keeps_serving(speech, fields, file, status, needle):
    files = {
        "ok": tone_wav(0.5, 200.0),
        "rate": tone_wav(0.5, 200.0, rate=4_000),  # below the 8 kHz that speech needs
        "long": tone_wav(WINDOW_S + 1.0, 200.0),  # longer than this model's window
        "huge": tone_wav(20.0, 200.0, rate=16_000),  # 640 kB > limits.max_audio_bytes
    }
    got_status, body = upload(speech["url"], fields, files.get(file, file) if isinstance(file, str) else file)
    assert got_status == status, body
    assert needle in json_message(body), body
    clip = tone_wav(0.8, 250.0)
    assert upload(speech["url"], {"model": "flora-speech-de"}, clip) == (200, {"text": reference(speech, clip, "flora-speech-de", "de")})


def json_message(body) -> str:
    return body["error"]["message"] if isinstance(body, dict) and "error" in body else str(body)


def test_models_and_adapter_routes_serve_speech_adapters(speech):
    status, _, body = http("GET", speech["url"] + "/v1/models")
    assert status == 200 and {"whisper-tiny", "flora-speech-de", "custom"} <= {m["id"] for m in body["data"]}
    status, _, body = http("POST", speech["url"] + "/v1/adapters", {"model": "custom"})
    assert status == 200 and body["loaded"]
    wait_for(lambda: http("DELETE", speech["url"] + "/v1/adapters/custom")[0] == 200, 30, "unloading custom")
    clip = tone_wav(0.6, 210.0)
    assert upload(speech["url"], {"model": "custom", "language": "fr"}, clip)[1] == {"text": reference(speech, clip, "custom", "fr")}
