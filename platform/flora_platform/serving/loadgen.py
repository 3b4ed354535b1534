"""Open-loop load at a fixed arrival rate against the completions endpoint, mixed adapters.

    python -m flora_platform.serving.loadgen --url http://127.0.0.1:8000 --rate 8 --duration 20 \
        --models embedded flora-python@latest flora-c@latest

Request i is sent at `i / rate` seconds whatever happened to the earlier ones (the paper's
serving setup: arrivals do not wait for answers), naming `models[i % len(models)]`. Every
request ends with a status: 200, an HTTP error code, or 0 when the connection failed or the
client timeout passed (a hang). Reports throughput, tokens/s and latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RETRYABLE = frozenset({429, 500, 502, 503, 504})  # what the openai client retries (besides 408/409)


@dataclass
class Outcome:
    model: str
    status: int  # 0: no HTTP answer (connection error or client timeout)
    latency_s: float
    completion_tokens: int = 0
    error: str = ""
    sent_s: float = 0.0  # when it was sent, seconds after the load began


@dataclass
class LoadReport:
    rate_per_s: float
    duration_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def statuses(self) -> Counter:
        return Counter(o.status for o in self.outcomes)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    def latency_s(self, q: float) -> float | None:
        values = sorted(o.latency_s for o in self.ok)
        if not values:
            return None
        return values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> dict:
        ok = self.ok
        return {
            "sent": len(self.outcomes), "ok": len(ok), "statuses": dict(sorted(self.statuses.items())),
            "rate_per_s": self.rate_per_s, "elapsed_s": round(self.elapsed_s, 2),
            "throughput_rps": round(len(ok) / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "tokens_per_s": round(sum(o.completion_tokens for o in ok) / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "latency_p50_s": _round(self.latency_s(0.50)), "latency_p99_s": _round(self.latency_s(0.99)),
            "latency_mean_s": _round(statistics.fmean(o.latency_s for o in ok)) if ok else None,
            "per_model": dict(Counter(o.model for o in ok)),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def send_completion(url: str, body: dict, *, api_key: str = "", timeout_s: float = 60.0) -> tuple[int, dict | str]:
    """POST /v1/completions; (status, parsed JSON or error text). Status 0: no HTTP answer."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except Exception as err:  # noqa: BLE001 - connection reset, timeout: all mean "no answer"
        return 0, repr(err)


def run_load(
    url: str,
    models: list[str],
    *,
    rate_per_s: float,
    duration_s: float,
    prompt: str = "def main(",
    max_tokens: int = 16,
    api_key: str = "",
    timeout_s: float = 60.0,
    progress_every_s: float = 5.0,
) -> LoadReport:
    if rate_per_s <= 0 or duration_s <= 0 or not models:
        raise ValueError("rate_per_s and duration_s must be > 0 and models non-empty")
    count = max(1, round(rate_per_s * duration_s))
    report = LoadReport(rate_per_s, duration_s)
    lock = threading.Lock()

    def one(i: int) -> None:
        model = models[i % len(models)]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        started = time.monotonic()
        status, answer = send_completion(url, body, api_key=api_key, timeout_s=timeout_s)
        tokens = answer["usage"]["completion_tokens"] if status == 200 and isinstance(answer, dict) else 0
        outcome = Outcome(model, status, time.monotonic() - started, tokens, "" if status == 200 else str(answer)[:300],
                          sent_s=started - start)
        with lock:
            report.outcomes.append(outcome)

    # Enough threads that a slow answer never delays a later arrival.
    workers = min(256, max(4, int(rate_per_s * timeout_s) + 1))
    start = time.monotonic()
    next_progress = start + progress_every_s
    with ThreadPoolExecutor(workers, thread_name_prefix="loadgen") as pool:
        for i in range(count):
            delay = start + i / rate_per_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
            if time.monotonic() >= next_progress:
                with lock:
                    done = len(report.outcomes)
                log.info("%d/%d sent, %d answered", i + 1, count, done)
                next_progress += progress_every_s
    report.elapsed_s = time.monotonic() - start
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--models", nargs="+", required=True, help="model ids to cycle through (base, adapters, name@alias)")
    parser.add_argument("--rate", type=float, default=8.0, help="arrivals per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt", default="def main(")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = run_load(args.url, args.models, rate_per_s=args.rate, duration_s=args.duration, prompt=args.prompt,
                      max_tokens=args.max_tokens, api_key=args.api_key, timeout_s=args.timeout)
    print(json.dumps(report.summary(), indent=2))
    return 0 if len(report.ok) == len(report.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
