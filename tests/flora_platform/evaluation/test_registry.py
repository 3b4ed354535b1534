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


# Alias promotion, each test on a fresh store: flora-perl versions 1-3, no alias, no tags.

@pytest.fixture
def perl_versions(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    client.create_registered_model("flora-perl")
    for v in range(1, 4):
        client.create_model_version("flora-perl", source=f"file://{tmp_path}/adapters/v{v}")
    return uri, client


def perl_adapter(version: str, **metrics) -> EvaluatedModel:
    """metrics: pass1=..., perplexity=... on perl."""
    return EvaluatedModel(f"flora-perl/{version}", "flora", "perl", _perl(metrics), registered_name="flora-perl", version=version)


def perl_base(**metrics) -> EvaluatedModel:
    return EvaluatedModel("base", "base", None, _perl(metrics))


def _perl(metrics: dict) -> dict:
    return {metric_key("pass@1" if k == "pass1" else k, "perl"): v for k, v in metrics.items()}


def evaluate_and_promote(uri, models, metric="pass@1", tag_versions=True):
    """One evaluation as jobs/evaluate.py runs it: log (metrics become version tags), then promote."""
    run_id = registry.log_evaluation(uri, "flora-evaluate", "eval", {}, {}, models, {}, tag_versions=tag_versions)
    return registry.promote_alias(uri, models, "champion", metric, run_id=run_id)["flora-perl"], run_id


def champion(client) -> str:
    return str(client.get_registered_model("flora-perl").aliases.get("champion", ""))


def test_alias_moves_when_the_candidate_beats_the_holder_and_the_base(perl_versions):
    uri, client = perl_versions
    first, _ = evaluate_and_promote(uri, [perl_base(pass1=0.2), perl_adapter("1", pass1=0.27)])
    assert first.moved and first.reason == "moved flora-perl@champion (unset) -> 1: pass@1 on perl 0.27 > base 0.2 (no version held it)"
    # Version 1 is not evaluated again: its value is the one recorded on it by the first evaluation.
    d, run_id = evaluate_and_promote(uri, [perl_base(pass1=0.2), perl_adapter("2", pass1=0.31)])
    assert (d.moved, d.holder, d.candidate, d.holder_value, d.base_value, d.version) == (True, "1", "2", 0.27, 0.2, "2")
    assert d.reason == "moved flora-perl@champion 1 -> 2: pass@1 on perl 0.31 > holder 0.27 and base 0.2"
    assert champion(client) == "2"
    # The MLflow UI shows why: on the evaluation run, the registered model and the version.
    assert client.get_run(run_id).data.tags["flora.promotion.flora-perl"] == d.reason
    assert client.get_registered_model("flora-perl").tags["flora.promotion.champion"] == d.reason
    assert client.get_model_version("flora-perl", "2").tags["flora.promotion.champion"] == d.reason


def test_alias_stays_when_the_candidate_does_not_beat_the_holder(perl_versions):
    uri, client = perl_versions
    evaluate_and_promote(uri, [perl_base(pass1=0.2), perl_adapter("1", pass1=0.27)])
    d, run_id = evaluate_and_promote(uri, [perl_base(pass1=0.2), perl_adapter("2", pass1=0.25)])
    assert not d.moved and d.version == "1" and champion(client) == "1"
    assert d.reason == "kept flora-perl@champion on version 1: candidate version 2 pass@1 on perl 0.25 <= holder 0.27"
    assert client.get_run(run_id).data.tags["flora.promotion.flora-perl"] == d.reason
    assert client.get_model_version("flora-perl", "2").tags["flora.promotion.champion"] == d.reason
    d, _ = evaluate_and_promote(uri, [perl_base(pass1=0.2), perl_adapter("3", pass1=0.27)])  # a tie is not better
    assert not d.moved and champion(client) == "1" and d.reason.endswith("0.27 <= holder 0.27")


def test_alias_is_not_set_without_beating_the_base(perl_versions):
    uri, client = perl_versions
    d, _ = evaluate_and_promote(uri, [perl_base(pass1=0.2), perl_adapter("1", pass1=0.2), perl_adapter("2", pass1=0.1)])
    assert not d.moved and d.candidate == "1" and champion(client) == ""
    assert d.reason == "left flora-perl@champion unset: candidate version 1 pass@1 on perl 0.2 <= base 0.2"
    # With a holder that is itself worse than the base: beating the holder is not enough.
    client.set_registered_model_alias("flora-perl", "champion", "1")
    d, _ = evaluate_and_promote(uri, [perl_base(pass1=0.3), perl_adapter("1", pass1=0.1), perl_adapter("2", pass1=0.25)])
    assert not d.moved and champion(client) == "1"
    assert d.reason == "kept flora-perl@champion on version 1: candidate version 2 pass@1 on perl 0.25 <= base 0.3"


def test_alias_is_not_moved_without_a_base_model_score(perl_versions):
    uri, client = perl_versions
    d, _ = evaluate_and_promote(uri, [perl_adapter("1", pass1=0.5)])  # evaluated with include_base=false
    assert not d.moved and champion(client) == "" and d.base_value is None
    assert "the base model has no pass@1 on perl in this run" in d.reason


def test_lower_perplexity_wins(perl_versions):
    uri, client = perl_versions
    d, _ = evaluate_and_promote(uri, [perl_base(perplexity=9.0), perl_adapter("1", perplexity=10.0)], "perplexity")
    assert not d.moved and d.reason == "left flora-perl@champion unset: candidate version 1 perplexity on perl 10 >= base 9"
    d, _ = evaluate_and_promote(uri, [perl_base(perplexity=9.0), perl_adapter("2", perplexity=5.0)], "perplexity")
    assert d.moved and champion(client) == "2"
    d, _ = evaluate_and_promote(uri, [perl_base(perplexity=9.0), perl_adapter("3", perplexity=6.0)], "perplexity")
    assert not d.moved and champion(client) == "2"
    assert d.reason == "kept flora-perl@champion on version 2: candidate version 3 perplexity on perl 6 >= holder 5"
    d, _ = evaluate_and_promote(uri, [perl_base(perplexity=9.0), perl_adapter("3", perplexity=4.0)], "perplexity")
    assert d.reason == "moved flora-perl@champion 2 -> 3: perplexity on perl 4 < holder 5 and base 9" and champion(client) == "3"


def test_a_holder_without_the_metric_keeps_the_alias_until_evaluated_beside_the_candidate(perl_versions):
    uri, client = perl_versions
    client.set_registered_model_alias("flora-perl", "champion", "1")  # set by hand in the UI: never evaluated
    d, _ = evaluate_and_promote(uri, [perl_base(pass1=0.2), perl_adapter("2", pass1=0.5)])
    assert not d.moved and d.holder_value is None and champion(client) == "1"
    assert d.reason == ("kept flora-perl@champion on version 1: candidate version 2 pass@1 on perl 0.5; holder version 1 has "
                        "no recorded pass@1 on perl (evaluate it in the same run: models:/flora-perl@champion)")
    # Evaluated in the same run, the holder is compared on this run's figures (not on tags: none written).
    models = [perl_base(pass1=0.2), perl_adapter("1", pass1=0.4), perl_adapter("2", pass1=0.5)]
    d, _ = evaluate_and_promote(uri, models, tag_versions=False)
    assert d.moved and champion(client) == "2" and d.reason == "moved flora-perl@champion 1 -> 2: pass@1 on perl 0.5 > holder 0.4 and base 0.2"


def test_the_best_of_the_run_is_chosen_by_the_metric_then_perplexity_then_version(perl_versions):
    uri, client = perl_versions
    base = perl_base(pass1=0.1, perplexity=9.0)
    d, _ = evaluate_and_promote(uri, [base, perl_adapter("1", pass1=0.3, perplexity=4.0), perl_adapter("2", pass1=0.3, perplexity=5.0)])
    assert d.candidate == "1" and champion(client) == "1"  # same pass@1, lower perplexity
    d, _ = evaluate_and_promote(uri, [base, perl_adapter("1", pass1=0.3, perplexity=4.0), perl_adapter("3", pass1=0.3, perplexity=4.0)])
    assert d.candidate == "3" and not d.moved  # the newer on a full tie, but not better than the holder
    d, _ = evaluate_and_promote(uri, [base, perl_adapter("1", pass1=0.3, perplexity=4.0), perl_adapter("3", pass1=math.nan)])
    assert d.candidate == "1" and not d.moved and d.reason.startswith("kept flora-perl@champion on version 1: it is the best")
    with pytest.raises(ValueError, match="promotion metric 'bleu'"):
        registry.promote_alias(uri, [base], "champion", "bleu")


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
