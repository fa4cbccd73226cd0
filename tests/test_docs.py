"""README and docs/: every relative link and anchor resolves, and the commands they show parse.

A command parses when the `--help` of the launch script it runs lists every flag it uses (the
installed `bert-ft-*` commands, `-m toolkit COMMAND` and the SLURM templates, which pass their
arguments to launch/train.py, count as their launch scripts).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
SCRIPTS = {"train": "train", "evaluate": "evaluate", "predict": "predict", "compare": "compare", "plot": "plot",
           "prepare_data": "prepare_data"}


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def outside_fences(text: str) -> list[str]:
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in outside_fences(page.read_text()):
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            base = github_anchor(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_the_anchor_spelling_matches_github():
    assert github_anchor("Beyond the seeds' policies: LoRA, LLRD and gradual unfreezing") == \
        "beyond-the-seeds-policies-lora-llrd-and-gradual-unfreezing"
    assert github_anchor("`--cache-frozen`: 1 vs 3 epochs") == "--cache-frozen-1-vs-3-epochs"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for line in outside_fences(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "```bash\n.venv/bin/python -m pytest -q\n```" in text  # .ci/run runs exactly this command
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"


def commands(text: str) -> list[str]:
    """Shell command lines of the ```bash blocks (continuations joined, comments dropped)."""
    found, block, fence = [], [], None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence == "bash":
            block.append(line)
    joined = "\n".join(block).replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            found.append(line)
    return found


def script_flags(command: str) -> list[tuple[str, list[str]]]:
    """(launch script, the flags given to it) for each toolkit command in a shell line."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return []
    found = []
    for i, word in enumerate(words):
        script = None
        if m := re.fullmatch(r"(?:.*/)?launch/(\w+)\.py", word):
            script = m.group(1)
        elif m := re.fullmatch(r"(?:.*/)?bert-ft-(\w+)", word):
            script = m.group(1)
        elif m := re.fullmatch(r"(?:.*/)?slurm/(\w+)\.sbatch", word):
            script = "compare" if m.group(1).startswith("compare") else "train"  # compare_array.sbatch
        elif word == "toolkit" and i > 0 and words[i - 1] == "-m" and i + 1 < len(words):
            script = words[i + 1]
        if script is None:
            continue
        rest = []
        for arg in words[i + 1:]:
            if arg in ("|", "&&", ";", ">", "2>&1"):
                break
            rest.append(arg)
        found.append((SCRIPTS.get(script, script), [a.split("=")[0] for a in rest if a.startswith("--")]))
    return found


@lru_cache(maxsize=None)
def help_flags(script: str) -> frozenset[str]:
    out = subprocess.run([sys.executable, str(ROOT / "launch" / f"{script}.py"), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", out.stdout))


def test_the_command_reader_finds_scripts_and_flags():
    assert script_flags("accelerate launch --num_processes 4 launch/train.py --freeze last2 --lr=3e-4") == \
        [("train", ["--freeze", "--lr"])]
    assert script_flags("sbatch --gres=gpu:2 slurm/single_node.sbatch --task imdb") == [("train", ["--task"])]
    assert script_flags("sbatch --array=0-3 slurm/compare_array.sbatch --lr-search") == [("compare", ["--lr-search"])]
    assert script_flags('echo "x" | python launch/predict.py --model m') == [("predict", ["--model"])]


def test_every_flag_the_readme_and_docs_use_is_accepted():
    unknown = []
    for page in PAGES:
        for command in commands(page.read_text()):
            for script, flags in script_flags(command):
                missing = [f for f in flags if f not in help_flags(script)]
                if missing:
                    unknown.append(f"{page.relative_to(ROOT)}: launch/{script}.py does not take {missing}: {command}")
    assert not unknown, "\n".join(unknown)
