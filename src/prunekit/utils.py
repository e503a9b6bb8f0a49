"""Small shared helpers: seeding, device and dtype resolution, atomic output folders, cache dir."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def import_optional(modules: tuple[str, ...] | list[str]) -> None:
    """Import modules that register plugins (methods, loaders); a module that is absent is skipped.

    An import error inside a present module is not hidden.
    """
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn 'cpu', 'cuda', 'cuda:1' or 'auto' into a torch.device, with a clear error if unavailable."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PrunekitError(f"device '{device}' was asked for but no CUDA GPU is available: use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise PrunekitError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from exc


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Turn a dtype name ('float32', 'bf16', ...) into a torch.dtype; None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PrunekitError(f"unknown dtype '{dtype}': use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where prepared models and datasets live: $PRUNEKIT_CACHE or ~/.cache/prunekit."""
    root = os.environ.get("PRUNEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prunekit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing output folder unless overwrite is set (checked before any long work)."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise PrunekitError(f"output folder '{path}' already exists: choose another --out or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise PrunekitError(f"output path '{path}' exists and is not a folder: choose another --out")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PrunekitError(f"cannot create output folder '{path}': '{ancestor}' is a file, not a folder: "
                            "choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PrunekitError(f"cannot create output folder '{path}': '{ancestor}' is not writable: "
                            "choose another --out")
    return path


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only when the block succeeds.

    On any error the temporary folder is removed, so a failed run leaves nothing behind and
    never touches an existing folder. With ``overwrite`` an existing ``out`` is replaced only
    after the new one is complete.
    """
    final = check_output_dir(out, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: mkdtemp makes the folder private (0700) and the saved model would stay so
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary name, so a reader never sees half a file (none is left on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary name, so a reader never sees half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def tensor_key(tensor: torch.Tensor) -> tuple[object, ...]:
    """Identity of a tensor's memory: device, address, size and dtype (the object's id when it has no storage)."""
    ptr = tensor.data_ptr()
    if ptr == 0:  # no storage (e.g. on 'meta', or empty): only the same object is the same tensor
        return ("id", id(tensor))
    return (tensor.device.type, tensor.device.index, ptr, tensor.numel(), tensor.dtype)


def unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors with duplicates (same memory) removed, in first-seen order."""
    seen: set[tuple[object, ...]] = set()
    out: list[torch.Tensor] = []
    for tensor in tensors:
        key = tensor_key(tensor)
        if key not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def count_parameters(model: nn.Module) -> int:
    """Parameters counted from the modules, each shared tensor once (tied embeddings and LM head count once).

    The one parameter count of prunekit: records, size reports and surgery facts all use it.
    """
    return sum(param.numel() for param in unique_tensors(model.parameters()))


def wants_progress(settings: dict[str, Any]) -> bool:
    """Progress bars unless the command asked for none (--no-progress, or a study run without them)."""
    return settings.get("progress") is not False
