"""The fine-tuning job with task=speech: Whisper, one adapter per language in mixed batches, on a
real local Ray cluster, real DeepSpeed and a real sqlite MLflow store."""

import shutil

import pytest

import flora
from flora_platform import tracking
from flora_platform.config import FinetuneConfig, load_config
from flora_platform.speech.model import load_speech_model

from .conftest import load_job, tiny_speech_overrides

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng speaks the embedded corpus")


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_train_register_and_score_wer(ray_local, tmp_path):
    finetune = load_job("finetune")
    cfg = load_config(FinetuneConfig, None, tiny_speech_overrides(tmp_path))
    out = finetune.run(cfg)
    metrics, uri = out["metrics"], cfg.tracking_uri

    assert metrics["step"] == 6
    for lang in ("de", "fr"):
        for key in ("eval_loss", "base_eval_loss", "eval_wer", "base_eval_wer", "eval_normalised_wer", "base_eval_normalised_wer"):
            assert f"{key}/{lang}" in metrics, key
            assert metrics[f"{key}/{lang}"] >= 0
    assert [r["language"] for r in out["rows"]] == ["de", "fr"]
    assert "| de |" in out["table"] and "base WER" in out["table"]

    client = tracking.client_for(uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "speech"
    assert [m.step for m in client.get_metric_history(out["run_id"], "eval_wer/de")] == [3, 6]
    assert [m.step for m in client.get_metric_history(out["run_id"], "train_loss/fr")] == [3, 6]

    # The registered adapter loads into the base Whisper, on encoder and decoder alike.
    (version,) = client.search_model_versions("name='flora-de'")
    assert version.tags["task"] == "speech"
    local = tracking.download_model(uri, f"models:/flora-de/{version.version}", tmp_path / "served")
    adapter = flora.load_adapter(local)
    assert any(k.startswith("model.encoder.") for k in adapter.tensors)
    assert any(".encoder_attn." in k for k in adapter.tensors)  # the decoder's cross-attention
    model, _ = load_speech_model(run.data.tags["base_model"])
    banks = flora.inject(model, "whisper", max_rank=2)
    banks.load("de", adapter)
    # Training moved each adapter away from the base model it starts as.
    for lang in ("de", "fr"):
        assert metrics[f"eval_loss/{lang}"] != metrics[f"base_eval_loss/{lang}"]
