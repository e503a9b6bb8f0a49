"""Random pruning: the honest baseline every method must beat; seeded, exact sparsity."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.masks import Structure, select_mask
from prunekit.methods.base import LayerwiseMethod

if TYPE_CHECKING:
    from prunekit.pruning import PruneConfig


class RandomMethod(LayerwiseMethod):
    """Uniform random scores, from a generator seeded by ``seed`` and the layer's name."""

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "uniformly random mask (seeded baseline), per layer or per row"
    needs_calibration: ClassVar[bool] = False
    settings: ClassVar[tuple[str, ...]] = ("sparsity", "structure", "compare", "seed", "include", "exclude")
    compares: ClassVar[tuple[str, ...]] = ("layer", "row")

    def __init__(self, config: PruneConfig, in_features: int, key: str = "") -> None:
        super().__init__(config, in_features, key)
        # the same seed and layer name give the same mask, whatever else is pruned
        self.generator = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + zlib.crc32(key.encode()))

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        weight = weight_view(layer)
        scores = torch.rand(tuple(weight.shape), generator=self.generator)
        return select_mask(scores, sparsity, structure, self.config.compare or self.default_compare())
