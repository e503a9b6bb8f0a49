"""A study's rows flattened for plots, tables and answers: one :class:`Entry` per run, and results.csv.

Quantities (the report states them the same way):

* ``removed``: fraction of the dense model's block-weight parameters that are zero or gone
  (1 - nonzero block weights / the dense model's block weights), so unstructured zeros and structured
  removal sit on one axis;
* ``bytes``: bytes on disk of the weight files in the study's first compressed format when it measured
  one (``evaluation.formats``), else as saved (safetensors);
* ``forward_ratio`` / ``decode_ratio``: time / the dense model's time, timed interleaved;
* quality: perplexity (lower is better) or accuracy (higher is better) per evaluation set, and per zero-shot
  task of lm-evaluation-harness its accuracy, named ``task (acc_norm)`` or ``task (acc)``: length-normalised
  where the harness reports it (choices of different lengths), with its standard error in ``stderr``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.study.database import open_existing


@dataclass
class Entry:
    """One run, flattened."""

    key: str
    label: str
    model: str
    method: str
    kind: str
    parent: str | None
    series: str  # the run's method and settings without its sparsity and seed: one line in a plot
    seed: int | None
    quality: dict[str, float]  # evaluation set -> value
    metrics: dict[str, str]  # evaluation set -> perplexity or accuracy
    params: int | None
    nonzero: int | None
    block_params: int | None
    block_nonzero: int | None
    removed: float | None
    bytes_saved: int | None
    bytes_format: int | None
    forward_ratio: float | None
    decode_ratio: float | None
    forward_ms: float | None
    decode_ms: float | None
    seconds: float
    layers: dict[str, list[int]]
    row: dict[str, Any] = field(repr=False, default_factory=dict)
    contended: bool = False  # its timing ran while other processes used the CPUs: ratios left out (None)
    in_format: bool = False  # the study asked for bytes in a compressed format: compare those only
    stderr: dict[str, float] = field(default_factory=dict)  # quality name -> its standard error, where measured

    @property
    def bytes(self) -> int | None:
        """Bytes in the study's compressed format (None where that format could not hold the model), else as saved.

        Never one run's saved float32 files beside another's compressed bfloat16 ones.
        """
        return self.bytes_format if self.in_format else self.bytes_saved

    def format_error(self) -> str | None:
        """Why the run has no bytes in the study's format (the export's one-line error), if it has none."""
        if not self.in_format or self.bytes_format is not None:
            return None
        for value in ((self.row.get("results") or {}).get("bytes") or {}).values():
            if isinstance(value, dict) and value.get("error"):
                return str(value["error"])
        return "not measured"


@dataclass
class StudyData:
    """Everything the report shows: the study's meta data, its entries, failures."""

    folder: Path
    name: str
    description: str
    settings: dict[str, Any]
    entries: list[Entry]
    failures: list[dict[str, Any]]
    format_name: str | None  # the compressed format bytes are shown in, or None: as saved
    hidden: int = 0  # rows of the database whose key is not a run of the study as last invoked

    def dense(self, model: str) -> Entry | None:
        """The model's reference: its dense run, else its dense fine-tuned baseline (training method none)."""
        for entry in self.entries:
            if entry.model == model and entry.kind == "dense":
                return entry
        for entry in self.entries:
            if entry.model == model and entry.kind == "training" and entry.method == "none":
                return entry
        return None

    def models(self) -> list[str]:
        return list(dict.fromkeys(entry.model for entry in self.entries))

    def eval_sets(self, model: str) -> list[str]:
        sets: list[str] = []
        for entry in self.entries:
            if entry.model == model:
                sets.extend(name for name in entry.quality if name not in sets)
        return sets

    def metric(self, model: str, eval_set: str) -> str:
        for entry in self.entries:
            if entry.model == model and eval_set in entry.metrics:
                return entry.metrics[eval_set]
        return "perplexity"


_PERCENT = re.compile(r"^\d+(\.\d+)?%$")


def series_of(label: str, model: str) -> str:
    """'wanda 50% owl seed 1' -> 'wanda owl' (the model's name, the sparsity and the seed left out)."""
    text = label[len(model) + 1:] if label.startswith(model + " ") else label
    text = re.sub(r"\bseed \d+\b", "", text)
    words = [word for word in text.split() if not _PERCENT.match(word)]
    return " ".join(words) or text


def load(folder: str | Path) -> StudyData:
    """Read a study folder's database (read-only)."""
    database = open_existing(folder, read_only=True)
    try:
        rows, failures, meta = database.runs(), database.failures(), dict(database.meta)
        current = database.study_keys()
    finally:
        database.close()
    settings = json.loads(meta.get("study_settings") or "{}")
    formats = (settings.get("evaluation") or {}).get("formats") or []
    format_name = None
    if formats:
        spec = formats[0]
        quantize = spec.get("quantize", "none")
        format_name = f"{spec.get('format', 'sparse-bitmask')} {spec.get('dtype', 'bfloat16')}" + (
            f" {quantize}" if quantize not in (None, "none") else "")
    shown = [row for row in rows if current is None or row["key"] in current]
    entries = [_entry(row, format_name) for row in shown]
    done = {row["key"] for row in rows}
    failures = [f for f in failures if f["key"] not in done and (current is None or f["key"] in current)]
    data = StudyData(Path(folder), meta.get("study", "?"), meta.get("description", ""), settings, entries, failures,
                     format_name, hidden=len(rows) - len(shown))
    for entry in entries:  # the fraction removed is relative to the dense model's block weights
        dense = data.dense(entry.model)
        base = dense.block_params if dense is not None and dense.block_params else entry.block_params
        if base and entry.block_nonzero is not None:
            entry.removed = max(0.0, 1.0 - entry.block_nonzero / base)
    return data


def _entry(row: dict[str, Any], format_name: str | None) -> Entry:
    results = row["results"]
    size = results.get("size") or {}
    stored = results.get("bytes") or {}
    in_format = stored.get(format_name) if format_name else None
    latency = row.get("latency") or {}
    contended = bool(latency.get("contended"))
    if contended:  # a figure measured under other processes' load says nothing about the model
        latency = {}
    quality = {name: float(q["value"]) for name, q in (results.get("quality") or {}).items()
               if isinstance(q.get("value"), int | float)}
    metrics = {name: str(q.get("metric")) for name, q in (results.get("quality") or {}).items()}
    tasks, stderr = task_accuracies(results)
    quality.update(tasks)
    metrics.update(dict.fromkeys(tasks, "accuracy"))
    return Entry(
        key=row["key"], label=row["label"], model=row["model"], method=row["method"], kind=row["kind"],
        parent=row["parent"], series=series_of(row["label"], row["model"]), seed=row["settings"].get("seed"),
        quality=quality, metrics=metrics, params=size.get("total_params"), nonzero=size.get("nonzero_params"),
        block_params=size.get("prunable_params"), block_nonzero=size.get("prunable_nonzero"), removed=None,
        bytes_saved=stored.get("saved"), bytes_format=in_format.get("bytes") if isinstance(in_format, dict) else None,
        forward_ratio=latency.get("forward_ratio"), decode_ratio=latency.get("decode_ratio"),
        forward_ms=latency.get("forward_ms"), decode_ms=latency.get("decode_ms_per_token"),
        seconds=float(row["seconds"]), layers=results.get("layers") or {}, row=row, contended=contended,
        in_format=format_name is not None, stderr=stderr)


def task_accuracies(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """A run's zero-shot task scores, one per task: ``{"task (acc_norm)": 0.355}`` and their standard errors.

    acc_norm (log-likelihood per byte of each choice) where the harness reports it, else acc.
    """
    values: dict[str, float] = {}
    errors: dict[str, float] = {}
    for task, scored in (((results.get("tasks") or {}).get("tasks")) or {}).items():
        metrics = (scored.get("metrics") or {}) if isinstance(scored, dict) else {}
        chosen = next((m for m in ("acc_norm", "acc") if isinstance(metrics.get(m), int | float)), None)
        if chosen is None:
            continue
        name = f"{task} ({chosen})"
        values[name] = float(metrics[chosen])
        error = metrics.get(f"{chosen}_stderr")
        if isinstance(error, int | float):
            errors[name] = float(error)
    return values, errors


def pareto(points: list[tuple[float, float, Any]], higher_is_better: bool) -> list[Any]:
    """The items not dominated by another: no other point is at most as large in x and at least as good in y
    (and better in one). ``points``: (x to minimise, quality, item); the frontier is returned by x."""
    ordered = sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1]))
    frontier: list[Any] = []
    best: float | None = None
    for _x, y, item in ordered:
        if best is None or (y > best if higher_is_better else y < best):
            frontier.append(item)
            best = y
    return frontier


def block_profile(entry: Entry, dense: Entry | None) -> dict[int, float]:
    """Per block: the fraction of the dense model's block weights that are zero or gone in this run."""
    def by_block(layers: dict[str, list[int]], index: int) -> dict[int, int]:
        out: dict[int, int] = {}
        for name, counts in layers.items():
            match = re.search(r"\.(\d+)\.", name)
            if match:
                out[int(match.group(1))] = out.get(int(match.group(1)), 0) + int(counts[index])
        return out

    nonzero = by_block(entry.layers, 1)
    base = by_block(dense.layers, 0) if dense is not None and dense.layers else by_block(entry.layers, 0)
    removed = ((entry.row.get("results") or {}).get("record") or {}).get("method_result", {}) or {}
    gone = sorted(int(b) for b in removed.get("blocks_removed") or [])
    if gone:  # whole blocks removed: the blocks left are renumbered 0, 1, ...; map them back to the dense ones
        kept = [block for block in sorted(base) if block not in gone]
        nonzero = {kept[i]: count for i, count in sorted(nonzero.items()) if i < len(kept)}
    if not base or set(nonzero) - set(base):
        return {}
    return {block: 1.0 - nonzero.get(block, 0) / total for block, total in sorted(base.items()) if total}


CSV_COLUMNS = ("key", "label", "model", "method", "kind", "parent", "seed", "removed", "params", "nonzero",
               "block_params", "block_nonzero", "bytes_saved", "bytes_format", "forward_ratio", "decode_ratio",
               "forward_ms", "decode_ms_per_token", "seconds", "finished", "settings")


def results_csv(data: StudyData) -> str:
    """One row per run: the columns above, one column per evaluation set, the settings as JSON."""
    sets: list[str] = []
    for model in data.models():
        sets.extend(name for name in data.eval_sets(model) if name not in sets)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS[:-1], *(f"{name} {data.metric(_model_of(data, name), name)}" for name in sets),
                     "settings"])
    for e in data.entries:
        values = [e.key, e.label, e.model, e.method, e.kind, e.parent or "", "" if e.seed is None else e.seed,
                  _num(e.removed), e.params, e.nonzero, e.block_params, e.block_nonzero, e.bytes_saved, e.bytes_format,
                  _num(e.forward_ratio), _num(e.decode_ratio), _num(e.forward_ms), _num(e.decode_ms),
                  f"{e.seconds:.1f}", e.row.get("finished", "")]
        quality = [_num(e.quality.get(name)) for name in sets]
        writer.writerow([*("" if v is None else v for v in values), *quality,
                         json.dumps(e.row.get("settings"), sort_keys=True)])
    return buffer.getvalue()


def _model_of(data: StudyData, eval_set: str) -> str:
    for entry in data.entries:
        if eval_set in entry.quality:
            return entry.model
    return ""


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
