"""The README's shell blocks as the commands a user types: tests run them as written, so a README edit that
breaks a command fails the suite. A command is one line of a ```bash block, with `\\` continuations joined
and its trailing comment dropped."""

from __future__ import annotations

import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _drop_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes, at the start or after a space)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_blocks(path: Path = README) -> list[list[str]]:
    """Every ```bash block of `path`, each as its list of commands."""
    blocks: list[list[str]] = []
    lines: list[str] | None = None
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if not fenced:
                fenced, lines = True, ([] if line.strip() in ("```bash", "```sh") else None)
            else:
                fenced = False
                if lines is not None:
                    blocks.append(_commands(lines))
                lines = None
        elif fenced and lines is not None:
            lines.append(line)
    return blocks


def _commands(lines: list[str]) -> list[str]:
    commands, pending = [], ""
    for line in lines:
        line = _drop_comment(line)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        command = (pending + line.strip()).strip()
        pending = ""
        if command:
            commands.append(" ".join(command.split()))  # continuation indents are layout, not arguments
    return commands


def block(containing: str, path: Path = README) -> list[str]:
    """The one shell block with a command that contains `containing`."""
    found = [b for b in shell_blocks(path) if any(containing in c for c in b)]
    assert len(found) == 1, f"{path.name}: {len(found)} shell blocks contain {containing!r}"
    return found[0]


def command(commands: list[str], containing: str) -> str:
    """The one command of a block that contains `containing`."""
    found = [c for c in commands if containing in c]
    assert len(found) == 1, f"{len(found)} commands contain {containing!r}: {commands}"
    return found[0]


def argv(text: str) -> list[str]:
    """A command's words, for commands with no shell syntax (no $, pipes, or environment prefix)."""
    assert not any(mark in text for mark in "$|;&<>`"), f"not a plain command: {text}"
    return shlex.split(text)
