"""Memory while streaming a large Stack-style corpus to training workers through Ray Data.

    python jobs/bench_data_stream.py [--size-gb 1.0] [--languages 4] [--workers 2] [--out benchmarks/data_stream]

Writes a synthetic The Stack-style parquet set (a folder per language, `content` and `lang`
columns; kept between runs), then streams every worker's share of every language once, the way
a fine-tuning worker reads it (`flora_platform.streaming`: read, filter, tokenise in Ray Data
tasks, packed into blocks on the worker), recording the RSS of the driver over time and of each
worker (after its first 200 blocks, and its peak). Writes `data_stream.csv` (the figures),
`data_stream_rss.csv` (the samples over time) and `data_stream.png` when matplotlib is present.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import threading
import time
from pathlib import Path

import psutil

WORDS = ["def", "return", "for", "in", "if", "else", "while", "int", "char", "local", "end", "function",
         "print", "value", "index", "count", "result", "buffer", "node", "list", "map", "self", "x", "y"]


def synthetic_document(rng: random.Random, lang: str) -> str:
    lines = []
    for _ in range(rng.randint(20, 120)):
        words = [rng.choice(WORDS) if rng.random() < 0.7 else f"{rng.choice(WORDS)}_{rng.randint(0, 9999)}" for _ in range(rng.randint(3, 12))]
        lines.append("    " * rng.randint(0, 3) + " ".join(words) + (";" if lang == "c" else ""))
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, size_bytes: int, languages: list[str]) -> int:
    """The Stack's layout under `root`; returns the bytes of content written (reused when present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stamp = root / "SIZE"
    if stamp.exists() and stamp.read_text() == f"{size_bytes}:{','.join(languages)}":
        return size_bytes
    per_language = size_bytes // len(languages)
    for lang in languages:
        folder = root / "data" / lang
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(lang)
        written, shard = 0, 0
        while written < per_language:
            docs = []
            while written < per_language and len(docs) < 20_000:
                docs.append(synthetic_document(rng, lang))
                written += len(docs[-1])
            pq.write_table(pa.table({"content": docs, "lang": [lang.capitalize()] * len(docs)}),
                           folder / f"train-{shard:04d}.parquet", row_group_size=2_000)
            shard += 1
        print(f"corpus: {lang}: {written / 1e6:.0f} MB in {shard} shards", flush=True)
    stamp.write_text(f"{size_bytes}:{','.join(languages)}")
    return size_bytes


class RssSampler:
    """Samples this process's RSS every `period` s (the workers report their own)."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, me.memory_info().rss / 2**20))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def stream_worker_share(sources: dict, tokenizer_path: str, rank: int, world: int, seq_len: int, data) -> dict:
    """One training worker's pass over its share of every language; its own peak RSS."""
    from flora_platform.stream_tasks import task_tokenizer
    from flora_platform.streaming import packed_blocks, token_chunks

    proc, peak, blocks, t0, start = psutil.Process(), 0.0, 0, time.perf_counter(), None
    tokenizer = task_tokenizer(tokenizer_path)
    for lang, dataset in sorted(sources.items()):
        for i, _ in enumerate(packed_blocks(token_chunks(dataset, tokenizer, frozenset(), rank, world, data), seq_len)):
            blocks += 1
            if blocks == 200:
                start = proc.memory_info().rss / 2**20  # the pipeline and the tokenizer are up
            if i % 200 == 0:
                peak = max(peak, proc.memory_info().rss / 2**20)
        print(f"rank {rank}: {lang} done, {blocks} blocks so far, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"rank": rank, "blocks": blocks, "tokens": blocks * seq_len, "seconds": time.perf_counter() - t0,
            "rss_after_200_blocks_mb": start, "peak_rss_mb": max(peak, proc.memory_info().rss / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--languages", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--stream-cpus", type=float, default=0.0)
    parser.add_argument("--stream-tasks", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/data_stream")
    args = parser.parse_args()

    import ray

    from flora_platform.base_model import train_tokenizer
    from flora_platform.data import CorpusConfig
    from flora_platform.streaming import language_sources

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    languages = ["c", "julia", "lua", "perl", "python", "r", "ruby", "shell"][: args.languages]
    corpus = out / "corpus"
    size = write_corpus(corpus, int(args.size_gb * 1e9), languages)
    rng = random.Random(0)
    tokenizer = train_tokenizer({lang: [synthetic_document(rng, lang) for _ in range(50)] for lang in languages},
                                vocab_size=2048, model_max_length=args.seq_len)
    tokenizer.save_pretrained(out / "tokenizer")

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    try:
        worker = ray.remote(num_cpus=1)(stream_worker_share)
        with RssSampler() as sampler:
            t0 = time.perf_counter()
            data = CorpusConfig(source=str(corpus / "data"), stream_cpus=args.stream_cpus, stream_tasks=args.stream_tasks)
            sources = language_sources(data, languages)
            results = ray.get([worker.remote(sources, str(out / "tokenizer"), r, args.workers, args.seq_len, data)
                               for r in range(args.workers)])
            seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()

    tokens = sum(r["tokens"] for r in results)
    rows = [
        ("corpus_bytes", size, "bytes"), ("languages", len(languages), ""), ("workers", args.workers, ""),
        ("tokens_streamed", tokens, "tokens"), ("seconds", round(seconds, 1), "s"),
        ("corpus_mb_per_s", round(size / 1e6 / seconds, 2), "MB/s"),
        ("driver_peak_rss_mb", round(max(s[1] for s in sampler.samples), 1), "MiB"),
        *((f"worker{r['rank']}_rss_after_200_blocks_mb", round(r["rss_after_200_blocks_mb"] or 0, 1), "MiB") for r in results),
        *((f"worker{r['rank']}_peak_rss_mb", round(r["peak_rss_mb"], 1), "MiB") for r in results),
        ("cpus", os.cpu_count(), ""),
    ]
    with open(out / "data_stream.csv", "w", newline="") as f:
        csv.writer(f).writerows([("figure", "value", "unit"), *rows])
    with open(out / "data_stream_rss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("seconds", "driver_rss_mb"), *sampler.samples])
    for name, value, unit in rows:
        print(f"{name:34s} {value} {unit}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    t, driver = zip(*sampler.samples)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, driver, label="driver")
    for r in results:
        ax.axhline(r["peak_rss_mb"], linestyle="--", color=f"C{r['rank'] + 1}", label=f"worker {r['rank']}: peak")
        ax.axhline(r["rss_after_200_blocks_mb"] or 0, linestyle=":", color=f"C{r['rank'] + 1}", label=f"worker {r['rank']}: after 200 blocks")
    ax.set(xlabel="seconds", ylabel="RSS (MiB)", title=f"Streaming {size / 1e9:.1f} GB of parquet to {args.workers} workers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "data_stream.png", dpi=120)
    print(f"wrote {out}/data_stream.csv, data_stream_rss.csv, data_stream.png")


if __name__ == "__main__":
    main()
