"""Save a model so it reloads anywhere, with a prunekit record beside it; load it back.

A saved folder is a normal `save_pretrained` folder (safetensors only, never pickles) plus
``prunekit.json``: what was done, the settings, the data, per-layer sparsity, the prunekit
version and evaluation results. Plain ``AutoModelFor*.from_pretrained`` reloads it whenever
the model's shapes are those its config describes; models whose layers were changed in ways
a config cannot say (different sizes per layer, factorised layers) name a prunekit loader in
their record (known from the model itself, :func:`prunekit.record.loader_for`), and :func:`load`
rebuilds them before reading the weights.
"""

from __future__ import annotations

import datetime
import errno
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit import __version__
from prunekit.errors import PrunekitError
from prunekit.models import RECORD_NAME, load, read_record
from prunekit.record import RunRecord, as_record, loader_for, versions
from prunekit.utils import atomic_dir

__all__ = ["RECORD_NAME", "full_record", "load", "read_record", "save_model", "to_jsonable", "update_record",
           "write_record"]


def to_jsonable(value: Any) -> Any:
    """Make settings and results JSON-friendly (paths, dtypes, tensors, tuples, dataclasses)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return to_jsonable(value.item())  # numpy scalars (np.float32, np.int64, ...) become numbers, not strings
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def save_model(model: nn.Module, tokenizer: Any, out: str | Path,
               record: RunRecord | dict[str, Any] | Any | None = None, overwrite: bool = False) -> Path:
    """Write model (safetensors), tokenizer and ``prunekit.json`` into ``out``, atomically.

    ``record``: a :class:`~prunekit.record.RunRecord`, a PruneResult, or a dict (``{"pruning": result}``
    is expanded). The loader a reload needs is read from the model, so any pruned model reloads with
    :func:`load`. Everything is written to a temporary folder beside ``out`` and renamed at the end,
    so a failure leaves nothing behind and an existing folder is replaced only with ``overwrite`` and
    only when the new one is complete.
    """
    record_data = full_record(model, record)
    save_pretrained = getattr(model, "save_pretrained", None)
    if not callable(save_pretrained):
        raise PrunekitError(f"cannot save a {type(model).__name__}: save_model needs a transformers model "
                            "(one with save_pretrained)")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        try:
            save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_record(tmp, record_data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise PrunekitError(f"not enough disk space for the model in '{Path(out).absolute().parent}' "
                                    f"({exc.strerror}): free some space or choose another --out; nothing was "
                                    "written") from exc
            raise
    return Path(out)


def full_record(model: nn.Module, record: RunRecord | dict[str, Any] | Any | None) -> dict[str, Any]:
    """The record written beside a model: prunekit version, time, software versions, ``record`` and the loader."""
    given = as_record(record)
    return {
        "prunekit_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **given,
        "loader": loader_for(model) or given.get("loader"),
    }


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write ``prunekit.json`` into a folder being assembled (inside :func:`prunekit.utils.atomic_dir`)."""
    (folder / RECORD_NAME).write_text(json.dumps(to_jsonable(record), indent=2) + "\n")


def update_record(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Add fields (e.g. evaluation results) to a saved folder's record, writing atomically."""
    record = read_record(path)
    record.update(to_jsonable(fields))
    file = Path(path) / RECORD_NAME
    tmp = file.with_name(f".{RECORD_NAME}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(file)
    return record
