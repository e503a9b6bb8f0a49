"""Studies: a grid of models x methods x settings x recovery budgets, run into a results database.

    from prunekit.study import load_study, run_study
    study = load_study("my-study.yaml")        # or load_study(preset="quick"); validated before anything runs
    outcome = run_study(study, "out/my-study", workers=2)
    # then prunekit.report.write_report("out/my-study") for report.html and results.csv

See docs/study.md for the study file and the folder it writes.
"""

from __future__ import annotations

from prunekit.study.database import DB_NAME, SCHEMA_VERSION, open_existing
from prunekit.study.runner import StudyOutcome, run_study
from prunekit.study.spec import EvalSet, Run, Study
from prunekit.study.studyfile import build_study, load_study, preset_names, presets_folder

__all__ = ["DB_NAME", "SCHEMA_VERSION", "EvalSet", "Run", "Study", "StudyOutcome", "build_study", "load_study",
           "open_existing", "preset_names", "presets_folder", "run_study"]
