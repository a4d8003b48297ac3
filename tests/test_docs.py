"""The docs keep up with the code (after sqlite-utils' tests/test_docs.py).

- every CLI command, groups' subcommands included, is named as `mmsearch CMD ...` in README.md or a
  README beside the code (mmsearch/**/README.md);
- every option of a command (each long flag, `--no-rerank` too; a short-only flag like `-k` by its
  short form) appears in a README that names that command;
- every command and every option has help text;
- README.md stays a newcomer's page: at most 300 lines;
- every relative link in those READMEs and benchmarks/README.md points to a file that exists, and
  an `#anchor` to a heading that exists.
"""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from mmsearch.cli import load_all

cli = load_all()  # every command module, so `cli.commands` is whole

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 300


def _readmes() -> list[Path]:
    return [README] + sorted((ROOT / "mmsearch").rglob("README.md"))


def _linked_docs() -> list[Path]:
    return _readmes() + [p for p in [ROOT / "benchmarks" / "README.md"] if p.exists()]


def _commands(cmd: click.Command = cli, path: tuple[str, ...] = ("mmsearch",)):
    """(path, command) for the root and every subcommand, depth first, in name order."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _commands(cmd.commands[name], path + (name,))


COMMANDS = list(_commands())
COMMAND_IDS = [" ".join(path) for path, _ in COMMANDS]


def _flags(cmd: click.Command) -> list[str]:
    """The flags a user types for each option: its long forms, or its short form when it has no long one."""
    flags = []
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        names = param.opts + param.secondary_opts
        longs = [n for n in names if n.startswith("--")]
        flags.extend(longs or names)
    return flags


def _mentions(text: str, token: str) -> bool:
    """`token` occurs in `text` as a whole word: `--rerank` is not found inside `--rerank-k`."""
    return re.search(r"(?<![\w-])" + re.escape(token) + r"(?![\w-])", text) is not None


def _names_command(text: str, path: tuple[str, ...]) -> bool:
    return _mentions(text, " ".join(path))


@pytest.fixture(scope="module")
def readme_texts() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in _readmes()}


def test_cli_tree_is_walked():
    # the walk reaches groups' subcommands; if this breaks, the checks below check nothing
    assert "mmsearch search" in COMMAND_IDS
    assert "mmsearch texts add" in COMMAND_IDS
    assert "mmsearch rerank enable" in COMMAND_IDS


def test_every_command_is_documented(readme_texts):
    missing = [" ".join(path) for path, _ in COMMANDS
               if not any(_names_command(text, path) for text in readme_texts.values())]
    assert not missing, ("commands that no README names (as `mmsearch CMD`): "
                         + ", ".join(missing))


def test_every_option_is_documented(readme_texts):
    missing = []
    for path, cmd in COMMANDS:
        homes = [text for text in readme_texts.values() if _names_command(text, path)]
        for flag in _flags(cmd):
            if not any(_mentions(text, flag) for text in homes):
                missing.append(f"{' '.join(path)} {flag}")
    assert not missing, ("options missing from every README that names their command:\n  "
                         + "\n  ".join(missing))


def test_every_command_and_option_has_help():
    missing = []
    for path, cmd in COMMANDS:
        if not (cmd.help or cmd.short_help or "").strip():
            missing.append(" ".join(path))
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip():
                missing.append(f"{' '.join(path)} {param.opts[0]}")
    assert not missing, "no help text: " + ", ".join(missing)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES}: move detail to a subpackage README"


# [text](target) and ![alt](target), skipping code spans and fenced blocks
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _links(text: str) -> list[str]:
    text = _CODE_SPAN.sub("", _FENCE.sub("", text))
    return _LINK.findall(text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*]", "", heading.strip().lower())
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("doc", _linked_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in _links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"broken links in {doc.relative_to(ROOT)}:\n  " + "\n  ".join(broken)


def test_link_checker_sees_links():
    # the checker itself: a link is found, one in code is not, and anchors follow GitHub's slugs
    assert _links("see [x](a/b.md#c) and `[y](z.md)`") == ["a/b.md#c"]
    assert _slug("Image→text search over a caption corpus") == "imagetext-search-over-a-caption-corpus"
    assert _slug("Choosing a model: `mmsearch models`") == "choosing-a-model-mmsearch-models"


def test_the_module_map_names_every_module():
    """mmsearch/README.md's module map names each module (or, for cli/, serve/, train/ and
    distributed/, the whole folder): a newcomer's map that leaves modules out is a wrong map."""
    package = ROOT / "mmsearch"
    lines = (package / "README.md").read_text().splitlines()
    rows = [ln for ln in lines if ln.startswith("| `")]
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.name in ("__init__.py", "__main__.py"):
            continue
        folder = rel.parts[0] + "/" if len(rel.parts) > 1 else ""
        named = any(f"`{rel.as_posix()}`" in r or (folder and f"`{folder}`" in r.split("|")[1])
                    or (folder and folder in r and f"`{rel.name}`" in r) for r in rows)
        if not named:
            missing.append(rel.as_posix())
    assert missing == []
