"""Compressed exports: a pruned model's block weights stored in a compressed-tensors format, really smaller on disk.

``format`` says how zeros are stored: ``dense`` (every weight), ``sparse-bitmask`` (the nonzero values and one
bit per weight: any pattern), ``sparse-24-bitmask`` (two values of every four and their bits: 2:4 models only).
``quantize`` stores the weights as ``int8`` (one scale per output channel) or ``int4`` (one scale per group of
``group_size`` inputs, weights alone: a bitmask over packed int4 is not a compressed-tensors format); zeros stay
exactly zero. Values and every other tensor (embeddings, norms, head) are stored in ``dtype``.

What is compressed: the linear layers inside the transformer blocks (the model's adapter names them); they
are named one by one in ``config.json``'s ``quantization_config``, written as compressed-tensors writes it.
:func:`prunekit.load` reloads every format (dense weights, same values). Plain ``transformers`` (with
compressed-tensors installed) reloads the quantised formats with ``format='dense'``; it cannot read the
bitmask formats, because compressed-tensors dropped their compressors in 0.15 and transformers 5 needs
0.15 or later: such a folder names ``prunekit.load`` in its record.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.utils import atomic_dir, check_output_dir, resolve_dtype, tensor_key

FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")
QUANTIZATIONS = ("none", "int8", "int4")
VALUE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class ExportSettings:
    """How an export stores the block weights; checked when built (one-line errors)."""

    format: str = "sparse-bitmask"
    dtype: str = "bfloat16"
    quantize: str = "none"
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise PrunekitError(f"unknown export format '{self.format}': use one of {', '.join(FORMATS)}")
        if self.quantize not in QUANTIZATIONS:
            raise PrunekitError(f"unknown quantisation '{self.quantize}': use one of {', '.join(QUANTIZATIONS)}")
        dtype = resolve_dtype(self.dtype)
        if dtype not in VALUE_DTYPES:
            raise PrunekitError(f"dtype '{self.dtype}' cannot store weights: use bfloat16, float16 or float32")
        object.__setattr__(self, "dtype", VALUE_DTYPES[dtype])
        if self.quantize == "int4" and self.format != "dense":
            raise PrunekitError(f"int4 weights are stored packed, and compressed-tensors has no bitmask over them: "
                                f"use --format dense with --quantize int4 (or --quantize int8 with {self.format})")
        if self.quantize == "int4" and int(self.group_size) < 1:
            raise PrunekitError(f"--group-size {self.group_size} must be at least 1 (e.g. 128)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    def values(self) -> str:
        """What the stored numbers are, e.g. 'int8 values, bfloat16 scales' or 'bfloat16 values'."""
        return f"{self.quantize} values, {self.dtype} scales" if self.quantized else f"{self.dtype} values"

    @property
    def sparse(self) -> bool:
        return self.format != "dense"

    @property
    def quantized(self) -> bool:
        return self.quantize != "none"


def export_layers(model: nn.Module, settings: ExportSettings, check_zeros: bool = True) -> dict[str, nn.Linear]:
    """The layers an export compresses (the block linears), checked against ``settings``.

    Raises a one-line error for a layer compressed-tensors cannot hold (not nn.Linear), a 2:4 format on
    weights that are not 2:4 (when ``check_zeros``), or an int4 group size that does not divide a layer's inputs.
    """
    from prunekit.adapters import get_adapter
    from prunekit.masks import Structure, is_nm_sparse

    layers = get_adapter(model).prunable_layers()
    checked: dict[str, nn.Linear] = {}
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise PrunekitError(f"layer {name} is a {type(layer).__name__}; compressed-tensors stores nn.Linear layers "
                                "only: keep this model in the dense folder prunekit prune wrote")
        if check_zeros and settings.format == "sparse-24-bitmask" and not is_nm_sparse(layer.weight.detach(),
                                                                                         Structure(2, 4)):
            raise PrunekitError(f"layer {name} is not 2:4 sparse (some group of 4 weights has more than 2 nonzero): "
                                "use --format sparse-bitmask, or prune with --structure 2:4")
        if settings.quantize == "int4" and layer.in_features % int(settings.group_size):
            raise PrunekitError(f"int4 group size {settings.group_size} does not divide the {layer.in_features} "
                                f"inputs of {name}: choose a group size (--group-size) that divides every layer's "
                                "input size")
        checked[name] = layer
    return checked


def compressed_state(model: nn.Module, settings: ExportSettings, layers: dict[str, nn.Linear]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors to save, ``quantization_config`` for config.json): the layers compressed, the rest in ``dtype``."""
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.quantization import QuantizationConfig

    from prunekit.compressed_load import QUANT_METHOD
    from prunekit.export.quantize import bitmask, quant_format, quantize_weight, scheme_for

    dtype, names = settings.torch_dtype, list(layers)
    fmt = quant_format(settings.quantize, settings.group_size, settings.sparse) if settings.quantized else None
    scheme = scheme_for(names, settings.quantize, settings.group_size, fmt) if fmt else None
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[object, ...]] = set()
    for key, tensor in model.state_dict().items():  # tied weights (embeddings and head) are stored once
        if tensor_key(tensor) in seen:
            continue
        seen.add(tensor_key(tensor))
        state[key] = tensor.detach().to("cpu", dtype=dtype) if tensor.is_floating_point() else tensor.detach().cpu()
    zeros = total = 0
    for name, layer in layers.items():
        weight = state.pop(f"{name}.weight")
        zeros, total = zeros + int((layer.weight == 0).sum()), total + layer.weight.numel()
        parts = (quantize_weight(layer.weight.detach().to("cpu"), scheme, fmt, dtype) if scheme is not None and fmt
                 else {"weight": weight})
        if settings.sparse:
            parts.update(bitmask(parts.pop("weight"), settings.format))
        state.update({f"{name}.{part}": value.contiguous() for part, value in parts.items()})

    config: dict[str, Any] = {QUANTIZATION_METHOD_NAME: QUANT_METHOD, COMPRESSION_VERSION_NAME:
                              compressed_tensors.__version__, SPARSITY_CONFIG_NAME: {}, TRANSFORM_CONFIG_NAME: {}}
    if settings.sparse:
        structure = "2:4" if settings.format == "sparse-24-bitmask" or _all_24(layers) else "unstructured"
        sparsity = SparsityCompressionConfig.load_from_registry(
            settings.format, targets=names, ignore=[], global_sparsity=zeros / total if total else 0.0,
            sparsity_structure=structure)
        config[SPARSITY_CONFIG_NAME] = sparsity.model_dump(mode="json")
    if scheme is not None:
        quantization = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                                          quantization_status="compressed", ignore=[])
        config.update(quantization.model_dump(mode="json", exclude={"quant_method"}))
    return state, config


def _all_24(layers: dict[str, nn.Linear]) -> bool:
    from prunekit.masks import Structure, is_nm_sparse

    return all(is_nm_sparse(layer.weight.detach(), Structure(2, 4)) for layer in layers.values())


def export_model(model: nn.Module, tokenizer: Any, out: str | Path, settings: ExportSettings | None = None,
                 record: Any = None, overwrite: bool = False) -> Path:
    """Write ``model`` with its block weights compressed as ``settings`` say, its tokenizer and record, atomically.

    Nothing is written when a check fails; the model itself is not changed. The record gets ``export``:
    the settings, the storage (compressed-tensors' format names) and the compressed-tensors version.
    """
    from prunekit.compressed_load import describe
    from prunekit.export.saving import full_record, write_record

    settings = settings or ExportSettings()
    check_output_dir(out, overwrite)
    layers = export_layers(model, settings)
    save_pretrained = getattr(model, "save_pretrained", None)
    if not callable(save_pretrained):
        raise PrunekitError(f"cannot export a {type(model).__name__}: export needs a transformers model "
                            "(one with save_pretrained)")
    state, config = compressed_state(model, settings, layers)
    record_data = full_record(model, record)
    record_data["export"] = {**asdict(settings), "storage": describe(config), "values": settings.values(),
                             "layers": len(layers),
                             "compressed_tensors": config.get("version"),
                             "plain_transformers": not settings.sparse and record_data.get("loader") is None}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_pretrained(tmp, state_dict=state, safe_serialization=True)
        file = tmp / "config.json"
        data = json.loads(file.read_text())
        data.update({"dtype": settings.dtype, "quantization_config": config})
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_record(tmp, record_data)
    return Path(out)


def export_folder(source: str | Path, out: str | Path, settings: ExportSettings | None = None,
                  overwrite: bool = False) -> Path:
    """Export a saved model (a prunekit folder, any model folder, or a built-in name) in a compressed form."""
    from prunekit.compressed_load import compression_config, describe
    from prunekit.models import RECORD_NAME, load_model, read_record, resolve_model_source

    settings = settings or ExportSettings()
    folder, _builtin = resolve_model_source(str(source), progress=True)
    existing = compression_config(folder) if Path(folder).is_dir() else None
    if existing is not None:
        raise PrunekitError(f"'{source}' is already compressed ({describe(existing)}): export the dense folder it "
                            "came from instead")
    check_output_dir(out, overwrite)
    model, tokenizer = load_model(str(source), device="cpu", progress=True)
    record = read_record(folder) if (Path(folder) / RECORD_NAME).exists() else {"source_model": str(source)}
    record = {key: value for key, value in record.items() if key not in ("created", "prunekit_version", "versions")}
    record["exported_from"] = str(source)
    return export_model(model, tokenizer, out, settings, record=record, overwrite=overwrite)
