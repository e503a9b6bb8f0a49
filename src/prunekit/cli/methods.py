"""`prunekit methods [NAME]`: every registered method of every kind, with its settings, defaults and help."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("methods", help="list the pruning methods (one-shot, structured, training) and settings",
                            description="List every registered method: its kind (one-shot and structured run with "
                                        "`prunekit prune`, training with `prunekit train`), whether it reads "
                                        "calibration data, and each setting it takes with its default and help. "
                                        "A setting a method does not take is refused.")
    parser.add_argument("name", nargs="?", default=None, help="show one method only")
    parser.add_argument("--kind", default=None, choices=("one-shot", "structured", "training"),
                        help="show the methods of one kind")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from prunekit.methods import available_methods, get_method

    specs = [get_method(args.name)] if args.name else available_methods(args.kind)
    console = Console(width=max(Console().width, 120))
    for spec in specs:
        command = "prunekit train" if spec.kind == "training" else "prunekit prune"
        calibration = ""
        if spec.kind != "training":
            try:
                calibration = "; reads calibration data" if spec.config().needs_calibration() else \
                    "; needs no calibration data (with its defaults)"
            except Exception:  # a config whose defaults are incomplete: nothing to say  # noqa: BLE001
                calibration = ""
        table = Table(title=f"{spec.name}  ({spec.kind}: {command} --method {spec.name}{calibration})",
                      caption=spec.description, title_justify="left", caption_justify="left", min_width=100)
        for column in ("setting", "type", "default", "flag", "help"):
            table.add_column(column, overflow="fold")
        for info in spec.config.settings():
            flag = "--" + info.name.replace("_", "-") if info.cli else f"--method-arg {info.name}=..."
            kind = info.type_name + (f" ({'|'.join(map(str, info.choices))})" if info.choices else "")
            table.add_row(info.name, kind, str(info.default), flag, info.help)
        if not spec.config.settings():
            table.add_row("(none)", "", "", "", "")
        console.print(table)
        console.print()
    return 0
