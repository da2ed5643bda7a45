"""The `kedavra` command: one subcommand per task, each defined in the module that does the work.

A command module exposes `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed arguments and returning an exit code. User errors (ValueError, FileNotFoundError)
end the command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kedavra import __version__

# Modules that define subcommands, in the order `kedavra --help` lists them.
COMMAND_MODULES = (
    "kedavra.commands.generate",
    "kedavra.commands.samplers",
    "kedavra.commands.evaluate",
    "kedavra.commands.serve",
    "kedavra.commands.demo",
    "kedavra.commands.train",
    "kedavra.commands.viz",
    "kedavra.commands.upscale",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kedavra", description="Stable Diffusion from scratch: sample, train, visualise and measure diffusion."
    )
    parser.add_argument("--version", action="version", version=f"kedavra {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
        print(f"kedavra {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kedavra {args.command}: interrupted", file=sys.stderr)
        return 130
