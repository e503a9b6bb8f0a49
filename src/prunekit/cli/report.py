"""`prunekit report DIR`: write DIR/report.html (self-contained, figures embedded) and DIR/results.csv from a
study's results database, and print the study's answers."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="write report.html and results.csv of a study folder",
        description="Read DIR/study.sqlite (written by prunekit study) and write DIR/report.html, one page that "
                    "opens offline (figures embedded: quality vs sparsity, vs bytes on disk and vs measured latency "
                    "with the Pareto frontier, recovery, per-layer sparsity; a table of every run with its "
                    "protocol, machine and software), and DIR/results.csv, one row per run.")
    parser.add_argument("folder", help="the --out folder of a study")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    write_and_print(Path(args.folder))
    return 0


def write_and_print(folder: Path) -> None:
    """Write the report and print where it is, with the study's written answers."""
    from prunekit.report import write_report
    from prunekit.report.answers import answers
    from prunekit.report.data import load

    html_path, csv_path = write_report(folder)
    for question, answer in answers(load(folder)):
        print(f"- {question}")
        print(textwrap.indent(textwrap.fill(answer, width=100), "  "))
    print(f"report: {html_path}")
    print(f"results: {csv_path}")
