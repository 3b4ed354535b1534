"""Typed configs of the evaluation job (`EvaluateConfig`) and the method comparison (`CompareConfig`).

Loaded like every job config (`flora_platform.config.load_config(cls, yaml, overrides)`); every
check names its field, e.g. `sampling.n_samples: must be >= k of every pass@k (10), got 5`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from flora_platform.config import ADAPTER_KINDS, TASKS, ConfigError, ModelConfig, ScalingConfig, SpeechConfig, TrainConfig
from flora_platform.data import CorpusConfig
from flora_platform.evaluation.execution import ISOLATION_MODES, ExecutionLimits
from flora_platform.evaluation.problems import BUILTIN

PROMOTE_METRICS = ("pass@1", "perplexity")


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name}", f"must be > 0, got {value}")


@dataclass(frozen=True)
class ProblemsConfig:
    """source: "builtin", a MultiPL-E .jsonl file or directory, or "nuprl/MultiPL-E".
    languages: () = every language that has problems; max_per_language: 0 = all."""

    source: str = BUILTIN
    languages: tuple[str, ...] = ()
    max_per_language: int = 0

    def __post_init__(self):
        if isinstance(self.languages, str):
            raise ConfigError("problems.languages", f"must be a list, got the string {self.languages!r}; write [{self.languages}]")
        if self.max_per_language < 0:
            raise ConfigError("problems.max_per_language", f"must be >= 0 (0 = all), got {self.max_per_language}")


@dataclass(frozen=True)
class SamplingConfig:
    """The paper's pass@1: 100 samples at temperature 0.1 (Chen et al.); top_p 0.95 is MultiPL-E's."""

    n_samples: int = 20
    temperature: float = 0.1
    top_p: float = 0.95
    max_new_tokens: int = 128
    ks: tuple[int, ...] = (1,)
    seed: int = 0

    def __post_init__(self):
        _positive("sampling", self, "n_samples", "max_new_tokens")
        if self.temperature < 0:
            raise ConfigError("sampling.temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and self.n_samples > 1:
            raise ConfigError("sampling.n_samples", "greedy decoding (temperature=0) gives identical samples; set n_samples=1")
        if not 0 < self.top_p <= 1:
            raise ConfigError("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("sampling.ks", f"must list k >= 1 for pass@k, got {self.ks}")
        if max(self.ks) > self.n_samples:
            raise ConfigError("sampling.n_samples", f"must be >= k of every pass@k ({max(self.ks)}), got {self.n_samples}")


@dataclass(frozen=True)
class GenerationConfig:
    """The engine run that produces every completion, in one Ray task."""

    max_batch_rows: int = 32
    max_batch_tokens: int = 2048
    num_cpus: int = 1
    use_gpu: bool = False
    dtype: str = ""  # "" = the checkpoint's; "bfloat16"/"float16" on GPU

    def __post_init__(self):
        _positive("generation", self, "max_batch_rows", "max_batch_tokens", "num_cpus")
        if self.max_batch_tokens < self.max_batch_rows:
            raise ConfigError("generation.max_batch_tokens", f"must be >= max_batch_rows ({self.max_batch_rows}), got {self.max_batch_tokens}")
        if self.dtype not in ("", "float32", "bfloat16", "float16"):
            raise ConfigError("generation.dtype", f"must be '', float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass(frozen=True)
class ExecutionConfig:
    """Limits per program (see `execution.ExecutionLimits`) and how programs are spread over Ray."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    max_output_kb: int = 64
    workdir_mb: int = 64
    isolation: str = "sandbox"  # sandbox (refuse to run where it cannot) | none (unisolated, said in MLflow)
    programs_per_task: int = 16
    max_concurrent_tasks: int = 0  # 0 = the cluster's CPUs

    def __post_init__(self):
        if self.isolation not in ISOLATION_MODES:
            raise ConfigError("execution.isolation", f"must be one of {ISOLATION_MODES}, got {self.isolation!r}")
        if self.programs_per_task < 1:
            raise ConfigError("execution.programs_per_task", f"must be >= 1, got {self.programs_per_task}")
        if self.max_concurrent_tasks < 0:
            raise ConfigError("execution.max_concurrent_tasks", f"must be >= 0 (0 = cluster CPUs), got {self.max_concurrent_tasks}")
        try:
            self.limits()
        except ValueError as err:
            raise ConfigError("execution", str(err)) from err

    def limits(self) -> ExecutionLimits:
        return ExecutionLimits(
            timeout_s=self.timeout_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb, max_processes=self.max_processes,
            max_file_mb=self.max_file_mb, max_output_kb=self.max_output_kb, workdir_mb=self.workdir_mb,
        )


@dataclass(frozen=True)
class PerplexityConfig:
    """Held-out perplexity per language over `eval_blocks` blocks of `seq_len` tokens of the
    held-out split, picked as the fine-tuning job picks them (`prepare.spread`): with the same
    `data` settings and the job's train.seq_len / train.eval_blocks, the same blocks."""

    enabled: bool = True
    seq_len: int = 128
    eval_blocks: int = 32
    batch_size: int = 8

    def __post_init__(self):
        _positive("perplexity", self, "eval_blocks", "batch_size")
        if self.seq_len < 2:
            raise ConfigError("perplexity.seq_len", f"must be >= 2, got {self.seq_len}")


@dataclass(frozen=True)
class PromoteConfig:
    """alias: move this alias (e.g. "champion") of every evaluated registered model to its best
    version of this evaluation, by `metric` on the version's own language, when that version
    beats both the base model and the alias's holder ("" = leave aliases; `registry.promote_alias`)."""

    alias: str = ""
    metric: str = "pass@1"

    def __post_init__(self):
        if self.metric not in PROMOTE_METRICS:
            raise ConfigError("promote.metric", f"must be one of {PROMOTE_METRICS}, got {self.metric!r}")


@dataclass(frozen=True)
class EvalTrackingConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else a sqlite store under run.storage_path
    experiment: str = "flora-evaluate"
    tag_versions: bool = True  # write the metrics as tags on each evaluated model version


@dataclass(frozen=True)
class EvalRunConfig:
    name: str = "flora-evaluate"
    storage_path: str = ""  # "" = $FLORA_STORAGE, else ~/flora_runs


def _storage_path(path: str) -> str:
    path = path or os.environ.get("FLORA_STORAGE") or "~/flora_runs"
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _tracking_uri(uri: str, storage_path: str) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(storage_path) / 'mlflow.db'}"


@dataclass(frozen=True)
class EvaluateConfig:
    """adapters: local adapter directories or `models:/<name>@<alias>` / `models:/<name>/<version>`
    URIs, each optionally prefixed `<language>=`; the language is otherwise read from the
    registered version's `adapter` tag or the directory name, and an adapter of no known
    language is evaluated on every language. model.name "auto": the base model the adapters'
    training runs name (tag `base_model`), else the embedded default."""

    adapters: tuple[str, ...] = ()
    include_base: bool = True
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="auto"))
    data: CorpusConfig = field(default_factory=CorpusConfig)
    problems: ProblemsConfig = field(default_factory=ProblemsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)
    run: EvalRunConfig = field(default_factory=EvalRunConfig)

    def __post_init__(self):
        if isinstance(self.adapters, str):
            raise ConfigError("adapters", f"must be a list, got the string {self.adapters!r}; write [{self.adapters}]")
        if not self.adapters and not self.include_base:
            raise ConfigError("adapters", "nothing to evaluate: name adapters or set include_base=true")

    @property
    def storage_path(self) -> str:
        return _storage_path(self.run.storage_path)

    @property
    def tracking_uri(self) -> str:
        return _tracking_uri(self.tracking.tracking_uri, self.storage_path)


@dataclass(frozen=True)
class CompareAdapterConfig:
    """rank: every method's rank (IA3 has none); the paper uses 1 (4 for Racket and Lua).
    targets: FLoRA's and LoRA's target modules; () = the architecture's preset over whole
    modules (for StarCoder all of c_attn, PEFT's LoRA default), so that FLoRA, LoRA and IA3
    (always PEFT's IA3 preset, as in the paper) fit one set of adapter banks."""

    rank: int = 1
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError("adapter.rank", f"must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class CompareTrackingConfig:
    tracking_uri: str = ""
    experiment: str = "flora-compare"
    registered_model_prefix: str = "flora-compare"  # versions register as <prefix>-<language>


@dataclass(frozen=True)
class CompareConfig:
    """Fine-tune each method in `methods` on the same data and budget (`train`, `scaling`; a
    `train.lr` of 0 gives each method the paper's learning rate), then evaluate them all with the
    base model in one evaluation (the other sections; held-out perplexity over the fine-tuning
    job's own held-out blocks: train.seq_len, train.eval_blocks). Every method's adapter for a language is
    a version of the registered model `<prefix>-<language>`, so `promote.alias` picks the best
    method per language.

    task=speech (Table 2): Whisper on `speech` data; each method's fine-tuning run scores held-out
    WER of the base model and its adapters itself, so there is no separate evaluation (the
    problems, sampling, generation, execution and promote sections do not apply)."""

    methods: tuple[str, ...] = ADAPTER_KINDS
    task: str = "text"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    adapter: CompareAdapterConfig = field(default_factory=CompareAdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    problems: ProblemsConfig = field(default_factory=ProblemsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    tracking: CompareTrackingConfig = field(default_factory=CompareTrackingConfig)
    run: EvalRunConfig = field(default_factory=lambda: EvalRunConfig(name="flora-compare"))

    def __post_init__(self):
        if isinstance(self.methods, str):
            raise ConfigError("methods", f"must be a list, got the string {self.methods!r}")
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = [m for m in self.methods if m not in ADAPTER_KINDS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError("methods", f"must list distinct methods of {ADAPTER_KINDS}, got {list(self.methods)}")
        if self.task not in TASKS:
            raise ConfigError("task", f"{self.task!r} is not one of {TASKS}")

    @property
    def storage_path(self) -> str:
        return _storage_path(self.run.storage_path)

    @property
    def tracking_uri(self) -> str:
        return _tracking_uri(self.tracking.tracking_uri, self.storage_path)
