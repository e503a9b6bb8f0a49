"""The grid of a study: method entries x their setting axes x seeds x models, then recovery runs.

A method entry is a mapping with ``method`` and that method's settings; a list value is a grid axis
(``sparsity: [0.3, 0.5]``). Settings that are lists themselves (``include``) take a list of lists as an
axis. Every combination is built into the method's validated config (so a setting it does not take,
a sparsity outside [0, 1) or an impossible combination is an error naming the entry) before anything runs.
"""

from __future__ import annotations

from typing import Any

from prunekit.errors import PrunekitError
from prunekit.study.spec import ENTRY_KEYS, Run, Study, as_list, model_task, product, run_key, setting_is_list

RUNNABLE_KINDS = ("one-shot", "structured", "training")
SHOWN = ("sparsity", "ratio", "heads_ratio", "neurons_ratio", "structure", "remove", "allocation")  # always in labels


def expand(study: Study, entries: list[Any], where: str) -> list[Run]:
    """Every run of the study, parents before the runs that depend on them, each key and each label once."""
    settings = study.settings
    runs: dict[str, Run] = {}
    recover: set[str] = set()  # keys of the runs that get recovery (the dense control included)
    for model in settings["models"]:
        task = model_task(model, check=False) if not model["task"] else model["task"]
        if settings["dense"]:
            dense = _dense_run(model["name"], task, settings)
            runs[dense.key] = dense
            if settings["recovery"] and settings["recovery"]["dense"]:
                recover.add(dense.key)
        for index, entry in enumerate(entries):
            for run, recovered in _entry_runs(study, model["name"], task, entry, f"{where}: methods[{index}]"):
                runs.setdefault(run.key, run)
                if recovered:
                    recover.add(run.key)
    base = _unique_labels(list(runs.values()))
    children = [child for parent in base if parent.key in recover and settings["recovery"]
                for child in _recovery_runs(parent, settings)]
    parents = {child.parent for child in children}
    # the dense model is written into the study folder only when it is fine-tuned (a control) itself
    base = [_without_save(r) if r.kind == "dense" and r.key not in parents else r for r in base]
    return base + list({child.key: child for child in children}.values())


def _unique_labels(runs: list[Run]) -> list[Run]:
    """Runs whose labels collide (entries differing only in settings a label leaves out) get those settings added."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    out = []
    for run in runs:
        group = groups[run.label]
        if len(group) > 1:
            configs = [other.settings.get("config") or {} for other in group]
            differ = [key for key in configs[0] if len({repr(c.get(key)) for c in configs}) > 1]
            config = run.settings.get("config") or {}
            extra = " ".join(f"{key}={config.get(key)}" for key in differ) or f"#{run.key[:6]}"
            run = Run(run.key, f"{run.label} {extra}", run.model, run.task, run.method, run.kind, run.settings,
                      run.parent, run.parent_folder, run.save)
        out.append(run)
    return out


def _without_save(run: Run) -> Run:
    return Run(run.key, run.label, run.model, run.task, run.method, run.kind, run.settings, save=False)


def _dense_run(model: str, task: str, settings: dict[str, Any]) -> Run:
    resolved = {"model": model, "task": task, "method": "dense", "kind": "dense", "dtype": settings["dtype"]}
    return Run(run_key(resolved), _with_model("dense", model, settings), model, task, "dense", "dense", resolved)


def _with_model(label: str, model: str, settings: dict[str, Any]) -> str:
    return f"{model} {label}" if len(settings["models"]) > 1 else label


def _entry_runs(study: Study, model: str, task: str, entry: Any, where: str) -> list[tuple[Run, bool]]:
    """The runs of one method entry for one model: (run, whether recovery applies to it)."""
    from prunekit.methods import get_method

    settings = study.settings
    if not isinstance(entry, dict) or "method" not in entry:
        raise PrunekitError(f"{where} must be a mapping with a method, e.g. - method: wanda")
    entry = {str(k).replace("-", "_"): v for k, v in entry.items()}
    name = str(entry["method"])
    where = f"{where} ({name})"
    if name == "dense":
        raise PrunekitError(f"{where}: the dense model is part of every study (dense: true); remove this entry")
    try:
        spec = get_method(name)
    except PrunekitError as exc:
        raise PrunekitError(f"{where}: {exc}") from exc
    if spec.kind not in RUNNABLE_KINDS:  # pragma: no cover - every registered kind runs
        raise PrunekitError(f"{where}: {spec.kind} methods cannot run in a study")
    if spec.kind == "training" and not settings["training"]["data"]:
        raise PrunekitError(f"{where}: {name} prunes while training: add a training section with data "
                            "(e.g. training: {data: reviews, epochs: 1})")
    names = spec.config.names()
    method_settings = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    unknown = [k for k in method_settings if k not in names]
    if unknown:
        takes = ", ".join(names) if names else "no settings"
        raise PrunekitError(f"{where}: method {name} does not take {', '.join(unknown)}; it takes {takes} "
                            "(see prunekit methods)")
    axes = {key: _axis(spec.config, key, value) for key, value in method_settings.items()}
    seeds = as_list(entry.get("seeds")) or settings["seeds"]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise PrunekitError(f"{where}: seeds must be whole numbers")
    recover = _recovery_applies(entry, spec, settings, where)
    out = []
    for values in product(axes):
        try:
            config = spec.make_config(values)
            config.ready()
        except PrunekitError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            raise PrunekitError(f"{where} with {shown or 'its defaults'}: {exc}") from exc
        for seed in seeds:
            seeded = config
            if "seed" in names and "seed" not in values:
                seeded = spec.make_config({**values, "seed": seed})
            resolved = _resolved(model, task, spec, seeded, seed, settings)
            varying = {key for key, axis in axes.items() if len(axis) > 1}
            several = len(seeds) > 1 or len(settings["seeds"]) > 1
            label = _label(name, values, entry.get("label"), varying,
                           seed if several and resolved["seed"] is not None else None)
            out.append((Run(run_key(resolved), _with_model(label, model, settings), model, task, name, spec.kind,
                            resolved), recover and spec.kind != "training"))
    return out


def _axis(config_class: type, key: str, value: Any) -> list[Any]:
    """A setting's grid values: a list is an axis, anything else one value (list settings need a list of lists)."""
    if setting_is_list(config_class, key):
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
        return [value]
    if isinstance(value, list):
        if not value:
            raise PrunekitError(f"setting {key} has an empty list: give at least one value")
        return list(dict.fromkeys(value))
    return [value]


def _recovery_applies(entry: dict[str, Any], spec: Any, settings: dict[str, Any], where: str) -> bool:
    recovery = settings["recovery"]
    given = entry.get("recovery")
    if given is not None and not isinstance(given, bool):
        raise PrunekitError(f"{where}: recovery must be true or false")
    if recovery is None:
        if given:
            raise PrunekitError(f"{where}: recovery: true needs a recovery section (data, budgets)")
        return False
    if given is not None:
        return given
    methods = as_list(recovery["methods"])
    return not methods or spec.name in methods


def _resolved(model: str, task: str, spec: Any, config: Any, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a run's key is the hash of: everything that changes its result (not where it ran)."""
    resolved: dict[str, Any] = {"model": model, "task": task, "method": spec.name, "kind": spec.kind,
                                "config": config.to_dict(), "dtype": settings["dtype"]}
    if spec.kind == "training":
        resolved["training"] = dict(settings["training"])
        resolved["seed"] = seed
        return resolved
    calibration = None
    if config.needs_calibration():
        calibration = {**settings["calibration"], "seed": seed}
    resolved["calibration"] = calibration
    # without calibration data and a seed of its own, a one-shot method does the same thing for every seed
    resolved["seed"] = seed if calibration is not None or "seed" in config.names() else None
    return resolved


def _recovery_runs(parent: Run, settings: dict[str, Any]) -> list[Run]:
    recovery = settings["recovery"]
    common = {k: v for k, v in recovery.items() if k not in ("budgets", "modes", "methods", "dense")}
    out = []
    for mode in recovery["modes"]:
        for budget in recovery["budgets"]:
            if budget <= 0:
                continue
            seed = parent.settings.get("seed") or 0
            recovery_settings = {**common, "mode": mode, "tokens": budget, "seed": seed}
            if mode == "full":  # LoRA's settings change nothing in full fine-tuning
                for key in ("lora_rank", "lora_alpha", "lora_dropout"):
                    recovery_settings.pop(key)
            resolved = {"model": parent.model, "task": parent.task, "method": parent.method, "kind": "recovery",
                        "parent": parent.settings, "recovery": recovery_settings}
            label = f"{parent.label} + {mode} {_count(budget)}"
            out.append(Run(run_key(resolved), label, parent.model, parent.task, parent.method, "recovery", resolved,
                           parent=parent.key, parent_folder=parent.folder))
    return out


def _count(tokens: int) -> str:
    """150000 -> '150k', 1000000 -> '1M', 542720 -> '542.7k'."""
    if tokens >= 1_000_000:
        return f"{tokens / 1e6:.4g}M"
    if tokens >= 1000:
        return f"{tokens / 1e3:.4g}k"
    return str(tokens)


def _label(method: str, values: dict[str, Any], given: Any, varying: set[str], seed: int | None) -> str:
    """A readable name: 'wanda 50%', 'wanda 2:4', 'heads-neurons 25%', 'blocks -4 blocks', plus other settings.

    Settings that vary within the entry are shown; of the others only those in :data:`SHOWN`. A ``label``
    given in the entry replaces the method and every setting that does not vary in the entry."""
    named = isinstance(given, str) and bool(given)
    parts = [str(given) if named else "dense fine-tuned" if method == "none" else method]
    nm = values.get("structure") not in (None, "unstructured")
    for key, value in values.items():
        if key not in varying and (named or key not in SHOWN):
            continue
        if key in ("sparsity", "ratio") and isinstance(value, int | float) and not isinstance(value, bool):
            if not nm:
                parts.append(f"{100 * value:g}%")
        elif key == "structure":
            parts.append(str(value) if nm or "sparsity" not in values else "")
        elif key == "remove":
            parts.append(f"-{value}")
        elif key == "allocation" and isinstance(value, str):
            parts.append(value)
        else:
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            parts.append(f"{key}={shown}")
    if seed is not None:
        parts.append(f"seed {seed}")
    return " ".join(part for part in parts if part)
