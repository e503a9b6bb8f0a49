"""Read a compressed-tensors folder back into dense weights (sparse bitmasks, int8 / int4 quantised weights).

A folder is compressed when its ``config.json`` has ``quantization_config.quant_method == "compressed-tensors"``.
Its layers' weights are stored as

* ``sparse-bitmask``: ``NAME.compressed`` (the nonzero values, 1-D), ``NAME.bitmask`` (one bit per weight,
  packed 8 to a byte along each row), ``NAME.row_offsets`` and ``NAME.shape``;
* ``sparse-24-bitmask``: ``NAME.compressed`` (the two kept values of every four, rows x cols/2), ``NAME.bitmask``
  and ``NAME.shape``;
* a quantisation format (``pack-quantized``, ``naive-quantized``, ...): the quantised weight and
  ``NAME.weight_scale``, decoded by compressed-tensors' own compressor for that format.

A bitmask over quantised values (sparsity and quantisation together) is unpacked first, then dequantised.
:func:`prunekit.models.load` builds the model from its config and loads the dense state dict this module
returns, so a compressed folder reloads as the plain model it was exported from (same values, every zero kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError

QUANT_METHOD = "compressed-tensors"
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
BITMASK_PARTS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
                 "sparse-24-bitmask": ("shape", "compressed", "bitmask")}
QPARAM_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale", "weight_packed")


def compression_config(source: str | Path | Any) -> dict[str, Any] | None:
    """The compressed-tensors config of a folder or a transformers config (None: weights are stored plainly)."""
    if isinstance(source, (str, Path)):
        file = Path(source) / "config.json"
        try:
            config = json.loads(file.read_text()) if file.exists() else {}
        except json.JSONDecodeError as exc:
            raise PrunekitError(f"'{file}' is not valid JSON ({exc.msg}): the folder is damaged, save it "
                                "again") from exc
        found = config.get("quantization_config") if isinstance(config, dict) else None
    else:
        found = getattr(source, "quantization_config", None)
    if found is not None and not isinstance(found, dict):
        found = found.to_dict() if callable(getattr(found, "to_dict", None)) else None
    if isinstance(found, dict) and found.get("quant_method") == QUANT_METHOD:
        return found
    return None


def sparsity_format(config: dict[str, Any]) -> str | None:
    """The bitmask format of a compressed-tensors config, or None when it stores no sparsity."""
    sparsity = config.get("sparsity_config") or {}
    fmt = sparsity.get("format") if isinstance(sparsity, dict) else None
    return None if fmt in (None, "dense") else str(fmt)


def is_quantized(config: dict[str, Any]) -> bool:
    return bool(config.get("config_groups"))


def describe(config: dict[str, Any] | None) -> str:
    """A short name of how the weights are stored, e.g. ``sparse-bitmask + pack-quantized int8 channel``."""
    if config is None:
        return "dense"
    parts = [fmt] if (fmt := sparsity_format(config)) else []
    for group in (config.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {} if isinstance(group, dict) else {}
        fmt = (group.get("format") if isinstance(group, dict) else None) or config.get("format") or "quantized"
        detail = f"{fmt} {weights.get('type', 'int')}{weights.get('num_bits', '?')} {weights.get('strategy', '')}"
        if weights.get("group_size"):
            detail += f" {weights['group_size']}"
        parts.append(detail.strip())
    return " + ".join(dict.fromkeys(parts)) or "compressed-tensors"


def read_compressed(folder: str | Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The folder's weights as a dense state dict (bitmasks unpacked, quantised weights dequantised)."""
    from prunekit.structured_load import read_safetensors

    state = read_safetensors(Path(folder))
    fmt = sparsity_format(config)
    if fmt is not None:
        if fmt not in SPARSE_FORMATS:
            raise PrunekitError(f"'{folder}' stores its weights as '{fmt}', which prunekit cannot read: "
                                f"use {' or '.join(SPARSE_FORMATS)}, or load it with compressed-tensors")
        state = unpack_bitmasks(state, fmt)
    if is_quantized(config):
        state = dequantize_state(state, config, folder)
    return state


def unpack_bitmasks(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Replace each bitmask-compressed weight (``NAME.compressed`` ...) by the dense ``NAME.weight``."""
    from compressed_tensors.utils import unpack_bitmasks as unpack

    out = dict(state)
    for prefix in [key[: -len(".bitmask")] for key in state if key.endswith(".bitmask")]:
        parts = {part: out.pop(f"{prefix}.{part}") for part in BITMASK_PARTS[fmt]}
        shape = [int(v) for v in parts["shape"].flatten().tolist()]
        keep = unpack(parts["bitmask"], shape)
        dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
        dense[keep] = parts["compressed"].flatten()
        out[f"{prefix}.weight"] = dense
    return out


def _scheme_for(name: str, schemes: list[Any], ignore: list[str]) -> Any | None:
    """The quantisation scheme that targets module ``name``: by name or ``re:`` pattern, else by class name."""
    from compressed_tensors.utils.match import match_name

    if any(match_name(name, target) for target in ignore):
        return None
    for scheme in schemes:
        if any(match_name(name, target) for target in scheme.targets):
            return scheme
    by_class = [s for s in schemes if any(not t.startswith("re:") and "." not in t for t in s.targets)]
    return by_class[0] if by_class else None


def dequantize_state(state: dict[str, torch.Tensor], config: dict[str, Any], folder: str | Path
                     ) -> dict[str, torch.Tensor]:
    """Dequantise every quantised weight with compressed-tensors' compressor for its format."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    fields = set(QuantizationConfig.model_fields)
    qconfig = QuantizationConfig.model_validate({k: v for k, v in config.items() if k in fields})
    schemes = [s for s in qconfig.config_groups.values() if not isinstance(s, list)]
    if any(s.input_activations is not None or s.output_activations is not None for s in schemes):
        raise PrunekitError(f"'{folder}' quantises activations, which prunekit.load cannot run: "
                            "load it with transformers and compressed-tensors")
    out = dict(state)
    prefixes = {key.rsplit(".", 1)[0] for key in state if key.endswith(".weight_scale")}
    for prefix in sorted(prefixes):
        scheme = _scheme_for(prefix, schemes, list(qconfig.ignore or []))
        if scheme is None:
            raise PrunekitError(f"'{folder}' has a quantised weight {prefix} that no quantisation group names: "
                                "the folder is damaged, export it again")
        compressor = BaseCompressor.get_value_from_registry(str(getattr(scheme.format, "value", scheme.format)
                                                                or qconfig.format))
        local = {key[len(prefix) + 1:]: out.pop(key) for key in list(out)
                 if key.startswith(prefix + ".") and key[len(prefix) + 1:] in (*QPARAM_SUFFIXES, "weight")}
        decoded = compressor.decompress(local, scheme)
        out[f"{prefix}.weight"] = decoded["weight"].to(local["weight_scale"].dtype)
    return out
