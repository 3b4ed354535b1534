"""A bad fine-tuning config fails before any worker starts, with a message naming the field."""

import pytest

from flora_platform.config import ConfigError, FinetuneConfig, load_config

from .conftest import load_job, tiny_job_overrides


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.languages=[python,klingon]", "languages"),
        ("adapter.rank=0", "adapter.rank"),
        ("adapter.targets=[no_such_module]", "adapter.targets"),
        ("model.name=./no/such/model", "model.name"),
        ("train.steps=-1", "train.steps"),
        ("adapter.kind=dora", "adapter.kind"),
        ("train.lr=fast", "train.lr"),
        ("tracking.nonsense=1", "tracking.nonsense"),
    ],
)
def test_bad_config_fails_before_any_worker(tmp_path, override, field):
    import ray

    finetune = load_job("finetune")
    with pytest.raises(ConfigError) as err:
        cfg = load_config(FinetuneConfig, None, tiny_job_overrides(tmp_path) + [override])
        finetune.run(cfg)
    assert field in str(err.value)
    assert not ray.is_initialized()


def test_empty_corpus_names_the_source(tmp_path):
    import ray

    finetune = load_job("finetune")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="source"):
        finetune.run(load_config(FinetuneConfig, None, tiny_job_overrides(tmp_path, **{"data.source": str(empty), "data.languages": "[]"})))
    assert not ray.is_initialized()
