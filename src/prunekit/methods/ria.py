"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play").

score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** alpha: a weight's share of its
output row plus its share of its input column, times the input feature's L2 norm over the calibration
tokens to the power ``alpha`` (0.5 in the paper). Compared within each output row (or the layer); no
weight update. With an N:M structure, ``permute`` first reorders the FFN's intermediate channels so the
large scores spread over the groups (:mod:`prunekit.methods.permutation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.errors import PrunekitError
from prunekit.methods.registry import register, setting
from prunekit.methods.wanda import WandaConfig, WandaMethod

TINY = 1e-12  # an all-zero row or column scores 0, not 0/0


@dataclass(frozen=True)
class RIAConfig(WandaConfig):
    alpha: float = setting(0.5, "exponent of the input norm ||X_j||_2 (0: relative importance alone)")

    def check(self) -> None:
        super().check()
        if not self.alpha >= 0:
            raise PrunekitError(f"ria: alpha {self.alpha:g} must be at least 0 (the paper uses 0.5)")


@register("ria", kind="one-shot", config=RIAConfig,
          description="relative importance |W|/row sum + |W|/column sum, times ||X_j||^alpha; no update")
class RIAMethod(WandaMethod):
    """Wanda's statistics (squared input norms), RIA's score."""

    def scores(self, layer: nn.Module) -> torch.Tensor:
        if self.sq_norm is None:
            raise RuntimeError("ria: the layer received no calibration inputs")
        weight = weight_view(layer).float().abs()
        rows = weight.sum(dim=1, keepdim=True).clamp_min(TINY)
        columns = weight.sum(dim=0, keepdim=True).clamp_min(TINY)
        activation = self.sq_norm.to(weight.device).pow(float(self.config.alpha) / 2.0)
        return (weight / rows + weight / columns) * activation.unsqueeze(0)
