"""The `difflens` command: one parser with a subcommand per module of difflens.commands, and `main`, which runs the
chosen one and turns a domain error into one line, "difflens: error: <option>: <what is allowed>", and exit status 2,
before any output is written.

torch is imported only when a command runs, so `difflens --help` is quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from difflens.commands import (
    delete,
    ensure_groups,
    evaluate,
    explain,
    keys,
    make_tiny_model,
    models,
    replay,
    serve,
    triton_serve,
    worker,
)
from difflens.commands.common import error_line
from difflens.errors import DifflensError

# In `difflens --help`'s order; each module's add(sub) makes its subparser and sets its `run`.
COMMANDS = (explain, make_tiny_model, evaluate, worker, replay, serve, models, ensure_groups, triton_serve, keys,
            delete)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflens", description="Generate and explain diffusion-model images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except DifflensError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflens: interrupted; nothing written", file=sys.stderr)
        return 130
