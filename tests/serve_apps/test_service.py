"""The HTTP layer without Ray: the same FastAPI app over a real `CompletionService` under uvicorn
on a loopback port. Request timeouts are per deployment, so they get their own small server here
rather than a second Serve application."""

from __future__ import annotations

import threading
import time

import pytest

from flora_platform.serving.api import build_http_app
from flora_platform.serving.config import parse_args
from flora_platform.serving.service import CompletionService

from .conftest import app_args, free_port, http, wait_for


@pytest.fixture
def short_timeout_server(assets):
    import uvicorn

    args = app_args(assets, limits__request_timeout_s=0.02, registry__enabled=False, security__api_key_env="")
    service = CompletionService(parse_args(args))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_http_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn to start", every_s=0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        service.close()


def test_a_request_past_its_timeout_is_answered_504_and_cancelled(short_timeout_server):
    url = short_timeout_server
    body = {"model": "tiny", "prompt": "def main(", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    status, _, answer = http("POST", url + "/v1/completions", body, key=None)
    assert status == 504 and "request_timeout_s" in answer["error"]["message"]
    # Streaming: the status line went out already, so the timeout arrives as an error event.
    status, _, text = http("POST", url + "/v1/completions", {**body, "stream": True}, key=None)
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]" and '"code":504' in events[-2]

    def settled():
        health = http("GET", url + "/health", key=None)[2]
        return health["inflight"] == 0 and health["engine"]["running_rows"] == 0 and health["engine"]["requests_cancelled"] >= 2

    wait_for(settled, 20, "the engine to drop the timed-out rows")
    started = time.monotonic()
    status, _, answer = http("POST", url + "/v1/completions", {**body, "max_tokens": 1}, key=None)
    assert status in (200, 504) and time.monotonic() - started < 5


def test_the_embedded_default_serves_a_registered_champion(tmp_path):
    """`model.name: embedded` finds the base the fine-tuning job trains on (same config, same
    cached directory; then the one its newest run recorded), and `flora-python@champion`,
    registered the way the job registers it, is served: its logprobs equal the merged
    reference's. A version whose run recorded another base is refused (422)."""
    import asyncio

    import torch

    import flora
    from flora_platform import tracking
    from flora_platform.base_model import load_base
    from flora_platform.config import FinetuneConfig, load_config
    from flora_platform.data import load_documents, split_documents
    from flora_platform.prepare import resolve_base_model
    from flora_platform.serving.model import resolve_base, trained_base
    from flora_platform.serving.protocol import parse_completion
    from flora_platform.serving.sources import AdapterInvalid
    from tests.flora.test_models import merge_into
    from tests.flora_platform.conftest import tiny_job_overrides

    overrides = tiny_job_overrides(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {"model": {"name": "embedded", "finetune_config": "", "finetune_overrides": overrides, "max_slots": 3,
                      "max_rank": 4, "torch_threads": 1},
            "adapters": {"cache_dir": str(tmp_path / "cache")}, "registry": {"tracking_uri": uri}}
    cfg = parse_args(args)
    job = load_config(FinetuneConfig, None, overrides)
    train_docs, _ = split_documents(load_documents(job.data), job.data.eval_fraction, job.data.seed)
    built = resolve_base(cfg.model, uri)  # no fine-tuning run yet: the config's base, built here
    assert built.name == resolve_base_model(job, train_docs) and built.served_name == "embedded"

    # Adapters as the job makes them (init at the base model, flora rank 4), moved far from it,
    # logged and registered from runs tagged with their base model, as the job tags them.
    base, tokenizer = load_base(built.name)
    shapes = flora.inject(load_base(built.name)[0], "gpt_bigcode", max_rank=4).module_shapes
    fresh = flora.init_adapter("flora", 4, shapes, base_model="embedded")
    noise = torch.Generator().manual_seed(3)  # far from the identity: this base barely reacts to q, k changes
    adapter = flora.Adapter(fresh.config, {k: v + 5 * torch.randn(v.shape, generator=noise) for k, v in fresh.tensors.items()})
    adapter.save(tmp_path / "trained" / "python")
    client = tracking.client_for(uri)
    experiment = client.create_experiment(job.tracking.experiment, artifact_location=(tmp_path / "art").as_uri())
    for trained_on, alias in ((built.name, "champion"), ("/elsewhere/embedded-gpt_bigcode-0123456789abcdef", "other")):
        run_id = client.create_run(experiment, tags={"base_model": trained_on}).info.run_id
        (uri_v,) = tracking.log_adapters(uri, run_id, {"python": tmp_path / "trained" / "python"}, register=True,
                                         prefix="flora", tags={}).values()
        client.set_registered_model_alias("flora-python", alias, uri_v.rsplit("/", 1)[1])
        client.set_terminated(run_id, "FINISHED")
        if alias == "champion":  # the newest finished run names the base "embedded" stands for
            assert trained_base(uri, job.tracking.experiment) == built.name
            assert resolve_base(cfg.model, uri).name == built.name

    service = CompletionService(parse_args({**args, "model": {**args["model"], "name": built.name, "served_name": "embedded"}}),
                                tracking_uri=uri)
    try:
        async def ask():
            params = parse_completion({"model": "flora-python@champion", "prompt": "def main(", "max_tokens": 6,
                                       "temperature": 0, "logprobs": 5}, service.cfg.limits)
            target = await service.resolve(params.model)
            prompt = service.encode(params.prompts[0])
            run = service.submit(service.engine_requests("t", target, [prompt], params.sampling))
            return prompt, [item async for _, item in run.events(time.monotonic() + 60)][-1]

        prompt, output = asyncio.run(ask())
        with pytest.raises(AdapterInvalid, match="was trained on base model /elsewhere"):
            asyncio.run(service.resolve("flora-python@other"))
    finally:
        service.close()
    ids = torch.tensor([prompt + list(output.output_ids)])
    with torch.no_grad():  # next-token log-probs at every output position: [n, V]
        adapted = torch.log_softmax(merge_into(base.eval(), adapter)(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        plain = torch.log_softmax(base(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
    served_top = torch.tensor([[lp for _, lp in top] for top in output.top_logprobs])  # [n, 5]
    assert torch.allclose(served_top, adapted.topk(5).values, atol=1e-4)
    assert torch.allclose(torch.tensor(output.logprobs), adapted.gather(1, ids[0, len(prompt):, None])[:, 0], atol=1e-4)
    assert (plain.topk(5).values - served_top).abs().max() > 1e-2, "the adapter did not change the model: the test could not fail"
