"""What Ray Data's tasks run for the training stream (`flora_platform.streaming`): read files and
parquet row groups, keep one language's documents, keep a worker's own share, tokenise.

Neither this module nor `flora_platform.data` imports torch at its top: every task runs in its own
worker process, and importing torch and transformers there would cost seconds and hundreds of MB
per process. Tokenising uses the `tokenizers` backend of the base model's fast tokenizer, as
transformers configured it (`task_tokenizer`): the same ids as `tokenizer(texts)`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from pathlib import Path

import numpy as np

from flora_platform import data
from flora_platform.data import CorpusConfig

DOCS_PER_TASK = 256  # documents per Ray Data batch: tokenised together, one output row


def document_digest(text: str) -> bytes:
    return hashlib.sha1(text.encode()).digest()


def map_resources(cfg: CorpusConfig) -> dict:
    import ray.data

    return {"num_cpus": cfg.stream_cpus, "compute": ray.data.TaskPoolStrategy(size=cfg.stream_tasks)}


def keep_language(batch, lang: str, max_file_bytes: int):
    """The batch's usable documents of `lang` (a table with `lang` and `content`)."""
    import pyarrow as pa

    cfg = CorpusConfig(max_file_bytes=max_file_bytes)
    langs, contents = batch.column("lang").to_pylist(), batch.column("content").to_pylist()
    kept = [
        c for raw, c in zip(langs, contents)
        if raw and isinstance(c, str) and data.normalize_language(raw) == lang and data._clean_text(c, cfg) is not None
    ]
    return pa.table({"content": pa.array(kept, type=pa.string())})


def seeded_order(units: list[dict], seed: int, lang: str) -> list[dict]:
    """The units (files, row groups) in a seeded random order: sources are sorted by path (a
    folder's files are alike), and a shuffle buffer only mixes what is near in the stream."""
    units = list(units)
    random.Random(f"{seed}:{lang}:units").shuffle(units)
    return units


def record_units(files: list[Path]) -> list[dict]:
    """What a read task reads: a parquet file's row group, or a whole jsonl file (row_group -1)."""
    import pyarrow.parquet as pq

    units = []
    for f in files:
        groups = pq.ParquetFile(f).metadata.num_row_groups if f.suffix == ".parquet" else 0
        units += [{"path": str(f), "row_group": g} for g in range(groups)] or [{"path": str(f), "row_group": -1}]
    return units


def read_records(batch, lang: str, max_file_bytes: int):
    """The documents of `lang` in a batch of row groups / jsonl files, DOCS_PER_TASK rows at a time."""
    import pyarrow as pa

    for path, group in zip(batch.column("path").to_pylist(), batch.column("row_group").to_pylist()):
        if group >= 0:
            table = data.open_stack_parquet(path).read_row_group(group, columns=["lang", "content"])
            for start in range(0, table.num_rows, DOCS_PER_TASK):
                yield keep_language(table.slice(start, DOCS_PER_TASK), lang, max_file_bytes)
            continue
        records = data._iter_files_records([Path(path)])
        while rows := list(itertools.islice(records, DOCS_PER_TASK)):
            yield keep_language(pa.table({"lang": [r[0] for r in rows], "content": [r[1] for r in rows]}), lang, max_file_bytes)


def read_files(batch, max_file_bytes: int):
    import pyarrow as pa

    cfg = CorpusConfig(max_file_bytes=max_file_bytes)
    texts = list(data._read_texts([Path(p) for p in batch.column("path").to_pylist()], cfg))
    return pa.table({"content": pa.array(texts, type=pa.string())})


def task_tokenizer(path: str) -> dict:
    """What tasks tokenise with: the backend of `path`'s fast tokenizer serialised (exactly as
    transformers set it up) and its eos id; a tokenizer without a fast backend is loaded by path."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path} has no eos token; documents could not be separated")
    if getattr(tokenizer, "is_fast", False):
        return {"backend": tokenizer.backend_tokenizer.to_str(), "eos": tokenizer.eos_token_id}
    return {"path": path, "eos": tokenizer.eos_token_id}


@functools.lru_cache(maxsize=4)
def _backend(serialised: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(serialised)


@functools.lru_cache(maxsize=4)
def _auto_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _encode(tokenizer: dict, texts: list[str]) -> list[list[int]]:
    if "backend" in tokenizer:
        return [e.ids for e in _backend(tokenizer["backend"]).encode_batch(texts, add_special_tokens=False)]
    return _auto_tokenizer(tokenizer["path"])(texts, add_special_tokens=False, verbose=False)["input_ids"]


def own_tokens(batch, tokenizer: dict, held_out: frozenset[bytes], rank: int, world: int):
    """One row {"tokens": int32[]}: this worker's training documents of the batch, tokenised,
    each followed by eos, in order."""
    import pyarrow as pa

    texts = []
    for text in batch.column("content").to_pylist():
        digest = document_digest(text)
        if digest not in held_out and int.from_bytes(digest[:8], "little") % world == rank:
            texts.append(text)
    ids = _encode(tokenizer, texts) if texts else []
    eos = tokenizer["eos"]
    flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)
    return pa.table({"tokens": pa.array([flat], type=pa.list_(pa.int32()))})
