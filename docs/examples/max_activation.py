"""A complete one-shot pruning method in one file: score |W_ij| x max_t |X_tj|.

Wanda scores a weight by the L2 norm of its input channel; this variant takes the largest magnitude
the channel reached on the calibration tokens instead. Import this module (or add it to
``prunekit.methods.BUILTIN_MODULES``) and it is a method like any other:

    prunekit.prune(model, {"method": "max-activation", "sparsity": 0.5}, calibration)
    prunekit prune MODEL --method max-activation --sparsity 0.5 --out DIR   (once built in)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.masks import Structure, select_mask
from prunekit.methods import register, setting
from prunekit.methods.base import LayerwiseMethod, SparsityConfig, flat_inputs


@dataclass(frozen=True)
class MaxActivationConfig(SparsityConfig):
    """sparsity, structure, allocation, include/exclude come from SparsityConfig; one setting of its own."""

    compare: str = setting("row", "which weights compete: row (each output row) or layer", choices=("row", "layer"))

    def needs_calibration(self) -> bool:
        return True


@register("max-activation", kind="one-shot", config=MaxActivationConfig,
          description="score |W_ij| * max_t |X_tj| from calibration activations; no update")
class MaxActivation(LayerwiseMethod):
    """The engine calls add_batch with each micro-batch of a layer's inputs, then prune once per layer."""

    def __init__(self, config: Any, in_features: int, key: str = "") -> None:
        super().__init__(config, in_features, key)
        self.peak = torch.zeros(in_features)

    def add_batch(self, inputs: torch.Tensor) -> None:
        rows = flat_inputs(inputs)
        self.peak = torch.maximum(self.peak, rows.abs().amax(dim=0).cpu())
        self.n_tokens += rows.shape[0]

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        weight = weight_view(layer)
        scores = weight.float().abs() * self.peak.to(weight.device).unsqueeze(0)
        return select_mask(scores, sparsity, structure, self.config.compare)
