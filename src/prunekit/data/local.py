"""Local datasets: ``text:PATH``, ``csv:PATH`` and ``jsonl:PATH``.

* ``text:PATH`` -- a UTF-8 text file, or a folder of ``.txt`` files (sorted by name, joined by a
  blank line). calibration = train = the first ~90% of characters, eval = the last ~10%, cut at a
  line boundary; all = the whole text (what ``prunekit eval`` scores when no ``--split`` is named).
* ``csv:PATH`` / ``jsonl:PATH`` -- rows with ``text`` and ``label`` (optional ``text_pair`` for
  sentence pairs, optional ``split`` = train/validation/test). Integer labels (or strings of
  digits) are used as ids, with names "0".."K-1"; other strings are mapped to ids in sorted order.
  Without a ``split`` column the rows are shuffled with seed 1234 and cut 80/10/10. A file with
  only a ``text`` column gives a text set (its rows joined by newlines, split like ``text:``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from prunekit.data.core import ClassificationData, Data, Example, ExampleText, TextData, split_examples, text_splits
from prunekit.errors import PrunekitError

SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}
_INT = re.compile(r"^\s*[+-]?\d+\s*$")


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PrunekitError(f"'{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                            "convert it to UTF-8 or give another file") from exc
    except OSError as exc:
        raise PrunekitError(f"cannot read '{path}' ({exc.strerror or exc}): check the path and its permissions") \
            from exc


def _existing(path_str: str, form: str) -> Path:
    if not path_str:
        raise PrunekitError(f"'{form}:' needs a path: write {form}:PATH")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise PrunekitError(f"{form} file '{path}' does not exist: check the path after '{form}:'")
    return path


def load_text(path_str: str) -> TextData:
    """``text:PATH`` -> TextData (see the module docstring for the split)."""
    path = _existing(path_str, "text")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise PrunekitError(f"folder '{path}' has no .txt files: put UTF-8 .txt files in it or give a file")
        text = "\n\n".join(_read_text_file(p).strip("\n") for p in files)
    else:
        text = _read_text_file(path)
    if not text.strip():
        raise PrunekitError(f"'{path}' holds no text: give a file with some text in it")
    return TextData(f"text:{path_str}", text_splits(text),
                    f"local text {path}: calibration = train = first ~90% of characters, eval = last ~10% "
                    "(cut at a line boundary), all = the whole text")


def _rows_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    text = _read_text_file(path)
    if not text.strip():
        raise PrunekitError(f"'{path}' is empty: give a CSV file with a header row and 'text' and 'label' columns")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except csv.Error as exc:
        raise PrunekitError(f"'{path}' is not valid CSV ({exc}): fix the file") from exc
    return [c for c in (reader.fieldnames or []) if c], rows


def _rows_jsonl(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    text = _read_text_file(path)
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrunekitError(f"line {lineno} of '{path}' is not JSON ({exc.msg}): write one JSON object per line") \
                from exc
        if not isinstance(rec, dict):
            raise PrunekitError(f"line {lineno} of '{path}' is not a JSON object: write one {{\"text\": ..., "
                                "\"label\": ...}} object per line")
        rec["_line"] = lineno
        rows.append(rec)
        columns.update(dict.fromkeys(k for k in rec if k != "_line"))
    if not rows:
        raise PrunekitError(f"'{path}' is empty: give a JSONL file with one {{\"text\": ..., \"label\": ...}} per line")
    return list(columns), rows


def _label_ids(labels: list[Any], path: Path) -> tuple[list[int], list[str]]:
    """Integer labels are kept (names "0".."K-1"); strings are mapped to ids in sorted order."""
    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and _INT.match(v):
            return int(v)
        return None

    ints = [as_int(v) for v in labels]
    if all(i is not None for i in ints):
        ids = [i for i in ints if i is not None]
        if min(ids) < 0:
            raise PrunekitError(f"'{path}' has negative label {min(ids)}: use labels 0..K-1 or label names")
        return ids, [str(i) for i in range(max(ids) + 1)]
    names = sorted({str(v).strip() for v in labels})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v).strip()] for v in labels], names


def load_table(path_str: str, form: str) -> Data:
    """``csv:PATH`` / ``jsonl:PATH`` -> ClassificationData (or TextData for a text-only file)."""
    path = _existing(path_str, form)
    if path.is_dir():
        raise PrunekitError(f"'{path}' is a folder: give a {form.upper()} file after '{form}:'")
    columns, rows = _rows_csv(path) if form == "csv" else _rows_jsonl(path)
    name = f"{form}:{path_str}"
    expected = "'text' and 'label' (optional 'text_pair', 'split')"
    if "text" not in columns:
        raise PrunekitError(f"'{path}' has columns {', '.join(columns) or '(none)'} but needs {expected}: "
                            "rename the columns")
    where = "row" if form == "csv" else "line"

    def pos(i: int, row: dict[str, Any]) -> Any:
        return row.get("_line", i + 2)

    for i, row in enumerate(rows):
        if not isinstance(row.get("text"), str):
            raise PrunekitError(f"{where} {pos(i, row)} of '{path}' has no text: give a string 'text' in every "
                                f"{where}")
    if "label" not in columns:
        if not rows:
            raise PrunekitError(f"'{path}' has a header but no rows: add some rows")
        text = "\n".join(row["text"] for row in rows)
        if not text.strip():
            raise PrunekitError(f"'{path}' holds no text: give some non-empty 'text' values")
        return TextData(name, text_splits(text), f"local text rows of {path} (no 'label' column): calibration = "
                        "train = first ~90% of characters, eval = last ~10%, all = the whole text")
    if not rows:
        raise PrunekitError(f"'{path}' has a header but no rows: add labelled rows")
    for i, row in enumerate(rows):
        if row.get("label") is None or row.get("label") == "":
            raise PrunekitError(f"{where} {pos(i, row)} of '{path}' has no label: give a label in every {where}")
    ids, label_names = _label_ids([row["label"] for row in rows], path)
    has_pair = "text_pair" in columns
    examples: list[Example] = []
    for row, label in zip(rows, ids, strict=True):
        item: ExampleText = (row["text"], str(row.get("text_pair") or "")) if has_pair else row["text"]
        examples.append((item, label))
    if "split" in columns:
        splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
        for i, (row, example) in enumerate(zip(rows, examples, strict=True)):
            split = SPLIT_NAMES.get(str(row.get("split") or "").strip().lower())
            if split is None:
                raise PrunekitError(f"{where} {pos(i, row)} of '{path}' has split {row.get('split')!r}: "
                                    "use train, validation or test")
            splits[split].append(example)
        how = "splits from its 'split' column"
    else:
        splits = split_examples(examples)
        how = "shuffled with seed 1234 and cut 80/10/10"
    counts = " / ".join(f"{k} {len(v)}" for k, v in splits.items())
    return ClassificationData(name, splits, label_names,
                              f"local labelled {form.upper()} {path}: {len(examples)} examples, {how}: {counts}")
