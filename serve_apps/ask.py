"""Ask the live endpoint: one completion per model, all at once, so that they share batches.

    python serve_apps/ask.py                                  # the base model + every @champion (else @latest)
    python serve_apps/ask.py --models embedded flora-python@champion --prompt "def fib(n):"

Prints each model's answer and latency, and how many adapters the replica's forward passes mixed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from flora_platform.serving.loadgen import send_completion


def get(url: str, api_key: str) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return json.loads(response.read())


def default_models(url: str, api_key: str) -> list[str]:
    """The base model, then every `@champion` adapter, else every `@latest`, else the directory ones."""
    listed = get(f"{url}/v1/models", api_key)["data"]
    base = [m["id"] for m in listed if m["source"] == "base"]
    for pick in (lambda m: m["id"].endswith("@champion"), lambda m: m["id"].endswith("@latest"),
                 lambda m: m["source"] == "directory"):
        adapters = [m["id"] for m in listed if pick(m)]
        if adapters:
            return base + adapters
    return base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--models", nargs="*", help="default: the base model and the registry's champions")
    parser.add_argument("--prompt", default="#include <stdio.h>\n\nint main(int argc, char **argv)\n{\n")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--api-key", default=os.environ.get("FLORA_API_KEY", ""))
    args = parser.parse_args(argv)
    models = args.models or default_models(args.url, args.api_key)

    def ask(model: str):
        started = time.monotonic()
        body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
        status, answer = send_completion(args.url, body, api_key=args.api_key)
        return model, status, answer, time.monotonic() - started

    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(ask, models))
    failed = 0
    print(f"prompt: {args.prompt!r}")
    for model, status, answer, seconds in results:
        if status == 200:
            print(f"\n[{model}] {seconds:.2f} s, {answer['usage']['completion_tokens']} tokens\n{answer['choices'][0]['text']}")
        else:
            failed += 1
            print(f"\n[{model}] HTTP {status}: {answer}")
    forwards = get(f"{args.url}/health", args.api_key)["forwards"]
    print(f"\nforward passes so far: {forwards['forwards']}, of which {forwards['mixed_forwards']} mixed adapters; "
          f"at most {forwards['max_adapters_per_forward']} adapters in one")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
