"""Documentation: links resolve, generated references are current, README stays short, and the
repository speaks of the product only."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = {DOCS / "cli.md", DOCS / "configuration.md"}


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "jobs" / "README.md", ROOT / "serve" / "README.md"]
    files += sorted(DOCS.rglob("*.md"))
    return [f for f in files if f.exists()]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_reference", DOCS / "generate_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code spans blanked (links there are not links)."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)))
    return out


def _anchors(path: Path, anchor) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (duplicates get -1, -2, …) and explicit ids."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = HEADING.match(line)
        if m:
            text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))  # [text](url) → text
            slug = anchor(text)
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return out


def _links(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in _prose_lines(path.read_text(encoding="utf-8")):
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
        m = REF_DEF.match(line)
        if m:
            out.append((n, m.group(1)))
    return out


def test_relative_links_and_anchors_resolve():
    anchor = _generator().heading_anchor
    problems, checked = [], 0
    for md in _markdown_files():
        for line, target in _links(md):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, …
                continue
            checked += 1
            where = f"{md.relative_to(ROOT)}:{line}: {target}"
            file_part, _, frag = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if not dest.exists():
                problems.append(f"{where} (no such file)")
                continue
            if not dest.is_relative_to(ROOT):
                problems.append(f"{where} (outside the repository)")
                continue
            if frag and dest.suffix == ".md" and frag not in _anchors(dest, anchor):
                problems.append(f"{where} (no heading with anchor #{frag} in {dest.relative_to(ROOT)})")
    assert checked > 20, f"only {checked} relative links found: is the link pattern still right?"
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_generated_references_are_current():
    stale = _generator().stale_files()
    assert not stale, ("out of date, run `python docs/generate_reference.py`:\n"
                       + "\n".join(diff[:2000] for diff in stale.values()))


def test_generated_cli_reference_lists_every_command():
    from tocoad_ray.cli import build_parser
    import argparse

    text = (DOCS / "cli.md").read_text(encoding="utf-8")

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield sub
                    yield from walk(sub)

    for sub in walk(build_parser()):
        assert f"`{sub.prog}`" in text, sub.prog
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help") and action.help != argparse.SUPPRESS:
                    assert re.search(rf"[`, ]{re.escape(opt)}\b", text), (sub.prog, opt)


def test_readme_is_short_and_opens_with_the_install_and_test_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail to docs/"
    blocks, current = [], None
    for line in lines:
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    assert len(blocks) >= 2
    # .ci/run installs and tests the way these two blocks say
    assert 'pip install -e ".[test]"' in blocks[0] and "tocoad train-all" in blocks[0]
    assert blocks[1].strip() == "python -m pytest -q"
    first_block = next(i for i, line in enumerate(lines) if line.startswith("```"))
    assert first_block < 15, "the install command must open the README"


def test_hand_written_docs_point_at_no_paths_outside_the_checkout():
    bad = []
    for md in _markdown_files():
        if md in GENERATED:  # mirror the CLI's help texts
            continue
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\.\./shared/|/work/shared", line):
                bad.append(f"{md.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_repository_speaks_of_the_product_only():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    probe = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "true":
        pytest.skip("not a git checkout")
    # assembled from parts so that this file does not match itself
    words = ["session [0-9]", "this " + "session", "helper " + "session", "lent to " + "this task", "the " + "issue's"]
    res = subprocess.run(["git", "grep", "-n", "-I", "-i", "-E", "|".join(words)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode in (0, 1), res.stderr
    assert res.stdout == "", "development-history wording:\n" + res.stdout
