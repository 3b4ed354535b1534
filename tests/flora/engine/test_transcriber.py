"""The transcriber: mixed-adapter Whisper batches give each request what Hugging Face `generate`
gives it alone on the model with its adapter merged in; bad requests and adapters fail alone."""

import copy
import threading
import time

import pytest
import torch

import flora
from flora.engine import AdapterUnavailable, RequestRejected
from flora.engine.transcriber import Transcriber, TranscriberConfig, TranscriptionRequest

from tests.flora.test_models import merge_into, randomised
from tests.flora.tiny_models import WHISPER_LANGUAGES, tiny_multilingual_whisper

ADAPTERS = {"de": ("flora", 1), "fr": ("flora", 4), "it": ("lora", 2)}


@pytest.fixture(scope="module")
def setup():
    base = tiny_multilingual_whisper()
    model = copy.deepcopy(base)
    banks = flora.inject(model, "whisper", max_slots=4, max_rank=4)
    adapters = {
        name: randomised(flora.init_adapter(kind, rank, banks.module_shapes, seed=i), 20 + i)
        for i, (name, (kind, rank)) in enumerate(ADAPTERS.items())
    }
    return base, model, adapters


def features(seed: int) -> torch.Tensor:
    return torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))  # [mels, frames] of tiny_whisper


def reference(model, request: TranscriptionRequest) -> list[int]:
    out = model.generate(
        request.features[None], language=request.language, task="transcribe", do_sample=False, num_beams=1,
        max_new_tokens=request.max_new_tokens, return_dict_in_generate=True,
    )
    ids = out.sequences[0, 4:].tolist()
    return ids[: ids.index(1) + 1] if 1 in ids else ids  # up to <|endoftext|> (id 1)


def mixed_requests(n: int) -> list[TranscriptionRequest]:
    names = [None, "de", "fr", "it"]
    langs = list(WHISPER_LANGUAGES)
    return [
        TranscriptionRequest(features(i), language=langs[i % 3], adapter=names[i % 4], max_new_tokens=6 + i % 5)
        for i in range(n)
    ]


def test_mixed_batch_equals_generate_with_each_adapter_merged(setup):
    base, model, adapters = setup
    loader = adapters.__getitem__
    transcriber = Transcriber(model, loader=loader, config=TranscriberConfig(max_batch_rows=8))
    requests = mixed_requests(10)
    got = transcriber.transcribe(requests)
    merged = {name: merge_into(base, adapter) for name, adapter in adapters.items()}
    with torch.no_grad():
        for request, ids in zip(requests, got):
            expected = reference(merged[request.adapter] if request.adapter else base, request)
            assert ids == expected, (request.adapter, request.language)
            assert len(ids) <= request.max_new_tokens
    assert transcriber.batches == 2 and transcriber.rows == 10  # 8 + 2: shared forwards, not one per request
    # The adapters change the transcripts: the comparison above could fail.
    plain = [reference(base, r) for r in requests if r.adapter]
    assert plain != [ids for r, ids in zip(requests, got) if r.adapter]
    transcriber.close()


def test_background_thread_serves_concurrent_submitters(setup):
    _, model, adapters = setup
    transcriber = Transcriber(model, loader=adapters.__getitem__, config=TranscriberConfig(batch_wait_s=0.02)).start()
    try:
        requests = mixed_requests(8)
        alone = Transcriber(model, loader=adapters.__getitem__).transcribe(mixed_requests(8))
        results = [None] * len(requests)

        def send(i):
            results[i] = transcriber.submit(requests[i]).result(timeout=60)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == alone
        assert transcriber.batches < len(requests)  # requests shared batches
    finally:
        transcriber.close()


def test_bad_requests_are_rejected_naming_the_field(setup):
    _, model, adapters = setup
    transcriber = Transcriber(model, loader=lambda name: adapters[name])
    with pytest.raises(RequestRejected, match="features"):
        transcriber.submit(TranscriptionRequest(torch.randn(8, 31), language="<|de|>"))
    with pytest.raises(RequestRejected, match="language"):
        transcriber.submit(TranscriptionRequest(features(0), language="<|xx|>"))
    with pytest.raises(RequestRejected, match="max_new_tokens"):
        transcriber.submit(TranscriptionRequest(features(0), language="<|de|>", max_new_tokens=29))
    transcriber.close()


def test_an_adapter_that_fails_to_load_fails_only_its_requests(setup):
    _, model, adapters = setup

    def loader(name):
        if name == "broken":
            time.sleep(0.05)
            raise OSError("disk on fire")
        return adapters[name]

    transcriber = Transcriber(model, loader=loader).start()
    try:
        bad = transcriber.submit(TranscriptionRequest(features(1), language="<|de|>", adapter="broken"))
        good = transcriber.submit(TranscriptionRequest(features(2), language="<|fr|>", adapter="fr"))
        assert good.result(timeout=60)
        with pytest.raises(AdapterUnavailable, match="disk on fire"):
            bad.result(timeout=60)
        again = transcriber.submit(TranscriptionRequest(features(3), language="<|de|>", adapter="de"))
        assert again.result(timeout=60)
    finally:
        transcriber.close()


def test_encoder_decoder_only():
    from tests.flora.tiny_models import tiny_gpt_bigcode

    with pytest.raises(ValueError, match="Whisper"):
        Transcriber(tiny_gpt_bigcode())
