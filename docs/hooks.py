"""MkDocs hooks: the pages that must not drift from the code are checked or generated at build time.

- `reference/configuration.md` is checked against the configuration models (merging/config_reference.py);
- each `mergeflow` command has a page `cli/<command>.md`, and `<!-- mergeflow-help: CMD -->` in it becomes
  that command's `--help` as argparse prints it;
- every example config in `examples/` is listed on `examples.md`.

Any problem fails the build (MkDocs turns a PluginError into a failed `mkdocs build`).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

HELP_MARK = re.compile(r"<!-- mergeflow-help: ([a-z ]+) -->")
ROOT = Path(__file__).resolve().parent.parent


def commands() -> dict[str, argparse.ArgumentParser]:
    """Returns {"merge": parser, "zoo build": parser, ...}: every `mergeflow` command that runs something."""
    from flows.cli import build_parser

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[prefix.strip()] = parser
        for action in subs:
            for name, child in action.choices.items():
                walk(child, f"{prefix} {name}")

    walk(build_parser(), "")
    return found


def command_page(command: str) -> str:
    return f"cli/{command.split()[0]}.md"


def on_config(config: Any) -> Any:
    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal width: fixed, so pages do not vary
    return config


def on_files(files: Any, config: Any) -> Any:
    pages = {f.src_uri for f in files}
    missing = sorted({command_page(c) for c in commands()} - pages)
    if missing:
        raise PluginError(f"docs: no page for these mergeflow commands: {', '.join(missing)}")
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    src = page.file.src_uri
    if src == "reference/configuration.md":
        from merging.config_reference import check_reference

        problems = check_reference(markdown)
        if problems:
            listed = "\n  ".join(problems)
            raise PluginError(f"docs/reference/configuration.md does not match the config models:\n  {listed}")
    if src.startswith("cli/"):
        known = commands()
        wanted = [c for c in known if command_page(c) == src]
        marked = HELP_MARK.findall(markdown)
        if sorted(marked) != sorted(wanted):
            raise PluginError(f"docs/{src}: help marks {marked}, expected one per command {wanted}")

        def help_block(match: re.Match[str]) -> str:
            return "```text\n" + known[match.group(1)].format_help().rstrip() + "\n```"

        markdown = HELP_MARK.sub(help_block, markdown)
    if src == "examples.md":
        listed = set(re.findall(r"`examples/([\w./-]+\.ya?ml)`", markdown))
        present = {p.relative_to(ROOT / "examples").as_posix() for p in (ROOT / "examples").rglob("*.y*ml")}
        if listed != present:
            raise PluginError(
                f"docs/examples.md: not listed {sorted(present - listed)}, listed but absent {sorted(listed - present)}"
            )
    return markdown
