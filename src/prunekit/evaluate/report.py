"""One-call evaluation of a model (quality, size, speed) and plain-text tables for before/after comparisons."""

from __future__ import annotations

import platform
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate.accuracy import accuracy
from prunekit.evaluate.perplexity import check_decoder_only, perplexity, place_model
from prunekit.evaluate.size import SIZE_PROTOCOL, size_report
from prunekit.evaluate.speed import latency

TEXT_TASKS = ("perplexity", "text", "lm")
CLASSIFICATION_TASKS = ("accuracy", "classification")

# ---------------------------------------------------------------------------------------------
# tables


TABLE_WIDTH = 100  # columns of a printed table: fits a terminal and a log next to its line numbers
MIN_NAME_WIDTH = 12  # a model name is never cut below this many characters
_LABELS = {"latency_ms": "forward", "decode_ms_per_token": "decode", "tokens_per_second": "tokens/s",
           "memory_bytes": "memory", "disk_bytes": "disk", "bytes": "size", "train_s": "train"}
_NEXT_TO = {"disk_bytes": "memory_bytes"}  # column -> the column it follows when both are shown


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind_of(key: str) -> str:
    """How a column is shown, from its key: perplexity, percent, bytes, params, ms, seconds, rate or plain."""
    name = key.lower()
    if name in ("perplexity", "ppl") or name.endswith("_ppl") or name.startswith("perplexity"):
        return "perplexity"
    if "sparsity" in name or name in ("accuracy", "acc") or name.endswith(("_accuracy", "_pct")):
        return "percent"
    if "bytes" in name or name.endswith(("_size", "size_mb")):
        return "bytes"
    if "params" in name or name in ("nonzero", "parameters"):
        return "params"
    if name.endswith("_ms") or "_ms_" in name or name in ("latency", "ms"):
        return "ms"
    if "per_second" in name or name.endswith("_per_s"):
        return "rate"
    if name.endswith("_s") or name == "seconds":
        return "seconds"
    return "plain"


def _compact(value: float) -> str:
    """About 4 significant digits, never more than 2 decimals: 538.1, 32.91, 0.352, 12,345."""
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.1f}"
    if size >= 1 or size == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _format_value(key: str, value: Any, byte_unit: float = 1e6) -> str:
    """A value formatted for its column: perplexity 2 decimals, percent 2 decimals, params in M, bytes in
    ``byte_unit`` (the unit is in the header), times in ms or s without unit (in the header), '-' for None."""
    if value is None:
        return "-"
    if not _is_number(value):
        return str(value)
    kind = _kind_of(key)
    if kind == "perplexity":
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if kind == "percent":
        return f"{100 * value:.2f}%"
    if kind == "bytes":
        return _compact(value / byte_unit)
    if kind == "params":
        return f"{value / 1e6:,.1f}M" if abs(value) >= 1e5 else f"{value:,.0f}"
    if kind in ("ms", "seconds"):
        return _compact(value)
    if kind == "rate" or isinstance(value, int):
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _header(key: str, sizes: list[Any]) -> tuple[str, float]:
    """(column header with its unit, byte unit) for a key: 'memory_bytes' -> ('memory MB', 1e6).

    ``sizes``: every byte count the table shows; below 1 MB all of them are in kB, else in MB."""
    label = _LABELS.get(key, key.replace("_", " "))
    kind = _kind_of(key)
    if kind == "bytes":
        numbers = [abs(v) for v in sizes if _is_number(v)]
        unit, name = (1e6, "MB") if not numbers or max(numbers) >= 1e6 else (1e3, "kB")
        return f"{label} {name}", unit
    if kind == "ms":
        return (f"{label} ms/token" if "per_token" in key else f"{label} ms"), 1e6
    if kind == "seconds":
        return f"{label} s", 1e6
    return label, 1e6


def _shorten(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` characters from the left ('…' first): a path's end says the most."""
    return name if len(name) <= limit else "…" + name[len(name) - limit + 1:]


def _wrap_words(text: str, width: int) -> list[str]:
    """``text`` on lines of at most ``width`` characters, broken at spaces (a longer word keeps its line)."""
    return textwrap.wrap(text, width=max(1, width), break_long_words=False, break_on_hyphens=False) or [""]


def _fit_widths(headers: list[str], cells: list[list[str]], width: int, gap: int) -> list[int]:
    """Column widths for a table at most ``width`` wide: whole headers if they fit, else headers wrapped at
    spaces (widest first), then the first column cut down to MIN_NAME_WIDTH."""
    content = [max((len(line[i]) for line in cells), default=0) for i in range(len(headers))]
    widths = [max(c, len(h)) for c, h in zip(content, headers, strict=True)]
    floors = [max(c, *(len(word) for word in h.split() or [""])) for c, h in zip(content, headers, strict=True)]

    def total() -> int:
        return sum(widths) + gap * (len(widths) - 1)

    while total() > width:
        shrinkable = [i for i in range(len(widths)) if widths[i] > floors[i]]
        if not shrinkable:
            break
        worst = max(shrinkable, key=lambda i: widths[i] - floors[i])
        widths[worst] = max(floors[worst], widths[worst] - (total() - width))
    if total() > width and widths:
        widths[0] = max(min(widths[0], MIN_NAME_WIDTH, content[0]), len(headers[0]),
                        widths[0] - (total() - width))
    return widths


def format_table(rows: list[dict[str, Any]], title: str | None = None, width: int = TABLE_WIDTH) -> str:
    """Render ``rows`` (one dict per model, e.g. dense vs pruned) as a plain-text table at most ``width`` wide.

    Columns are the keys in order of first appearance; a column that is None in every row is left out;
    missing values show as '-'. Units are in the headers (MB = 10^6 bytes, ms); headers wrap over two
    lines where needed, and a long first column (a model path) is cut from the left to make the table fit.
    Columns that still do not fit are left out and named under the table.
    """
    gap = 2
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    columns = [key for key in columns if any(row.get(key) is not None for row in rows)]
    if not columns:
        return "".join(f"{line}\n" for line in (title, "(nothing to show)") if line)
    for key, before in _NEXT_TO.items():  # e.g. a disk size added to one row after the fact sits by the memory
        if key in columns and before in columns:
            columns.remove(key)
            columns.insert(columns.index(before) + 1, key)
    sizes = [row.get(key) for key in columns if _kind_of(key) == "bytes" for row in rows]  # one unit for all
    units = {key: _header(key, sizes) for key in columns}
    headers = [units[key][0] for key in columns]
    cells = [[_format_value(key, row.get(key), units[key][1]) for key in columns] for row in rows]
    numeric = [any(_is_number(row.get(key)) for row in rows) for key in columns]
    widths = _fit_widths(headers, cells, width, gap)
    left_out: list[str] = []
    while len(widths) > 1 and sum(widths) + gap * (len(widths) - 1) > width:
        left_out.insert(0, headers.pop())
        numeric.pop()
        cells = [line[:-1] for line in cells]
        widths = _fit_widths(headers, cells, width, gap)

    def line_of(parts: list[str]) -> str:
        padded = [part.rjust(w) if right else part.ljust(w)
                  for part, w, right in zip(parts, widths, numeric, strict=True)]
        return (" " * gap).join(padded).rstrip()

    wrapped = [_wrap_words(header, w) for header, w in zip(headers, widths, strict=True)]
    depth = max((len(lines) for lines in wrapped), default=1)
    wrapped = [[""] * (depth - len(lines)) + lines for lines in wrapped]  # headers sit on the rule
    table_width = sum(widths) + gap * (len(widths) - 1)
    out: list[str] = []
    if title:
        out.extend(line.center(table_width).rstrip() for line in _wrap_words(title, min(width, max(table_width, 20))))
    out.extend(line_of([lines[i] for lines in wrapped]) for i in range(depth))
    out.append("─" * table_width)
    for line in cells:
        first = [_shorten(line[0], widths[0])] if line else []
        out.append(line_of(first + line[1:]))
    if left_out:
        out.extend(_wrap_words(f"(left out to fit {width} columns: {', '.join(left_out)})", width))
    return "\n".join(out) + "\n"


def summary_row(name: str, results: dict[str, Any]) -> dict[str, Any]:
    """One row for :func:`format_table` from an :func:`evaluate` result dict."""
    row: dict[str, Any] = {"model": name}
    if "perplexity" in results:
        row["perplexity"] = results["perplexity"]["perplexity"]
    if "accuracy" in results:
        row["accuracy"] = results["accuracy"]["accuracy"]
    size = results.get("size") or {}
    if size:
        row.update({"sparsity": size["prunable_sparsity"], "params": size["total_params"],
                    "nonzero": size["nonzero_params"], "memory_bytes": size["bytes_in_memory"]})
        if size.get("bytes_on_disk") is not None:
            row["disk_bytes"] = size["bytes_on_disk"]
    speed = results.get("latency") or {}
    if speed:
        row["latency_ms"] = speed["forward_ms_median"]  # tokens per second stays in the JSON: same information
        if speed.get("decode_ms_per_token") is not None:
            row["decode_ms_per_token"] = speed["decode_ms_per_token"]
    return row


# ---------------------------------------------------------------------------------------------
# evaluate


def _eval_tokens(tokenizer: Any, data: Any, split: str) -> torch.Tensor:
    try:
        from prunekit.data import eval_tokens
    except ImportError:
        from prunekit.data.core import eval_tokens
    return eval_tokens(tokenizer, data, split=split)


def _kind(data: Any, split: str, task: str | None) -> str:
    """'text' or 'classification', from ``task`` when given, else from what the data's split holds."""
    if task is not None:
        if task in TEXT_TASKS:
            return "text"
        if task in CLASSIFICATION_TASKS:
            return "classification"
        raise PrunekitError(f"unknown task '{task}': use perplexity or accuracy (or leave it out)")
    splits = getattr(data, "splits", None)
    if not isinstance(splits, dict) or not splits:
        raise PrunekitError("the evaluation data has no splits: give a prepared dataset name")
    sample = splits.get(split, next(iter(splits.values())))
    return "text" if isinstance(sample, str) else "classification"


def _classification_split(data: Any, split: str) -> str:
    """The split to score: ``split``, or 'validation' when 'eval' is asked and the set has none."""
    if split in data.splits:
        return split
    if split == "eval" and "validation" in data.splits:
        return "validation"
    raise PrunekitError(f"dataset '{data.name}' has no split '{split}': use one of {', '.join(data.splits)}")


def evaluate(model: nn.Module, tokenizer: Any, data: Any = None, *, seq_len: int = 512, stride: int | None = None,
             max_tokens: int | None = None, task: str | None = None, split: str = "eval", latency_seq_len: int = 128,
             latency_batch: int = 1, gen_tokens: int = 32, path: str | Path | None = None,
             device: str | torch.device | None = None, measure_latency: bool = True, progress: bool = True,
             batch_size: int = 1, accuracy_batch: int = 32, max_length: int = 128, bos: bool = True,
             tasks: str | Sequence[str] | None = None, num_fewshot: int | None = None,
             limit: int | float | None = None, task_batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """Quality (perplexity on text data, accuracy on labelled data, lm-eval tasks), size and speed, as one dict.

    Keys: 'perplexity' or 'accuracy' (when data is given), 'tasks' (when lm-eval tasks are given: see
    :func:`prunekit.evaluate.harness.run_tasks`), 'size', 'latency' (when measured), 'protocol'.
    ``bos``: every perplexity window starts with the tokenizer's BOS token when it defines one.
    ``task_batch_size``: lm-eval requests per forward (8: short requests run several times faster batched).
    """
    run_device = place_model(model, device)
    results: dict[str, Any] = {}
    protocol: dict[str, Any] = {"device": str(run_device), "threads": torch.get_num_threads(),
                                "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        protocol["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass

    if data is not None:
        kind = _kind(data, split, task)
        protocol["data"] = getattr(data, "name", None)
        if kind == "text":
            check_decoder_only(model)
            tokens = _eval_tokens(tokenizer, data, split)
            bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
            ppl = perplexity(model, tokens, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                             batch_size=batch_size, progress=progress, source=f"{data.name}/{split}",
                             bos_token_id=bos_id if isinstance(bos_id, int) else None)
            results["perplexity"] = asdict(ppl)
            why = "" if ppl.bos_token_id is not None else (
                " (--no-bos)" if not bos else " (the tokenizer defines no BOS token)")
            protocol.update({"split": split, "perplexity": ppl.protocol + why})
        else:
            used = _classification_split(data, split)
            acc = accuracy(model, tokenizer, data.splits[used], batch_size=accuracy_batch,
                           max_length=max_length, progress=progress, split=used)
            results["accuracy"] = asdict(acc)
            protocol.update({"split": used, "accuracy": (
                f"argmax of the logits against the label on all {acc.n_examples} examples of {data.name}/{used}, "
                f"texts truncated to {max_length} tokens")})
    elif task is not None:
        raise PrunekitError(f"task '{task}' needs evaluation data: pass --data")
    if tasks:
        from prunekit.evaluate.harness import protocol as harness_protocol
        from prunekit.evaluate.harness import run_tasks

        results["tasks"] = run_tasks(model, tokenizer, tasks, num_fewshot=num_fewshot, limit=limit,
                                     batch_size=task_batch_size, seed=seed, progress=progress)
        protocol["tasks"] = harness_protocol(results["tasks"])

    size = size_report(model, path=path)
    results["size"] = asdict(size)
    protocol["size"] = SIZE_PROTOCOL if path is not None else SIZE_PROTOCOL.replace(
        "; bytes_on_disk = weight files only (*.safetensors)", "; bytes_on_disk not measured (no saved folder)")

    if measure_latency:
        speed = latency(model, batch_size=latency_batch, seq_len=latency_seq_len, gen_tokens=gen_tokens)
        results["latency"] = asdict(speed)
        protocol["latency"] = (
            f"absolute and machine-dependent: seeded random tokens, batch {speed.batch_size} x {speed.seq_len}; "
            f"median and quartiles of timed forward passes after warm-up on {speed.device} with {speed.threads} "
            "threads"
            + (f"; decode = (greedy generate of {speed.gen_tokens} tokens - of 1 token) / {speed.gen_tokens - 1}, "
               "KV cache on" if speed.decode_ms_per_token is not None else ""))
    results["protocol"] = protocol
    return results
