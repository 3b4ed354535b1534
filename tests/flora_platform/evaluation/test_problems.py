"""MultiPL-E problem files: the packaged set, other files, completions cut at stop tokens."""

import json

import pytest

from flora_platform.evaluation.problems import BUILTIN, language_name, load_problems, truncate_at_stop


def test_packaged_set_has_a_dozen_problems_per_language_in_multiple_format():
    problems = load_problems(BUILTIN)
    by_lang = {}
    for p in problems:
        by_lang.setdefault(p.language, []).append(p)
    assert {lang: len(ps) for lang, ps in by_lang.items()} == {"python": 12, "perl": 12, "shell": 12}
    for p in problems:
        assert p.prompt and p.tests and p.stop_tokens and p.extra["canonical_solution"]
    shell = next(p for p in by_lang["shell"] if p.name.endswith("_add"))
    # MultiPL-E's shell layout: the completion is the body, the tests close the function.
    assert shell.prompt.endswith("add() {\n") and shell.tests.startswith("}\n") and shell.stop_tokens == ("\n}",)
    assert load_problems(BUILTIN, languages=("pl",), max_per_language=3) == by_lang["perl"][:3]


def test_truncate_at_the_earliest_stop_token():
    stops = ("\ndef", "\n#", "\nif")
    assert truncate_at_stop("    return 1\n# note\ndef g():", stops) == "    return 1"
    assert truncate_at_stop("    return 1\n", stops) == "    return 1\n"
    assert truncate_at_stop("\nif x", stops) == ""


def test_program_is_prompt_completion_and_tests():
    p = load_problems(BUILTIN, languages=("python",), max_per_language=1)[0]
    assert p.program("    return x + y\n") == p.prompt + "    return x + y\n" + "\n" + p.tests


def test_language_codes_and_names():
    assert [language_name(x) for x in ("pl", "py", "sh", "rb", "lua", "Python", "bash")] == [
        "perl", "python", "shell", "ruby", "lua", "python", "shell"]


def test_own_jsonl_files_and_their_errors(tmp_path):
    row = {"name": "t0", "language": "lua", "prompt": "local function f()\n", "tests": "os.exit(0)\n", "stop_tokens": ["\nend"]}
    path = tmp_path / "lua.jsonl"
    path.write_text(json.dumps(row) + "\n\n")
    (p,) = load_problems(str(tmp_path))
    assert (p.name, p.language, p.stop_tokens) == ("t0", "lua", ("\nend",))

    bad = dict(row)
    del bad["tests"]
    path.write_text(json.dumps(row) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"lua.jsonl:2: missing field\(s\) \['tests'\]"):
        load_problems(str(path))
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_problems(str(path))
    path.write_text(json.dumps({**row, "stop_tokens": "\nend"}) + "\n")
    with pytest.raises(ValueError, match="stop_tokens must be a list"):
        load_problems(str(path))
    with pytest.raises(ValueError, match="is not 'builtin'"):
        load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="name those to load"):
        load_problems("nuprl/MultiPL-E")
