"""What README.md and docs/*.md show works: every ``dcae15 …`` command parses with the CLI's own parser, every
subcommand's ``--help`` prints, and every YAML config snippet loads as a config.

A YAML snippet that is intentionally only part of a config starts with a ``# partial`` comment line: it must still
be valid YAML. Commands are taken from fenced shell blocks (continuation lines joined, comments dropped, ``&&`` /
``;`` / ``|`` split, ``NAME=value`` assignments of the same block substituted) and from inline code spans; a span that
only names a command (```dcae15 encode```) must name one that exists.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^\s*```(\S*)\s*$")
_INLINE = re.compile(r"`([^`\n]+)`")
_PROGRAMS = ("dcae15", ".venv/bin/dcae15")
_SEPARATORS = {"&&", "||", ";", "|", "&"}


def _blocks(text: str) -> tuple[list[tuple[str, int, list[str]]], list[tuple[int, str]]]:
    """Fenced blocks as (language, first line number, lines) and the prose lines outside them."""
    blocks, prose = [], []
    lang, start, body = None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m and lang is None:
            lang, start, body = m.group(1) or "text", n + 1, []
        elif m:
            blocks.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
        else:
            prose.append((n, line))
    return blocks, prose


def _words(line: str, env: dict[str, str]) -> list[str]:
    for name, value in env.items():  # unquoted $NAME expands into several words, as in the shell
        line = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value, line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    return list(lexer)


def _commands(words: list[str]) -> list[list[str]]:
    out, cur = [], []
    for w in [*words, ";"]:
        if w in _SEPARATORS:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(w)
    return out


def _shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after the program) of every dcae15 command the docs show."""
    found = []
    for path in DOCS:
        blocks, prose = _blocks(path.read_text())
        for lang, start, body in blocks:
            if lang not in ("bash", "sh", "shell", "console"):
                continue
            env: dict[str, str] = {}
            joined, first = "", start
            for n, line in enumerate(body, start):
                joined, first = (joined + " " + line[:-1], first) if line.endswith("\\") else (joined + " " + line, first)
                if line.endswith("\\"):
                    continue
                try:
                    words = _words(joined, env) if "dcae15" in joined or "=" in joined else []
                except ValueError as exc:  # unbalanced quotes: reported by the parse test, not at collection
                    words = ["dcae15", f"<{exc}: {joined.strip()}>"]
                for cmd in _commands(words):
                    while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]) or cmd[:1] == ["export"]:
                        if cmd[0] != "export":
                            name, _, value = cmd[0].partition("=")
                            env[name] = " ".join(_words(value, env))  # R=...; CFG="--root $R": CFG holds R's value
                        cmd = cmd[1:]
                    if cmd and cmd[0] in _PROGRAMS:
                        found.append((f"{path.name}:{first}", cmd[1:]))
                joined, first = "", n + 1
        for n, line in prose:
            for span in _INLINE.findall(line):
                words = span.split()
                if len(words) > 1 and words[0] in _PROGRAMS:  # a bare `dcae15` names the program
                    found.append((f"{path.name}:{n}", shlex.split(span)[1:]))
    return found


def _config_snippets() -> list[tuple[str, str]]:
    snippets = []
    for path in DOCS:
        blocks, _ = _blocks(path.read_text())
        snippets += [(f"{path.name}:{start}", "\n".join(body)) for lang, start, body in blocks if lang in ("yaml", "yml")]
    return snippets


COMMANDS = _shown_commands()
SNIPPETS = _config_snippets()


def _parse(argv: list[str]) -> tuple[int | None, str]:
    """Parse like ``dcae15 argv``: (exit code or None when it parsed, what argparse printed)."""
    from flows.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0), out.getvalue()
    return None, out.getvalue()


def test_the_docs_show_commands_and_the_readme_links_every_docs_page():
    assert len(COMMANDS) >= 20 and any(where.startswith("README.md") for where, _ in COMMANDS)
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "README.md is an introduction: guides go to docs/, numbers to bench/"
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_shown_command_parses(where, argv):
    from flows.cli import _parse_set

    if len(argv) == 1 and not argv[0].startswith("-"):  # prose naming a command (`dcae15 encode`): it exists
        argv = [*argv, "--help"]
    code, printed = _parse(argv)
    if "--help" in argv or "-h" in argv:
        assert code == 0, f"{where}: dcae15 {shlex.join(argv)}\n{printed}"
        return
    assert code is None, f"{where}: dcae15 {shlex.join(argv)}\n{printed}"
    sets = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w == "--set"]
    _parse_set(sets + [w.split("=", 1)[1] for w in argv if w.startswith("--set=")])


def test_every_subcommand_has_help():
    from flows.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        code, printed = _parse([name, "--help"])
        assert code == 0 and "usage: dcae15 " in printed, (name, printed[-500:])  # an alias prints its command


@pytest.mark.parametrize("where,text", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_every_yaml_snippet_is_a_config(where, text):
    from flows.config import load_config

    raw = yaml.safe_load(text)
    assert isinstance(raw, dict), f"{where}: not a mapping"
    if text.lstrip().startswith("# partial"):
        return
    try:
        load_config(raw)
    except ValueError as exc:
        pytest.fail(f"{where}: does not load as a dcae15 config ({exc}); complete it or mark it '# partial'")
