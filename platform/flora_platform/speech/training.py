"""The speech task of the shared fine-tuning worker (`flora_platform.train`): Whisper on
(audio, transcript, locale) examples, each row under its own language token and its own adapter.

Training rows come from `mixed_batches` over example indices, so speech batches mix languages
and shard across workers exactly as code batches do. Held-out scoring adds word error rate:
greedy transcription of each worker's share, edit counts summed over all workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import flora
from flora_platform.collectives import all_reduce_sum
from flora_platform.config import FinetuneConfig, from_dict
from flora_platform.data import mixed_batches
from flora_platform.speech.corpus import SpeechExample
from flora_platform.speech.model import encode_batch, load_speech_model, transcribe
from flora_platform.speech.wer import normalise_text, word_errors


class SpeechTask:
    def __init__(self, loop_config: dict):
        import ray

        cfg: FinetuneConfig = from_dict(FinetuneConfig, loop_config["config"])
        self.settings = cfg.speech
        self.train: dict[str, list[SpeechExample]] = ray.get(loop_config["train_examples"])
        self.held_out: dict[str, list[SpeechExample]] = ray.get(loop_config["held_out_examples"])
        self.languages = sorted(self.train)
        self.processor = None

    def load_model(self, base_path: str, dtype: str):
        model, self.processor = load_speech_model(base_path, dtype=dtype)
        return model

    def batches(self, batch_size: int, seed: int, rank: int, world: int, start_step: int) -> Iterator[tuple[dict, list[str]]]:
        # One-column "blocks" of example indices: the row stream of the code task, over clips.
        indices = {lang: torch.arange(len(rows)).unsqueeze(1) for lang, rows in self.train.items()}
        for picked, langs in mixed_batches(indices, batch_size, seed, rank=rank, world_size=world, start_step=start_step):
            examples = [self.train[lang][int(i)] for i, lang in zip(picked[:, 0], langs)]
            yield encode_batch(self.processor, examples, self.settings.max_label_tokens), langs

    def row_losses(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = inputs["labels"]  # [B, L], -100 where no loss
        features = inputs["input_features"].to(next(model.parameters()).dtype)  # bf16/fp16 training
        logits = model(input_features=features, decoder_input_ids=inputs["decoder_input_ids"]).logits
        losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [B, L]
        return losses.sum(1), (labels != -100).sum(1)

    def held_out_rows(self, lang: str, rank: int, world: int, batch_size: int) -> Iterator[list[SpeechExample]]:
        """This worker's share of a language's held-out clips, `batch_size` at a time."""
        shard = self.held_out[lang][rank::world]
        for start in range(0, len(shard), batch_size):
            yield shard[start : start + batch_size]

    def eval_batches(self, lang: str, rank: int, world: int, batch_size: int) -> Iterator[dict]:
        for rows in self.held_out_rows(lang, rank, world, batch_size):
            yield encode_batch(self.processor, rows, self.settings.max_label_tokens)

    @torch.no_grad()
    def score(self, model, route_names, rank: int, world: int, batch_size: int, device) -> dict[str, float]:
        """Word error rate per language, unnormalised (as the paper) and normalised."""
        counts = torch.zeros(len(self.languages), 4, dtype=torch.float64)  # errors, words, normalised both
        for i, lang in enumerate(self.languages):
            for rows in self.held_out_rows(lang, rank, world, batch_size):
                with flora.route(model, [route_names(lang)] * len(rows)):
                    texts = transcribe(model, self.processor, [ex.audio for ex in rows], [lang] * len(rows),
                                       self.settings.max_new_tokens)
                for ex, text in zip(rows, texts):
                    counts[i, :2] += torch.tensor(word_errors(ex.sentence, text), dtype=torch.float64)
                    counts[i, 2:] += torch.tensor(word_errors(normalise_text(ex.sentence), normalise_text(text)), dtype=torch.float64)
        counts = all_reduce_sum(counts)
        out = {}
        for i, lang in enumerate(self.languages):
            out[f"wer/{lang}"] = (counts[i, 0] / counts[i, 1].clamp(min=1)).item()
            out[f"normalised_wer/{lang}"] = (counts[i, 2] / counts[i, 3].clamp(min=1)).item()
        return out
