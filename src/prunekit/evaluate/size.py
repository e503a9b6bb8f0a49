"""Parameter counts, sparsity and bytes of a model, in memory and on disk.

Counting rules (stated in the report's protocol):

* every tensor is counted once, by storage address: tied weights (e.g. input embeddings and LM head)
  count once;
* a parameter is "nonzero" unless it is exactly 0.0; sparsity = 1 - nonzero / params;
* prunable layers are the linear layers (nn.Linear, GPT-2's Conv1D) inside the transformer blocks (from the model's
  adapter unless given); only their weights count as prunable, not their biases;
* ``bytes_in_memory`` = numel * element size of every unique parameter and buffer;
* ``bytes_on_disk`` = the size of the weight files of a saved folder (``*.safetensors``, or ``*.bin`` /
  ``*.pt`` / ``*.pth`` / ``*.gguf`` when it holds no safetensors), never configs or tokenizer files;
* ``disk_by_kind`` splits the safetensors bytes by tensor name: ``block_weights`` (every tensor inside a
  numbered block, ``layers.3.``, ``h.3.``: weights, biases, norms, bitmasks, scales), ``embeddings`` (token and
  position embeddings, the output head), ``other`` (the rest, and the files' headers); the three add up to
  ``bytes_on_disk``. ``disk_format`` names how the weights are stored (compressed-tensors' format names, and the
  float dtype holding most bytes); ``runtime`` what the model measured in memory runs as.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.adapters import get_adapter, is_linear, weight_view
from prunekit.errors import PrunekitError
from prunekit.utils import count_parameters, tensor_key, unique_tensors

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".gguf")

SIZE_PROTOCOL = ("parameters counted once per tensor (tied weights once); nonzero = not exactly 0.0; prunable = "
                 "weights (not biases) of the linear layers inside the transformer blocks; bytes_in_memory = "
                 "unique parameters and buffers; bytes_on_disk = weight files only (*.safetensors)"
                 "; disk_by_kind: block weights = tensors inside numbered blocks, embeddings = token/position "
                 "embeddings and output head, other = the rest and file headers")
TENSOR_KINDS = ("block_weights", "embeddings", "other")
_IN_BLOCK = re.compile(r"(^|\.)\d+\.")  # layers.3., h.3., layer.3.: a tensor inside a numbered block
_EMBEDDING = re.compile(r"(embed|wte|wpe|lm_head|shared|embeddings|output_projection)")
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8",
                "U8": "uint8", "I32": "int32", "I64": "int64", "F8_E4M3": "float8_e4m3fn"}


@dataclass
class LayerSparsity:
    """One prunable layer's weight: shape as (out_features, in_features), counts and sparsity."""

    name: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    sparsity: float


@dataclass
class SizeReport:
    """Whole-model and prunable-layer counts, with per-layer detail and bytes."""

    total_params: int
    nonzero_params: int
    prunable_params: int
    prunable_nonzero: int
    prunable_sparsity: float
    total_sparsity: float
    layers: list[LayerSparsity]
    bytes_on_disk: int | None
    bytes_in_memory: int
    disk_by_kind: dict[str, int] | None = None
    disk_format: str | None = None
    runtime: str | None = None


def count_nonzero(tensor: torch.Tensor) -> int:
    """Entries that are not exactly zero."""
    if tensor.device.type == "meta":
        return int(tensor.numel())
    return int(torch.count_nonzero(tensor.detach()).item())


def _sparsity(params: int, nonzero: int) -> float:
    return 1.0 - nonzero / params if params else 0.0


def _weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in) for a linear layer, else as stored."""
    if is_linear(layer):
        return weight_view(layer)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise PrunekitError(f"layer {type(layer).__name__} has no weight tensor: "
                            "pass only linear layers as prunable layers")
    return weight.detach()


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's prunable layers from its adapter; without one, every linear layer but the output head."""
    try:
        return get_adapter(model).prunable_layers()
    except PrunekitError:
        pass
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name: module for name, module in model.named_modules() if is_linear(module) and module is not head}


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a saved model: one file, or a folder's ``*.safetensors`` (else ``*.bin`` etc.)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PrunekitError(f"saved model '{path}' does not exist: give the folder the model was saved to")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if not files:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise PrunekitError(f"no weight files (*.safetensors, *.bin) in '{path}': "
                            "give the folder written by save_pretrained or prunekit prune")
    return files


def size_report(model: nn.Module, layers: dict[str, nn.Module] | None = None,
                path: str | Path | None = None) -> SizeReport:
    """Parameter counts and sparsity of ``model`` and of its prunable ``layers`` (adapter's when None).

    With ``path`` (a saved folder or file), ``bytes_on_disk`` is the size of its weight files.
    """
    params = unique_tensors(model.parameters())
    buffers = unique_tensors(model.buffers())
    total = count_parameters(model)
    nonzero = sum(count_nonzero(p) for p in params)
    in_memory = sum(t.numel() * t.element_size() for t in (*params, *buffers))

    if layers is None:
        layers = default_layers(model)
    rows: list[LayerSparsity] = []
    seen: set[tuple[object, ...]] = set()
    prunable = prunable_nonzero = 0
    for name, layer in layers.items():
        weight = _weight(layer)
        count, nz = weight.numel(), count_nonzero(weight)
        rows.append(LayerSparsity(name=name, shape=tuple(weight.shape), params=count, nonzero=nz,
                                  sparsity=_sparsity(count, nz)))
        key = tensor_key(weight)
        if key not in seen:  # a layer listed twice (shared weights) counts once in the totals
            seen.add(key)
            prunable += count
            prunable_nonzero += nz

    on_disk = sum(f.stat().st_size for f in weight_files(path)) if path is not None else None
    by_kind, disk_format = disk_breakdown(path) if path is not None else (None, None)
    return SizeReport(total_params=total, nonzero_params=nonzero, prunable_params=prunable,
                      prunable_nonzero=prunable_nonzero, prunable_sparsity=_sparsity(prunable, prunable_nonzero),
                      total_sparsity=_sparsity(total, nonzero), layers=rows, bytes_on_disk=on_disk,
                      bytes_in_memory=in_memory, disk_by_kind=by_kind, disk_format=disk_format,
                      runtime=runtime_of(model))


def tensor_kind(name: str) -> str:
    """'block_weights', 'embeddings' or 'other' for a stored tensor's name (see the module docstring)."""
    if _IN_BLOCK.search(name):
        return "block_weights"
    module = name.rsplit(".", 1)[0] if "." in name else name
    return "embeddings" if _EMBEDDING.search(module) else "other"


def safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header bytes, header) of a safetensors file: tensor name -> dtype, shape and data offsets."""
    with open(file, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise PrunekitError(f"'{file}' is not a safetensors file (too short): save the model again")
        length = struct.unpack("<Q", raw)[0]
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PrunekitError(f"'{file}' has a damaged safetensors header: save the model again") from exc
    return 8 + length, header


def disk_breakdown(path: str | Path) -> tuple[dict[str, int] | None, str | None]:
    """(bytes per tensor kind, storage format) of a saved model's safetensors; (None, None) for other files."""
    from prunekit.compressed_load import compression_config, describe

    files = [f for f in weight_files(path) if f.suffix == ".safetensors"]
    if not files:
        return None, None
    by_kind = dict.fromkeys(TENSOR_KINDS, 0)
    by_dtype: dict[str, int] = {}
    for file in files:
        header_bytes, header = safetensors_header(file)
        by_kind["other"] += header_bytes
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            start, end = info["data_offsets"]
            by_kind[tensor_kind(name)] += int(end) - int(start)
            if info.get("dtype") in ("F32", "F16", "BF16", "F64"):
                dtype = _DTYPE_NAMES[info["dtype"]]
                by_dtype[dtype] = by_dtype.get(dtype, 0) + int(end) - int(start)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    storage = describe(compression_config(folder))
    values = max(by_dtype, key=lambda key: by_dtype[key]) if by_dtype else None
    return by_kind, f"{storage}; floats in {values}" if values else storage


def runtime_of(model: nn.Module) -> str:
    """What the model in memory runs as: PyTorch eager, its float dtype, and int8 dynamic linear layers if any."""
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()})
    quantized = sum(1 for m in model.modules() if "DynamicQuantizedLinear" in type(m).__name__
                    or type(m).__module__.startswith("torch.ao.nn.quantized.dynamic"))
    text = f"PyTorch eager, dense {'/'.join(dtypes) or 'float32'} weights"
    return text + (f", {quantized} int8 dynamic linear layers" if quantized else "")


def disk_line(size: Mapping[str, Any]) -> str | None:
    """One line for a report: bytes on disk per tensor kind and the format (None when no folder was measured)."""
    by_kind = size.get("disk_by_kind")
    if not by_kind:
        return None
    parts = ", ".join(f"{kind.replace('_', ' ')} {by_kind.get(kind, 0) / 1e6:.1f} MB" for kind in TENSOR_KINDS)
    return f"on disk: {parts} ({size.get('disk_format')}); runs as: {size.get('runtime')}"
