"""Reload models whose shapes a config cannot say: per-block head/FFN sizes, factorised (FLOP) layers.

The model is built from its config as usual, then cut to the per-block shapes recorded in
``config.prunekit_structure`` (or the record's ``structure``), its factorised layers (recorded in
``config.prunekit_factorised`` or the record's ``factorised``) are replaced by two-factor layers of
the recorded rank, and only then are the safetensors weights loaded, strictly.
:func:`prunekit.export.load` calls it for folders whose record or config names the loader ``structured``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.record import FACTORISED_ATTR, STRUCTURE_ATTR
from prunekit.surgery import LowRankLinear, shrink_to


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder (one file or shards listed in the index)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise PrunekitError(f"'{folder}' has no model.safetensors: save the model again with prunekit")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def load_weights(model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load the folder's weights (or ``state``, read from it) into ``model``; every parameter must be given unless
    it is tied to one that is."""
    state = _renamed(model, read_safetensors(folder) if state is None else state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise PrunekitError(f"'{folder}' holds weights the rebuilt model lacks ({unexpected[0]}, ...): "
                            "the folder and its prunekit record disagree, save the model again")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in params if k not in missing}
    untied = [k for k in missing if k in params and id(params[k]) not in loaded]
    if untied:
        raise PrunekitError(f"'{folder}' lacks the weights {untied[0]} of the rebuilt model: "
                            "the folder and its prunekit record disagree, save the model again")


def _renamed(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved weights under the names the model uses: transformers renames some on saving (GPT-NeoX's
    lm_head is saved as embed_out) and back on loading; a state loaded by hand needs the same renaming."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings saves under the model's own names
        return state
    if not isinstance(model, PreTrainedModel):
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return state
    return {rename_source_key(key, renamings, [])[0]: tensor for key, tensor in state.items()}


def apply_factorised(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace each named layer by an empty two-factor layer of the recorded rank."""
    for name, info in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LowRankLinear(int(info["in"]), int(info["out"]), int(info["rank"]), bias=bool(info["bias"]))
        setattr(parent, attr, layer)


def load_structured(model: nn.Module, folder: Path, config: Any, record: dict[str, Any],
                    state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Cut a freshly built ``model`` to the recorded shapes, then load the folder's weights (module docstring).

    ``state``: the weights already read (and decompressed) from the folder; None reads them."""
    shapes = getattr(config, STRUCTURE_ATTR, None) or record.get("structure")
    if shapes:
        shrink_to(model, shapes["layers"] if isinstance(shapes, dict) else shapes)
    factorised = getattr(config, FACTORISED_ATTR, None) or record.get("factorised")
    if factorised:
        apply_factorised(model, factorised)
    load_weights(model, Path(folder), state)
    model.eval()
    return model
