"""Every command line the reference docs show parses against the command it names.

test_readme.py runs the README's commands; the docs (docs/*.md, checkpoints/README.md) show longer
runs (thousands of images, whole training runs) that are too slow for the suite, and their scripts
run in a small mode in test_benchmarks.py. What can rot silently in a doc is a renamed or removed
option or a bad value: this test hands each line's arguments to the click command's own parser,
which runs nothing.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "checkpoints" / "README.md"]
COMMAND = re.compile(r"^(?:\.venv/bin/)?(?:python )?(benchmarks/\w+\.py|lego-(?:run|export|serve|train))\b")


def doc_commands() -> list[tuple[str, str, bool]]:
    """(where, command line, whole) for every bash-block line (whole: a command to run as it stands)
    and inline `code` span (a mention in prose, which may leave out required options) that starts a command."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        lines = [(line, True) for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        lines += [(" ".join(span.split()), False) for span in re.findall(r"`([^`]+)`", prose)]  # spans may wrap
        for line, whole in lines:
            line = line.split(" #")[0].strip()
            if COMMAND.match(line):
                found.append((doc.relative_to(ROOT).as_posix(), line, whole))
    return found


def command_for(program: str) -> click.Command:
    """The click command behind a console script or a benchmark script (imported, not run)."""
    if program.startswith("benchmarks/"):
        path = ROOT / program
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(f"doc_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
        return module.main
    from lego_export.cli import export_main
    from lego_export.runtime.cli import main as run_main
    from lego_export.serve.cli import main as serve_main
    from lego_train.cli import main as train_main

    return {"lego-run": run_main, "lego-export": export_main, "lego-serve": serve_main, "lego-train": train_main}[
        program
    ]


def parse(command: click.Command, args: list[str]) -> None:
    """Parse args as the command would (subcommands included), without invoking anything."""
    if isinstance(command, click.Group) and args and not args[0].startswith("-"):
        name, *rest = args
        if name not in command.commands:
            raise click.UsageError(f"no subcommand {name!r}")
        return parse(command.commands[name], rest)
    command.make_context(command.name or "cmd", list(args)).close()


COMMANDS = doc_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20, COMMANDS  # the extraction itself works


@pytest.mark.parametrize(("where", "line", "whole"), COMMANDS, ids=[f"{w}:{line[:60]}" for w, line, _ in COMMANDS])
def test_a_doc_command_parses(where: str, line: str, whole: bool):
    program = COMMAND.match(line).group(1)
    words = shlex.split(line)
    args = words[words.index(next(w for w in words if w.endswith(program))) + 1 :]
    if not args:
        return  # a bare name in prose ("`lego-run`"): nothing to parse
    try:
        parse(command_for(program), args)
    except click.exceptions.Exit:
        pass  # --help, --version
    except click.MissingParameter as e:
        if whole:
            pytest.fail(f"{where}: `{line}`: {e.format_message()}")
    except click.BadOptionUsage as e:
        if whole or "requires an argument" not in e.format_message():  # prose may name an option alone
            pytest.fail(f"{where}: `{line}`: {e.format_message()}")
    except click.UsageError as e:
        pytest.fail(f"{where}: `{line}`: {e.format_message()}")
