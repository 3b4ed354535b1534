"""The adapters an evaluation scores: where they come from, which language each is for, the
base model they belong to, and how they share adapter banks.

    specs = ["models:/flora-perl@champion", "shell=runs/adapters/shell", "adapters/python"]
    adapters = resolve_adapters(specs, tracking_uri, download_dir)     # -> [EvalAdapter]
    base_path = resolve_base(model_config, data_config, adapters, train_docs)
    for model, labels in bank_groups(base_model, {a.label: a.adapter for a in adapters}): ...

Adapters of different kinds share one set of banks when they agree on the shape of every module
they both adapt (FLoRA and LoRA over all of StarCoder's c_attn plus IA3's c_attn and mlp.c_proj
do; FLoRA over c_attn's q,k columns and IA3 over all of c_attn do not): `bank_groups` puts
each adapter in the first group it fits, so every group's rows run in shared batches.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import flora
from flora_platform import tracking
from flora_platform.config import ConfigError, FinetuneConfig, ModelConfig, flat_params
from flora_platform.data import CorpusConfig
from flora_platform.evaluation.problems import language_name
from flora_platform.prepare import resolve_base_model

log = logging.getLogger(__name__)

BASE_LABEL = "base"


@dataclass
class EvalAdapter:
    label: str  # unique name in this evaluation, e.g. "flora-perl/3" or a directory name
    language: str | None  # the language it was trained for; None = evaluate on every language
    adapter: flora.Adapter
    source: str  # the spec it came from
    registered_name: str = ""  # set for models:/ URIs
    version: str = ""
    run_id: str = ""  # the training run
    training_base_model: str = ""  # the training run's `base_model` tag

    @property
    def kind(self) -> str:
        return self.adapter.config.kind


def resolve_adapters(specs: tuple[str, ...], tracking_uri: str, download_dir: Path, known_languages: set[str] = frozenset()) -> list[EvalAdapter]:
    """Load every spec: `[<language>=]<models:/ URI or directory>` (see the module docstring).

    known_languages: names a directory may be called to count as that language's adapter.
    """
    adapters: list[EvalAdapter] = []
    for i, spec in enumerate(specs):
        language, source = _split_language(spec)
        if source.startswith("models:/"):
            found = _from_registry(source, tracking_uri, download_dir / f"{i}")
        else:
            path = Path(source).expanduser()
            if not path.is_dir():
                raise ConfigError(f"adapters[{i}]", f"{source!r} is neither a models:/ URI nor an adapter directory")
            guess = language_name(path.name)
            found = EvalAdapter(path.name, guess if guess in known_languages else None, _load(path, i), source)
        if language is not None:
            found.language = language
        if found.language == "all":
            found.language = None  # the fine-tuning job's single shared adapter
        adapters.append(found)
    _make_labels_unique(adapters)
    return adapters


def _split_language(spec: str) -> tuple[str | None, str]:
    head, sep, rest = spec.partition("=")
    if sep and re.fullmatch(r"[A-Za-z][\w+#.-]*", head):
        return language_name(head), rest
    return None, spec


def _load(path: Path, index: int) -> flora.Adapter:
    try:
        return flora.load_adapter(path)
    except flora.AdapterLoadError as err:
        raise ConfigError(f"adapters[{index}]", str(err)) from err


def _from_registry(uri: str, tracking_uri: str, dst: Path) -> EvalAdapter:
    from mlflow.exceptions import MlflowException

    try:
        version = tracking.resolve_model_version(tracking_uri, uri)
        local = tracking.download_model(tracking_uri, uri, dst)
    except (MlflowException, ValueError) as err:
        raise ConfigError("adapters", f"cannot resolve {uri} in {tracking_uri}: {err}") from err
    tags = dict(version.tags or {})
    training_base = ""
    if version.run_id:
        try:
            training_base = tracking.client_for(tracking_uri).get_run(version.run_id).data.tags.get("base_model", "")
        except MlflowException:
            log.warning("%s: its training run %s is gone", uri, version.run_id)
    language = language_name(tags["adapter"]) if tags.get("adapter") else None
    return EvalAdapter(
        f"{version.name}/{version.version}", language, flora.load_adapter(local), uri,
        registered_name=version.name, version=str(version.version), run_id=version.run_id or "",
        training_base_model=training_base,
    )


def _make_labels_unique(adapters: list[EvalAdapter]) -> None:
    seen: dict[str, int] = {BASE_LABEL: 1}
    for a in adapters:
        if a.label in seen:
            seen[a.label] += 1
            a.label = f"{a.label}#{seen[a.label]}"
        seen[a.label] = 1


# --------------------------------------------------------------------------- their base model


def resolve_base(model: ModelConfig, data: CorpusConfig, adapters: list[EvalAdapter], train_docs: dict) -> str:
    """The base model's path: `model.name`, or for "auto" the one the adapters' training runs
    name (the embedded default when none does). Raises ConfigError when an adapter was trained
    on another base."""
    trained_on = {a.training_base_model for a in adapters if a.training_base_model}
    name = model.name
    if name == "auto":
        if len(trained_on) > 1:
            raise ConfigError("model.name", f"the adapters were trained on different base models {sorted(trained_on)}; evaluate them separately")
        name = trained_on.pop() if trained_on else "embedded"
        log.info("base model: %s", name)
    base_path = resolve_base_model(FinetuneConfig(model=ModelConfig(name=name, embedded=model.embedded), data=data), train_docs)
    for a in adapters:
        if a.training_base_model and a.training_base_model not in (name, base_path):
            raise ConfigError("model.name", f"{a.source} was trained on {a.training_base_model}, not {base_path}; set model.name={a.training_base_model}")
    return base_path


def warn_on_data_mismatch(adapters: list[EvalAdapter], data: CorpusConfig, tracking_uri: str) -> None:
    """Held-out perplexity is held out only with the training run's split: same data settings."""
    ours = {f"data.{k}": v for k, v in flat_params(data).items()}
    for a in adapters:
        if not a.run_id:
            continue
        theirs = tracking.client_for(tracking_uri).get_run(a.run_id).data.params
        differ = {k: (theirs[k], v) for k, v in ours.items() if k in theirs and theirs[k] != v}
        if differ:
            log.warning("%s was trained with other data settings %s (training, here): its held-out split differs", a.label, differ)


# --------------------------------------------------------------------------- banks


def bank_groups(model: nn.Module, adapters: dict[str, flora.Adapter]) -> list[tuple[nn.Module, list[str]]]:
    """[(model with banks, adapter labels)]: adapters whose shapes agree share one group (the
    first group is `model` itself, later ones copies of it). The banks hold every adapter of
    the group resident, so no request waits for a slot."""
    groups: list[tuple[dict[str, list[int]], list[str]]] = []
    for label in sorted(adapters):
        shapes = adapters[label].config.module_shapes
        for union, labels in groups:
            if all(union.get(path, shape) == shape for path, shape in shapes.items()):
                union.update(shapes)
                labels.append(label)
                break
        else:
            groups.append((dict(shapes), [label]))
    if len(groups) > 1:
        log.warning(
            "adapters adapt different columns of the same modules, so they run in %d separate batch groups: %s",
            len(groups), [labels for _, labels in groups],
        )
    if not groups:
        return [(model, [])]
    # Copies first: once injected, a model cannot be copied into a fresh one.
    models = [model] + [copy.deepcopy(model) for _ in groups[1:]]
    built = []
    for target_model, (union, labels) in zip(models, groups):
        group = [adapters[label].config for label in labels]
        ranks = [c.rank for c in group if c.kind != "lora"]
        lora_ranks = [c.rank for c in group if c.kind == "lora"]
        flora.inject(
            target_model, bank_targets(target_model, union),
            max_slots=len(labels) + 1, max_rank=max(ranks, default=1), max_lora_rank=max(lora_ranks, default=0),
        )
        built.append((target_model, labels))
    return built


def bank_targets(model: nn.Module, module_shapes: dict[str, list[int]]) -> list[str]:
    """Target patterns that adapt exactly these modules with these [adapted outputs, inputs]:
    the module's full path, with the columns of a fused projection where an adapter adapts only
    part of it (found among the architecture's presets, e.g. gpt_bigcode's `c_attn:q,k`)."""
    targets, widths = [], {}
    for path, (dout, din) in sorted(module_shapes.items()):
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear) or layer.in_features != din:
            raise ValueError(f"adapters target {path} as a linear layer with {din} inputs, which this base model lacks: they were trained on another model")
        exact = re.escape(path)
        if dout == layer.out_features:
            targets.append(exact)
            continue
        for pattern in _column_presets(model.config.model_type):
            regex, _, columns = pattern.partition(":")
            if not flora.target_matches(regex, path):
                continue
            if pattern not in widths:
                widths[pattern] = _adapted_widths(model.config, pattern)
            if widths[pattern].get(path) == dout:
                targets.append(f"{exact}:{columns}")
                break
        else:
            raise ValueError(
                f"adapters adapt {dout} of the {layer.out_features} output columns of {path}, and no "
                f"{model.config.model_type} preset names such columns; re-train them on whole modules"
            )
    return targets


def _column_presets(model_type: str) -> list[str]:
    patterns = [p for name, ps in flora.PRESETS.items() if name == model_type or name.startswith(model_type + "-") for p in ps]
    return [p for p in patterns if ":" in p]


def _adapted_widths(config, pattern: str) -> dict[str, int]:
    """Module path -> columns `pattern` adapts, from a weightless (meta-device) copy of the model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return {p: shape[0] for p, shape in flora.inject(meta, [pattern], max_slots=2, max_rank=1).module_shapes.items()}
