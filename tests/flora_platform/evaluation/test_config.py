"""Evaluation and comparison configs: errors name the field and the fix; the YAML files load."""

from pathlib import Path

import pytest

from flora_platform.config import ConfigError, load_config
from flora_platform.evaluation.config import CompareConfig, EvaluateConfig, ProblemsConfig

from ..conftest import load_job

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("overrides,field,fix", [
    (["sampling.n_samples=5", "sampling.ks=[1,10]"], "sampling.n_samples", "must be >= k"),
    (["sampling.temperature=0"], "sampling.n_samples", "set n_samples=1"),
    (["sampling.top_p=0"], "sampling.top_p", "(0, 1]"),
    (["execution.isolation=auto"], "execution.isolation", "sandbox"),
    (["execution.timeout_s=0"], "execution", "timeout_s must be > 0"),
    (["promote.metric=bleu"], "promote.metric", "pass@1"),
    (["include_base=false"], "adapters", "nothing to evaluate"),
    (["generation.max_batch_tokens=4"], "generation.max_batch_tokens", "max_batch_rows"),
])
def test_evaluate_config_errors_name_the_field(overrides, field, fix):
    with pytest.raises(ConfigError) as err:
        load_config(EvaluateConfig, None, overrides)
    assert err.value.field == field and fix in str(err.value)


def test_lists_given_as_one_string():
    assert load_config(EvaluateConfig, None, ["adapters=models:/flora-perl@champion"]).adapters == ("models:/flora-perl@champion",)
    with pytest.raises(ConfigError, match=r"write \[perl\]"):
        ProblemsConfig(languages="perl")


def test_compare_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="methods"):
        load_config(CompareConfig, None, ["methods=[flora,dora]"])
    with pytest.raises(ConfigError, match="adapter.rank"):
        load_config(CompareConfig, None, ["adapter.rank=0"])


@pytest.mark.parametrize("name,cls", [("evaluate", EvaluateConfig), ("compare_methods", CompareConfig)])
def test_yaml_configs_load_and_open_with_their_command(name, cls):
    path = REPO / "jobs" / "configs" / f"{name}.yaml"
    assert path.read_text().splitlines()[0].startswith(f"# ray job submit --working-dir . -- python jobs/{name}.py --config jobs/configs/{name}.yaml")
    cfg = load_config(cls, str(path), [])
    assert cfg.sampling.temperature == 0.1 and cfg.problems.source == "builtin"


def test_compare_trains_flora_and_lora_on_whole_modules_and_ia3_on_its_preset():
    compare = load_job("compare_methods")
    cfg = load_config(CompareConfig, None, [])
    assert compare.finetune_config(cfg, "flora", "x").adapter.targets == (r"transformer\.h\.\d+\.attn\.c_attn",)
    assert compare.finetune_config(cfg, "lora", "x").adapter.targets == (r"transformer\.h\.\d+\.attn\.c_attn",)
    ia3 = compare.finetune_config(cfg, "ia3", "x")
    assert ia3.adapter.targets == () and ia3.lr == 5e-3 and compare.finetune_config(cfg, "flora", "x").lr == 8e-3


def test_evaluate_cli_reports_config_errors_before_starting_anything(tmp_path, capsys):
    evaluate = load_job("evaluate")
    assert evaluate.main([f"problems.source={tmp_path / 'none.jsonl'}"]) == 2
    assert "problems" in capsys.readouterr().err
    code = evaluate.main([f"adapters=[{tmp_path / 'missing'}]", "perplexity.enabled=false", f"model.name={tmp_path}"])
    assert code == 2 and "adapters[0]" in capsys.readouterr().err
