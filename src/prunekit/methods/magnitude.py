"""Magnitude pruning: drop the weights of smallest |W|, compared per layer, per output row, or globally."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.masks import Structure, global_masks, select_mask
from prunekit.methods.base import LayerwiseMethod

if TYPE_CHECKING:
    from prunekit.pruning import PruneConfig


class MagnitudeMethod(LayerwiseMethod):
    """score = |W|; no calibration, no weight update."""

    name: ClassVar[str] = "magnitude"
    description: ClassVar[str] = "score |W|, compared per layer (default), per output row, or across all layers"
    needs_calibration: ClassVar[bool] = False
    settings: ClassVar[tuple[str, ...]] = ("sparsity", "structure", "compare", "allocation", "include", "exclude")
    compares: ClassVar[tuple[str, ...]] = ("layer", "row", "global")

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        compare = self.config.compare or self.default_compare()
        return select_mask(weight_view(layer).abs(), sparsity, structure, compare)

    @classmethod
    def whole_model_masks(cls, layers: dict[str, nn.Module], sparsity: float, config: PruneConfig
                          ) -> dict[str, torch.Tensor] | None:
        """With ``compare='global'`` one threshold over the |W| of every selected layer."""
        if config.compare != "global":
            return None
        return global_masks({name: weight_view(layer).abs() for name, layer in layers.items()}, sparsity)
