"""Training step time: one adapter per language in mixed batches vs one shared adapter.

    python jobs/bench_train_step.py [--model PATH] [--batch-size 8] [--seq-len 128] [--out benchmarks/train]

FLoRA's training-side claim: N adapters train in one mixed batch for about the price of one.
Both set-ups run in one process on the same batches, steps interleaved so that machine load hits
both alike; the median step times and their ratio go to CSV. The model defaults to the cached
embedded base (built by the fine-tuning job); any causal LM directory works.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

import torch

import flora
from flora_platform.base_model import load_base
from flora_platform.data import CorpusConfig, load_documents, mixed_batches, pack_blocks
from flora_platform.train import per_row_token_losses


def build(model, names: list[str], rank: int):
    model = copy.deepcopy(model)
    banks = flora.inject(model, "auto", max_slots=len(names) + 1, max_rank=rank)
    for i, name in enumerate(names):
        banks.load(name, flora.init_adapter("flora", rank, banks.module_shapes, seed=i))
    optimizer = torch.optim.AdamW(banks.trainable_parameters(names), lr=8e-3, weight_decay=0.0)
    return model, optimizer


def step(model, optimizer, ids, names) -> float:
    t0 = time.perf_counter()
    with flora.route(model, names):
        loss = per_row_token_losses(model(input_ids=ids).logits, ids).mean()
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def default_model() -> str:
    found = sorted(Path("~/.cache/flora/base").expanduser().glob("embedded-*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no cached embedded base: run `make finetune` once, or pass --model")
    return str(found[-1])  # the most recently built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/train")
    args = parser.parse_args()

    model, tokenizer = load_base(args.model or default_model())
    docs = load_documents(CorpusConfig(max_files_per_language=40))
    blocks = pack_blocks(docs, tokenizer, args.seq_len)
    languages = sorted(blocks)
    multi, multi_opt = build(model, languages, args.rank)
    single, single_opt = build(model, ["all"], args.rank)
    batches = mixed_batches(blocks, args.batch_size, seed=0)
    times = {"per_language": [], "single": []}
    for i in range(args.steps + 5):
        ids, langs = next(batches)
        runs = [("per_language", multi, multi_opt, langs), ("single", single, single_opt, ["all"] * len(langs))]
        for label, m, opt, names in runs if i % 2 else runs[::-1]:
            elapsed = step(m, opt, ids, names)
            if i >= 5:  # warm-up steps are not timed
                times[label].append(elapsed)
        if (i + 1) % 10 == 0:
            print(f"step {i + 1}/{args.steps + 5}", flush=True)

    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["per_language"] / medians["single"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_step_cpu.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setup", "adapters", "batch_size", "seq_len", "rank", "median_step_s"])
        writer.writerow(["per_language", len(languages), args.batch_size, args.seq_len, args.rank, f"{medians['per_language']:.4f}"])
        writer.writerow(["single", 1, args.batch_size, args.seq_len, args.rank, f"{medians['single']:.4f}"])
    print(f"median step: {len(languages)} adapters {medians['per_language'] * 1e3:.1f} ms, "
          f"1 adapter {medians['single'] * 1e3:.1f} ms, ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
