"""One-call evaluation of a model (quality, size, speed) and rich tables for before/after comparisons."""

from __future__ import annotations

import io
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate.accuracy import accuracy
from prunekit.evaluate.perplexity import perplexity, place_model
from prunekit.evaluate.size import SIZE_PROTOCOL, size_report
from prunekit.evaluate.speed import latency

TEXT_TASKS = ("perplexity", "text", "lm")
CLASSIFICATION_TASKS = ("accuracy", "classification")

# ---------------------------------------------------------------------------------------------
# tables


def _format_value(key: str, value: Any) -> str:
    """A number formatted for its column: perplexity 2 decimals, sparsity %, bytes MB (10^6), params M."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    name = key.lower()
    if name in ("perplexity", "ppl") or name.endswith("_ppl") or name.startswith("perplexity"):
        return f"{value:,.2f}"
    if "sparsity" in name or name in ("accuracy", "acc") or name.endswith(("_accuracy", "_pct")):
        return f"{100 * value:.2f}%"
    if "bytes" in name or name.endswith(("_size", "size_mb")):
        return f"{value / 1e6:,.1f} MB" if abs(value) >= 1e5 else f"{value / 1e3:,.1f} kB"
    if "params" in name or name in ("nonzero", "parameters"):
        return f"{value / 1e6:,.2f}M" if abs(value) >= 1e5 else f"{value:,.0f}"
    if name.endswith("_ms") or "_ms_" in name or name in ("latency", "ms"):
        return f"{value:,.2f} ms"
    if "per_second" in name or name.endswith("_per_s"):
        return f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def format_table(rows: list[dict[str, Any]], title: str | None = None, width: int = 160) -> str:
    """Render ``rows`` (one dict per model, e.g. dense vs pruned) as a plain-text rich table.

    Columns are the keys in order of first appearance; missing values show as '-'. MB = 10^6 bytes.
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    table = Table(title=title)
    for index, column in enumerate(columns):
        numeric = any(isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool)
                      for row in rows)
        table.add_column(column, justify="right" if numeric else "left", no_wrap=index == 0)
    for row in rows:
        table.add_row(*(_format_value(column, row.get(column)) for column in columns))
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, legacy_windows=False)
    console.width = min(width, console.measure(table).maximum)  # title centred over the table, not the console
    console.print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


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
        row["latency_ms"] = speed["forward_ms_median"]
        row["tokens_per_second"] = speed["tokens_per_second"]
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
             batch_size: int = 1, accuracy_batch: int = 32, max_length: int = 128) -> dict[str, Any]:
    """Quality (perplexity on text data, accuracy on labelled data), size and speed, as one JSON-ready dict.

    Keys: 'perplexity' or 'accuracy' (when data is given), 'size', 'latency' (when measured), 'protocol'.
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
            tokens = _eval_tokens(tokenizer, data, split)
            ppl = perplexity(model, tokens, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                             batch_size=batch_size, progress=progress, source=f"{data.name}/{split}")
            results["perplexity"] = asdict(ppl)
            protocol.update({"split": split, "perplexity": ppl.protocol})
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

    size = size_report(model, path=path)
    results["size"] = asdict(size)
    protocol["size"] = SIZE_PROTOCOL if path is not None else SIZE_PROTOCOL.replace(
        "; bytes_on_disk = weight files only (*.safetensors)", "; bytes_on_disk not measured (no saved folder)")

    if measure_latency:
        speed = latency(model, batch_size=latency_batch, seq_len=latency_seq_len, gen_tokens=gen_tokens)
        results["latency"] = asdict(speed)
        protocol["latency"] = (
            f"seeded random tokens, batch {speed.batch_size} x {speed.seq_len}; median and quartiles of timed "
            f"forward passes after warm-up on {speed.device} with {speed.threads} threads"
            + (f"; decode = (greedy generate of {speed.gen_tokens} tokens - of 1 token) / {speed.gen_tokens - 1}, "
               "KV cache on" if speed.decode_ms_per_token is not None else ""))
    results["protocol"] = protocol
    return results
