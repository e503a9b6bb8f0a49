"""Reading a study: a YAML file or a built-in preset, validated and expanded into its runs before anything runs.

Every problem is a one-line :class:`~prunekit.errors.PrunekitError` naming the entry: an unknown key, an
unknown method, a setting a method does not take, a sparsity outside [0, 1), a model or dataset that does
not exist. The presets are YAML files shipped in ``prunekit/study/presets``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import PrunekitError
from prunekit.study.grid import expand
from prunekit.study.spec import (
    CALIBRATION,
    EVALUATION,
    LATENCY,
    QUESTIONS,
    RECOVERY,
    TOP_KEYS,
    TRAINING,
    Study,
    check_sources_exist,
    check_values,
    eval_sets_of,
    int_list,
    parse_models,
    section,
    typed,
)


def presets_folder() -> Path:
    return Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    return sorted(path.stem for path in presets_folder().glob("*.yaml"))


def read_study(path: str | None = None, preset: str | None = None) -> tuple[str, str]:
    """(source, YAML text) of a study file or a built-in preset."""
    if (path is None) == (preset is None):
        raise PrunekitError("give a study file or --preset NAME (not both): e.g. prunekit study --preset quick "
                            "--out DIR")
    if preset is not None:
        file = presets_folder() / f"{preset}.yaml"
        if not file.is_file():
            raise PrunekitError(f"unknown preset '{preset}': use one of {', '.join(preset_names())}")
        return f"preset:{preset}", file.read_text()
    file = Path(str(path))
    if not file.is_file():
        raise PrunekitError(f"study file '{path}' not found: check the path (or use --preset "
                            f"{'/'.join(preset_names())})")
    return str(path), file.read_text()


def load_study(path: str | None = None, preset: str | None = None, check_sources: bool = True) -> Study:
    """Read, validate and expand a study file or preset. Every problem is a one-line error naming the entry.

    ``check_sources`` also checks that every model and dataset exists (datasets are loaded, built-in
    ones prepared on first use); without it only the file itself is checked.
    """
    source, text = read_study(path, preset)
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise PrunekitError(f"study {source} is not valid YAML{line}: fix its syntax") from exc
    if not isinstance(loaded, dict):
        raise PrunekitError(f"study {source} must be a mapping with name, models and methods: see docs/study.md")
    return build_study(loaded, source, text, check_sources)


def build_study(raw: dict[str, Any], source: str, text: str = "", check_sources: bool = True) -> Study:
    """A validated :class:`Study` from a parsed study mapping."""
    where = f"study {source}"
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise PrunekitError(f"{where}: unknown key {', '.join(unknown)}: known keys are {', '.join(TOP_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise PrunekitError(f"{where}: name must be a short word (letters, digits, - _ .), e.g. name: my-study")
    settings: dict[str, Any] = {
        "models": parse_models(raw.get("models"), where),
        "seeds": int_list(raw.get("seeds", [0]), f"{where}: seeds"),
        "dense": typed(raw.get("dense", True), True, f"{where}: dense"),
        "keep_models": typed(raw.get("keep_models", True), True, f"{where}: keep_models"),
        "device": typed(raw.get("device", "auto"), "auto", f"{where}: device"),
        "dtype": typed(raw.get("dtype", "float32"), "float32", f"{where}: dtype"),
        "calibration": section(raw.get("calibration"), CALIBRATION, f"{where}: calibration"),
        "training": section(raw.get("training"), TRAINING, f"{where}: training"),
        "recovery": section(raw.get("recovery"), RECOVERY, f"{where}: recovery") if raw.get("recovery") else None,
        "questions": section(raw.get("questions"), QUESTIONS, f"{where}: questions"),
    }
    evaluation = section(raw.get("evaluation"), EVALUATION, f"{where}: evaluation")
    latency = evaluation["latency"]
    if latency is True or latency is None:
        evaluation["latency"] = dict(LATENCY)
    elif latency is not False:
        evaluation["latency"] = section(latency, LATENCY, f"{where}: evaluation.latency")
    settings["evaluation"] = evaluation
    check_values(settings, where)
    methods = raw.get("methods") or []
    if not isinstance(methods, list):
        raise PrunekitError(f"{where}: methods must be a list of entries such as - method: wanda")
    study = Study(name=name, description=str(raw.get("description") or "").strip(), source=source, text=text,
                  settings=settings, eval_sets={})
    study.eval_sets = eval_sets_of(study, where, check_sources)
    study.runs = expand(study, methods, where)
    if not study.runs:
        raise PrunekitError(f"{where}: the grid holds no runs: add methods (or dense: true)")
    if check_sources:
        check_sources_exist(study, where)
    return study
