"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 over the calibration tokens, compared per output row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.masks import Structure, select_mask
from prunekit.methods.base import CompareConfig, LayerwiseMethod, flat_inputs
from prunekit.methods.permutation import check_permute
from prunekit.methods.registry import register, setting


@dataclass(frozen=True)
class WandaConfig(CompareConfig):
    compare: str = setting("row", "which weights compete: row (each output row, as in the paper) or layer",
                           choices=("row", "layer"))
    permute: bool = setting(False, "N:M: reorder the FFN's intermediate channels (gate/up rows and down columns "
                                   "together, same function) so large scores spread over the groups")

    def check(self) -> None:
        super().check()
        check_permute(self)

    def needs_calibration(self) -> bool:
        return True


@register("wanda", kind="one-shot", config=WandaConfig,
          description="score |W|*||X_j|| from calibration activations, per output row; no update")
class WandaMethod(LayerwiseMethod):
    """Accumulates the squared L2 norm of each input feature; no weight update."""

    def __init__(self, config: Any, in_features: int, key: str = "") -> None:
        super().__init__(config, in_features, key)
        self.sq_norm: torch.Tensor | None = None

    def add_batch(self, inputs: torch.Tensor) -> None:
        rows = flat_inputs(inputs)
        squares = rows.square().sum(dim=0)
        self.sq_norm = squares if self.sq_norm is None else self.sq_norm.add_(squares)
        self.n_tokens += rows.shape[0]

    def scores(self, layer: nn.Module) -> torch.Tensor:
        """|W_ij| * ||X_j||_2 in float32, shaped (out, in)."""
        if self.sq_norm is None:
            raise RuntimeError("wanda: the layer received no calibration inputs")
        weight = weight_view(layer)
        norm = self.sq_norm.to(weight.device).sqrt()
        return weight.float().abs() * norm.unsqueeze(0)

    def permute_inputs(self, order: torch.Tensor) -> None:
        """Follow a reordering of the layer's input channels (new channel i = old ``order[i]``)."""
        if self.sq_norm is not None:
            self.sq_norm = self.sq_norm[order.to(self.sq_norm.device)]

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        return select_mask(self.scores(layer), sparsity, structure, self.config.compare)
