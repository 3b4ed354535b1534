"""The embedded Whisper: built, cached, loaded like a hub model; prompts, batches, greedy decoding, FLoRA."""

import logging
import re

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

import flora
from flora_platform.speech import model as speech_model
from flora_platform.speech.corpus import SpeechExample
from flora_platform.speech.model import (
    MARKER_NAME,
    ExamplePool,
    decoder_prompt,
    encode_batch,
    ensure_embedded_whisper,
    load_speech_model,
    pretrain,
    transcribe,
    transcribe_ids,
)

SENTENCES = {
    "de": ["Der Hund läuft über die Straße.", "Die Katze schläft heute im Garten.", "Das Mädchen liest ein Buch."],
    "fr": ["Le chat est très calme.", "L'enfant aime l'école.", "La fenêtre est ouverte aujourd'hui."],
}
TINY = dict(vocab_size=300, max_target_positions=32)
RATE = 16_000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and 2 threads on shared cores can be far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("whisper")
    return cache, ensure_embedded_whisper(cache, SENTENCES, **TINY)


@pytest.fixture(scope="module")
def loaded(built):
    model, processor = load_speech_model(str(built[1]))
    return model.eval(), processor


def tone(seconds: float, hz: float, seed: int) -> np.ndarray:
    """A sine with a little noise: distinct clips without any audio files."""
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (0.5 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def example(locale: str, sentence: str, hz: float, seed: int = 0) -> SpeechExample:
    return SpeechExample(audio=tone(1.0, hz, seed), sentence=sentence, locale=locale, split="train")


def test_loads_back_as_a_whisper_model_with_the_built_weights(built, loaded):
    cache, path = built
    model, processor = loaded
    assert [p.name for p in cache.iterdir()] == [path.name] and speech_model.is_complete(path)
    assert isinstance(model, WhisperForConditionalGeneration) and isinstance(processor, WhisperProcessor)
    assert model.config.d_model == 64 and model.config.encoder_layers == model.config.decoder_layers == 2
    assert model.config.vocab_size == len(processor.tokenizer)
    # The build seeds torch and then initialises: the same weights again, independently of the file.
    torch.manual_seed(0)
    fresh = WhisperForConditionalGeneration(model.config).eval()
    features = torch.randn(2, 80, 3000)
    decoder = torch.tensor([decoder_prompt(processor.tokenizer, "de"), decoder_prompt(processor.tokenizer, "fr")])
    with torch.no_grad():
        expected = fresh(input_features=features, decoder_input_ids=decoder).logits
        got = model(input_features=features, decoder_input_ids=decoder).logits
    torch.testing.assert_close(got, expected)
    fe = processor.feature_extractor
    assert (fe.feature_size, fe.sampling_rate, fe.chunk_length) == (80, RATE, 30)


def test_tokenizer_round_trips_accented_text_and_has_whispers_special_tokens(loaded):
    _, processor = loaded
    tok = processor.tokenizer
    for sentence in ("Der Hund läuft über die Straße.", "L'enfant aime l'école, où il fête Noël!"):
        ids = tok(sentence, add_special_tokens=False).input_ids
        assert tok.decode(ids) == sentence
        assert tok.decode(decoder_prompt(tok, "fr") + ids + [tok.eos_token_id], skip_special_tokens=True) == sentence
    order = ["<|endoftext|>", "<|startoftranscript|>", "<|de|>", "<|fr|>", "<|translate|>", "<|transcribe|>",
             "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    ids = tok.convert_tokens_to_ids(order)
    assert tok.convert_ids_to_tokens(ids) == order
    assert ids[1:] == list(range(ids[1], ids[1] + len(order) - 1))  # Whisper's order, contiguous
    assert ids[-1] == len(tok) - 1  # nothing above <|notimestamps|>: generate() reads those as timestamps


def test_generation_config_knows_languages_and_tasks(loaded):
    model, processor = loaded
    gc, ids = model.generation_config, processor.tokenizer.convert_tokens_to_ids
    assert gc.lang_to_id == {"<|de|>": ids("<|de|>"), "<|fr|>": ids("<|fr|>")}
    assert gc.task_to_id == {"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")}
    assert gc.no_timestamps_token_id == ids("<|notimestamps|>") and gc.is_multilingual
    assert gc.decoder_start_token_id == model.config.decoder_start_token_id == ids("<|startoftranscript|>")
    assert model.config.eos_token_id == processor.tokenizer.eos_token_id


def test_second_call_is_a_cache_hit_and_other_settings_are_not(built, monkeypatch):
    cache, path = built
    mtime = (path / MARKER_NAME).stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(speech_model, "_build", no_build)
    assert ensure_embedded_whisper(cache, SENTENCES, **TINY) == path
    assert (path / MARKER_NAME).stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="rebuilt"):
        ensure_embedded_whisper(cache, SENTENCES, **{**TINY, "seed": 1})
    with pytest.raises(AssertionError, match="rebuilt"):
        ensure_embedded_whisper(cache, {**SENTENCES, "fr": SENTENCES["fr"][:-1]}, **TINY)
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_settings_and_locales_are_checked(tmp_path):
    with pytest.raises(ValueError, match="lower-case"):
        ensure_embedded_whisper(tmp_path, {"sv-SE": ["Hej."]})
    with pytest.raises(ValueError, match="divisible"):
        ensure_embedded_whisper(tmp_path, SENTENCES, d_model=30)
    with pytest.raises(ValueError, match=">= 1 sentence"):
        ensure_embedded_whisper(tmp_path, {"de": []})
    with pytest.raises(ValueError, match="needs pretrain_data"):
        ensure_embedded_whisper(tmp_path, SENTENCES, pretrain_steps=5)
    with pytest.raises(ValueError, match=r"pretrain_ctc_weight must be in \[0, 1\)"):
        ensure_embedded_whisper(tmp_path, SENTENCES, pretrain_ctc_weight=1.0)
    assert list(tmp_path.iterdir()) == []


def test_pretraining_lowers_the_decoder_loss_and_keeps_no_ctc_head(built, caplog):
    """`pretrain` on a pool of four clips: the decoder's loss falls with the encoder's CTC loss
    beside it, and the CTC head it trains is not part of the model it leaves."""
    model, processor = load_speech_model(str(built[1]))
    names = set(model.state_dict())
    pool = ExamplePool([
        example("de", "Der Hund läuft.", 200, 1), example("fr", "Le chat est calme.", 400, 2),
        example("de", "Die Katze schläft.", 600, 3), example("fr", "L'enfant aime l'école.", 800, 4),
    ])
    with caplog.at_level(logging.INFO, logger="flora_platform.speech.model"):
        pretrain(model, processor, pool, 20, 3e-3, 31, seed=0, ctc_weight=0.5, batch_size=4, log_every=5)
    logged = [float(x) for x in re.findall(r"step \d+/20, decoder loss ([\d.]+)", caplog.text)]
    assert len(logged) == 4 and logged[-1] < 0.6 * logged[0], caplog.text
    assert set(model.state_dict()) == names and not model.training
    assert pool.digest() == ExamplePool(list(pool.examples)).digest() != ExamplePool(pool.examples[:3]).digest()


def test_load_speech_model_names_the_path_when_it_is_not_whisper(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"gpt2'.* is a 'gpt2' model, not Whisper"):
        load_speech_model(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="does not exist"):
        load_speech_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read a model config"):
        load_speech_model(str(tmp_path))


def test_decoder_prompt_per_locale_and_unknown_locale(loaded):
    tok = loaded[1].tokenizer
    for locale in ("de", "fr"):
        assert tok.convert_ids_to_tokens(decoder_prompt(tok, locale)) == [
            "<|startoftranscript|>", f"<|{locale}|>", "<|transcribe|>", "<|notimestamps|>"
        ]
    with pytest.raises(ValueError, match=r"no language token <\|it\|> for locale 'it'.*\['<\|de\|>', '<\|fr\|>'\]"):
        decoder_prompt(tok, "it")


def test_encode_batch_shapes_labels_and_masking(loaded):
    _, processor = loaded
    tok = processor.tokenizer
    examples = [example("de", "Der Hund.", 300), example("fr", "La fenêtre est ouverte aujourd'hui.", 500)]
    batch = encode_batch(processor, examples, max_label_tokens=31)
    texts = [tok(ex.sentence, add_special_tokens=False).input_ids for ex in examples]
    full = [decoder_prompt(tok, ex.locale) + text + [tok.eos_token_id] for ex, text in zip(examples, texts)]
    length = max(map(len, full)) - 1
    assert batch["input_features"].shape == (2, 80, 3000) and batch["input_features"].dtype == torch.float32
    assert batch["decoder_input_ids"].shape == batch["labels"].shape == (2, length)
    for row, sequence in enumerate(full):
        n = len(sequence) - 1
        assert batch["decoder_input_ids"][row, :n].tolist() == sequence[:-1]
        assert (batch["decoder_input_ids"][row, n:] == tok.pad_token_id).all()
        labels = batch["labels"][row].tolist()
        assert labels[:3] == [-100] * 3  # the forced language, task and timestamp tokens
        assert labels[3:n] == texts[row] + [tok.eos_token_id]
        assert labels[n:] == [-100] * (length - n)
    # Features are Whisper's own: the same clip through the feature extractor directly.
    direct = processor.feature_extractor(examples[1].audio, sampling_rate=RATE, return_tensors="pt").input_features
    torch.testing.assert_close(batch["input_features"][1:], direct)


def test_encode_batch_cuts_long_transcripts_and_refuses_long_clips(loaded):
    _, processor = loaded
    ex = example("de", "Die Katze schläft heute im Garten und der Hund läuft über die Straße.", 300)
    batch = encode_batch(processor, [ex], max_label_tokens=8)
    assert batch["labels"].shape == (1, 8) and (batch["labels"][0, 3:] != -100).all()
    assert processor.tokenizer.eos_token_id not in batch["labels"][0].tolist()
    too_long = SpeechExample(audio=np.zeros(31 * RATE, np.float32), sentence="x", locale="de", split="train")
    with pytest.raises(ValueError, match="31.0 s long"):
        encode_batch(processor, [too_long], max_label_tokens=8)


@pytest.fixture(scope="module")
def trained(built):
    """The embedded model after 30 AdamW steps on 4 clips of two languages in one mixed batch."""
    model, processor = load_speech_model(str(built[1]))
    examples = [
        example("de", "Der Hund läuft.", 200, 1), example("fr", "Le chat est calme.", 400, 2),
        example("de", "Die Katze schläft.", 600, 3), example("fr", "L'enfant aime l'école.", 800, 4),
    ]
    batch = encode_batch(processor, examples, max_label_tokens=31)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), processor, examples, losses


def test_a_few_adamw_steps_lower_the_training_loss(trained):
    losses = trained[3]
    assert losses[0] > 0.8 * np.log(trained[0].config.vocab_size)  # starts near uniform: random weights
    assert losses[-1] < 0.4 * losses[0], losses


def greedy_reference(model, features: torch.Tensor, prompt: list[int], steps: int, eos: int) -> list[int]:
    """The definition of greedy decoding: one clip, full forward passes, no cache, argmax, stop after eos."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_features=features[None], decoder_input_ids=torch.tensor([tokens])).logits
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] == eos:
                break
    return tokens


def test_transcribe_forces_each_examples_language_and_matches_a_greedy_loop(trained):
    model, processor, examples, _ = trained
    tok = processor.tokenizer
    audios, locales = [ex.audio for ex in examples], [ex.locale for ex in examples]
    steps = 8
    sequences = transcribe_ids(model, processor, audios, locales, max_new_tokens=steps)
    assert sequences.shape[0] == 4 and sequences.shape[1] <= 4 + steps
    for row, locale in enumerate(locales):
        assert sequences[row, :4].tolist() == decoder_prompt(tok, locale)
    features = processor.feature_extractor(audios, sampling_rate=RATE, return_tensors="pt").input_features
    for row in (0, 1):  # one clip of each language, alone: batching must not mix rows
        expected = greedy_reference(model, features[row], decoder_prompt(tok, locales[row]), steps, tok.eos_token_id)
        assert len(set(expected[4:])) > 2  # a trained model: real text, not one repeated token
        got = sequences[row].tolist()
        assert got[: len(expected)] == expected
        assert all(t == tok.pad_token_id for t in got[len(expected):])
    texts = transcribe(model, processor, audios, locales, max_new_tokens=steps)
    assert len(texts) == 4 and texts[0] == tok.decode(sequences[0, 4:], skip_special_tokens=True).strip()
    # The language token steers the decoder: the same clips under the other language read differently.
    swapped = transcribe(model, processor, audios, [{"de": "fr", "fr": "de"}[loc] for loc in locales], steps)
    assert all(a != b for a, b in zip(texts, swapped)), (texts, swapped)


def test_transcribe_checks_its_arguments(loaded):
    model, processor = loaded
    audio = [tone(0.5, 300, 0)]
    with pytest.raises(ValueError, match="locale 'es'"):
        transcribe(model, processor, audio, ["es"], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens=40"):
        transcribe(model, processor, audio, ["de"], max_new_tokens=40)
    with pytest.raises(ValueError, match="1 clips but 2 locales"):
        transcribe(model, processor, audio, ["de", "fr"], max_new_tokens=4)


def test_flora_adapts_every_encoder_and_decoder_linear_and_starts_as_the_base(built):
    model, processor = load_speech_model(str(built[1]))
    model.eval()
    linears = {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and p != "proj_out"}
    batch = encode_batch(processor, [example("de", "Der Hund.", 300, 1), example("fr", "Le chat.", 500, 2)], 31)
    del batch["labels"]
    with torch.no_grad():
        base = model(**batch).logits
    banks = flora.inject(model, "whisper", max_slots=4, max_rank=4)
    assert set(banks.layers) == linears
    assert {
        "model.encoder.layers.1.self_attn.k_proj", "model.encoder.layers.0.fc1", "model.decoder.layers.1.fc2",
        "model.decoder.layers.0.self_attn.out_proj", "model.decoder.layers.1.encoder_attn.q_proj",
    } <= set(banks.layers)
    assert len(banks.layers) == 2 * (4 + 2) + 2 * (4 + 4 + 2)  # encoder: self-attn + ffn; decoder: + cross-attn
    banks.load("de", flora.init_adapter("flora", 4, banks.module_shapes, seed=1))
    trained = flora.init_adapter("flora", 4, banks.module_shapes, seed=2)
    for name, tensor in trained.tensors.items():
        tensor.mul_(1 + 0.2 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name))))
    banks.load("fr", trained)
    with torch.no_grad(), flora.route(model, ["de", "fr"]):
        adapted = model(**batch).logits
    torch.testing.assert_close(adapted[0], base[0], rtol=1e-4, atol=1e-5)  # a fresh adapter is the base model
    assert not torch.allclose(adapted[1], base[1], atol=1e-3)  # a changed one is not: the layers are in the path
