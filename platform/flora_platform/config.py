"""Typed job configs: frozen dataclasses, loaded from YAML with `key.sub=value` overrides.

Every check that can fail before a worker starts happens here or in `validate_*` functions, and
names the field: `adapter.rank: must be >= 1, got 0`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flora_platform.data import CorpusConfig

ADAPTER_KINDS = ("flora", "ia3", "lora")
TASKS = ("text", "speech")  # causal code models on code corpora; Whisper on (audio, transcript) pairs
# The paper's learning rates (appendix A): multiplicative adapters need larger steps.
DEFAULT_LR = {"flora": 8e-3, "ia3": 5e-3, "lora": 1e-4}
BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train.precision -> torch dtype name
QUANTIZATIONS = ("none", "8bit")


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the field's dotted name."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class EmbeddedBaseConfig:
    """The default base model: a small StarCoder-architecture model pre-trained on the local corpus."""

    vocab_size: int = 4096
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 512
    pretrain_steps: int = 600
    pretrain_threads: int = 1  # torch threads of pre-training: the weights depend on it, not on the core count
    cache_dir: str = "~/.cache/flora/base"


@dataclass(frozen=True)
class EmbeddedWhisperConfig:
    """The default speech model (task=speech): a tiny multilingual Whisper pre-trained, all
    languages mixed, before any adapter sees it: on new sentences of separately spoken words at
    every step when speech.source is the embedded corpus (`flora_platform.speech.word_bank`),
    else on the source's training split. pretrain_ctc_weight: the share of an encoder CTC loss
    in pre-training (see `flora_platform.speech.model.pretrain`); 0 trains the decoder loss only."""

    vocab_size: int = 1024
    d_model: int = 64
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 256
    max_target_positions: int = 48
    window_seconds: int = 6  # the embedded corpus's clips are under 5 s; Whisper's own window is 30 s
    pretrain_steps: int = 8000
    pretrain_lr: float = 2e-3
    pretrain_ctc_weight: float = 0.5
    pretrain_threads: int = 1  # torch threads of pre-training: the weights depend on it, not on the core count
    cache_dir: str = "~/.cache/flora/whisper"


@dataclass(frozen=True)
class ModelConfig:
    """name: "embedded", a Hugging Face hub id, or a local directory.
    dtype: what the frozen base's weights are loaded in. auto: train.precision's (fp32 -> float32,
        bf16 -> bfloat16, fp16 -> float16), so the base never passes through float32 on its way to
        a 16-bit run. float32 with a 16-bit train.precision loads in float32 and DeepSpeed casts
        on the device (the peak of a float32 copy).
    quantization: none | 8bit (bitsandbytes `load_in_8bit`; refused before any worker starts,
        see `preflight.check_base_loading`).
    """

    name: str = "embedded"
    dtype: str = "auto"
    quantization: str = "none"
    embedded: EmbeddedBaseConfig = field(default_factory=EmbeddedBaseConfig)
    embedded_whisper: EmbeddedWhisperConfig = field(default_factory=EmbeddedWhisperConfig)  # task=speech

    def __post_init__(self):
        if self.dtype not in BASE_DTYPES:
            raise ConfigError("model.dtype", f"{self.dtype!r} is not one of {BASE_DTYPES}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError("model.quantization", f"{self.quantization!r} is not one of {QUANTIZATIONS}")


@dataclass(frozen=True)
class SpeechConfig:
    """task=speech: where the (audio, transcript, locale) examples come from, and speech-only settings.

    source: "embedded" (sentences spoken by espeak-ng into corpus_dir, with a held-out split), a
        corpus directory / Common Voice-style .parquet or .tsv, or a Hugging Face dataset laid
        out as Common Voice (a config per locale) by hub id or downloaded repository directory
        (see flora_platform.speech.corpus).
    languages: locales to keep; () keeps every locale of the source (a hub dataset needs them named).
    per_language / held_out: the embedded corpus's training and test clips per language; for a
        hub dataset, the most rows read per language from its train and test splits.
    eval_fraction: held-out share per language for sources without a test split.
    eval_examples: held-out clips per language scored during training (loss and WER).
    max_label_tokens: transcript tokens per training example, prompt included (longer ones are cut).
    max_new_tokens: the longest transcript greedy decoding produces when scoring WER.
    """

    source: str = "embedded"
    languages: tuple[str, ...] = ()
    per_language: int = 300
    held_out: int = 40
    corpus_dir: str = "~/.cache/flora/speech-corpus"
    eval_fraction: float = 0.1
    eval_examples: int = 40
    max_label_tokens: int = 40
    max_new_tokens: int = 40
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.languages, str):
            raise ConfigError("speech.languages", f"must be a list of locales, got the string {self.languages!r}")
        for name in ("per_language", "eval_examples", "max_label_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"speech.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.held_out < 0:
            raise ConfigError("speech.held_out", f"must be >= 0, got {self.held_out}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError("speech.eval_fraction", f"must be between 0 and 1, got {self.eval_fraction}")


@dataclass(frozen=True)
class AdapterSpec:
    kind: str = "flora"
    rank: int = 4
    targets: tuple[str, ...] = ()  # () = the architecture's preset (flora.PRESETS / IA3_PRESETS)
    per_language: bool = True  # False: one adapter shared by every language (the single-adapter run)

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise ConfigError("adapter.kind", f"{self.kind!r} is not one of {ADAPTER_KINDS}")
        if self.rank < 1:
            raise ConfigError("adapter.rank", f"must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8  # per worker
    seq_len: int = 128
    lr: float = 0.0  # 0 = the paper's value for the adapter kind
    warmup_steps: int = 10
    eval_interval: int = 50  # steps between held-out evaluations
    # Steps between checkpoints (adapters, every rank's optimizer shard, scheduler, RNG, data
    # position): a restarted worker group continues exactly where the last one left off.
    # 0 = checkpoint with every evaluation.
    checkpoint_interval: int = 0
    eval_blocks: int = 64  # held-out blocks per language, spread over its documents
    log_interval: int = 10
    # DeepSpeed ZeRO stage. 0..2 partition only what the optimizer holds (the adapters'): every
    # worker keeps the whole frozen base. 3 also shards the base's weights across the workers
    # (1/num_workers each, gathered per module while it runs); the adapters train and export
    # as under 2 (tests/flora_platform/test_finetune_zero3.py). Workers still load the whole
    # base before DeepSpeed shards it.
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16 | fp16 (the last two on GPU)
    # Recompute each transformer block's activations in the backward pass instead of keeping
    # them: less memory for ~1/3 more compute (see `flora_platform.memory`).
    gradient_checkpointing: bool = False
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_blocks", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.lr < 0:
            raise ConfigError("train.lr", f"must be >= 0 (0 = the paper's default), got {self.lr}")
        if self.checkpoint_interval < 0:
            raise ConfigError(
                "train.checkpoint_interval", f"must be >= 0 (0 = train.eval_interval), got {self.checkpoint_interval}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("train.zero_stage", f"must be 0..3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError("train.precision", f"must be fp32, bf16 or fp16, got {self.precision!r}")

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: `checkpoint_interval`, or `eval_interval` when it is 0."""
        return self.checkpoint_interval or self.eval_interval


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1  # fractions let several small runs (search trials) share a node
    # Memory of each worker's GPU: a run whose estimate (`flora_platform.memory`) exceeds it is
    # refused before any worker starts, naming what to change. 0: no check (e.g. on CPU).
    gpu_memory_gb: float = 0

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError("scaling.num_workers", f"must be >= 1, got {self.num_workers}")
        if self.gpu_memory_gb < 0:
            raise ConfigError("scaling.gpu_memory_gb", f"must be >= 0 (0 = no check), got {self.gpu_memory_gb}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("scaling.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else a sqlite store under run.storage_path
    experiment: str = "flora-finetune"
    register: bool = True
    registered_model_prefix: str = "flora"  # registered model per language: <prefix>-<language>


@dataclass(frozen=True)
class RunConfig:
    name: str = "flora-finetune"
    storage_path: str = ""  # "" = $FLORA_STORAGE, else ~/flora_runs; a local path or s3://
    max_failures: int = 2


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "text"  # "text": code corpus (data); "speech": Whisper on audio (speech)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError("task", f"{self.task!r} is not one of {TASKS}")
        if self.task == "speech" and self.train.zero_stage == 3:
            # ZeRO-3 makes every forward a collective; held-out WER decodes as many tokens as each
            # rank's utterances need, so the ranks' forwards would not line up.
            raise ConfigError("train.zero_stage", "3 is for text models; the speech task's held-out decoding "
                              "cannot run under ZeRO-3: use 2 (Whisper bases fit one GPU)")
        trained = PRECISION_DTYPES[self.train.precision]
        if self.model.dtype not in ("auto", "float32", trained):
            # DeepSpeed casts every parameter to train.precision, the adapters too (they take the
            # base's dtype): a 16-bit base under another precision would be cast again anyway.
            raise ConfigError(
                "model.dtype", f"{self.model.dtype} does not match train.precision={self.train.precision}: "
                f"use model.dtype=auto (= {trained}), or set train.precision to match",
            )

    @property
    def base_dtype(self) -> str:
        """The torch dtype name the frozen base is loaded in (model.dtype, auto resolved)."""
        return PRECISION_DTYPES[self.train.precision] if self.model.dtype == "auto" else self.model.dtype

    @property
    def lr(self) -> float:
        return self.train.lr or DEFAULT_LR[self.adapter.kind]

    @property
    def storage_path(self) -> str:
        path = self.run.storage_path or os.environ.get("FLORA_STORAGE") or "~/flora_runs"
        return path if "://" in path else str(Path(path).expanduser().resolve())

    @property
    def tracking_uri(self) -> str:
        uri = self.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        return f"sqlite:///{Path(self.storage_path) / 'mlflow.db'}"


# --------------------------------------------------------------------------- loading


def load_config(cls, path: str | None = None, overrides: list[str] = ()):
    """Build `cls` from an optional YAML file and `a.b=value` overrides (values parsed as YAML)."""
    raw: dict = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError("--config", f"cannot read {path}: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError("--config", f"{path} must hold a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "overrides are key.sub=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return from_dict(cls, raw)


def from_dict(cls, raw: dict, prefix: str = "", base=None):
    """Instantiate a (nested) frozen dataclass from plain data; unknown keys name themselves.

    Values missing from `raw` come from `base`, else from the field defaults of the enclosing
    class (so a subclass that changes a section's default keeps it when one key is overridden).
    """
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown field; known: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        hint, dotted = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            section = getattr(base, name) if base is not None else _field_default(fields[name])
            kwargs[name] = from_dict(hint, value or {}, dotted + ".", base=section)
        else:
            kwargs[name] = _coerce(hint, value, dotted)
    if base is not None:
        kwargs = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}, **kwargs}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        # Configs validated outside this module raise plain ValueErrors: name the section.
        raise ConfigError(prefix.rstrip(".") or cls.__name__, str(err)) from err


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _coerce(hint, value, dotted: str):
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(dotted, f"expected a list, got {value!r}")
        item_hint = typing.get_args(hint)[0] if typing.get_args(hint) else None
        if item_hint in (int, float):
            return tuple(_coerce(item_hint, v, f"{dotted}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(dotted, f"expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot (1e-6) as strings.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(dotted, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(dotted, f"expected a number, got {value!r}")
        if hint is int and value != int(value):
            raise ConfigError(dotted, f"expected an integer, got {value!r}")
        return hint(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(dotted, f"expected a string, got {value!r}")
    return value


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def flat_params(config) -> dict[str, str]:
    """`{"adapter.rank": "4", ...}`: the config as flat MLflow params."""
    return _flatten(to_dict(config), "")


def _flatten(d: dict, prefix: str) -> dict[str, str]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out
