"""The README and the docs/ pages say what the code does: the README fits on a few screens, every
link lands on a file (and a heading) that exists, every `make` command shown parses (`make -n`:
nothing runs), every `python -m ssl_lib` command shown names a subcommand, options and config
fields that exist, and `make help` lists every target shown."""

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_lib.config import FIELD_TYPES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
#: an indented code block: lines of 4 spaces or more after a blank line, outside fences
INDENTED = re.compile(r"(?:^\n)((?:^ {4,}\S.*\n)+)", re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SEPARATORS = {";", "&&", "||", "|", "&"}
#: subcommands whose first positional is itself a subcommand
NESTED = {"experiments", "report"}


def _without_code(text: str) -> str:
    return FENCE.sub("", text)


def commands(text: str) -> list[list[str]]:
    """The simple commands of the code blocks (fenced or indented): continuation lines joined,
    comments dropped, split at ; && || | &. A transcript's `$ ` lines are left out: they show bad
    input on purpose."""
    out = []
    for block in [*FENCE.findall(text), *INDENTED.findall(_without_code(text))]:
        for line in re.sub(r"\\\n", " ", block).splitlines():
            if line.lstrip().startswith("$ "):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            try:
                tokens = list(lexer)
            except ValueError:  # not shell (a YAML or Python line with an odd quote)
                continue
            command: list[str] = []
            for token in [*tokens, ";"]:
                if token in SEPARATORS:
                    if command:
                        out.append(command)
                    command = []
                else:
                    command.append(token)
    return out


def make_commands(text: str) -> list[tuple[str, ...]]:
    return [tuple(c[1:]) for c in commands(text) if c[0] == "make"]


def _program(command: list[str]) -> str:
    return next((token for token in command if not re.match(r"\w+=", token)), "")


def ssl_lib_commands(text: str) -> list[list[str]]:
    """The arguments after `-m ssl_lib` of python, python3 or torchrun (environment settings before)."""
    return [c[i + 2:] for c in commands(text) if _program(c) in ("python", "python3", "torchrun")
            for i in range(len(c) - 1) if c[i:i + 2] == ["-m", "ssl_lib"]]


def make_targets(args: tuple[str, ...]) -> list[str]:
    return [a for a in args if "=" not in a and not a.startswith("-")]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(page: Path) -> set[str]:
    text = _without_code(page.read_text())
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _make(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@functools.cache
def cli_help(*subcommand: str) -> str:
    result = subprocess.run([sys.executable, "-m", "ssl_lib", *subcommand, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"python -m ssl_lib {' '.join(subcommand)} --help: {result.stderr}"
    return result.stdout


def test_readme_fits_on_a_few_screens():
    assert len(README.read_text().splitlines()) <= 200


def test_readme_shows_the_main_commands_and_links_every_docs_page():
    text = README.read_text()
    for command in ("make reports", "make test", "python -m ssl_lib train", "make tune",
                    "python -m ssl_lib experiments protocol", "make gpu-check"):
        assert command in text, command
    linked = {(README.parent / link.split("#")[0]).resolve() for link in LINK.findall(_without_code(text))}
    assert set(DOCS) <= linked, f"docs pages missing from the README's table: {set(DOCS) - linked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_land_on_a_file_and_a_heading(page):
    broken = []
    for link in LINK.findall(_without_code(page.read_text())):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_make_command_shown_parses_and_make_help_lists_its_targets():
    shown = sorted({args for page in PAGES for args in make_commands(page.read_text())})
    assert any("reports" in args for args in shown)
    listed = {line.split()[0] for line in _make("help").stdout.splitlines() if line.strip()}
    for args in shown:
        result = _make("-n", *args)
        assert result.returncode == 0 and "***" not in result.stderr, f"make -n {' '.join(args)}: {result.stderr}"
        missing = set(make_targets(args)) - listed
        assert not missing, f"make {' '.join(args)}: `make help` does not list {missing}"


def test_every_ssl_lib_command_shown_has_its_subcommand_options_and_fields():
    fields = set(FIELD_TYPES)
    shown = [args for page in PAGES for args in ssl_lib_commands(page.read_text())]
    assert any(args[:1] == ["train"] for args in ssl_lib_commands(README.read_text()))
    for args in shown:
        words = [a for a in args[:2] if not a.startswith("-")]
        subcommand = tuple(words[:2] if words and words[0] in NESTED else words[:1])
        help_text = cli_help(*subcommand)
        where = f"python -m ssl_lib {' '.join(args)}"
        for i, arg in enumerate(args):
            option = arg.lstrip("[").split("=")[0].split()[0] if arg.lstrip("[").startswith("--") else ""
            if re.fullmatch(r"--[a-z][\w-]*", option):
                assert re.search(rf"(?<![\w-]){option}(?![\w-])", help_text), f"{where}: no option {option}"
            if arg == "--set" and i + 1 < len(args):
                key = args[i + 1].split("=")[0]
                assert key in fields or key == "key", f"{where}: no config field {key!r}"
            if arg in ("--config", "--space") and i + 1 < len(args) and args[i + 1].startswith("configs/"):
                assert (ROOT / args[i + 1]).is_file(), f"{where}: no file {args[i + 1]}"
