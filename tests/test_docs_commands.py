"""Every ``nanomorph ...`` command written in README.md and docs/*.md parses with today's CLI: a
renamed or removed flag breaks this test, not a user copying the line. (Parsing only: running them
needs their data.)"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

from nanomorph.cli import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)


def documented_commands() -> list[tuple[str, str]]:
    """``(file: line, command)`` for each ``nanomorph COMMAND ...`` line in a fenced code block;
    continuation lines (trailing backslash) are joined, comments dropped, ``...`` placeholders skipped."""
    found = []
    for doc in DOCS:
        for block in _code_blocks(doc.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if not line.startswith("nanomorph ") or "..." in line:
                    continue
                words = shlex.split(line, comments=True)
                if len(words) > 1 and words[1] in COMMANDS:
                    found.append((f"{doc.name}: {line[:60]}", line))
    return found


CASES = documented_commands()


def test_the_docs_hold_commands() -> None:
    assert len(CASES) >= 20  # the finder itself works (README and docs are full of examples)


@pytest.mark.parametrize("where,line", CASES, ids=[c[0] for c in CASES])
def test_documented_command_parses(where: str, line: str) -> None:
    words = shlex.split(line, comments=True)
    parser = build_parser(words[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the docs use no deprecated spelling
        parser.parse_args(words[2:])
