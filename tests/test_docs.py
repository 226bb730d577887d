"""The README and docs/ stay true to the repository: every relative link resolves to a file (and heading), every
`make` target and `difflens` command they show exists, every `DIFFLENS_*` variable the code reads is in
docs/operations.md's one settings table, and nothing points outside the repository."""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code spans: links inside them are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    text = text.replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    """Every anchor of a markdown page: its headings' slugs (repeats numbered -1, -2 as GitHub does) and any
    explicit <a id=...> / <a name=...>."""
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    found = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return frozenset(found)


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_catches_what_it_should(tmp_path):
    """The checker above is only worth something if it fails on a missing file or heading."""
    page = tmp_path / "p.md"
    page.write_text("# A `b` c: d/e\n\n## A `b` c: d/e\n\n[x](p.md#a-b-c-de-1) [y](p.md#nope) `[z](gone.md)` "
                    "[w](gone.md) [v](https://example.com/x)\n")
    assert anchors(page) == {"a-b-c-de", "a-b-c-de-1"}
    assert relative_links(page) == ["p.md#a-b-c-de-1", "p.md#nope", "gone.md"]


def test_nothing_points_outside_the_repository():
    """The method lives in docs/method.md; the team's shared folder is not part of the repository."""
    for page in PAGES:
        text = page.read_text()
        for outside in ("../shared", "/work/shared", "METHOD.md"):
            assert outside not in text, f"{page.relative_to(ROOT)} points outside the repository: {outside}"


@cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([a-zA-Z][\w-]*):(?!=)", text, re.M))


@cache
def cli_commands() -> frozenset[str]:
    """Every `difflens` subcommand name the argument parsers register (read from the source, not imported: the
    docs test needs no torch)."""
    names: set[str] = set()
    for src in (ROOT / "service" / "difflens").rglob("*.py"):
        names |= set(re.findall(r"add_parser\(\s*\"([\w-]+)\"", src.read_text()))
    return frozenset(names)


def code(text: str) -> str:
    """The fenced blocks and inline code spans of a page: where commands are shown."""
    return "\n".join(FENCE.findall(text) + re.findall(r"`([^`\n]+)`", FENCE.sub("", text)))


def shown_commands(text: str) -> tuple[set[str], set[str]]:
    """The make targets and difflens subcommands a page shows as commands (in its code)."""
    shown = code(text)
    make = set(re.findall(r"(?<![\w/.-])make ([a-z][\w-]*)", shown))
    # a command line: `difflens` (or a path to it) first on the line or after a shell separator or a parenthesis
    cli = set(re.findall(r"(?:^|[;&|(]\s*)[\w./-]*?(?<![\w-])difflens ([a-z][\w-]+)", shown, re.M))
    return make, cli


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_target_and_difflens_command_shown_exists(page):
    make, cli = shown_commands(page.read_text())
    assert make <= make_targets(), f"{page.relative_to(ROOT)}: no such make target: {sorted(make - make_targets())}"
    assert cli <= cli_commands(), f"{page.relative_to(ROOT)}: no such difflens command: {sorted(cli - cli_commands())}"


def test_the_command_finder_sees_commands_and_only_commands():
    text = ("Run `make demo`; to make sure, see below.\n\n```\n.venv/bin/difflens explan x  # typo\nmake nonsuch\n"
            "helm install difflens helm/difflens\nfrom difflens import explain\n```\n(`difflens serve --embedded`)\n")
    make, cli = shown_commands(text)
    assert make == {"demo", "nonsuch"} and cli == {"explan", "serve"}
    assert "demo" in make_targets() and "nonsuch" not in make_targets()
    assert {"explain", "serve", "worker", "replay"} <= cli_commands() and "explan" not in cli_commands()


def settings_table() -> set[str]:
    """The `DIFFLENS_*` names in the first column of docs/operations.md's settings table."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for row in re.findall(r"^\|([^|\n]*)\|", section, re.M):
        names |= set(re.findall(r"DIFFLENS_[A-Z0-9_]*[A-Z0-9]", row))
    return names


def read_by_the_code() -> set[str]:
    """Every `DIFFLENS_*` name in the package, the benchmarks, the deploy scripts, the Makefile and the tests
    (a name ending in "_" is a family's prefix, as in an error message, not a variable)."""
    files = [ROOT / "Makefile", *(ROOT / "service" / "difflens").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
             *(ROOT / "deploy").rglob("*.sh"), *(ROOT / "tests").rglob("*.py")]
    names: set[str] = set()
    for f in files:
        if f == Path(__file__).resolve() or "_gen" in f.parts:
            continue
        names |= set(re.findall(r"DIFFLENS_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])", f.read_text()))
    return names


def test_every_difflens_variable_is_in_the_one_settings_table():
    missing = read_by_the_code() - settings_table()
    assert not missing, f"docs/operations.md's settings table lacks {sorted(missing)}"
    assert {"DIFFLENS_REDIS_URL", "DIFFLENS_REDIS_PASSWORD", "DIFFLENS_API_KEY"} <= settings_table()
