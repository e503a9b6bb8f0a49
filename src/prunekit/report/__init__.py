"""The report of a study: ``report.html`` (one self-contained page, figures embedded) and ``results.csv``.

    from prunekit.report import write_report
    html_path, csv_path = write_report("out/my-study")

Everything is computed from the study's results database (:mod:`prunekit.study.database`): the figures
(:mod:`prunekit.report.plots`), the written answers (:mod:`prunekit.report.answers`) and the tables.
"""

from __future__ import annotations

from pathlib import Path

from prunekit.errors import PrunekitError

REPORT_NAME = "report.html"
CSV_NAME = "results.csv"


def write_report(folder: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``results.csv`` into a study folder (atomically); returns their paths."""
    from prunekit.report.answers import answers
    from prunekit.report.data import load, results_csv
    from prunekit.report.page import render
    from prunekit.report.plots import all_figures
    from prunekit.study.database import open_existing
    from prunekit.utils import atomic_write_text

    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise PrunekitError("the report's figures need matplotlib: pip install matplotlib") from exc
    folder = Path(folder)
    data = load(folder)
    database = open_existing(folder)
    try:
        study_yaml = database.meta.get("study_yaml", "")
    finally:
        database.close()
    page = render(data, all_figures(data), answers(data), study_yaml)
    html_path, csv_path = folder / REPORT_NAME, folder / CSV_NAME
    atomic_write_text(csv_path, results_csv(data))
    atomic_write_text(html_path, page)
    return html_path, csv_path


__all__ = ["CSV_NAME", "REPORT_NAME", "write_report"]
