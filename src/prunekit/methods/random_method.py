"""Random pruning: the honest baseline every method must beat; seeded, exact sparsity."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.errors import PrunekitError
from prunekit.masks import Structure, select_mask
from prunekit.methods.base import CompareConfig, LayerwiseMethod
from prunekit.methods.registry import register, setting


@dataclass(frozen=True)
class RandomConfig(CompareConfig):
    compare: str = setting("layer", "which weights compete: layer or row", choices=("layer", "row"))
    include_lm_head: bool = setting(False, "also prune the LM head (refused when it is tied to the embeddings)")
    seed: int = setting(0, "seed of the random scores (the command's --seed when not given)", cli=False)

    def check(self) -> None:
        super().check()
        if self.include_lm_head and self.allocation == "owl":
            raise PrunekitError("include_lm_head works with uniform allocation only: drop --allocation owl")


@register("random", kind="one-shot", config=RandomConfig,
          description="uniformly random mask (seeded baseline), per layer or per row")
class RandomMethod(LayerwiseMethod):
    """Uniform random scores, from a generator seeded by ``seed`` and the layer's name."""

    def __init__(self, config: Any, in_features: int, key: str = "") -> None:
        super().__init__(config, in_features, key)
        # the same seed and layer name give the same mask, whatever else is pruned
        self.generator = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + zlib.crc32(key.encode()))

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        weight = weight_view(layer)
        scores = torch.rand(tuple(weight.shape), generator=self.generator)
        return select_mask(scores, sparsity, structure, self.config.compare)
