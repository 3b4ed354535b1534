"""Fixtures for the Serve application: a tiny model directory, adapters on disk and in a real
sqlite MLflow registry, and one real local Ray cluster with Serve on a free loopback port,
shared by this package's modules and shut down after them (also when a test fails).

The served model is a 2-layer StarCoder-architecture decoder with random weights (initializer
range 0.2, so that greedy outputs differ from adapter to adapter; a briefly pre-trained model
repeats one token whatever the adapter) and a byte-level BPE tokenizer, saved like any model.
References are Hugging Face `generate` on a copy of it with the adapter merged into the weights
(`tests.flora.test_models.merge_into`), which shares no code with the engine or the server.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import flora
from tests.flora.test_models import merge_into, randomised

API_KEY_ENV = "FLORA_TEST_API_KEY"
API_KEY = "test-key-not-a-secret"
CONTEXT = 128
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
TEXTS = [
    "def main():\n    return parse(argv)\n",
    "import os\nprint(os.getcwd())\n",
    "for i in range(10):\n    total += i * i\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared machine they slow down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model_dir(path: Path) -> Path:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    from flora_platform.base_model import train_tokenizer

    tokenizer = train_tokenizer({"python": TEXTS * 8}, vocab_size=300, model_max_length=CONTEXT)
    torch.manual_seed(0)
    config = GPTBigCodeConfig(
        vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4, multi_query=True,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPTBigCodeForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapters(model_dir: Path) -> dict[str, flora.Adapter]:
    """FLoRA of two ranks, LoRA, IA3 and FLoRA on half the layers, all far from the identity,
    plus two more FLoRA adapters that the tests register in MLflow."""
    from flora_platform.base_model import load_base

    model, _ = load_base(str(model_dir))
    shapes = flora.inject(model, "gpt_bigcode", max_slots=2, max_rank=4).module_shapes
    half = dict(list(shapes.items())[::2])
    return {
        "flora_r2": randomised(flora.init_adapter("flora", 2, shapes, seed=1), 11),
        "flora_r4": randomised(flora.init_adapter("flora", 4, shapes, seed=2), 12),
        "lora_r4": randomised(flora.init_adapter("lora", 4, shapes, scale=2.0, seed=3), 13),
        "ia3": randomised(flora.init_adapter("ia3", 1, shapes), 14),
        "flora_half": randomised(flora.init_adapter("flora", 1, half, seed=4), 15),
        "registry_v1": randomised(flora.init_adapter("flora", 2, shapes, seed=5), 16),
        "registry_v2": randomised(flora.init_adapter("flora", 3, shapes, seed=6), 17),
    }


DIRECTORY_ADAPTERS = ("flora_r2", "flora_r4", "lora_r4", "ia3", "flora_half")


class Reference:
    """Greedy `generate` alone on the base model with one adapter merged into its weights."""

    def __init__(self, model_dir: Path, adapters: dict[str, flora.Adapter]):
        from flora_platform.base_model import load_base

        self.base, self.tokenizer = load_base(str(model_dir))
        self.base.eval()
        self.adapters = adapters
        self._merged: dict[str | None, torch.nn.Module] = {None: self.base}

    def model(self, adapter: str | None):
        if adapter not in self._merged:
            self._merged[adapter] = merge_into(self.base, self.adapters[adapter]).eval()
        return self._merged[adapter]

    @torch.no_grad()
    def generate(self, prompt: str | list[int], adapter: str | None, max_tokens: int) -> tuple[list[int], str, str]:
        """(token ids, text, finish reason) as the API should answer greedily."""
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        x = torch.tensor([ids])
        out = self.model(adapter).generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
        )[0, len(ids):].tolist()
        finish = "stop" if out and out[-1] == self.tokenizer.eos_token_id else "length"
        return out, self.tokenizer.decode(out, skip_special_tokens=True), finish

    @torch.no_grad()
    def logprobs(self, prompt: str, adapter: str | None, output: list[int]) -> torch.Tensor:
        """log-softmax of the next-token logits at each output position: [len(output), V]."""
        ids = self.tokenizer(prompt)["input_ids"] + list(output)
        logits = self.model(adapter)(torch.tensor([ids])).logits[0, -len(output) - 1 : -1]
        return torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="package")
def assets(tmp_path_factory):
    """The model directory, adapters on disk, the reference, and an MLflow sqlite store."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = build_model_dir(root / "model")
    adapters = make_adapters(model_dir)
    for name in DIRECTORY_ADAPTERS:
        adapters[name].save(root / "adapters" / name)
    for name in ("registry_v1", "registry_v2"):
        adapters[name].save(root / "to_register" / name)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    from flora_platform.tracking import client_for

    # Artifacts under the test's folder, not ./mlruns of whatever directory pytest runs in.
    client_for(tracking_uri).create_experiment("serve-tests", artifact_location=(root / "artifacts").as_uri())
    return {"root": root, "model_dir": model_dir, "adapters": adapters, "tracking_uri": tracking_uri,
            "reference": Reference(model_dir, adapters)}


def register(assets, adapter: str, registered: str, alias: str | None = None) -> str:
    """Log `to_register/<adapter>` in an MLflow run and register it as a new version of `registered`."""
    from flora_platform import tracking

    uri = assets["tracking_uri"]
    client = tracking.client_for(uri)
    experiment = client.get_experiment_by_name("serve-tests").experiment_id
    run_id = client.create_run(experiment, run_name=f"register-{adapter}").info.run_id
    prefix, _, name = registered.partition("-")
    # What the fine-tuning job does with its adapters: log them and register a version each.
    uris = tracking.log_adapters(
        uri, run_id, {name: assets["root"] / "to_register" / adapter}, register=True, prefix=prefix, tags={"source": adapter}
    )
    version = uris[name].rsplit("/", 1)[1]
    client.set_terminated(run_id)
    if alias:
        client.set_registered_model_alias(registered, alias, version)
    return version


def app_args(assets, **changes) -> dict:
    args = {
        "model": {"name": str(assets["model_dir"]), "served_name": "tiny", "max_slots": 8, "max_rank": 4,
                  "max_lora_rank": 4, "torch_threads": 1, "chat_template": CHAT_TEMPLATE},
        "engine": {"max_batch_rows": 8, "max_batch_tokens": 256},
        "adapters": {"directory": str(assets["root"] / "adapters"), "cache_dir": str(assets["root"] / "cache")},
        "registry": {"tracking_uri": assets["tracking_uri"], "refresh_interval_s": 2},
        "limits": {"max_queued_requests": 4, "request_timeout_s": 60, "max_tokens": 120, "max_choices": 4},
        "security": {"api_key_env": API_KEY_ENV},
        "deployment": {"num_replicas": 1, "num_cpus": 1, "health_check_period_s": 2},
    }
    for key, value in changes.items():
        section, field = key.split("__")
        args[section][field] = value
    return args


@pytest.fixture(scope="package")
def endpoint(assets):
    """Ray (local, 127.0.0.1) + Serve on a free port + the flora app; yields its base URL."""
    import ray
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as build_from_config

    from serve_apps.flora_server import build_app

    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    os.environ[API_KEY_ENV] = API_KEY  # the replicas inherit the raylet's environment
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # As `serve run/deploy <config>` builds it (which checks the builder's signature too).
        serve.run(build_from_config(build_app, app_args(assets)), name="flora", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "app_args": app_args(assets), "build_app": build_app}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.pop(API_KEY_ENV, None)


def http(method: str, url: str, body=None, *, key: str | None = API_KEY, raw: bytes | None = None, timeout_s: float = 60):
    """(status, headers, parsed JSON or text) of one plain HTTP call."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, head, text = response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        status, head, text = err.code, dict(err.headers), err.read().decode()
    try:
        return status, head, json.loads(text)
    except json.JSONDecodeError:
        return status, head, text


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
