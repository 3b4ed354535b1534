"""Code files labelled by language: load a corpus, split it, pack it into blocks, mix it into batches.

Sources (`CorpusConfig.source`):
    "embedded"          code already on any machine with Python: the standard library (python),
                        Perl's @INC (perl), /usr/include headers (c), scripts with a sh/bash
                        shebang and bash completions (shell); languages with too little text
                        are dropped with a warning. Needs no download.
    a parquet/jsonl     The Stack layout: one row per file with `content` and `lang` columns;
      file or directory a directory counts as a dataset when it holds such files and no code.
    a source tree       a directory of code: the language comes from the file extension
                        (`EXTENSION_LANGUAGES`), or the shebang of a file without one.
    anything else       a Hugging Face dataset id, streamed with `datasets.load_dataset`.

Everything is deterministic and bounded: walks are sorted, sampling is seeded per language
(`random.Random(f"{seed}:{lang}")`), each language keeps at most `max_files_per_language`
documents and `max_bytes_per_language` bytes, and binary, undecodable, empty, duplicate and
huge files are skipped.

Shapes: `N` blocks of one language, `L` sequence length (`seq_len`), `B` batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
DATASET_SUFFIXES = (".parquet", ".jsonl")

EXTENSION_LANGUAGES = {
    ".py": "python", ".pyi": "python",
    ".pl": "perl", ".pm": "perl",
    ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hh": "cpp", ".hpp": "cpp", ".hxx": "cpp",
    ".sh": "shell", ".bash": "shell",
    ".rb": "ruby", ".lua": "lua", ".jl": "julia", ".r": "r", ".R": "r",
    ".js": "javascript", ".mjs": "javascript", ".ts": "typescript",
    ".go": "go", ".rs": "rust", ".java": "java", ".kt": "kotlin", ".scala": "scala",
    ".swift": "swift", ".php": "php", ".cs": "csharp", ".hs": "haskell", ".ml": "ocaml",
    ".ex": "elixir", ".exs": "elixir", ".erl": "erlang", ".clj": "clojure", ".rkt": "racket",
    ".f90": "fortran", ".sql": "sql", ".tcl": "tcl", ".el": "emacs-lisp", ".zig": "zig",
}
# Interpreter named by a `#!` line -> language, for files without an extension (scripts).
SHEBANG_LANGUAGES = {
    "sh": "shell", "bash": "shell", "dash": "shell", "python": "python", "perl": "perl",
    "ruby": "ruby", "lua": "lua", "julia": "julia", "Rscript": "r", "node": "javascript",
}
_SHEBANG = re.compile(rb"^#!\s*\S*/(?:env\s+(?:-\S+\s+)*)?([A-Za-z]+)")
# The Stack spells languages "Python", "C++", "Shell"; other sets say "bash" or "py".
LANGUAGE_ALIASES = {"c++": "cpp", "c#": "csharp", "bash": "shell", "sh": "shell", "py": "python"}
# Folders that hold copies, caches or other people's vendored code, never the tree's own code.
SKIPPED_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox", "site-packages"}


def normalize_language(name: str) -> str:
    """"Python" -> "python", "C++" -> "cpp", "Emacs Lisp" -> "emacs-lisp"."""
    key = name.strip().lower().replace(" ", "-")
    return LANGUAGE_ALIASES.get(key, key)


@dataclass(frozen=True)
class CorpusConfig:
    """Which code files to read and how many.

    source: "embedded" | a local parquet/jsonl file or directory | a source tree | a HF dataset id.
    languages: keep only these (normalised: "Python" == "python"); () keeps every language found.
    max_files_per_language / max_bytes_per_language: caps on the sample kept per language.
    eval_fraction: held-out share per language, by document (used by `split_documents`).
    seed: seeds every sampling step.
    max_file_bytes: larger files / rows are skipped (minified or generated code, data blobs).
    min_bytes_per_language: embedded corpus only: languages this machine holds less text of
        (fewer files than the cap, fewer bytes than this or half the byte cap) are dropped with a
        warning; explicit sources keep everything they were given.
    max_scan_rows: rows read from a parquet/jsonl/hub source before sampling; bounds a streamed
        hub dataset, which may be terabytes.
    The caps bound the sample `load_documents` keeps in memory: the held-out split is drawn from
    it (and an embedded base's tokenizer learns from it). Training streams every other document
    of the source (`flora_platform.streaming`):
    shuffle_blocks: blocks each worker's shuffle buffer holds per language.
    stream_cpus: CPUs each Ray Data task of the stream (reading, tokenising) reserves. 0, the
        default, reserves none: the tasks share the node's CPUs with the training workers, which
        otherwise hold every CPU of a small or fully booked cluster (a search's trials) and
        would wait forever for their data.
    stream_tasks: Ray Data tasks that run at once per stage of each worker's stream of a language.
    """

    source: str = EMBEDDED
    languages: tuple[str, ...] = ()
    max_files_per_language: int = 400
    max_bytes_per_language: int = 2_000_000
    eval_fraction: float = 0.1
    seed: int = 0
    max_file_bytes: int = 30_000
    min_bytes_per_language: int = 50_000
    max_scan_rows: int = 1_000_000
    shuffle_blocks: int = 256
    stream_cpus: float = 0.0
    stream_tasks: int = 1

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"source must be 'embedded', a local path or a dataset id, got {self.source!r}")
        if isinstance(self.languages, str):
            raise ValueError(f"languages must be a list of names, got the string {self.languages!r}; write [{self.languages!r}]")
        # YAML gives lists; keep the dataclass hashable and the names in one spelling.
        object.__setattr__(self, "languages", tuple(normalize_language(lang) for lang in self.languages))
        if not self.stream_cpus >= 0:
            raise ValueError(f"stream_cpus must be >= 0, got {self.stream_cpus}")
        for name in ("max_files_per_language", "max_bytes_per_language", "max_file_bytes", "max_scan_rows", "shuffle_blocks", "stream_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_bytes_per_language < 0:
            raise ValueError(f"min_bytes_per_language must be >= 0, got {self.min_bytes_per_language}")
        _check_eval_fraction(self.eval_fraction)


def _check_eval_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}; e.g. 0.1 holds out 10% of each language's documents")


def looks_like_path(name: str) -> bool:
    """True for strings meant as local paths rather than hub ids ("owner/name" or "name")."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith(DATASET_SUFFIXES)
    )


# ---------------------------------------------------------------------------------------------
# load_documents
# ---------------------------------------------------------------------------------------------


def load_documents(cfg: CorpusConfig) -> dict[str, list[str]]:
    """lang -> documents (file contents), sampled under `cfg`'s caps; languages sorted by name."""
    source = cfg.source
    path = Path(source).expanduser()
    if source == EMBEDDED:
        # Walk only the requested languages' roots (/usr/lib and /usr/share take the longest);
        # every root when one of them is missing, to list what is available.
        candidates = _embedded_candidates(cfg.languages)
        if not all(candidates.get(lang) for lang in cfg.languages):
            candidates = _embedded_candidates()
        docs = _read_candidates(candidates, cfg)
        docs = _drop_thin_languages(docs, cfg)
    elif path.exists():
        dataset_files = _dataset_files(path)
        if dataset_files:
            found = set()
            if cfg.languages:  # The Stack's per-language files: read only the wanted ones
                found = {lang for f in dataset_files if f.suffix == ".parquet" for lang in parquet_languages(f) or ()}
                dataset_files = [f for f in dataset_files if may_hold(f, set(cfg.languages))]
            logger.info("reading %d parquet/jsonl file(s) from %s", len(dataset_files), path)
            docs = _sample_records(_iter_files_records(dataset_files), cfg, found)
        else:
            logger.info("reading source tree %s", path)
            docs = _read_candidates(_tree_candidates(path), cfg)
    elif looks_like_path(source):
        raise ValueError(f"source {source!r} does not exist; pass an existing file or directory, a dataset id, or 'embedded'")
    else:
        docs = _sample_records(_iter_hub_records(source), cfg)
    docs = _drop_empty_languages(docs, cfg)
    if not any(docs.values()):
        raise ValueError(
            f"source {source!r} gave no usable documents (empty, binary, over max_file_bytes="
            f"{cfg.max_file_bytes}, or no known language); point source at code files"
        )
    for lang, texts in docs.items():
        logger.info("%s: %d documents, %d bytes", lang, len(texts), sum(len(t.encode()) for t in texts))
    return docs


def _select_languages(found: Iterable[str], cfg: CorpusConfig) -> list[str]:
    """The languages to keep; a requested language that was not found is an error."""
    found = sorted(set(found))
    missing = [lang for lang in cfg.languages if lang not in found]
    if missing:
        raise ValueError(
            f"languages {missing} not found in source {cfg.source!r}; available: {found}. "
            f"Fix `languages` (or leave it empty for all)"
        )
    return sorted(set(cfg.languages)) if cfg.languages else found


def _drop_empty_languages(docs: dict[str, list[str]], cfg: CorpusConfig) -> dict[str, list[str]]:
    """Languages left without documents (all skipped, or too thin) are dropped; requested ones
    are an error, because training would silently lose an adapter."""
    empty = sorted(lang for lang, texts in docs.items() if not texts)
    lost = [lang for lang in cfg.languages if lang in empty]
    if lost:
        raise ValueError(
            f"languages {lost}: no usable documents in source {cfg.source!r} (binary, over max_file_bytes, "
            f"or under min_bytes_per_language); remove them from `languages` or lower those limits"
        )
    for lang in empty:
        logger.warning("%s: no usable documents; dropped", lang)
    return {lang: texts for lang, texts in docs.items() if texts}


def _drop_thin_languages(docs: dict[str, list[str]], cfg: CorpusConfig) -> dict[str, list[str]]:
    """Embedded corpus: drop languages whose files on this machine ran out before the minimum.
    A sample cut short by the caps is the caller's choice, not a thin language."""
    threshold = min(cfg.min_bytes_per_language, cfg.max_bytes_per_language // 2)
    kept = {}
    for lang, texts in docs.items():
        n_bytes = sum(len(t.encode()) for t in texts)
        if n_bytes < threshold and len(texts) < cfg.max_files_per_language:
            logger.warning(
                "embedded corpus: dropping %s: only %d bytes on this machine (< min_bytes_per_language=%d)",
                lang, n_bytes, cfg.min_bytes_per_language,
            )
            texts = []  # kept as empty so that _drop_empty_languages checks `languages`
        kept[lang] = texts
    return kept


def _clean_text(text: str, cfg: CorpusConfig) -> str | None:
    """The document, or None when it is unusable: binary (NUL bytes), blank or too large."""
    if "\0" in text or not text.strip() or len(text.encode()) > cfg.max_file_bytes:
        return None
    return text


def _take_within_budget(texts: Iterable[str], cfg: CorpusConfig) -> list[str]:
    """First texts (in the given, already random, order) that fit the caps; duplicates skipped."""
    kept, seen, n_bytes = [], set(), 0
    for text in texts:
        size = len(text.encode())
        digest = hashlib.sha1(text.encode()).digest()
        if digest in seen or n_bytes + size > cfg.max_bytes_per_language:
            continue  # a smaller document later may still fit
        seen.add(digest)
        kept.append(text)
        n_bytes += size
        if len(kept) == cfg.max_files_per_language:
            break
    return kept


# ---------------------------------------------------------------------------------------------
# Files: embedded corpus and source trees
# ---------------------------------------------------------------------------------------------


def _read_candidates(candidates: dict[str, list[Path]], cfg: CorpusConfig) -> dict[str, list[str]]:
    """Sample files per language: seeded shuffle of the sorted candidates, read until the caps."""
    docs = {}
    for lang in _select_languages((lang for lang, paths in candidates.items() if paths), cfg):
        paths = sorted(candidates[lang])
        random.Random(f"{cfg.seed}:{lang}").shuffle(paths)
        docs[lang] = _take_within_budget(_read_texts(paths, cfg), cfg)
    return docs


def _read_texts(paths: Iterable[Path], cfg: CorpusConfig) -> Iterator[str]:
    for path in paths:
        try:
            if path.stat().st_size > cfg.max_file_bytes:
                continue  # checked before reading: huge files are never loaded
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = _clean_text(text, cfg)
        if text is not None:
            yield text


def _walk_files(root: Path) -> Iterator[Path]:
    """Regular files under root (or root itself), sorted, without following links or VCS folders."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not path.is_symlink():
                yield path


def _shebang_language(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            head = f.read(128)
    except OSError:
        return None
    match = _SHEBANG.match(head)
    if not match:
        return None
    interpreter = re.sub(r"[\d.]+$", "", match.group(1).decode())  # python3.11 -> python
    return SHEBANG_LANGUAGES.get(interpreter)


def _file_language(path: Path) -> str | None:
    suffix = path.suffix
    if suffix:
        return EXTENSION_LANGUAGES.get(suffix) or EXTENSION_LANGUAGES.get(suffix.lower())
    return _shebang_language(path)


def _tree_candidates(root: Path) -> dict[str, list[Path]]:
    candidates: dict[str, list[Path]] = {}
    for path in _walk_files(root):
        lang = _file_language(path)
        if lang is not None:
            candidates.setdefault(lang, []).append(path)
    return candidates


def _perl_dirs() -> list[Path]:
    if shutil.which("perl"):
        try:
            out = subprocess.run(["perl", "-e", 'print join "\\n", @INC'], capture_output=True, text=True, timeout=10)
            dirs = [Path(line) for line in out.stdout.splitlines() if line.startswith("/")]
            if dirs:
                return dirs
        except (OSError, subprocess.SubprocessError) as err:
            logger.debug("perl @INC not readable (%s); using common directories", err)
    roots = [Path("/usr/share/perl5"), Path("/usr/share/perl"), Path("/usr/lib/perl5"), Path("/usr/local/share/perl")]
    return roots + sorted(Path("/usr/lib").glob("*/perl*"))


def _embedded_roots() -> dict[str, list[tuple[Path, str]]]:
    """lang -> (root, rule): rule "ext" takes files whose extension means lang, "shebang" takes
    extensionless scripts whose `#!` names lang (and `.sh`), "all" takes every file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shell_dirs = ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/etc", "/usr/share", "/usr/lib", "/usr/libexec"]
    return {
        "python": [(stdlib, "ext")],
        "perl": [(d, "ext") for d in _perl_dirs()],
        "c": [(Path("/usr/include"), "ext"), (Path("/usr/local/include"), "ext")],
        # Bash completions are bash without a shebang.
        "shell": [(Path(d), "shebang") for d in shell_dirs] + [(Path("/usr/share/bash-completion/completions"), "all")],
    }


def _embedded_candidates(languages: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    candidates: dict[str, list[Path]] = {}
    for lang, roots in _embedded_roots().items():
        if languages and lang not in languages:
            continue
        seen: set[str] = set()  # /bin -> /usr/bin and overlapping @INC entries give the same file twice
        for root, rule in roots:
            if not root.is_dir():
                continue
            for path in _walk_files(root):
                if rule == "ext" and EXTENSION_LANGUAGES.get(path.suffix) != lang:
                    continue
                if rule == "ext" and lang == "c" and "c++" in path.parts:
                    continue  # C++ standard library headers live under include/c++
                if rule == "shebang" and not (path.suffix == ".sh" or (not path.suffix and _shebang_language(path) == lang)):
                    continue
                real = os.path.realpath(path)
                if real not in seen:
                    seen.add(real)
                    candidates.setdefault(lang, []).append(path)
    return candidates


# ---------------------------------------------------------------------------------------------
# Records: parquet / jsonl files and hub datasets (The Stack layout)
# ---------------------------------------------------------------------------------------------


def _dataset_files(path: Path) -> list[Path]:
    """The parquet/jsonl files a path names: itself, or a directory's when it holds no code."""
    if path.is_file():
        return [path] if path.suffix in DATASET_SUFFIXES else []
    files = list(_walk_files(path))
    tables = [f for f in files if f.suffix in DATASET_SUFFIXES]
    # A source tree may carry a jsonl fixture; it is a dataset only if it holds no code at all.
    if tables and not any(f.suffix in EXTENSION_LANGUAGES for f in files):
        return tables
    return []


def parquet_languages(path: Path) -> set[str] | None:
    """The languages a parquet file holds, from its row-group statistics of `lang` when each row
    group holds one value (The Stack's layout: a folder per language); None when unknown."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    column = meta.schema.to_arrow_schema().get_field_index("lang")
    if column < 0:
        return None
    found = set()
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max or stats.min != stats.max:
            return None
        found.add(normalize_language(stats.min))
    return found


def may_hold(path: Path, languages: set[str]) -> bool:
    """False only when `path`'s metadata proves it holds none of `languages` (then it is not read)."""
    held = parquet_languages(path) if path.suffix == ".parquet" else None
    return held is None or bool(held & languages)


def open_stack_parquet(path: Path | str):
    """A parquet file of The Stack's layout (`content` and `lang` columns), or a ValueError naming what it lacks."""
    import pyarrow.parquet as pq  # only needed for this source

    parquet = pq.ParquetFile(path)
    missing = {"content", "lang"} - set(parquet.schema_arrow.names)
    if missing:
        raise ValueError(f"source file {path} lacks column(s) {sorted(missing)}; The Stack layout needs `content` and `lang`")
    return parquet


def _iter_files_records(files: list[Path]) -> Iterator[tuple[str, str]]:
    """(lang, content) rows of parquet and jsonl files, in file order."""
    for path in files:
        if path.suffix == ".parquet":
            parquet = open_stack_parquet(path)
            for batch in parquet.iter_batches(columns=["lang", "content"], batch_size=1024):
                yield from zip(batch.column("lang").to_pylist(), batch.column("content").to_pylist())
        else:
            with path.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if "content" not in row or "lang" not in row:
                        raise ValueError(f"source file {path} line {line_no} lacks `content` or `lang`; The Stack layout needs both")
                    yield row["lang"], row["content"]


def _iter_hub_records(dataset_id: str) -> Iterator[tuple[str, str]]:
    """(lang, content) rows of a hub dataset, streamed so that only what is read is downloaded."""
    hint = "pass 'embedded', an existing parquet/jsonl file or directory, or a source tree"
    try:
        import datasets

        rows = iter(datasets.load_dataset(dataset_id, split="train", streaming=True))
        first = next(rows, None)  # streaming defers the first request; fail here, not mid-run
    except Exception as err:
        raise ValueError(f"source {dataset_id!r} is not a local path and could not be loaded as a Hugging Face dataset ({type(err).__name__}: {err}); {hint}") from err
    if first is None:
        return
    if "content" not in first or "lang" not in first:
        raise ValueError(f"source {dataset_id!r} rows have columns {sorted(first)}; The Stack layout needs `content` and `lang`")
    yield first["lang"], first["content"]
    for row in rows:
        yield row["lang"], row["content"]


def _sample_records(records: Iterator[tuple[str, str]], cfg: CorpusConfig, found: set[str] = frozenset()) -> dict[str, list[str]]:
    """Per language, a uniform seeded sample (reservoir sampling: one pass, bounded memory);
    `found`: languages known to be in the source without reading their rows."""
    reservoirs: dict[str, list[str]] = {}
    rngs: dict[str, random.Random] = {}
    seen_counts: dict[str, int] = {}
    found = set(found)
    wanted = set(cfg.languages)
    for n_rows, (raw_lang, content) in enumerate(records):
        if n_rows == cfg.max_scan_rows:
            logger.warning("source %r: stopped after max_scan_rows=%d rows", cfg.source, cfg.max_scan_rows)
            break
        if not raw_lang or not isinstance(content, str):
            continue
        lang = normalize_language(raw_lang)
        found.add(lang)
        if (wanted and lang not in wanted) or _clean_text(content, cfg) is None:
            continue
        rng = rngs.setdefault(lang, random.Random(f"{cfg.seed}:{lang}"))
        reservoir = reservoirs.setdefault(lang, [])
        n = seen_counts[lang] = seen_counts.get(lang, 0) + 1
        if len(reservoir) < cfg.max_files_per_language:
            reservoir.append(content)
        else:
            j = rng.randrange(n)
            if j < cfg.max_files_per_language:
                reservoir[j] = content
    docs = {}
    for lang in _select_languages(found, cfg):
        reservoir = reservoirs.get(lang, [])
        rngs.get(lang, random.Random(0)).shuffle(reservoir)  # so the byte cap keeps a random subset
        docs[lang] = _take_within_budget(reservoir, cfg)
    return docs


# ---------------------------------------------------------------------------------------------
# Split, pack, batch
# ---------------------------------------------------------------------------------------------


def split_documents(
    docs: dict[str, list[str]], eval_fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, held_out) per language, by whole document; each side gets >= 1 document.

    A seeded shuffle per language picks `round(eval_fraction * n)` documents (at least 1, at most
    n - 1) to hold out; both sides keep the original document order."""
    _check_eval_fraction(eval_fraction)
    train, held_out = {}, {}
    for lang, texts in docs.items():
        if len(texts) < 2:
            raise ValueError(
                f"language {lang!r} has {len(texts)} document(s); a train/held-out split needs >= 2 "
                f"(give it more files, or leave it out of `languages`)"
            )
        n_eval = min(max(1, round(eval_fraction * len(texts))), len(texts) - 1)
        order = list(range(len(texts)))
        random.Random(f"{seed}:{lang}:split").shuffle(order)
        eval_ids = set(order[:n_eval])
        train[lang] = [t for i, t in enumerate(texts) if i not in eval_ids]
        held_out[lang] = [t for i, t in enumerate(texts) if i in eval_ids]
    return train, held_out


def pack_blocks(docs: dict[str, list[str]], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """lang -> LongTensor [N, L]: each language's documents tokenised, each followed by eos, the
    stream cut into N = len // L blocks (the tail shorter than a block is dropped). A language
    with less than one block of tokens repeats its stream to fill one block (logged)."""
    import torch  # not at the top: Ray Data's read tasks import this module, and need no torch

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token target needs two tokens), got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; set tokenizer.eos_token to separate documents")
    blocks = {}
    for lang, texts in docs.items():
        if not texts:
            raise ValueError(f"language {lang!r} has no documents to pack; drop it from `docs`")
        ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        stream = torch.tensor([t for doc in ids for t in [*doc, eos]], dtype=torch.long)  # [T]
        n_blocks = len(stream) // seq_len
        if n_blocks == 0:
            logger.warning("%s: %d tokens < seq_len=%d; repeating them to fill one block", lang, len(stream), seq_len)
            stream = stream.repeat(-(-seq_len // len(stream)))
            n_blocks = 1
        blocks[lang] = stream[: n_blocks * seq_len].view(n_blocks, seq_len)  # [N, L]
    return blocks


def mixed_batches(
    blocks: dict[str, torch.Tensor],
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless (input_ids [B, L], languages [B]) for worker `rank` of `world_size`, from `start_step`.

    Semantics: all workers together draw a global stream of rows, `B * world_size` per step; at
    step s, worker r gets rows g in [s*B*W + r*B, s*B*W + (r+1)*B). Rows come in cycles of one row
    per language, in a seeded order per cycle c = g // n_langs, so every language gets the same
    number of rows (small languages are repeated, not starved) and any `n_langs` consecutive
    rows of a cycle hold distinct languages. The row of language `lang` in cycle c reads block
    perm[c % N] of a seeded permutation of its N blocks, drawn afresh every N cycles (an epoch
    of that language): within an epoch no block is read twice, so workers' rows are disjoint.
    Every row is a pure function of (seed, g): resuming at `start_step` continues the stream.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if not blocks:
        raise ValueError("blocks is empty; pack at least one language with pack_blocks")
    languages = sorted(blocks)
    seq_lens = {blocks[lang].shape[1] for lang in languages}
    if len(seq_lens) != 1 or any(blocks[lang].shape[0] == 0 for lang in languages):
        raise ValueError(f"blocks must be non-empty [N, L] tensors with one L; got shapes { {k: tuple(v.shape) for k, v in blocks.items()} }")

    n_langs = len(languages)
    cycle_orders: dict[int, list[str]] = {}  # cycle -> language order; a few live at a time
    epoch_perms: dict[str, tuple[int, list[int]]] = {}  # lang -> (epoch, block permutation)

    def row(g: int) -> tuple[str, int]:
        cycle, pos = divmod(g, n_langs)
        if cycle not in cycle_orders:
            cycle_orders.clear()  # rows are visited in increasing order: old cycles are done
            order = list(languages)
            random.Random(f"{seed}:cycle:{cycle}").shuffle(order)
            cycle_orders[cycle] = order
        lang = cycle_orders[cycle][pos]
        n_blocks = blocks[lang].shape[0]
        epoch, k = divmod(cycle, n_blocks)  # this is lang's cycle-th draw: one per cycle
        if epoch_perms.get(lang, (None,))[0] != epoch:
            perm = list(range(n_blocks))
            random.Random(f"{seed}:{lang}:epoch:{epoch}").shuffle(perm)
            epoch_perms[lang] = (epoch, perm)
        return lang, epoch_perms[lang][1][k]

    step = start_step
    while True:
        first = (step * world_size + rank) * batch_size
        rows = [row(g) for g in range(first, first + batch_size)]
        input_ids = torch.stack([blocks[lang][i] for lang, i in rows])  # [B, L]
        yield input_ids, [lang for lang, _ in rows]
        step += 1
