"""The search job's config: the fine-tuning config every trial starts from, plus what to search.

    search.lr_span / lr_grid   learning rates as multiples of the centre: train.lr, or each
                               kind's paper value (FLoRA 8e-3, IA3 5e-3, LoRA 1e-4) when it is 0
    search.ranks, kinds, targets   the other axes; kinds and targets only when given
    search.metric              the held-out loss ASHA and "best" use: mean, or one language

`trial_config(cfg, params, name)` turns one sampled point into the trial's `FinetuneConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flora_platform.config import (
    ADAPTER_KINDS,
    DEFAULT_LR,
    ConfigError,
    FinetuneConfig,
    RunConfig,
    ScalingConfig,
    TrackingConfig,
)

ALGORITHMS = ("auto", "random", "grid", "optuna")
SCHEDULERS = ("asha", "none")


@dataclass(frozen=True)
class SearchConfig:
    """What to search and how; learning rates are multiples of the centre (train.lr or the paper's)."""

    num_samples: int = 8  # trials (random, optuna); grid: repeats of the whole grid
    algorithm: str = "auto"  # auto = optuna when installed, else random | random | grid | optuna
    lr_span: float = 10.0  # random/optuna: lr log-uniform in [centre/span, centre·span]
    lr_grid: tuple[float, ...] = (0.1, 1.0, 10.0)  # grid: lr = centre × each
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    kinds: tuple[str, ...] = ()  # () = adapter.kind only
    targets: tuple[str, ...] = ()  # options, each a flora preset name or space-separated patterns; () = adapter.targets
    metric: str = "mean"  # held-out loss that ASHA and "best" use: "mean" over languages, or a language
    scheduler: str = "asha"  # asha | none
    grace_period_steps: int = 0  # ASHA: steps before a trial can be stopped; 0 = train.eval_interval
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.25  # the trial function's own share; its workers ask for scaling.* on top
    seed: int = 0

    def __post_init__(self):
        def bad(name, message):
            raise ConfigError(f"search.{name}", message)

        if self.num_samples < 1:
            bad("num_samples", f"must be >= 1, got {self.num_samples}")
        if self.algorithm not in ALGORITHMS:
            bad("algorithm", f"{self.algorithm!r} is not one of {ALGORITHMS}")
        if self.lr_span < 1:
            bad("lr_span", f"must be >= 1 (the lr range is [centre/span, centre·span]), got {self.lr_span}")
        if not self.lr_grid or any(not isinstance(f, (int, float)) or f <= 0 for f in self.lr_grid):
            bad("lr_grid", f"needs positive multiples of the centre lr, e.g. [0.1, 1, 10]; got {list(self.lr_grid)}")
        if not self.ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in self.ranks):
            bad("ranks", f"needs integers >= 1, e.g. [1, 2, 4, 8]; got {list(self.ranks)}")
        for kind in self.kinds:
            if kind not in ADAPTER_KINDS:
                bad("kinds", f"{kind!r} is not one of {ADAPTER_KINDS}")
        if any(not isinstance(t, str) or not t.strip() for t in self.targets):
            bad("targets", "each option is a preset name or space-separated target patterns")
        if not isinstance(self.metric, str) or not self.metric:
            bad("metric", "'mean' or a language name")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", f"{self.scheduler!r} is not one of {SCHEDULERS}")
        if self.grace_period_steps < 0:
            bad("grace_period_steps", f"must be >= 0 (0 = train.eval_interval), got {self.grace_period_steps}")
        if self.reduction_factor <= 1:
            bad("reduction_factor", f"must be > 1, got {self.reduction_factor}")
        if self.max_concurrent_trials < 1:
            bad("max_concurrent_trials", f"must be >= 1, got {self.max_concurrent_trials}")
        if self.trial_cpus <= 0:
            bad("trial_cpus", f"must be > 0 (Tune needs a resource to place the trial), got {self.trial_cpus}")
        if self.algorithm == "optuna" and not optuna_installed():
            bad("algorithm", "optuna is not installed: pip install optuna, or use random or grid")


@dataclass(frozen=True)
class SearchJobConfig(FinetuneConfig):
    """The fine-tuning config every trial starts from, plus the search; same keys as the fine-tuning job."""

    scaling: ScalingConfig = field(default_factory=lambda: ScalingConfig(num_workers=1, cpus_per_worker=0.75))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="flora-tune"))
    run: RunConfig = field(default_factory=lambda: RunConfig(name="flora-tune"))
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self):
        if self.search.scheduler == "asha" and self.grace_period_steps > self.train.steps:
            raise ConfigError(
                "search.grace_period_steps",
                f"{self.grace_period_steps} > train.steps ({self.train.steps}); lower it or raise train.steps",
            )

    @property
    def grace_period_steps(self) -> int:
        return self.search.grace_period_steps or self.train.eval_interval

    @property
    def metric(self) -> str:
        return f"eval_loss/{self.search.metric}"

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.search.kinds or (self.adapter.kind,)

    @property
    def trials_storage_path(self) -> str:
        """Where the trials' Ray Train runs (and their checkpoints) live, next to the Tune experiment."""
        return f"{self.storage_path}/{self.run.name}-trials"


def optuna_installed() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def target_patterns(option: str) -> tuple[str, ...]:
    """A targets option: a flora preset name, or space-separated patterns."""
    import flora

    if option in flora.PRESETS:
        return tuple(flora.PRESETS[option])
    return tuple(option.split())


def centre_lr(cfg: FinetuneConfig, kind: str) -> float:
    """The middle of the lr range: train.lr when set, else the paper's value for the kind."""
    return cfg.train.lr or DEFAULT_LR[kind]


def trial_config(cfg: SearchJobConfig, params: dict, name: str) -> FinetuneConfig:
    """The fine-tuning config of one trial: the search's base config with the sampled values."""
    base = FinetuneConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FinetuneConfig)})
    kind = params.get("kind", cfg.adapter.kind)
    targets = target_patterns(params["targets"]) if "targets" in params else cfg.adapter.targets
    adapter = dataclasses.replace(cfg.adapter, kind=kind, rank=int(params["rank"]), targets=targets)
    train = dataclasses.replace(cfg.train, lr=centre_lr(cfg, kind) * float(params["lr_factor"]))
    return dataclasses.replace(base, adapter=adapter, train=train, run=dataclasses.replace(cfg.run, name=name))
