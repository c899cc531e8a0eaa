"""The one command line, ``diffiml``. Each subcommand imports what it needs only when it runs, so the runtime's
commands never load torch."""

from __future__ import annotations

import argparse
import logging
import sys

from diffiml.runtime.errors import DiffimlError


def build_parser() -> argparse.ArgumentParser:
    from diffiml import __version__
    from diffiml.train import commands as train_commands

    parser = argparse.ArgumentParser(prog="diffiml", description="DiffIML image manipulation localization")
    parser.add_argument("--version", action="version", version=f"diffiml {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    train_commands.add_parsers(sub)
    # runtime before export: export plugs its PyTorch reference into `localize --reference`, so the runtime itself
    # never imports export (or torch).
    for module in ("diffiml.runtime.commands", "diffiml.export.commands", "diffiml.benchmarks.commands"):
        try:
            __import__(module, fromlist=["add_parsers"]).add_parsers(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("diffiml: interrupted", file=sys.stderr)
        return 130
    except (DiffimlError, ValueError, OSError, RuntimeError) as exc:
        # Typed errors of ours (DiffimlError and its subclasses) and the ValueError / OSError that name
        # a bad file: their message already names the file and the fix.
        if args.verbose:
            raise
        print(f"diffiml {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
