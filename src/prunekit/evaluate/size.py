"""Parameter counts, sparsity and bytes of a model, in memory and on disk.

Counting rules (stated in the report's protocol):

* every tensor is counted once, by storage address: tied weights (e.g. input embeddings and LM head)
  count once;
* a parameter is "nonzero" unless it is exactly 0.0; sparsity = 1 - nonzero / params;
* prunable layers are the linear layers (nn.Linear, GPT-2's Conv1D) inside the transformer blocks (from the model's
  adapter unless given); only their weights count as prunable, not their biases;
* ``bytes_in_memory`` = numel * element size of every unique parameter and buffer;
* ``bytes_on_disk`` = the size of the weight files of a saved folder (``*.safetensors``, or ``*.bin`` /
  ``*.pt`` / ``*.pth`` / ``*.gguf`` when it holds no safetensors), never configs or tokenizer files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunekit.adapters import get_adapter, is_linear, weight_view
from prunekit.errors import PrunekitError
from prunekit.utils import count_parameters, tensor_key, unique_tensors

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".gguf")

SIZE_PROTOCOL = ("parameters counted once per tensor (tied weights once); nonzero = not exactly 0.0; prunable = "
                 "weights (not biases) of the linear layers inside the transformer blocks; bytes_in_memory = "
                 "unique parameters and buffers; bytes_on_disk = weight files only (*.safetensors)")


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
    return SizeReport(total_params=total, nonzero_params=nonzero, prunable_params=prunable,
                      prunable_nonzero=prunable_nonzero, prunable_sparsity=_sparsity(prunable, prunable_nonzero),
                      total_sparsity=_sparsity(total, nonzero), layers=rows, bytes_on_disk=on_disk,
                      bytes_in_memory=in_memory)
