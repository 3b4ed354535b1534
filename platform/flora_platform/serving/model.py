"""The served base model: resolved once per application, loaded with adapter banks per replica.

"embedded" is resolved exactly as the fine-tuning job resolves it (same corpus, same settings,
same cached directory), so adapters trained by `jobs/finetune.py` fit the served banks.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

import flora
from flora_platform.config import ConfigError, FinetuneConfig, load_config
from flora_platform.serving.config import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_base(spec: ModelSpec, tracking_uri: str = "") -> ModelSpec:
    """`spec` with `name` a directory or hub id that `from_pretrained` loads.

    "embedded" is the base the newest finished fine-tuning run in the registry trained on (its
    `base_model` tag), so that its adapters are served on their own base even if the machine's
    corpus changed since; without such a run, the base the fine-tuning config builds (built
    here if it is not cached yet: minutes for the default, with progress in the log)."""
    if spec.name != "embedded":
        return spec
    from flora_platform.data import load_documents, split_documents
    from flora_platform.prepare import resolve_base_model

    try:
        finetune = load_config(FinetuneConfig, spec.finetune_config or None, list(spec.finetune_overrides))
    except ConfigError as err:
        raise ConfigError("model.finetune_config", str(err)) from err
    if finetune.model.name != "embedded":
        return dataclasses.replace(spec, name=finetune.model.name, served_name=spec.served_name or finetune.model.name)
    trained = trained_base(tracking_uri, finetune.tracking.experiment) if tracking_uri else None
    if trained is not None:
        log.info("embedded base model: %s, as trained on by the latest %r run", trained, finetune.tracking.experiment)
        return dataclasses.replace(spec, name=trained, served_name=spec.served_name or "embedded")
    log.info("resolving the embedded base model of %s", spec.finetune_config or "the default fine-tuning config")
    if finetune.task == "speech":
        from flora_platform.speech.prepare import read_examples, resolve_speech_model, split_examples

        train, _ = split_examples(read_examples(finetune), finetune.speech.eval_fraction, finetune.speech.seed)
        path = resolve_speech_model(finetune, train)
    else:
        docs = load_documents(finetune.data)
        train_docs, _ = split_documents(docs, finetune.data.eval_fraction, finetune.data.seed)
        path = resolve_base_model(finetune, train_docs)
    log.info("embedded base model: %s", path)
    return dataclasses.replace(spec, name=path, served_name=spec.served_name or "embedded")


def trained_base(tracking_uri: str, experiment: str) -> str | None:
    """The base-model directory that the newest finished run of `experiment` recorded (its
    `base_model` tag), if that directory still holds a whole model; None otherwise."""
    from flora_platform.base_model import is_complete
    from flora_platform.speech.model import is_complete as is_complete_whisper
    from flora_platform.tracking import client_for

    try:
        client = client_for(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=20)
    except Exception as err:  # noqa: BLE001 - no registry just means: build from the config
        log.warning("cannot read fine-tuning runs from %s (%s); using the fine-tuning config", tracking_uri, err)
        return None
    for run in runs:
        tag = run.data.tags.get("base_model", "")
        if tag and (is_complete(Path(tag)) or is_complete_whisper(Path(tag))):
            return tag
    return None


def same_base(trained_on: str, served: str) -> bool:
    """Whether an adapter trained on `trained_on` (a run's base_model tag) fits the served base:
    the same hub id, or directories with the same name (embedded bases are named by a hash of
    their settings and corpus, so a copy elsewhere still matches)."""
    return trained_on == served or Path(trained_on).name == Path(served).name


def pick_device(spec: ModelSpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device", "cuda was asked for but this replica sees no GPU: set deployment.num_gpus")
    return torch.device(spec.device)


def is_speech_model(name: str) -> bool:
    """Whether the (resolved) base model is a Whisper model, served by transcription."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).model_type == "whisper"
    except (OSError, ValueError) as err:
        raise ConfigError("model.name", f"cannot read a model config from {name!r}: {err}") from err


def load_model(spec: ModelSpec):
    """(model with adapter banks, tokenizer) on the replica's device, in eval mode; for a
    Whisper model, (model, processor)."""
    from flora_platform.base_model import load_base
    from flora_platform.speech.model import load_speech_model

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    device = pick_device(spec)
    if is_speech_model(spec.name):
        model, tokenizer = load_speech_model(spec.name, dtype=_DTYPES.get(spec.dtype))
    else:
        model, tokenizer = load_base(spec.name, dtype=_DTYPES.get(spec.dtype))
    # One preset name, a list of patterns, or () for the architecture's preset (what fine-tuning adapts).
    targets = spec.targets[0] if len(spec.targets) == 1 and spec.targets[0] in flora.PRESETS else list(spec.targets) or "auto"
    try:
        flora.inject(model, targets, max_slots=spec.max_slots, max_rank=spec.max_rank, max_lora_rank=spec.max_lora_rank)
    except ValueError as err:
        raise ConfigError("model.targets", str(err)) from err
    model.to(device).eval()
    if spec.chat_template and not model.config.is_encoder_decoder:
        tokenizer.chat_template = spec.chat_template
    log.info(
        "serving %s (%s, %s) with %d adapter slots, max rank %d",
        spec.name, model.config.model_type, device, spec.max_slots - 1, spec.max_rank,
    )
    return model, tokenizer
