"""`prunekit methods`: every registered pruning method, what it needs and the settings it reads."""

from __future__ import annotations

import argparse
import dataclasses


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("methods", help="list the pruning methods and their settings",
                            description="List the registered pruning methods (one-shot layer-wise and whole-model), "
                                        "whether they need calibration data, and the settings each reads.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from prunekit.methods import available_methods
    from prunekit.pruning import PruneConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    table = Table(title="pruning methods (prunekit prune MODEL --method NAME ...)")
    for column in ("method", "kind", "calibration", "settings (default)", "description"):
        table.add_column(column)
    for info in available_methods():
        settings = ", ".join(f"{name}={defaults.get(name)}" if defaults.get(name) is not None else name
                             for name in info.settings)
        calibration = ("depends" if info.calibration_rule else "yes") if info.needs_calibration else "no"
        table.add_row(info.name, info.kind, calibration, settings, info.description)
    Console(width=max(Console().width, 160)).print(table)
    print("allocation: uniform (same sparsity in every block) or owl (outlier-weighted, needs calibration); "
          "structure: unstructured or N:M (e.g. 2:4); include/exclude: fnmatch patterns on full layer names")
    return 0
