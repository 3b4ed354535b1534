"""The cluster image installs the project the way `make install` and the README do: parsed with
Docker's own Dockerfile parser (no Docker daemon here to build it), its steps compared with the
Makefile's install recipe: the same pip, the same torch pin, DeepSpeed built against that torch
without build isolation, then the project editable, in that order, on Ray's official image of
the Ray and Python this project runs."""

from __future__ import annotations

import re
import shlex
import sys

import dockerfile
import ray

from .conftest import REPO

DOCKERFILE = REPO / "cluster/Dockerfile"


def makefile_install_steps() -> dict[str, str]:
    """The Makefile's install recipe lines, by what they install, with $(VAR)s expanded."""
    text = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*\?=\s*(.+)$", text, re.M))
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.M).group(1)
    steps = {}
    for line in recipe.splitlines():
        line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line.strip())
        if "pip install" in line:
            for what in ("pip<", "torch==", "deepspeed", "-e"):
                if what in line:
                    steps.setdefault(what, line)
                    break
    return steps


def pip_args(line: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, arguments after `pip install` without --quiet/--no-cache-dir)."""
    words = shlex.split(line)
    env = {}
    while words and re.fullmatch(r"\w+=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    args = words[words.index("install") + 1 :]
    return env, [a for a in args if a not in ("--quiet", "--no-cache-dir")]


def docker_steps() -> tuple[dict[str, str], list[dockerfile.Command]]:
    commands = dockerfile.parse_file(str(DOCKERFILE))
    args = {}
    for c in commands:
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, value = c.value[0].split("=", 1)
            args[key] = value.strip('"')
    return args, commands


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def test_base_image_is_rays_official_image_of_this_ray_and_python():
    args, commands = docker_steps()
    (base,) = [expand(c.value[0], args) for c in commands if c.cmd == "FROM"]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-{python}-(gpu|cpu|cu\d+)", base), base


def test_install_steps_match_the_makefile():
    make = makefile_install_steps()
    args, commands = docker_steps()
    runs = [expand(c.value[0], args) for c in commands if c.cmd == "RUN" and "pip install" in c.value[0]]
    pip_upgrade, torch, deepspeed, project = runs

    assert pip_args(pip_upgrade) == pip_args(make["pip<"])
    # The same torch release; the image adds the CUDA wheel index.
    (make_torch,) = pip_args(make["torch=="])[1]
    assert pip_args(torch)[1][0] == make_torch, (torch, make_torch)
    assert pip_args(deepspeed) == pip_args(make["deepspeed"]), "DeepSpeed must build against the torch above"
    env, project_args = pip_args(project)
    assert project_args[0] == "-e" and project_args[1].startswith(".["), "the project, editable, from the copied checkout"

    # Dependencies are installed before the source is copied, the project after it.
    order = [c.cmd if c.cmd != "RUN" else expand(c.value[0], args) for c in commands]
    assert order.index(torch) < order.index(deepspeed) < order.index("COPY") < order.index(project)


def test_readme_names_the_same_torch_pin():
    make_torch = pip_args(makefile_install_steps()["torch=="])[1][0]
    assert f"`{make_torch}`" in (REPO / "README.md").read_text()


def test_extras_the_image_installs_exist():
    args, commands = docker_steps()
    project = next(expand(c.value[0], args) for c in commands if c.cmd == "RUN" and "-e '.[" in c.value[0])
    extras = re.search(r"\.\[([\w,]+)\]", project).group(1).split(",")
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in extras:
        assert re.search(rf"^{extra} = \[", pyproject, re.M), f"pyproject.toml has no [{extra}] extra"


def test_build_context_leaves_out_local_environments():
    ignored = (REPO / "cluster/Dockerfile.dockerignore").read_text().split()
    for path in (".venv", ".git", "runs", "mlruns"):
        assert path in ignored, f"{path} would be copied into the image"


def test_the_image_has_the_makefiles_system_packages():
    text = (REPO / "Makefile").read_text()
    listed = re.search(r"^SYSTEM_PACKAGES := (.*)$", text, re.M).group(1)
    wanted = {pair.split(":")[1] for pair in listed.split()}  # command:package
    assert {"espeak-ng", "bubblewrap"} <= wanted
    args, commands = docker_steps()
    installed = set()
    for c in commands:
        if c.cmd == "RUN" and "apt-get install" in c.value[0]:
            installed |= set(expand(c.value[0], args).split())
    assert wanted <= installed, f"the image lacks {sorted(wanted - installed)}"
