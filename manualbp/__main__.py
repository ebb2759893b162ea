"""``python -m manualbp COMMAND ...``: the package's command line.

Each subcommand's module registers its own parser and sets ``run`` (args -> exit
status); adding a command is one more ``add_parser`` call below.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from manualbp.derivation import explain

    parser = argparse.ArgumentParser(prog="python -m manualbp", description="manualbp: dense layers with a hand-written backward.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    explain.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
