"""Magnitude pruning: drop the weights of smallest |W|, compared per layer, per output row, or globally."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.errors import PrunekitError
from prunekit.masks import Structure, global_masks, select_mask
from prunekit.methods.base import CompareConfig, LayerwiseMethod
from prunekit.methods.registry import register, setting


@dataclass(frozen=True)
class MagnitudeConfig(CompareConfig):
    compare: str = setting("layer", "which weights compete: layer, row (each output row) or global (all layers)",
                           choices=("layer", "row", "global"))
    include_lm_head: bool = setting(False, "also prune the LM head (refused when it is tied to the embeddings)")

    def check(self) -> None:
        super().check()
        if self.include_lm_head and self.allocation == "owl":
            raise PrunekitError("include_lm_head works with uniform allocation only: drop --allocation owl")
        if self.sequential and not self.refines():
            raise PrunekitError("magnitude reads no activations, so sequential changes nothing: drop it (it matters "
                                "with refine or reconstruct_steps)")


@register("magnitude", kind="one-shot", config=MagnitudeConfig,
          description="score |W|, compared per layer (default), per output row, or across all layers")
class MagnitudeMethod(LayerwiseMethod):
    """score = |W|; no calibration, no weight update."""

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        return select_mask(weight_view(layer).abs(), sparsity, structure, self.config.compare)

    @classmethod
    def whole_model_masks(cls, layers: dict[str, nn.Module], sparsity: float, config: Any
                          ) -> dict[str, torch.Tensor] | None:
        """With ``compare='global'`` one threshold over the |W| of every selected layer."""
        if config.compare != "global":
            return None
        return global_masks({name: weight_view(layer).abs() for name, layer in layers.items()}, sparsity)
