"""A new user's first run: the README's commands work exactly as written, with no environment
activated, and the README and docs link only to what exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def readme_command(word: str) -> str:
    """The README's one-line command (in a code block) that contains ``word``."""
    lines = [line.strip() for line in README.read_text().splitlines()
             if line.startswith("python3 -m venv") and word in line]
    assert len(lines) == 1, f"the README should hold one set-up command with {word!r}: {lines}"
    return lines[0]


def test_ci_runs_the_readme_test_command_as_written():
    command = readme_command("pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in [line.strip() for line in ci.splitlines()], (
        f".ci/run must run the README's test command as written: {command}")
    active = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r"\bPATH=|\bexport\b|\bsource\b|activate", line)
                   for line in active), ".ci/run must not change the shell a user would have"


def test_no_test_or_benchmark_starts_a_bare_ascension_from_path():
    from ascension_cli.cli.app import app

    commands = "|".join(c.name or c.callback.__name__ for c in app.registered_commands)
    bare = re.compile(rf"""["']ascension["']\s*,\s*["']({commands})["']""")
    offenders = [f"{path.relative_to(ROOT)}:{number}"
                 for folder in ("tests", "benchmarks") for path in (ROOT / folder).glob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if bare.search(line)]
    assert not offenders, f"start the CLI as conftest.CLI (python -m ascension_cli): {offenders}"


def test_a_cli_starting_test_passes_with_no_ascension_on_path():
    """What a user without an activated environment has: a PATH with no `ascension` on it."""
    directories = [d for d in os.environ.get("PATH", "").split(os.pathsep)
                   if d and not (Path(d) / "ascension").exists()]
    env = {**os.environ, "PATH": os.pathsep.join(directories)}
    env.pop("VIRTUAL_ENV", None)
    assert shutil.which("ascension", path=env["PATH"]) is None
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_serve.py::test_several_server_processes_answer"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, re.M)}


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto: ...
            name, _, anchor = target.partition("#")
            linked = (page.parent / name).resolve() if name else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
    linked_from_readme = set(re.findall(r"\]\(docs/([^)#\s]+)", README.read_text()))
    unlinked = [p.name for p in DOCS.glob("*.md") if p.name not in linked_from_readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_anchor_rule_matches_githubs():
    assert github_anchor("Retrieval quality (`bench_quality.py`)") == \
        "retrieval-quality-bench_qualitypy"
    assert github_anchor("More GPUs: torchrun and DDP") == "more-gpus-torchrun-and-ddp"
