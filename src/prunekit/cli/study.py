"""`prunekit study STUDY.yaml --out DIR` (or `--preset NAME`): run a grid of pruning runs into a results database.

The study file is checked whole before anything runs. Runs already in DIR's database are skipped, so the
same command continues an interrupted study; each run's row is written when it completes. At the end the
report is written (`prunekit report DIR` writes it again at any time).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from prunekit.errors import PrunekitError


def register(sub: argparse._SubParsersAction) -> None:
    from prunekit.study.studyfile import preset_names

    presets = ", ".join(preset_names())
    parser = sub.add_parser(
        "study", help="run a grid of models x methods x settings x recovery budgets into a results database",
        description="Run a study: every run of the grid in STUDY.yaml (or a built-in --preset) is pruned, "
                    "fine-tuned if asked, and evaluated the same way; one row per finished run goes into "
                    "DIR/study.sqlite, so running the same command again continues where it stopped. Then the "
                    f"latency of every run is timed and DIR/report.html is written. Presets: {presets}. "
                    "docs/study.md describes the study file.")
    parser.add_argument("study", nargs="?", default=None, help="a study file (YAML)")
    parser.add_argument("--preset", default=None, help=f"a built-in study instead of a file: {presets}")
    parser.add_argument("--out", default=None, help="the study folder: results database, models, report (required)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at once, each with an equal share of the cores (default 1: in this process, with "
                             "the run's own progress bars)")
    parser.add_argument("--executor", default="local", choices=("local", "ray"),
                        help="local processes (default) or Ray tasks (pip install 'prunekit[ray]')")
    parser.add_argument("--ray-address", default=None,
                        help="the Ray cluster to use with --executor ray (default: start a local Ray instance)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the study file's)")
    parser.add_argument("--retime-latency", action="store_true",
                        help="time every run whose model is in DIR again (e.g. after other work shared the machine "
                             "while the study was timing); the earlier figures are replaced")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write the report at the end")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved study settings and its runs, and exit (nothing runs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prunekit.study import load_study, run_study

    study = load_study(args.study, args.preset)
    if args.device:
        study.settings["device"] = args.device
    if args.print_config:
        runs = [{"key": r.key, "label": r.label, "kind": r.kind, "model": r.model, **({"after": r.parent}
                                                                                      if r.parent else {})}
                for r in study.runs]
        print(yaml.safe_dump({"name": study.name, **study.settings, "runs": runs}, sort_keys=False), end="")
        return 0
    if not args.out:
        raise PrunekitError("no output folder given: add --out DIR (a new folder, or the folder of this study to "
                            "continue it)")
    try:
        outcome = run_study(study, args.out, workers=args.workers, executor=args.executor, address=args.ray_address,
                            progress=args.progress, echo=_echo, retime=args.retime_latency)
    except KeyboardInterrupt:
        print(f"prunekit: interrupted; the runs finished so far are kept in {args.out}: run the same command again "
              "to continue", file=sys.stderr)
        return 130
    print(f"study {study.name}: {len(outcome.finished)} run(s) finished now, {outcome.done_before} before, "
          f"{outcome.timed} timed, in {outcome.seconds:.0f} s")
    if args.report:
        from prunekit.cli.report import write_and_print

        write_and_print(outcome.folder)
    if outcome.failed or outcome.blocked:
        print(f"prunekit: {len(outcome.failed)} run(s) failed and {len(outcome.blocked)} wait for them (errors above "
              f"and in {outcome.folder}/logs): fix the cause and run the same command again", file=sys.stderr)
        return 1
    return 0


def _echo(line: str) -> None:
    print(line, flush=True)
