"""MultiPL-E problems: load them, turn a completion into the program that tests it.

A problem is one JSON object per line with MultiPL-E's fields:
    name         unique id, e.g. "HumanEval_0_has_close_elements"
    language     MultiPL-E's code ("py", "pl", "sh", "rb", "lua", "jl", "r", ...) or a full name
    prompt       the function's signature and docstring: what the model continues
    tests        code appended after the completion; the program passes iff it exits with status 0
    stop_tokens  generation stops at the first of these; the completion is cut before it
Other fields (MultiPL-E's `doctests`, `original`; HumanEval's `canonical_solution`) are kept in
`Problem.extra`. The program is `prompt + completion + "\\n" + tests`, as MultiPL-E builds it.

Sources (`load_problems(source)`):
    "builtin"          the problem set packaged here: a dozen problems each in Python, Perl and
                       shell, in MultiPL-E's format, each with a `canonical_solution`
    a .jsonl file      one problem per line; a directory: every .jsonl file in it
    "nuprl/MultiPL-E"  the Hugging Face dataset, split "test", config `humaneval-<code>` per
                       language (needs the hub, or its files in the local HF cache)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from flora_platform.data import normalize_language

log = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_DIR = Path(__file__).with_name("problems")
MULTIPLE_HUB_ID = "nuprl/MultiPL-E"
REQUIRED_FIELDS = ("name", "language", "prompt", "tests", "stop_tokens")
# MultiPL-E's language codes -> the names the corpus and the adapters use (flora_platform.data).
MULTIPLE_CODES = {
    "py": "python", "pl": "perl", "sh": "shell", "rb": "ruby", "lua": "lua", "jl": "julia", "r": "r",
    "rkt": "racket", "d": "d", "rs": "rust", "swift": "swift", "js": "javascript", "ts": "typescript",
    "cpp": "cpp", "cs": "csharp", "java": "java", "go": "go", "php": "php", "scala": "scala",
}
LANGUAGE_CODES = {name: code for code, name in MULTIPLE_CODES.items()}


@dataclass(frozen=True)
class Problem:
    name: str
    language: str  # normalised: "python", "perl", "shell", ...
    prompt: str
    tests: str
    stop_tokens: tuple[str, ...]
    extra: dict = field(default_factory=dict, compare=False)

    def program(self, completion: str) -> str:
        """The program that runs `completion` against the tests."""
        return self.prompt + completion + "\n" + self.tests


def language_name(code_or_name: str) -> str:
    """"pl" -> "perl", "Python" -> "python", "sh" -> "shell"."""
    key = code_or_name.strip().lower()
    return MULTIPLE_CODES.get(key) or normalize_language(key)


def truncate_at_stop(text: str, stop_tokens: tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest stop token, as MultiPL-E cuts completions."""
    cut = min((i for i in (text.find(s) for s in stop_tokens if s) if i >= 0), default=len(text))
    return text[:cut]


def load_problems(source: str = BUILTIN, languages: tuple[str, ...] = (), max_per_language: int = 0) -> list[Problem]:
    """Problems of `languages` (all when empty) from `source`, at most `max_per_language` each
    (0 = all), in file order. Raises ValueError naming the file and line of a malformed problem."""
    wanted = tuple(language_name(lang) for lang in languages)
    if source == BUILTIN:
        problems = _read_jsonl_files(sorted(BUILTIN_DIR.glob("*.jsonl")))
    elif source == MULTIPLE_HUB_ID or source.startswith(MULTIPLE_HUB_ID + ":"):
        if not wanted:
            raise ValueError(f"{MULTIPLE_HUB_ID} holds many languages: name those to load with problems.languages=[perl,lua]")
        problems = _load_hub(source, wanted)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if not files:
                raise ValueError(f"{path} holds no .jsonl files")
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"{source!r} is not {BUILTIN!r}, {MULTIPLE_HUB_ID!r}, a .jsonl file or a directory of them")
        problems = _read_jsonl_files(files)
    if wanted:
        problems = [p for p in problems if p.language in wanted]
        missing = sorted(set(wanted) - {p.language for p in problems})
        if missing:
            log.warning("no problems for %s in %s", missing, source)
    _check_unique(problems)
    if max_per_language:
        counts: dict[str, int] = {}
        kept = []
        for p in problems:
            counts[p.language] = counts.get(p.language, 0) + 1
            if counts[p.language] <= max_per_language:
                kept.append(p)
        problems = kept
    return problems


def problem_from_row(row: dict, where: str) -> Problem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a problem must be a JSON object, got {type(row).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; MultiPL-E problems have {list(REQUIRED_FIELDS)}")
    for f in ("name", "language", "prompt", "tests"):
        if not isinstance(row[f], str) or (f != "tests" and not row[f]):
            raise ValueError(f"{where}: field {f!r} must be a non-empty string")
    stops = row["stop_tokens"]
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"{where}: stop_tokens must be a list of non-empty strings, got {stops!r}")
    extra = {k: v for k, v in row.items() if k not in REQUIRED_FIELDS}
    return Problem(row["name"], language_name(row["language"]), row["prompt"], row["tests"], tuple(stops), extra)


def _read_jsonl_files(files: list[Path]) -> list[Problem]:
    problems = []
    for path in files:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not JSON ({err})") from err
                problems.append(problem_from_row(row, where))
    return problems


def _load_hub(source: str, languages: tuple[str, ...]) -> list[Problem]:
    """MultiPL-E from the hub: `nuprl/MultiPL-E` (HumanEval) or `nuprl/MultiPL-E:mbpp`."""
    _, _, benchmark = source.partition(":")
    benchmark = benchmark or "humaneval"
    try:
        import datasets
    except ImportError as err:
        raise ValueError("loading MultiPL-E from the hub needs the `datasets` package") from err
    problems = []
    for lang in languages:
        code = LANGUAGE_CODES.get(lang)
        if code is None:
            raise ValueError(f"MultiPL-E has no code for the language {lang!r}; known: {sorted(LANGUAGE_CODES)}")
        config = f"{benchmark}-{code}"
        try:
            rows = datasets.load_dataset(MULTIPLE_HUB_ID, config, split="test")
        except Exception as err:  # noqa: BLE001 - offline, unknown config, auth: all mean the same here
            raise ValueError(
                f"cannot load {MULTIPLE_HUB_ID} config {config!r} ({type(err).__name__}: {err}); "
                "without the hub, download its JSONL elsewhere and pass the file or directory"
            ) from err
        problems += [problem_from_row(dict(row), f"{MULTIPLE_HUB_ID}/{config}[{i}]") for i, row in enumerate(rows)]
    return problems


def _check_unique(problems: list[Problem]) -> None:
    seen: set[tuple[str, str]] = set()
    for p in problems:
        key = (p.language, p.name)
        if key in seen:
            raise ValueError(f"problem {p.name!r} ({p.language}) appears twice; names must be unique per language")
        seen.add(key)
