"""`prunekit models`: the built-in models, where they come from and whether they are ready."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list the built-in models",
                            description="List the built-in models with source, size and cache state.")
    parser.add_argument("--prepare", action="store_true", help="also convert/cache every built-in model now")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prunekit.models import BUILTIN_MODELS, builtin_folder, list_models

    if args.prepare:
        for name in BUILTIN_MODELS:
            print(f"{name}: {builtin_folder(name)}")
    table = Table(title="built-in models (any local folder or hub id works too)")
    for column in ("name", "params", "task", "package", "state", "description"):
        table.add_column(column)
    for row in list_models():
        table.add_row(row["name"], row["params"], row["task"], row["package"], row["state"], row["description"])
    Console(width=max(Console().width, 160)).print(table)
    return 0
