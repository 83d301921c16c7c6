"""README.md as a user meets it: its Python code runs, its commands name files that exist, its links resolve.

Every ```python block of README.md runs as a script of its own in a fresh interpreter, from an empty scratch
folder (so a block must be self-contained: no files of the repository but the installed packages, nothing it
writes lands in the repository), with the project importable and nothing fetched from a hub. The ```bash blocks
must name only recipes, scripts and files that exist; the install line and test command are the ones
``.ci/run`` runs. The relative links of README.md, docs/*.md and bench/README.md must reach a file (and a heading
of it, when they name one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import COMMAND_ENV, ROOT

README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
PAGES = [README, ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_PAGES = [
    "finetune",
    "probe",
    "dann",
    "multitask",
    "data",
    "backbones",
    "logging",
    "distributed",
    "precision",
    "export",
]
REQUIRED_LINKS = {*(f"docs/{page}.md" for page in [*DOC_PAGES, "architecture"]), "bench/README.md"}


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```<language> code blocks of a markdown text, in order."""
    return re.findall(rf"^```{language}[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S)


def links(text: str) -> list[str]:
    """The targets of the markdown links ``[text](target)`` of a text."""
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (lowercase, punctuation dropped, spaces → -)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        anchors.add(slug.replace(" ", "-"))
    return anchors


PYTHON_BLOCKS = fenced_blocks(TEXT, "python")
SHELL = "\n".join(fenced_blocks(TEXT, "bash"))


def test_the_readme_has_python_code_and_commands() -> None:
    assert PYTHON_BLOCKS, "README.md has no ```python block"
    assert "python train.py fit --config configs/quickstart.yaml" in SHELL


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[f"python_block_{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_block_runs(code: str, tmp_path: Path) -> None:
    script = tmp_path / "readme_block.py"
    script.write_text(code, encoding="utf-8")
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    env = {**os.environ, **COMMAND_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=scratch, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"the README block failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"


def test_commands_name_existing_recipes_and_scripts() -> None:
    named = set(re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:yaml|py))\b", SHELL))
    assert named, "no recipe or script named in the README's commands"
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert not missing, f"README commands name files that do not exist: {missing}"


def test_the_technique_table_names_every_recipe_and_only_recipes() -> None:
    recipes = {path.stem for path in (ROOT / "configs").glob("*.yaml")}
    section = TEXT.split("## Pick a technique", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    column = next(i for i, cell in enumerate(header) if "configs/" in cell)
    named = {name for row in body for name in re.findall(r"`(\w+)`", row[column])}
    assert named <= recipes, f"the technique table names recipes that do not exist: {sorted(named - recipes)}"
    assert recipes <= named, f"recipes missing from the README's technique table: {sorted(recipes - named)}"


def test_set_up_commands_are_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    installs = [line.strip() for line in ci if line.strip().startswith("pip install")]
    assert installs, ".ci/run installs nothing"
    set_up = [line for line in SHELL.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(set_up) == 2, "README.md should hold the two fresh-machine commands (main job, tests)"
    for line in set_up:
        assert " && ".join(installs) in line, f"the README installs differently from .ci/run: {line}"
    ci_tests = [line.strip() for line in ci if line.strip().startswith("python -m pytest")]
    readme_tests = [line for line in set_up if "python -m pytest" in line]
    assert len(ci_tests) == 1 and len(readme_tests) == 1
    command = readme_tests[0].rpartition(" && ")[2]
    assert ci_tests[0].startswith(command), f".ci/run runs {ci_tests[0]!r}, the README says {command!r}"
    assert any("python train.py fit --config configs/quickstart.yaml" in line for line in set_up)


def test_the_readme_links_every_docs_page_and_the_benchmarks() -> None:
    targets = {target.split("#")[0] for target in links(TEXT)}
    assert REQUIRED_LINKS <= targets, f"README.md does not link {sorted(REQUIRED_LINKS - targets)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"
