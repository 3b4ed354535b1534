"""Training data streamed through Ray Data: what each worker reads, in which order, and how much
memory it takes. Real Ray Data on a local cluster; a real (tiny) tokenizer saved to disk."""

import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flora_platform import data
from flora_platform.data import CorpusConfig
from flora_platform.stream_tasks import document_digest, task_tokenizer
from flora_platform.streaming import (
    TrainStream, language_sources, packed_blocks, rows_before, row_languages, shuffled, token_chunks,
)

WORD = {"python": "pyth", "c": "cc"}  # every document of a language repeats its word


def document(lang: str, i: int) -> str:
    return f"{WORD[lang]} doc{i:05d} " + f"{WORD[lang]} " * 20 + "\n"


def stack_layout(root, n_docs=120):
    """The Stack's layout: a folder per language, parquet shards holding one language each."""
    for lang, raw in (("python", "Python"), ("c", "C")):
        folder = root / "data" / lang
        folder.mkdir(parents=True)
        for shard in range(2):
            ids = range(shard * n_docs // 2, (shard + 1) * n_docs // 2)
            pq.write_table(pa.table({"content": [document(lang, i) for i in ids], "lang": [raw] * len(ids)}), folder / f"train-{shard}.parquet")
    return root / "data"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from flora_platform.base_model import train_tokenizer

    tok = train_tokenizer({"mix": [document(lang, i) for lang in WORD for i in range(50)]}, vocab_size=300, model_max_length=64)
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return str(path)


def decoded_docs(tokenizer, rows: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row.tolist()) for row in rows]


def worker_batches(sources, tokenizer_dir, held_out, rank, world, steps, start_step=0, batch_size=4):
    stream = TrainStream(
        sources, tokenizer_path=tokenizer_dir, held_out=held_out, seq_len=16, batch_size=batch_size, seed=3,
        rank=rank, world=world, data=CorpusConfig(shuffle_blocks=8),
    )
    batches = stream.batches(start_step)
    return [next(batches) for _ in range(steps)]


def test_workers_stream_labelled_mixed_batches_disjointly_without_held_out_documents(ray_local, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    source = stack_layout(tmp_path)
    held_out = frozenset(document_digest(document(lang, i)) for lang in WORD for i in (0, 7, 30))
    sources = language_sources(CorpusConfig(source=str(source)), ["c", "python"])
    seen = []
    for rank in range(2):
        ids_seen = set()
        for input_ids, langs in worker_batches(sources, tokenizer_dir, held_out, rank, 2, steps=20):
            assert input_ids.shape == (4, 16) and input_ids.dtype == torch.long
            assert sorted(langs) == ["c", "c", "python", "python"]  # every batch mixes, equally
            for text, lang in zip(decoded_docs(tokenizer, input_ids), langs):
                other = WORD["c" if lang == "python" else "python"]
                assert not re.search(rf"\b{other}\b", text), (lang, text)  # the row is its label's language
                ids_seen |= {(lang, int(i)) for i in re.findall(r"doc(\d{5})", text)}
        assert not ids_seen & {(lang, i) for lang in WORD for i in (0, 7, 30)}  # held out: never trained on
        seen.append(ids_seen)
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each worker has its own documents


def test_a_resumed_stream_continues_where_it_stopped(ray_local, tmp_path, tokenizer_dir):
    source = tmp_path / "one.jsonl"  # small: several epochs of each language pass in 30 steps
    source.write_text("".join(
        f'{{"lang": "{lang}", "content": {document(lang, i)!r}}}\n'.replace("'", '"') for lang in WORD for i in range(6)
    ))
    sources = language_sources(CorpusConfig(source=str(source)), ["c", "python"])
    full = worker_batches(sources, tokenizer_dir, frozenset(), 1, 2, steps=30)
    resumed = worker_batches(sources, tokenizer_dir, frozenset(), 1, 2, steps=12, start_step=18)
    for (x, lx), (y, ly) in zip(full[18:], resumed):
        assert torch.equal(x, y) and lx == ly


def test_tasks_tokenise_as_the_transformers_tokenizer_does(tokenizer_dir):
    from transformers import AutoTokenizer

    from flora_platform.stream_tasks import _encode

    texts = [document("c", 3), "def f(x):\n    return x  # é ☃\n", ""]
    reference = AutoTokenizer.from_pretrained(tokenizer_dir)(texts, add_special_tokens=False)["input_ids"]
    assert _encode(task_tokenizer(tokenizer_dir), texts) == reference
    assert _encode({"path": tokenizer_dir, "eos": 0}, texts) == reference  # the fallback for slow tokenizers


def test_row_languages_cycle_and_count():
    langs = ["a", "b", "c"]
    rows = row_languages(langs, seed=1, rank=0, first=0, count=30)
    assert all(sorted(rows[i : i + 3]) == langs for i in range(0, 30, 3))  # one row per language per cycle
    for n in (0, 1, 5, 29, 30):
        assert rows_before(langs, 1, 0, n) == {lang: rows[:n].count(lang) for lang in langs}
    assert row_languages(langs, 1, 0, 7, 9) == rows[7:16]


def test_packing_keeps_every_token_and_the_shuffle_is_a_seeded_permutation():
    import random

    import numpy as np

    chunks = [np.arange(0, 5, dtype=np.int32), np.arange(5, 17, dtype=np.int32), np.arange(17, 20, dtype=np.int32)]
    blocks = list(packed_blocks(iter(chunks), seq_len=4))
    assert torch.equal(torch.cat(blocks), torch.arange(20))  # remainders start the next block
    out = list(shuffled(iter(range(100)), 10, random.Random(0)))
    assert len(out) == 90 and len(set(out)) == 90 and out != sorted(out)
    assert out == list(shuffled(iter(range(100)), 10, random.Random(0)))


def test_stack_files_of_other_languages_are_not_read(tmp_path):
    source = stack_layout(tmp_path, n_docs=8)
    # A shard that says it holds Lua but has no `content` column: reading it would fail.
    (source / "lua").mkdir()
    pq.write_table(pa.table({"lang": ["Lua"] * 3}), source / "lua" / "train-0.parquet")
    assert data.parquet_languages(source / "lua" / "train-0.parquet") == {"lua"}
    docs = data.load_documents(CorpusConfig(source=str(source), languages=("python",)))
    assert list(docs) == ["python"] and len(docs["python"]) == 8
    with pytest.raises(ValueError, match="lacks column"):
        data.load_documents(CorpusConfig(source=str(source), languages=("lua",)))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def test_a_corpus_many_times_the_old_caps_streams_through_in_bounded_memory(ray_local, tmp_path, tokenizer_dir):
    """24 MB of one language (12x the old 2 MB cap) through one worker's whole stream: held, its
    tokens would take far more than the bound; streamed, the worker's memory stays flat."""
    rows = 24 * 2**20 // len(document("python", 0))
    folder = tmp_path / "big"
    folder.mkdir()
    per_file = rows // 8
    for f in range(8):
        ids = range(f * per_file, (f + 1) * per_file)
        pq.write_table(pa.table({"content": [document("python", i) for i in ids], "lang": ["Python"] * per_file}), folder / f"part-{f}.parquet")
    sources = language_sources(CorpusConfig(source=str(folder)), ["python"])

    @ray_local.remote(num_cpus=1)
    def consume(dataset):  # a fresh process, like a training worker
        import time

        start, peak, tokens, t0 = None, 0.0, 0, time.perf_counter()
        for i, block in enumerate(packed_blocks(token_chunks(dataset, task_tokenizer(tokenizer_dir), frozenset(), 0, 1, CorpusConfig()), 64)):
            tokens += block.numel()
            if i == 100:
                start = rss_mb()  # after the pipeline and the tokenizer are up
            if i % 500 == 0 and start is not None:
                peak = max(peak, rss_mb())
        return tokens, start, max(peak, rss_mb()), time.perf_counter() - t0

    tokens, start, peak, seconds = ray_local.get(consume.remote(sources["python"]))
    held_mb = tokens * 8 / 2**20  # the blocks as LongTensors, had the worker kept them
    print(f"streamed {tokens} tokens in {seconds:.1f} s; worker RSS {start:.0f} -> peak {peak:.0f} MB; held would be {held_mb:.0f} MB", file=sys.stderr)
    assert held_mb > 40
    assert peak - start < held_mb / 2, (start, peak)
