"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 over the calibration tokens, compared per output row."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.masks import Structure, select_mask
from prunekit.methods.base import LayerwiseMethod, flat_inputs

if TYPE_CHECKING:
    from prunekit.pruning import PruneConfig


class WandaMethod(LayerwiseMethod):
    """Accumulates the squared L2 norm of each input feature; no weight update."""

    name: ClassVar[str] = "wanda"
    description: ClassVar[str] = "score |W|*||X_j|| from calibration activations, per output row; no update"
    settings: ClassVar[tuple[str, ...]] = ("sparsity", "structure", "compare", "allocation", "owl_m", "owl_lambda",
                                           "include", "exclude")
    compares: ClassVar[tuple[str, ...]] = ("row", "layer")

    def __init__(self, config: PruneConfig, in_features: int, key: str = "") -> None:
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

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        return select_mask(self.scores(layer), sparsity, structure, self.config.compare or self.default_compare())
