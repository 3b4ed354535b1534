"""Speech serving: one Whisper `Transcriber` per replica, shared by every request, whatever
language adapter it names.

    service = TranscriptionService(cfg, tracking_uri=...)     # Whisper + banks, the batch thread
    result = await service.transcribe("flora-speech-de@champion", wav_bytes, language=None)

A request's audio is decoded and checked here (not audio, empty, an unusable sample rate, longer
than the model's window: `BadAudio`, HTTP 400), resampled to 16 kHz and turned into log-mel
features by the model's own feature extractor; then it joins the transcriber's next batch,
where requests for different adapters share the encoder and decoder forwards.

The language token: the request's `language`, else the one the adapter's name ends with
(`flora-speech-de`, `de`), else the request is refused naming `language`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from flora.engine.transcriber import Transcriber, TranscriberConfig, TranscriptionRequest
from flora_platform.serving.config import ServeConfig
from flora_platform.serving.model import load_model
from flora_platform.serving.service import AdapterService, BadPrompt, RequestRecord
from flora_platform.serving.sources import Target
from flora_platform.speech.audio import TARGET_RATE, decode_audio, to_16k
from flora_platform.speech.model import audio_features, audio_window_seconds, language_tokens


class BadAudio(BadPrompt):
    """An upload that is not usable audio (HTTP 400 naming `file`)."""

    def __init__(self, message: str):
        super().__init__(message, "file")


@dataclass
class Transcription:
    text: str
    language: str  # the locale whose token was forced, e.g. "de"
    duration_s: float  # of the audio, as uploaded
    tokens: int
    target: Target


class TranscriptionService(AdapterService):
    def __init__(self, cfg: ServeConfig, *, tracking_uri: str = "", on_record: Callable[[RequestRecord], None] | None = None):
        model, self.processor = load_model(cfg.model)
        super().__init__(cfg, model, tracking_uri=tracking_uri, on_record=on_record)
        self.locales = [token[2:-2] for token in language_tokens(self.processor.tokenizer)]  # "<|de|>" -> "de"
        self.window_s = audio_window_seconds(self.processor)
        e = cfg.engine
        self.transcriber = Transcriber(
            self.model, loader=self.sources,
            config=TranscriberConfig(max_batch_rows=e.max_batch_rows, load_threads=e.load_threads),
        ).start()

    @property
    def alive(self) -> bool:
        return self.transcriber.alive

    def close(self) -> None:
        self.transcriber.close()
        super().close()

    async def load_adapter(self, model: str) -> Target:
        """Resolve `model` afresh and read its adapter (it enters a slot with its first request)."""
        return await self.resolve(model, fresh=True)

    def unload_key(self, key: str) -> bool:
        return self.transcriber.unload_adapter(key)

    # ------------------------------------------------------------------ requests

    def language_of(self, target: Target, language: str | None) -> str:
        if language:
            if language not in self.locales:
                raise BadPrompt(f"language {language!r} is not one of this model's {self.locales}", "language")
            return language
        if target.key is not None:
            name = target.key.removeprefix("models:/").rsplit("/", 1)[0] if target.source == "registry" else target.key
            parts = name.split("-")
            for i in range(len(parts)):  # the longest suffix that is a locale: "sv-se" before "se"
                if "-".join(parts[i:]) in self.locales:
                    return "-".join(parts[i:])
        raise BadPrompt(
            f"language: required for {target.model!r} (its name ends with no locale of this model); "
            f"one of {self.locales}", "language",
        )

    def features(self, data: bytes):
        """[mels, frames] features of an uploaded clip, and its duration; BadAudio if unusable."""
        try:
            samples, rate = decode_audio(data, max_seconds=self.window_s)
            samples = to_16k(samples, rate)
            return audio_features(self.processor, [samples])[0], len(samples) / TARGET_RATE
        except ValueError as err:  # AudioError, or longer than the window once resampling rounds up
            raise BadAudio(str(err)) from err

    async def transcribe(self, model: str, data: bytes, language: str | None, deadline_s: float) -> Transcription:
        target = await self.resolve(model)
        locale = self.language_of(target, language)
        features, duration = await asyncio.get_running_loop().run_in_executor(None, self.features, data)
        request = TranscriptionRequest(features, language=f"<|{locale}|>", adapter=target.key)
        self.admit(1)
        try:
            future = self.transcriber.submit(request)
            ids = await asyncio.wait_for(asyncio.wrap_future(future), deadline_s - time.monotonic())
        except asyncio.TimeoutError:
            request.future.cancel()
            raise TimeoutError from None
        finally:
            self.release(1)
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Transcription(text, locale, duration, len(ids), target)

    def engine_snapshot(self) -> dict:
        t = self.transcriber
        return {"generated_tokens": t.generated, "batches": t.batches, "rows": t.rows, "waiting": t.waiting}
