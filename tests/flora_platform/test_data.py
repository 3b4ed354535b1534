"""Corpus loading from every source, the split, packing and mixed batches."""

import json
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flora_platform import data
from flora_platform.data import CorpusConfig, load_documents, mixed_batches, pack_blocks, split_documents

ROWS = [
    {"lang": "Python", "content": f"def f{i}(x):\n    return x + {i}\n"} for i in range(6)
] + [
    {"lang": "Perl", "content": f"sub g{i} {{ return $_[0] * {i}; }}\n"} for i in range(4)
] + [
    {"lang": "Shell", "content": "echo hi\n"},
    {"lang": "Shell", "content": "echo hi\n"},  # duplicate: kept once
    {"lang": "Shell", "content": "bin\0ary"},  # binary: skipped
    {"lang": "Shell", "content": "   \n"},  # blank: skipped
    {"lang": "Shell", "content": "ls -la\n"},
]


def expected_by_language(rows):
    out = {}
    for row in rows:
        text = row["content"]
        if "\0" in text or not text.strip():
            continue
        lang = data.normalize_language(row["lang"])
        if text not in out.setdefault(lang, []):
            out[lang].append(text)
    return out


def write_parquet(path, rows):
    pq.write_table(pa.table({"content": [r["content"] for r in rows], "lang": [r["lang"] for r in rows]}), path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({**r, "size": len(r["content"])}) + "\n" for r in rows))


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "directory"])
def test_stack_style_sources(tmp_path, kind):
    if kind == "parquet":
        source = tmp_path / "stack.parquet"
        write_parquet(source, ROWS)
    elif kind == "jsonl":
        source = tmp_path / "stack.jsonl"
        write_jsonl(source, ROWS)
    else:  # a directory of shards, mixed formats
        source = tmp_path / "shards"
        source.mkdir()
        write_parquet(source / "part-0.parquet", ROWS[:7])
        write_jsonl(source / "part-1.jsonl", ROWS[7:])
    docs = load_documents(CorpusConfig(source=str(source)))
    expected = expected_by_language(ROWS)
    assert sorted(docs) == ["perl", "python", "shell"]
    for lang, texts in expected.items():
        assert sorted(docs[lang]) == sorted(texts), lang


def test_caps_and_language_filter_and_determinism(tmp_path):
    rows = [{"lang": "Python", "content": f"x = {i:04d}\n"} for i in range(100)]  # 9 bytes each
    rows += [{"lang": "C", "content": "int main(void) { return 0; }\n"}]
    source = tmp_path / "stack.parquet"
    write_parquet(source, rows)
    cfg = CorpusConfig(source=str(source), languages=("Python",), max_files_per_language=10)
    docs = load_documents(cfg)
    assert list(docs) == ["python"] and len(docs["python"]) == 10
    assert docs == load_documents(cfg)  # seeded
    assert docs != load_documents(CorpusConfig(source=str(source), languages=("python",), max_files_per_language=10, seed=1))
    by_bytes = load_documents(CorpusConfig(source=str(source), languages=("python",), max_bytes_per_language=50))
    assert len(by_bytes["python"]) == 5  # 5 * 9 bytes <= 50 < 6 * 9
    big = load_documents(CorpusConfig(source=str(source), max_file_bytes=20))
    assert "c" not in big  # its only file is over max_file_bytes


def test_source_tree(tmp_path):
    files = {
        "pkg/a.py": "import os\nprint(os.sep)\n",
        "pkg/b.pm": "package B;\n1;\n",
        "src/m.c": "int main(void) { return 0; }\n",
        "src/m.h": "#define N 3\n",
        "bin/run": "#!/usr/bin/env bash\necho run\n",  # no extension: shebang
        "bin/tool": "#!/usr/bin/python3\nprint(1)\n",
        "lib/x.rb": "puts 1\n",
        "lib/y.lua": "print(1)\n",
        "lib/z.jl": "println(1)\n",
        "lib/w.R": "print(1)\n",
        "lib/s.sh": "ls\n",
        "README.txt": "not code\n",
        "blob.py": "\x00\x01\x02",  # binary: skipped
        ".git/hooks/pre-commit.sh": "exit 0\n",  # VCS folder: skipped
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe not utf-8 \x81")  # undecodable: skipped
    docs = load_documents(CorpusConfig(source=str(tmp_path)))
    assert {lang: sorted(texts) for lang, texts in docs.items()} == {
        "c": sorted([files["src/m.c"], files["src/m.h"]]),
        "julia": [files["lib/z.jl"]],
        "lua": [files["lib/y.lua"]],
        "perl": [files["pkg/b.pm"]],
        "python": sorted([files["pkg/a.py"], files["bin/tool"]]),
        "r": [files["lib/w.R"]],
        "ruby": [files["lib/x.rb"]],
        "shell": sorted([files["bin/run"], files["lib/s.sh"]]),
    }


def test_embedded_corpus_has_python_and_a_disjoint_split():
    cfg = CorpusConfig(max_files_per_language=40, max_bytes_per_language=300_000, min_bytes_per_language=10_000)
    docs = load_documents(cfg)
    assert "python" in docs  # the standard library of the running interpreter is always there
    assert len(docs["python"]) >= 10
    assert all(len(texts) <= 40 and sum(len(t.encode()) for t in texts) <= 300_000 for texts in docs.values())
    train, held_out = split_documents(docs, cfg.eval_fraction, cfg.seed)
    for lang, texts in docs.items():
        assert held_out[lang] and train[lang]
        assert not set(train[lang]) & set(held_out[lang])
        assert sorted(train[lang] + held_out[lang]) == sorted(texts)
    only_python = CorpusConfig(languages=("python",), max_files_per_language=5)  # capped: never "thin"
    docs = load_documents(only_python)
    assert list(docs) == ["python"] and len(docs["python"]) == 5
    assert load_documents(only_python) == docs  # sorted walk + seeded sample
    assert load_documents(CorpusConfig(languages=("python",), max_files_per_language=5, seed=1)) != docs


def test_embedded_discovery_rules_and_thin_languages(tmp_path, monkeypatch, caplog):
    files = {
        "py/a.py": "x = 1\n" * 200, "py/b.py": "y = 2\n" * 200,
        "pl/X.pm": "1;\n",  # too little perl: dropped
        "inc/m.h": "#define M 1\n" * 100, "inc/c++/v.h": "template <class T> class v;\n",  # C++: not c
        "bin/run": "#!/bin/bash\necho run\n" * 40, "bin/tool": "#!/usr/bin/python3\nprint(1)\n",
        "bin/s.sh": "ls\n" * 300, "bin/data.txt": "#!/bin/sh\n",  # an extension other than .sh: not a script
        "completions/git": "complete -F _git git\n" * 30,  # bash completions have no shebang
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    roots = {
        "python": [(tmp_path / "py", "ext")], "perl": [(tmp_path / "pl", "ext")], "c": [(tmp_path / "inc", "ext")],
        "shell": [(tmp_path / "bin", "shebang"), (tmp_path / "completions", "all"), (tmp_path / "absent", "all")],
    }
    monkeypatch.setattr(data, "_embedded_roots", lambda: roots)
    with caplog.at_level("WARNING", logger="flora_platform.data"):
        docs = load_documents(CorpusConfig(min_bytes_per_language=500))
    assert "dropping perl" in caplog.text
    assert {lang: sorted(texts) for lang, texts in docs.items()} == {
        "c": [files["inc/m.h"]],
        "python": sorted([files["py/a.py"], files["py/b.py"]]),
        "shell": sorted([files["bin/run"], files["bin/s.sh"], files["completions/git"]]),
    }
    with pytest.raises(ValueError, match=r"languages \['perl'\]: no usable documents"):
        load_documents(CorpusConfig(languages=("perl",), min_bytes_per_language=500))


def test_split_holds_out_at_least_one_document_per_language():
    docs = {"a": ["a1", "a2"], "b": [f"b{i}" for i in range(50)]}
    train, held_out = split_documents(docs, 0.1, seed=0)
    assert len(held_out["a"]) == 1 and len(train["a"]) == 1
    assert len(held_out["b"]) == 5 and len(train["b"]) == 45
    assert (train, held_out) == split_documents(docs, 0.1, seed=0)
    with pytest.raises(ValueError, match="'a' has 1 document"):
        split_documents({"a": ["only"]}, 0.1, seed=0)


class CharTokenizer:
    """An independent reference tokenizer: one token per character, eos = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def decode(self, ids):
        return "".join("|" if i == 0 else chr(i) for i in ids)


def test_pack_blocks_shapes_and_round_trip():
    docs = {"x": ["abcdefg", "hij"], "y": ["k"]}
    blocks = pack_blocks(docs, CharTokenizer(), seq_len=4)
    # x: "abcdefg|hij|" = 12 tokens -> 3 blocks; y: "k|" = 2 tokens < 4 -> repeated into 1 block
    assert blocks["x"].shape == (3, 4) and blocks["x"].dtype == torch.long
    assert CharTokenizer().decode(blocks["x"].flatten().tolist()) == "abcdefg|hij|"
    assert CharTokenizer().decode(blocks["y"].flatten().tolist()) == "k|k|"
    dropped_tail = pack_blocks({"x": ["abcdefghij"]}, CharTokenizer(), seq_len=4)["x"]  # 11 tokens
    assert CharTokenizer().decode(dropped_tail.flatten().tolist()) == "abcdefgh"


def test_pack_blocks_with_a_real_tokenizer_round_trips(tmp_path):
    from flora_platform.base_model import train_tokenizer

    code = ["def f(x):\n    return x  # ok\n", "int main(void) { return 0; }\n", "echo \"$HOME\" | tr a b\n"]
    tok = train_tokenizer({"mix": code * 3}, vocab_size=300, model_max_length=64)
    blocks = pack_blocks({"mix": code}, tok, seq_len=8)["mix"]  # [N, 8]
    text = tok.decode(blocks.flatten().tolist())
    joined = "".join(c + tok.eos_token for c in code)
    assert joined.startswith(text) and len(text) > len(joined) - 3 * 8


def toy_blocks(sizes: dict[str, int], seq_len: int = 3) -> dict[str, torch.Tensor]:
    """Block i of language number j holds the values (j*1000 + i) * seq_len + [0, seq_len): unique."""
    return {
        lang: ((j * 1000 + torch.arange(n)).unsqueeze(1) * seq_len + torch.arange(seq_len))  # [N, L]
        for j, (lang, n) in enumerate(sorted(sizes.items()))
    }


def block_ids(batch: torch.Tensor, seq_len: int = 3) -> list[int]:
    return (batch[:, 0] // seq_len).tolist()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_mixed_batches_mix_languages_and_do_not_starve_small_ones():
    blocks = toy_blocks({"big": 500, "mid": 50, "tiny": 2})
    counts = {lang: 0 for lang in blocks}
    for input_ids, langs in take(mixed_batches(blocks, batch_size=6, seed=0), 20):
        assert input_ids.shape == (6, 3) and len(langs) == 6
        assert set(langs) == set(blocks)  # batch_size >= n_langs: every language in every batch
        for row, lang in zip(input_ids, langs):
            assert any(torch.equal(row, b) for b in blocks[lang])  # the label matches the row
            counts[lang] += 1
    assert counts == {"big": 40, "mid": 40, "tiny": 40}


def test_mixed_batches_ranks_are_disjoint_and_deterministic():
    blocks = toy_blocks({"a": 300, "b": 300, "c": 300})
    streams = [take(mixed_batches(blocks, batch_size=4, seed=7, rank=r, world_size=3), 20) for r in range(3)]
    seen = [{i for ids, _ in s for i in block_ids(ids)} for s in streams]
    assert all(len(s) == 80 for s in seen)  # 20 steps * 4 rows, no block twice within an epoch
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    again = take(mixed_batches(blocks, batch_size=4, seed=7, rank=1, world_size=3), 20)
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(streams[1], again))
    other_seed = take(mixed_batches(blocks, batch_size=4, seed=8, rank=1, world_size=3), 20)
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(streams[1], other_seed))


def test_mixed_batches_start_step_resumes_the_same_stream():
    blocks = toy_blocks({"a": 7, "b": 3})  # small: several language epochs pass in 25 steps
    full = take(mixed_batches(blocks, batch_size=3, seed=1, rank=1, world_size=2), 25)
    resumed = take(mixed_batches(blocks, batch_size=3, seed=1, rank=1, world_size=2, start_step=10), 15)
    for (x, lx), (y, ly) in zip(full[10:], resumed):
        assert torch.equal(x, y) and lx == ly


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="eval_fraction"):
        CorpusConfig(eval_fraction=1.0)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents({"a": ["x", "y"]}, 0.0, seed=0)
    with pytest.raises(ValueError, match="max_files_per_language"):
        CorpusConfig(max_files_per_language=0)
    source = tmp_path / "stack.jsonl"
    write_jsonl(source, ROWS)
    with pytest.raises(ValueError, match=r"languages \['cobol'\].*available: \['perl', 'python', 'shell'\]"):
        load_documents(CorpusConfig(source=str(source), languages=("COBOL",)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no code here\n")
    with pytest.raises(ValueError, match="source .* no usable documents"):
        load_documents(CorpusConfig(source=str(empty)))
    with pytest.raises(ValueError, match="source .* does not exist"):
        load_documents(CorpusConfig(source=str(tmp_path / "missing" / "stack.parquet")))
    with pytest.raises(ValueError, match="batch_size"):
        next(mixed_batches(toy_blocks({"a": 2}), batch_size=0, seed=0))
    with pytest.raises(ValueError, match="rank"):
        next(mixed_batches(toy_blocks({"a": 2}), batch_size=1, seed=0, rank=2, world_size=2))


def test_hub_dataset_ids_go_to_datasets_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        if name == "offline/unreachable":
            raise ConnectionError("Couldn't reach the Hub")
        return iter(ROWS)

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=fake_load_dataset))
    docs = load_documents(CorpusConfig(source="bigcode/the-stack-smol"))
    assert calls == [("bigcode/the-stack-smol", "train", True)]
    assert {lang: sorted(t) for lang, t in docs.items()} == {lang: sorted(t) for lang, t in expected_by_language(ROWS).items()}
    with pytest.raises(ValueError, match="source 'offline/unreachable' .* Hugging Face dataset .*ConnectionError"):
        load_documents(CorpusConfig(source="offline/unreachable"))
