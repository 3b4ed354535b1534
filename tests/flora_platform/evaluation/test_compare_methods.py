"""The comparison end to end on a real local Ray cluster, real DeepSpeed fine-tuning, the real
sandbox and a real sqlite MLflow store: FLoRA, IA3 and LoRA fine-tuned by jobs/finetune.py,
evaluated together by jobs/evaluate.py, Table 1 produced and logged.

The evaluation's held-out perplexity is checked against the fine-tuning job's own final
evaluation (another implementation: the training loop's loss over the same held-out blocks).
"""

import math
import shutil

import pytest

from flora_platform import tracking
from flora_platform.config import load_config
from flora_platform.evaluation.config import CompareConfig
from flora_platform.evaluation.execution import detect_isolation

from ..conftest import REPO, load_job, tiny_job_overrides, tiny_speech_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]

METHODS = ("flora", "ia3", "lora")
LANGUAGES = ("python", "shell")


def tiny_compare(tmp_path) -> CompareConfig:
    overrides = tiny_job_overrides(tmp_path, **{
        "data.languages": "[python,shell]",
        "train.steps": 4, "train.eval_interval": 4, "train.log_interval": 2, "train.eval_blocks": 4,
        "scaling.num_workers": 1,
        "problems.max_per_language": 3,
        "sampling.n_samples": 2, "sampling.max_new_tokens": 24,
        "execution.timeout_s": 5,
        "promote.alias": "champion",
    })
    return load_config(CompareConfig, str(REPO / "jobs" / "configs" / "compare_methods.yaml"), overrides)


def test_table_one_end_to_end(ray_local, tmp_path):
    cfg = tiny_compare(tmp_path)
    out = load_job("compare_methods").run(cfg)
    ev, client = out["evaluation"], tracking.client_for(cfg.tracking_uri)

    # Table 1 layout: a row per language, base then each method with its relative change.
    assert "| Language | Base model | FLoRA | IA3 | LoRA |" in out["table"]
    for lang in LANGUAGES:
        assert any(line.startswith(f"| {lang} |") and line.count("(") == 3 for line in out["table"].splitlines()), out["table"]
    assert ev["unavailable"] == {} and ev["isolation"] == detect_isolation().describe()

    # Every model was scored on its problems by execution.
    rows = {(r["label"], r["language"]): r for r in ev["rows"]}
    assert rows[("base", "perl")]["problems"] == 3 and rows[("base", "perl")]["samples"] == 6
    for r in ev["rows"]:
        if "pass@1" in r:
            assert sum(r[s] for s in ("passed", "failed", "timeout", "error")) == r["samples"]

    # The evaluation's perplexity equals the fine-tuning job's final held-out evaluation.
    for method, run_id in out["training_runs"].items():
        trained = client.get_run(run_id).data.metrics
        for lang in LANGUAGES:
            assert out["values"]["perplexity"][(method, lang)] == pytest.approx(trained[f"eval_perplexity/{lang}"], rel=2e-5)
            assert out["values"]["perplexity"][("base", lang)] == pytest.approx(trained[f"base_eval_perplexity/{lang}"], rel=2e-5)
    assert out["values"]["perplexity"][("flora", "python")] != out["values"]["perplexity"][("base", "python")]

    # MLflow: the comparison on the evaluation run, a child run per model, metrics on versions.
    parent = client.get_run(ev["run_id"])
    assert parent.data.tags["flora.sandbox"] == "sandbox" and parent.data.tags["flora.sandbox_isolation"] == ev["isolation"]
    assert {a.path for a in client.list_artifacts(ev["run_id"])} >= {"comparison.md", "evaluation.md", "results.jsonl", "scores.json"}
    assert all(f"pass_at_1/{lang}/{m}" in parent.data.metrics for lang in LANGUAGES for m in METHODS)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{ev['run_id']}'")
    assert len(children) == 1 + len(METHODS) * len(LANGUAGES)
    for lang in LANGUAGES:
        versions = client.search_model_versions(f"name='flora-compare-{lang}'")
        assert sorted(v.tags["kind"] for v in versions) == sorted(METHODS)
        for v in versions:
            assert 0.0 <= float(v.tags[f"pass_at_1/{lang}"]) <= 1.0 and math.isfinite(float(v.tags[f"perplexity/{lang}"]))
            child = client.get_run(v.tags["flora.eval_run_id"])
            assert child.data.tags["flora.training_run_id"] == v.run_id == out["training_runs"][v.tags["kind"]]
        # The alias moves only to a version that beats the base (and any holder): it says why either way.
        decision = ev["promotion"][f"flora-compare-{lang}"]
        assert str(client.get_registered_model(f"flora-compare-{lang}").aliases.get("champion", "")) == decision.version, decision.reason
        assert parent.data.tags[f"flora.promotion.flora-compare-{lang}"] == decision.reason


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng speaks the embedded corpus")
def test_table_two_for_speech_end_to_end(ray_local, tmp_path):
    overrides = tiny_speech_overrides(tmp_path, **{"train.steps": 2, "train.eval_interval": 2, "train.log_interval": 2,
                                                   "scaling.num_workers": 1})
    cfg = load_config(CompareConfig, str(REPO / "jobs" / "configs" / "compare_speech.yaml"), overrides)
    out = load_job("compare_methods").run(cfg)
    client = tracking.client_for(cfg.tracking_uri)

    # Table 2 layout, twice (unnormalised WER as the paper, then normalised): a row per language.
    assert out["table"].count("| Language | Base model | FLoRA | IA3 | LoRA |") == 2
    for lang in ("de", "fr"):
        assert sum(line.startswith(f"| {lang} |") and line.count("(") == 3 for line in out["table"].splitlines()) == 2
    # The figures are the training runs' own held-out WER, and the base model's is shared by all.
    for method, run_id in out["training_runs"].items():
        trained = client.get_run(run_id).data.metrics
        assert client.get_run(run_id).data.params["adapter.kind"] == method
        for lang in ("de", "fr"):
            assert out["values"]["wer"][(method, lang)] == pytest.approx(100 * trained[f"eval_wer/{lang}"])
            assert out["values"]["wer"][("base", lang)] == pytest.approx(100 * trained[f"base_eval_wer/{lang}"])
    comparison = client.get_run(out["run_id"])
    assert comparison.info.status == "FINISHED" and "wer/de/flora" in comparison.data.metrics
    assert {a.path for a in client.list_artifacts(out["run_id"])} == {"comparison.md"}
