"""The `prunekit` command: one small module per subcommand, each a thin layer over the API."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import typing
from collections.abc import Sequence

from prunekit import __version__
from prunekit.errors import PrunekitError

# subcommand name -> module in prunekit.cli; each module has `register(subparsers)` that sets `func`
SUBCOMMANDS = ["models", "data", "eval", "prune", "methods", "train", "finetune", "export", "study", "report"]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump) and exit with 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="prunekit",
        description="Prune transformer models, recover their quality, and measure what was gained and lost.")
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"prunekit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"prunekit.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def quiet_libraries() -> None:
    """Keep third-party chatter (transformers warnings, hub retries) off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    quiet_libraries()
    parser = build_parser()
    # --debug may come anywhere (`prunekit eval m --debug` too): only the top-level parser knows it
    args = parser.parse_args((["--debug"] if debug else []) + [a for a in argv if a != "--debug"])
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not args.command else 2
    try:
        return int(args.func(args) or 0)
    except PrunekitError as exc:
        if debug:
            raise
        message = " ".join(str(exc).split())  # always one line, whatever the message holds
        print(f"prunekit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted; nothing was written to the output folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
