"""The `imgcls` command: parse flags, build a config, call exactly one library function.

parsers.py holds the flags and help of every subcommand, commands.py what each one does.
Library modules are imported inside each command, so `imgcls --help` does not load torch.
"""

from __future__ import annotations

import sys

from imgcls.cli.parsers import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from imgcls.atomic import WriteError
    from imgcls.models import MissingWeightsError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, MissingWeightsError, WriteError) as e:  # bad input, a full disk: say what, no traceback
        print(f"imgcls: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgcls: interrupted", file=sys.stderr)
        return 130
