"""Training data streamed through Ray Data: every document of the source, read, filtered and
tokenised in Ray Data tasks, packed into blocks and mixed into batches on each worker.

Driver (`language_sources`): one lazy Dataset per language, rows {"content"}: The Stack-style
parquet/jsonl shards (parquet files whose row-group statistics say they hold other languages are
not read), the files of a source tree or of the embedded corpus, or a hub dataset streamed with
`datasets`. Files and parquet row groups are read in a seeded random order (a path-sorted source
keeps alike files together). Only parquet metadata is read on the driver.

Worker (`TrainStream`): for each language, its own Dataset on top of that source keeps the
documents that are neither held out (their SHA-1 is in the held-out set) nor another worker's
(SHA-1 mod world size), and tokenises them; the worker packs the token stream into blocks of
`seq_len` (each document followed by eos, no tail dropped: it starts the next block), passes them
through a seeded shuffle buffer, and starts the language's stream again when it ends (an epoch).
Batches take rows in cycles of one row per language in a seeded order, so every batch mixes
languages, every language gets the same number of rows, and each row is labelled by its language.

Why not `ray.train.get_dataset_shard`: its streaming split hands blocks to whichever worker asks
first, so what a worker trains on depends on timing (no exact resume), and its epoch barrier
stalls a worker that finished a language early while the others wait for it in the gradient
all-reduce. Here each worker's stream is a pure function of (source, seed, rank, world size),
order kept (`preserve_order`), so a resumed worker skips exactly the blocks it already trained on.

Memory: Ray Data's backpressure bounds what is in flight; a worker holds the shuffle buffer
(`shuffle_blocks` blocks per language) and less than one block of carried tokens per language.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from flora_platform import data
from flora_platform.data import CorpusConfig
from flora_platform.stream_tasks import (
    DOCS_PER_TASK, keep_language, map_resources, own_tokens, read_files, read_records, record_units, seeded_order,
    task_tokenizer,
)

log = logging.getLogger(__name__)

PREFETCH_CHUNKS = 4  # tokenised batches a worker queues ahead per language
RUN_AHEAD_BYTES = 64 * 2**20  # object store bytes one stream's Ray Data execution may hold


# --------------------------------------------------------------------------- driver: sources


def language_sources(cfg: CorpusConfig, languages: list[str]):
    """lang -> lazy Ray Dataset of that language's documents (rows {"content": str}), over the
    whole source (no caps; `max_file_bytes`, binary and blank documents are skipped)."""
    import ray.data

    source = cfg.source
    path = Path(source).expanduser()
    if source == data.EMBEDDED or (path.exists() and not data._dataset_files(path)):
        candidates = data._embedded_candidates(tuple(languages)) if source == data.EMBEDDED else data._tree_candidates(path)
        return {
            lang: ray.data.from_items(seeded_order([{"path": str(p)} for p in sorted(candidates.get(lang, []))], cfg.seed, lang))
            .map_batches(read_files, fn_kwargs={"max_file_bytes": cfg.max_file_bytes}, batch_format="pyarrow", batch_size=DOCS_PER_TASK, **map_resources(cfg))
            for lang in languages
        }
    if path.exists():
        files = data._dataset_files(path)
        return {
            lang: ray.data.from_items(seeded_order(record_units([f for f in files if data.may_hold(f, {lang})]), cfg.seed, lang))
            .map_batches(read_records, fn_kwargs={"lang": lang, "max_file_bytes": cfg.max_file_bytes}, batch_format="pyarrow", batch_size=1, **map_resources(cfg))
            for lang in languages
        }
    import datasets  # a hub id: load_documents has already checked that it loads

    rows = ray.data.from_huggingface(datasets.load_dataset(source, split="train", streaming=True))
    return {lang: _of_language(rows, lang, cfg) for lang in languages}


def _of_language(rows, lang: str, cfg: CorpusConfig):
    return rows.map_batches(
        keep_language, fn_kwargs={"lang": lang, "max_file_bytes": cfg.max_file_bytes},
        batch_format="pyarrow", batch_size=DOCS_PER_TASK, **map_resources(cfg),
    )


def token_chunks(dataset, tokenizer: dict, held_out: frozenset[bytes], rank: int, world: int, cfg: CorpusConfig) -> Iterator[np.ndarray]:
    """One pass over this worker's tokens of a language Dataset, in source order."""
    import pyarrow.compute as pc
    import ray.data

    own = dataset.map_batches(
        own_tokens, fn_kwargs={"tokenizer": tokenizer, "held_out": held_out, "rank": rank, "world": world},
        batch_format="pyarrow", batch_size=DOCS_PER_TASK, **map_resources(cfg),
    )
    own.context.execution_options.preserve_order = True  # the stream is a pure function of the source
    # Ray Data runs ahead as far as its buffers allow; training needs a few blocks a step, so a
    # small bound keeps the stream from taking CPU from the workers to tokenise far ahead.
    own.context.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=RUN_AHEAD_BYTES)
    own.context.enable_progress_bars = False  # progress is the training loop's
    for table in own.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        if table.num_rows:
            yield pc.list_flatten(table.column("tokens")).to_numpy()


def packed_blocks(chunks: Iterator[np.ndarray], seq_len: int) -> Iterator[torch.Tensor]:
    """Cut a token stream into LongTensor blocks [seq_len]; the remainder starts the next block."""
    carry = np.empty(0, dtype=np.int32)
    for chunk in chunks:
        tokens = np.concatenate([carry, chunk])
        n = len(tokens) // seq_len
        for i in range(n):
            yield torch.from_numpy(tokens[i * seq_len : (i + 1) * seq_len].astype(np.int64))
        carry = tokens[n * seq_len :]


def shuffled(blocks: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """An endless stream through a buffer of `buffer_size`: each arrival replaces a random
    buffered item, which is emitted. Deterministic for a given `rng` and input order."""
    buffer = []
    for block in blocks:
        if len(buffer) < buffer_size:
            buffer.append(block)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = block


# --------------------------------------------------------------------------- worker: batches


def cycle_order(languages: list[str], seed: int, rank: int, cycle: int) -> list[str]:
    order = list(languages)
    random.Random(f"{seed}:{rank}:cycle:{cycle}").shuffle(order)
    return order


def row_languages(languages: list[str], seed: int, rank: int, first: int, count: int) -> list[str]:
    """Languages of this worker's rows [first, first + count): cycles of one row per language."""
    n = len(languages)
    out, order, order_cycle = [], None, None
    for k in range(first, first + count):
        cycle, pos = divmod(k, n)
        if cycle != order_cycle:
            order, order_cycle = cycle_order(languages, seed, rank, cycle), cycle
        out.append(order[pos])
    return out


def rows_before(languages: list[str], seed: int, rank: int, rows: int) -> dict[str, int]:
    """How many of this worker's first `rows` rows each language got."""
    full, partial = divmod(rows, len(languages))
    counts = dict.fromkeys(languages, full)
    for lang in cycle_order(languages, seed, rank, full)[:partial]:
        counts[lang] += 1
    return counts


def _drain(chunks: queue.Queue, stop: threading.Event) -> Iterator:
    """The items a producer thread queues; its errors raised here; closing it stops the producer."""
    try:
        while True:
            item = chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class TrainStream:
    """One worker's endless training batches: (input_ids [B, L], languages [B]) per step."""

    def __init__(self, sources: dict, *, tokenizer_path: str, held_out: frozenset[bytes], seq_len: int,
                 batch_size: int, seed: int, rank: int, world: int, data: CorpusConfig):
        self.sources, self.languages = sources, sorted(sources)
        self.tokenizer = task_tokenizer(tokenizer_path)  # what the Ray Data tasks tokenise with
        self.held_out, self.seq_len = held_out, seq_len
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.data = data  # shuffle_blocks, stream_cpus, stream_tasks

    def _endless_tokens(self, lang: str) -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            got = False
            for chunk in token_chunks(self.sources[lang], self.tokenizer, self.held_out, self.rank, self.world, self.data):
                got = got or len(chunk) > 0
                yield chunk
            if not got:
                raise ValueError(
                    f"language {lang!r}: worker {self.rank} of {self.world} has no training documents (the held-out "
                    f"split and the other workers took them all); give {lang} more data or use fewer workers"
                )
            epoch += 1
            log.info("rank %d: %s: epoch %d of its stream done; starting again", self.rank, lang, epoch)

    def _prefetched_tokens(self, lang: str) -> Iterator[np.ndarray]:
        """`_endless_tokens` run ahead on a thread, `PREFETCH_CHUNKS` chunks at most: every
        language's stream starts at once, and restarting a stream (a new Ray Data execution)
        overlaps with training on what is queued."""
        chunks: queue.Queue = queue.Queue(maxsize=PREFETCH_CHUNKS)
        stop = threading.Event()

        def produce():
            try:
                for chunk in self._endless_tokens(lang):
                    while not stop.is_set():
                        try:
                            chunks.put(chunk, timeout=1.0)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as err:  # noqa: BLE001 - raised again in the consumer
                chunks.put(err)

        threading.Thread(target=produce, name=f"stream-{lang}", daemon=True).start()
        return _drain(chunks, stop)

    def blocks(self, lang: str) -> Iterator[torch.Tensor]:
        rng = random.Random(f"{self.seed}:{lang}:{self.rank}:shuffle")
        return shuffled(packed_blocks(self._prefetched_tokens(lang), self.seq_len), self.data.shuffle_blocks, rng)

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
        streams = {lang: self.blocks(lang) for lang in self.languages}
        if start_step:
            # Each worker's stream is deterministic: replay it to where the interrupted run was.
            done = rows_before(self.languages, self.seed, self.rank, start_step * self.batch_size)
            log.info("rank %d: resuming the data stream at step %d: skipping the blocks already trained on (%s)",
                     self.rank, start_step, ", ".join(f"{lang} {n}" for lang, n in done.items()))
            for lang, n in done.items():
                for _ in range(n):
                    next(streams[lang])
        step = start_step
        while True:
            langs = row_languages(self.languages, self.seed, self.rank, step * self.batch_size, self.batch_size)
            yield torch.stack([next(streams[lang]) for lang in langs]), langs
            step += 1
