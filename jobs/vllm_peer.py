"""vLLM as a benchmark peer: a long-lived process that runs generation jobs sent to it as JSON lines.

    .venv-vllm/bin/python jobs/vllm_peer.py --model DIR [--lora NAME=DIR ...] [--rows 32] [--tokens 512]

Runs in vLLM's own virtualenv (`make vllm-venv`: vLLM pins other transformers versions than ours),
so it imports nothing of this project. `jobs/bench_engine.py` starts it once and sends one job per
timed run, interleaved with its own runs on the same machine:

    {"prompts": [[token ids]], "max_tokens": [n], "loras": [name or null]}   one line on stdin
    RESULT {"wall_s": s, "tokens": [[token ids]]}                          one line on stdout

Greedy, end-of-sequence ignored, token-id prompts (no tokenizer), as our engine runs them; the
wall time covers `LLM.generate` only. vLLM's own log lines go to stdout too, hence the marker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model directory written by save_pretrained")
    parser.add_argument("--lora", action="append", default=[], help="NAME=DIR of a PEFT LoRA adapter (repeatable)")
    parser.add_argument("--rows", type=int, default=32, help="max_num_seqs")
    parser.add_argument("--tokens", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-lora-rank", type=int, default=8)
    parser.add_argument("--memory-fraction", type=float, default=0.4, help="of this node's memory, for vLLM's KV cache")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    loras = {}
    for i, spec in enumerate(args.lora, start=1):
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--lora {spec!r}: give NAME=DIR")
        loras[name] = LoRARequest(name, i, path)
    llm = LLM(
        model=args.model, skip_tokenizer_init=True, dtype=args.dtype, max_num_seqs=args.rows,
        max_num_batched_tokens=args.tokens, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.memory_fraction, enable_lora=bool(loras),
        max_loras=max(len(loras), 1), max_lora_rank=args.max_lora_rank,
    )
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        params = [SamplingParams(temperature=0, ignore_eos=True, detokenize=False, max_tokens=n) for n in job["max_tokens"]]
        lora = [loras[name] if name else None for name in job.get("loras") or [None] * len(prompts)]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora if loras else None, use_tqdm=False)
        wall = time.perf_counter() - started
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        print("RESULT " + json.dumps({"wall_s": wall, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
