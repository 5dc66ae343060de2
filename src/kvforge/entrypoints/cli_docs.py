"""docs/cli.md from the argument parser: ``python -m kvforge.entrypoints.cli_docs > docs/cli.md``
(a test checks the committed file is current). The page is rendered here, not with argparse's
help formatter, so it does not change with the Python version or the terminal width."""

from __future__ import annotations

import argparse
import sys


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = (), helptext: str = ""
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every command of ``parser`` depth first: its words after ``kvforge``, its parser and
    the one-line help its parent gives it."""
    found = [(path, parser, helptext)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, child in action.choices.items():
                found += _commands(child, (*path, name), helps.get(name, ""))
    return found


def _option(action: argparse.Action) -> str:
    """``-m, --model MODEL`` or ``prompt`` for one argument."""
    if not action.option_strings:
        return str(action.metavar or action.dest)
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    suffix = {"+": f" {metavar} [...]", "*": f" [{metavar} ...]", "?": f" [{metavar}]"}
    return names + suffix.get(str(action.nargs), f" {metavar}")


def render() -> str:
    """The reference page: every command, its arguments, their help and defaults."""
    from kvforge.entrypoints.cli import build_parser

    lines = [
        "# kvforge command line",
        "",
        "Generated from the argument parser by `python -m kvforge.entrypoints.cli_docs`;",
        "do not edit by hand.",
        "",
    ]
    for path, parser, helptext in _commands(build_parser()):
        lines += [f"## kvforge {' '.join(path)}".rstrip(), ""]
        if helptext or parser.description:
            lines += [helptext or str(parser.description), ""]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = "" if action.help == argparse.SUPPRESS else " ".join((action.help or "").split())
            text = text.replace("%%", "%")  # argparse's escape
            default = action.default
            if default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
                text += f" (default: {default})"
            if action.choices and not isinstance(action, argparse._SubParsersAction):
                text += f" (one of: {', '.join(map(str, action.choices))})"
            lines.append(f"- `{_option(action)}`{': ' + text.strip() if text.strip() else ''}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
