"""MLflow for evaluations on a real sqlite store: adapter specs resolved through the registry,
evaluation runs linked to training runs and versions, metrics on versions, alias promotion; and
the tables built from verdicts."""

import math

import pytest

import flora
from flora_platform import tracking
from flora_platform.config import ConfigError
from flora_platform.evaluation import registry
from flora_platform.evaluation.adapters import resolve_adapters
from flora_platform.evaluation.registry import EvaluatedModel, metric_key
from flora_platform.evaluation.report import method_table, pass_at_k_scores, relative_change

SHAPES = {"transformer.h.0.attn.c_attn": [48, 32]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with a training run that registered a perl and a shell adapter, twice."""
    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dirs = {}
    for lang in ("perl", "shell"):
        dirs[lang] = flora.init_adapter("flora", 2, SHAPES, seed=1).save(tmp_path / "adapters" / lang)
    runs = []
    for i in range(2):
        run_id = tracking.start_or_resume_run(uri, "flora-finetune", f"train-{i}", {"data.seed": "0"}, {"base_model": "/models/base"})
        tracking.log_adapters(uri, run_id, dirs, register=True, prefix="flora", tags={"kind": "flora"})
        tracking.finish_run(uri, run_id, ok=True)
        runs.append(run_id)
    return uri, runs, tmp_path


def test_specs_resolve_to_labelled_adapters_with_their_training_runs(store):
    uri, runs, tmp = store
    adapters = resolve_adapters(
        ("models:/flora-perl/2", "shell=models:/flora-shell/1", str(tmp / "adapters" / "perl"), "lua=" + str(tmp / "adapters" / "shell")),
        uri, tmp / "downloads", known_languages={"perl", "shell"},
    )
    assert [(a.label, a.language, a.version, a.run_id) for a in adapters] == [
        ("flora-perl/2", "perl", "2", runs[1]),
        ("flora-shell/1", "shell", "1", runs[0]),
        ("perl", "perl", "", ""),  # a directory named after a language is that language's adapter
        ("shell", "lua", "", ""),  # an explicit language wins
    ]
    assert adapters[0].training_base_model == "/models/base" and adapters[0].kind == "flora"
    with pytest.raises(ConfigError, match="cannot resolve models:/flora-perl/9"):
        resolve_adapters(("models:/flora-perl/9",), uri, tmp / "downloads")
    with pytest.raises(ConfigError, match=r"adapters\[0\]"):
        resolve_adapters((str(tmp / "nowhere"),), uri, tmp / "downloads")


def evaluated(runs) -> list[EvaluatedModel]:
    def model(label, version, pass1, ppl, run):
        return EvaluatedModel(label, "flora", "perl", {metric_key("pass@1", "perl"): pass1, metric_key("perplexity", "perl"): ppl},
                              registered_name="flora-perl", version=version, training_run_id=run)
    return [
        EvaluatedModel("base", "base", None, {metric_key("pass@1", "perl"): 0.1, metric_key("perplexity", "perl"): 9.0}),
        model("flora-perl/1", "1", 0.30, 5.0, runs[0]),
        model("flora-perl/2", "2", 0.30, 4.0, runs[1]),  # same pass@1, lower perplexity
    ]


def test_evaluation_runs_link_training_runs_and_versions(store):
    uri, runs, _ = store
    models = evaluated(runs)
    parent = registry.log_evaluation(uri, "flora-evaluate", "eval", {"sampling.n_samples": "20"}, {"note": "x"}, models, {"evaluation.md": "| table |\n"})
    client = tracking.client_for(uri)
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.params["sampling.n_samples"] == "20"
    assert [a.path for a in client.list_artifacts(parent)] == ["evaluation.md"]
    for m in models:
        child = client.get_run(m.run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent
        assert child.data.metrics["pass_at_1/perl"] == m.metrics["pass_at_1/perl"]
        if m.registered_name:
            assert child.data.tags["flora.training_run_id"] == m.training_run_id
            assert (child.data.tags["flora.registered_model"], child.data.tags["flora.model_version"]) == ("flora-perl", m.version)
            version = client.get_model_version("flora-perl", m.version)
            assert float(version.tags["pass_at_1/perl"]) == pytest.approx(m.metrics["pass_at_1/perl"])
            assert version.tags["flora.eval_run_id"] == m.run_id
            assert client.get_run(m.training_run_id).data.tags["flora.eval_run_id"] == m.run_id
    # The versions can be found and sorted by their metrics.
    tagged = client.search_model_versions("name='flora-perl'")
    assert sorted(float(v.tags["perplexity/perl"]) for v in tagged) == [4.0, 5.0]


def test_alias_moves_to_the_best_version_by_the_chosen_metric(store):
    uri, runs, _ = store
    client = tracking.client_for(uri)
    models = evaluated(runs)
    assert registry.promote_alias(uri, models, "champion", "pass@1") == {"flora-perl": "2"}  # tie -> lower perplexity
    models[1].metrics[metric_key("pass@1", "perl")] = 0.5
    assert registry.promote_alias(uri, models, "champion", "pass@1") == {"flora-perl": "1"}
    assert str(client.get_model_version_by_alias("flora-perl", "champion").version) == "1"
    assert registry.promote_alias(uri, models, "champion", "perplexity") == {"flora-perl": "2"}
    models[2].metrics[metric_key("perplexity", "perl")] = math.nan
    assert registry.promote_alias(uri, models, "champion", "perplexity") == {"flora-perl": "1"}


def test_pass_at_k_per_model_and_language_from_verdicts():
    def v(label, problem, status, lang="perl"):
        return {"label": label, "language": lang, "problem": problem, "status": status}

    verdicts = [
        v("a", "p1", "passed"), v("a", "p1", "failed"), v("a", "p1", "passed"), v("a", "p1", "timeout"),
        v("a", "p2", "error"), v("a", "p2", "failed"), v("a", "p2", "failed"), v("a", "p2", "passed"),
        v("a", "p3", "skipped"),  # a prompt too long for the context: counts for nothing
        v("b", "p1", "passed", "shell"),
    ]
    scores = pass_at_k_scores(verdicts, ks=(1, 2))
    a = scores[("a", "perl")]
    assert a["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert a["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)  # 1 - C(n-c,2)/C(4,2)
    assert (a["problems"], a["samples"], a["passed"], a["failed"], a["timeout"], a["error"]) == (2, 8, 3, 3, 1, 1)
    assert scores[("b", "shell")]["pass@1"] == 1.0 and math.isnan(scores[("b", "shell")]["pass@2"])


def test_table_one_layout_with_relative_improvement():
    values = {("base", "perl"): 0.1705, ("flora", "perl"): 0.2144, ("ia3", "perl"): 0.1771, ("lora", "perl"): 0.2146,
              ("base", "ruby"): 0.0, ("flora", "ruby"): 0.0}
    table = method_table(values, ["flora", "ia3", "lora"], ["perl", "ruby"], percent=True, title="pass@1")
    lines = table.splitlines()
    assert lines[2] == "| Language | Base model | FLoRA | IA3 | LoRA |"
    assert lines[4] == "| perl | 17.05 | 21.44 (+25.75%) | 17.71 (+3.87%) | 21.46 (+25.87%) |"
    assert lines[5] == "| ruby | 0.00 | 0.00 (±0.00%) | – | – |"
    assert relative_change(0.2, 0.0) == "n/a" and relative_change(4.0, 5.0) == "-20.00%"
