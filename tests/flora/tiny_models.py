"""Tiny Hugging Face models built from configs (random weights), and their inputs."""

import torch
from transformers import (
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

VOCAB = 128


def tiny_gpt_bigcode(seed: int = 0) -> GPTBigCodeForCausalLM:
    torch.manual_seed(seed)
    config = GPTBigCodeConfig(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, multi_query=True,
        bos_token_id=0, eos_token_id=1,
    )
    return GPTBigCodeForCausalLM(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=32, pad_token_id=2, bos_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )
    return WhisperForConditionalGeneration(config).eval()


# The tiny multilingual Whisper's control tokens, at the top of its vocabulary in Whisper's order.
WHISPER_LANGUAGES = {"<|de|>": VOCAB - 9, "<|fr|>": VOCAB - 8, "<|it|>": VOCAB - 7}
WHISPER_SOT, WHISPER_TRANSLATE, WHISPER_TRANSCRIBE = VOCAB - 10, VOCAB - 6, VOCAB - 5
WHISPER_NO_TIMESTAMPS = VOCAB - 1  # after <|startoflm|>, <|startofprev|>, <|nospeech|>


def tiny_multilingual_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    """`tiny_whisper` with the generation config `generate(language=..., task=...)` needs."""
    from transformers import GenerationConfig

    model = tiny_whisper(seed)
    model.config.decoder_start_token_id = WHISPER_SOT
    model.generation_config = GenerationConfig(
        decoder_start_token_id=WHISPER_SOT, bos_token_id=1, eos_token_id=1, pad_token_id=2,
        lang_to_id=dict(WHISPER_LANGUAGES), task_to_id={"translate": WHISPER_TRANSLATE, "transcribe": WHISPER_TRANSCRIBE},
        no_timestamps_token_id=WHISPER_NO_TIMESTAMPS, prev_sot_token_id=VOCAB - 3, is_multilingual=True,
        max_length=model.config.max_target_positions,
    )
    return model


def model_inputs(model, batch: int, seq: int = 6, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    if model.config.model_type == "whisper":
        frames = 2 * model.config.max_source_positions
        features = torch.randn(batch, model.config.num_mel_bins, frames, generator=gen)
        return {"input_features": features, "decoder_input_ids": ids}
    return {"input_ids": ids}


def row(inputs: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in inputs.items()}
