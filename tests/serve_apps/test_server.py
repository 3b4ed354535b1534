"""The Serve application over real HTTP on a real local Ray cluster, with the `openai` client.

Every answer is checked against an independent reference (greedy `generate` on the base model
with the adapter merged in); every error case is followed by a request that must still succeed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from .conftest import API_KEY, CONTEXT, DIRECTORY_ADAPTERS, http, register, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["def main(", "import os\n", "class Point:\n", "for i in range("]


def client(endpoint, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60, **kw)


def assert_still_serving(endpoint, assets):
    ref = assets["reference"]
    _, text, _ = ref.generate("x = ", "flora_r2", 8)
    out = client(endpoint).completions.create(model="flora_r2", prompt="x = ", max_tokens=8, temperature=0)
    assert out.choices[0].text == text


def test_concurrent_requests_for_many_adapters_equal_their_references(endpoint, assets):
    ref = assets["reference"]
    register(assets, "registry_v1", "flora-python", alias="champion")
    served = {**{n: n for n in DIRECTORY_ADAPTERS}, "tiny": None, "flora-python@champion": "registry_v1"}
    jobs = [(model, PROMPTS[i % len(PROMPTS)], 20 + i) for i, model in enumerate(list(served) * 2)]
    before = http("GET", endpoint["url"] + "/health")[2]["forwards"]
    api = client(endpoint)
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(
            lambda j: api.completions.create(model=j[0], prompt=j[1], max_tokens=j[2], temperature=0), jobs
        ))
    texts = set()
    for (model, prompt, max_tokens), answer in zip(jobs, answers):
        ids, text, finish = ref.generate(prompt, served[model], max_tokens)
        choice = answer.choices[0]
        assert (choice.text, choice.finish_reason) == (text, finish), (model, prompt)
        assert answer.usage.completion_tokens == len(ids) and answer.model == model
        texts.add((prompt, text))
    assert len(texts) > len(PROMPTS) * 2, "adapters do not change the outputs: the test could not fail"
    # The requests shared forward passes: some forwards mixed three or more adapters.
    after = http("GET", endpoint["url"] + "/health")[2]["forwards"]
    assert after["mixed_forwards"] > before["mixed_forwards"]
    assert after["max_adapters_per_forward"] >= 3


def test_streaming_delivers_tokens_incrementally(endpoint, assets):
    ref = assets["reference"]
    ids, text, finish = ref.generate("def main(", "lora_r4", 60)
    stream = client(endpoint).completions.create(
        model="lora_r4", prompt="def main(", max_tokens=60, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Request-Id": "trace-42"},
    )
    arrivals, pieces, finishes, usage = [], [], [], None
    for chunk in stream:
        arrivals.append(time.monotonic())
        assert chunk.id == "cmpl-trace-42"  # the client's request id names the completion (and its log lines)
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        pieces.append(chunk.choices[0].text)
        finishes.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == text
    assert finishes[-1] == finish and set(finishes[:-1]) == {None}
    assert usage.completion_tokens == len(ids)
    assert sum(1 for p in pieces if p) >= len(ids) // 3, "the text came in one piece, not token by token"
    assert arrivals[-1] - arrivals[0] > 0.005


def test_logprobs_n_seed_and_prompt_lists(endpoint, assets):
    ref = assets["reference"]
    api = client(endpoint)
    out = api.completions.create(model="flora_r4", prompt="import os\n", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    ids, text, _ = ref.generate("import os\n", "flora_r4", 6)
    expected = ref.logprobs("import os\n", "flora_r4", ids)  # [6, V]
    assert "".join(lp.tokens) == text or "\ufffd" in text
    for i, t in enumerate(ids):
        assert lp.token_logprobs[i] == pytest.approx(expected[i, t].item(), abs=1e-3)
        best_two = expected[i].topk(2).values.tolist()
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(best_two, abs=1e-3)
    # Two prompts × n=2 sampled choices: indices prompt-major; a seed makes them reproducible.
    kw = dict(model="ia3", prompt=["def main(", "x = "], max_tokens=8, temperature=1.0, n=2, seed=7)
    first, again = api.completions.create(**kw), api.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text or first.choices[2].text != first.choices[3].text
    # Token-id prompts and stop strings: the text ends before the stop string.
    _, full, _ = ref.generate("def main(", "ia3", 30)
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    cut = api.completions.create(model="ia3", prompt=ref.tokenizer("def main(")["input_ids"], max_tokens=30,
                                 temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_completions_use_the_chat_template(endpoint, assets):
    ref = assets["reference"]
    messages = [{"role": "user", "content": "write a loop"}]
    prompt = ref.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                               chat_template=endpoint["app_args"]["model"]["chat_template"])
    ids = ref.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    _, text, finish = ref.generate(ids, "flora_half", 12)
    answer = client(endpoint).chat.completions.create(model="flora_half", messages=messages, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == finish
    streamed = client(endpoint).chat.completions.create(model="flora_half", messages=messages, max_tokens=12,
                                                        temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_registry_alias_becomes_servable_and_moves_without_restart(endpoint, assets):
    ref, api = assets["reference"], client(endpoint)
    _, v1_text, _ = ref.generate("x = ", "registry_v1", 16)
    _, v2_text, _ = ref.generate("x = ", "registry_v2", 16)
    assert v1_text != v2_text
    v1 = register(assets, "registry_v1", "flora-c", alias="champion")  # registered during the test
    ask = lambda model: api.completions.create(model=model, prompt="x = ", max_tokens=16, temperature=0).choices[0].text  # noqa: E731
    assert ask("flora-c@champion") == v1_text
    assert ask(f"models:/flora-c/{v1}") == v1_text
    ids = {m.id: m for m in api.models.list().data}
    assert ids["flora-c@champion"].model_extra["loaded"] is True

    # A new version and a moved alias: a reload call picks it up at once...
    v2 = register(assets, "registry_v2", "flora-c", alias="champion")
    status, _, body = http("POST", endpoint["url"] + "/v1/adapters", {"model": "flora-c@champion"})
    assert status == 200 and body["root"] == f"models:/flora-c/{v2}"
    assert ask("flora-c@champion") == v2_text
    assert ask("models:/flora-c@latest") == v2_text
    # ...and without one, within registry.refresh_interval_s (2 s here).
    from flora_platform.tracking import client_for

    client_for(assets["tracking_uri"]).set_registered_model_alias("flora-c", "champion", v1)
    wait_for(lambda: ask("flora-c@champion") == v1_text, 15, "the moved alias to be served")


def test_adapters_load_unload_and_list(endpoint, assets):
    url = endpoint["url"]
    status, _, body = http("POST", url + "/v1/adapters", {"model": "flora_half"})
    assert status == 200 and body["loaded"]
    models = {m["id"]: m for m in http("GET", url + "/v1/models")[2]["data"]}
    assert models["tiny"]["source"] == "base" and models["flora_half"]["loaded"]
    assert set(DIRECTORY_ADAPTERS) <= set(models)
    status, _, body = http("DELETE", url + "/v1/adapters/flora_half")
    assert status == 200 and body["unloaded"] is True
    models = {m["id"]: m for m in http("GET", url + "/v1/models")[2]["data"]}
    assert models["flora_half"]["loaded"] is False  # still available, no longer resident
    assert http("DELETE", url + "/v1/adapters/tiny")[0] == 400
    assert http("DELETE", url + "/v1/adapters/nope")[0] == 404
    assert_still_serving(endpoint, assets)


def test_bad_requests_get_clear_errors_and_the_replica_keeps_serving(endpoint, assets):
    url, api = endpoint["url"] + "/v1/completions", client(endpoint)
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model="no-such-adapter", prompt="x", max_tokens=4)
    assert "unknown model 'no-such-adapter'" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="flora-nothing@champion", prompt="x", max_tokens=4)
    status, _, body = http("POST", url, raw=b'{"model": "tiny", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="tiny", prompt="x", max_tokens=-3)
    assert "max_tokens" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="tiny", prompt="word " * (2 * CONTEXT), max_tokens=4)
    assert "prompt has" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:  # fits alone, not with max_tokens
        api.completions.create(model="tiny", prompt=[5] * (CONTEXT - 10), max_tokens=20)
    assert "lower max_tokens" in str(err.value)
    for body, field in (({"model": "tiny", "prompt": "x", "temprature": 0}, "temprature"),
                        ({"model": "tiny", "prompt": "x", "top_p": 3}, "top_p"),
                        ({"model": "tiny", "prompt": [], "max_tokens": 2}, "prompt"),
                        ({"model": "tiny", "prompt": [1, 10**6]}, "vocabulary"),
                        ({"prompt": "x"}, "model")):
        status, _, answer = http("POST", url, body)
        assert status == 400 and field in answer["error"]["message"], answer
    status, _, _ = http("POST", url, raw=b"x" * (2 << 20))
    assert status == 413
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt="x", max_tokens=2)
    assert http("GET", endpoint["url"] + "/health", key=None)[0] == 200  # health needs no key
    assert_still_serving(endpoint, assets)


def test_client_disconnect_cancels_the_request_in_the_engine(endpoint, assets):
    url = endpoint["url"]
    cancelled_before = http("GET", url + "/health")[2]["engine"]["requests_cancelled"]
    body = json.dumps({"model": "flora_r4", "prompt": "def main(", "max_tokens": 120, "ignore_eos": True,
                       "temperature": 0, "stream": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data: ") < 3:  # a few tokens have streamed: hang up mid-generation
            received += conn.recv(4096)
    assert b"200 OK" in received.split(b"\r\n", 1)[0]

    def cancelled():
        h = http("GET", url + "/health")[2]
        return h["engine"]["requests_cancelled"] > cancelled_before and h["inflight"] == 0

    wait_for(cancelled, 20, "the engine to cancel the abandoned request")
    assert_still_serving(endpoint, assets)


def test_metrics_reach_rays_prometheus_endpoint(endpoint, assets):
    import ray

    client(endpoint).completions.create(model="flora_r2", prompt="x", max_tokens=4, temperature=0)
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = ["ray_flora_requests_total", "ray_flora_request_latency_s_bucket", "ray_flora_ttft_s_bucket",
              "ray_flora_engine_queue_length", "ray_flora_engine_running_rows", "ray_flora_engine_tokens_per_s",
              "ray_flora_engine_adapters_resident", "ray_flora_engine_evictions", "ray_flora_forwards_total",
              "ray_flora_mixed_forwards_total", "ray_serve_num_http_requests_total"]

    seen = {"text": ""}

    def scrape():
        status, _, text = http("GET", f"http://127.0.0.1:{port}/metrics", key=None)
        seen["text"] = text if status == 200 else ""
        return text if status == 200 and all(name in text for name in wanted) else None

    try:
        text = wait_for(scrape, 30, "the flora metrics on Ray's Prometheus endpoint", every_s=1)
    except AssertionError:
        missing = [name for name in wanted if name not in seen["text"]]
        names = sorted({line.split("{")[0] for line in seen["text"].splitlines() if "flora" in line and not line.startswith("#")})
        raise AssertionError(f"missing {missing}; flora metrics seen: {names}") from None
    per_adapter = [line for line in text.splitlines() if line.startswith("ray_flora_requests_total") and 'model="flora_r2"' in line]
    assert per_adapter and any('status="200"' in line for line in per_adapter)


def test_the_serving_benchmark_runs_against_the_endpoint(endpoint, assets):
    # `jobs/bench_serving.py --url`: the ShareGPT-like workload over HTTP, adapters cycled.
    script = Path(__file__).resolve().parents[2] / "jobs" / "bench_serving.py"
    done = subprocess.run(
        [sys.executable, str(script), "--url", endpoint["url"], "--adapters", "flora_r2,lora_r4,ia3",
         "--api-key", API_KEY, "--preset", "smoke", "--requests", "6", "--concurrency", "2", "--rate", "20"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6/6 ok" in done.stdout and "tokens/s" in done.stdout
    assert_still_serving(endpoint, assets)
