"""The install keeps the standard library's `platform`, and `flora` stays free of the platform layer."""

import json
import subprocess
import sys
import sysconfig

PROBE = """
import json, sys
import platform
import flora
import flora_platform
print(json.dumps({
    "platform_file": platform.__file__,
    "has_system": hasattr(platform, "system"),
    "loaded": sorted(m for m in ("ray", "deepspeed", "mlflow") if m in sys.modules),
}))
"""


def test_platform_is_stdlib_and_flora_loads_no_ray(tmp_path):
    # A fresh interpreter outside the repo sees only what the install put on the path.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["platform_file"].startswith(sysconfig.get_paths()["stdlib"]), probe
    assert probe["has_system"]
    assert probe["loaded"] == [], f"import flora pulled in {probe['loaded']}"


def import_graph(*packages) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports, at the top or inside functions (a lazy
    import is still a dependency), read from the source with `ast`."""
    import ast
    import importlib
    from pathlib import Path

    modules = {}
    for package in packages:
        root = Path(importlib.import_module(package).__file__).parent
        for path in root.rglob("*.py"):
            parts = (package, *path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..speech import y
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import submodule` depends on the submodule; any other name on `pkg` itself.
                for alias in node.names:
                    imported.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state, path = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_a_lazy_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_in_flora_or_the_platform():
    """Imports point one way (e.g. train -> speech.training -> collectives, prepare ->
    speech.prepare -> preflight), counting imports inside functions: a lazy import that closes a
    circle hides an order dependency until someone imports the modules the other way round."""
    graph = import_graph("flora", "flora_platform")
    assert {"flora_platform.train", "flora_platform.speech.training", "flora_platform.prepare"} <= set(graph)
    assert "flora_platform.speech.training" in graph["flora_platform.train"]  # the graph sees the edges
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))
