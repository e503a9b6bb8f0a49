"""OWL (Yin et al. 2023): outlier-weighted layer-wise sparsity — blocks with more outliers are pruned less.

For each block the Wanda scores |W_ij|·‖X_j‖ of all its selected layers are pooled; its *outlier ratio*
is the fraction of scores above ``owl_m`` × their mean. The ratios are min-max normalised to [0, 1],
scaled to a spread of 2·``owl_lambda``, and centred, so that

    sparsity_b = target − (2λ·r̂_b − mean_b(2λ·r̂_b))

and the mean over blocks equals the target (blocks have the same size in a uniform model). The ratios
come from a separate, cheap pass over the DENSE model (one forward per block, its outputs reused as the
next block's inputs, as in the reference code), before the pruning pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.calibration import BlockPlacement, BlockVisitor, Observer, run_blockwise
from prunekit.errors import PrunekitError
from prunekit.methods.wanda import WandaMethod


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of the pooled scores that exceed ``m`` times their mean."""
    pooled = torch.cat([s.reshape(-1).float() for s in scores])
    if pooled.numel() == 0:
        return 0.0
    return float((pooled > m * pooled.mean()).float().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from outlier ratios: mean = target, spread 2·lam, more outliers -> less pruning."""
    values = torch.tensor(ratios, dtype=torch.float64)
    if values.numel() == 0:
        return []
    span = float(values.max() - values.min())
    normalised = (values - values.min()) / span if span > 0 else torch.zeros_like(values)
    density_shift = normalised * (2 * lam)
    sparsities = target - (density_shift - density_shift.mean())
    if float(sparsities.min()) < 0 or float(sparsities.max()) >= 1:
        raise PrunekitError(f"OWL with target {target:g} and lambda {lam:g} gives block sparsities from "
                            f"{float(sparsities.min()):.3f} to {float(sparsities.max()):.3f}, outside [0, 1): "
                            "lower --owl-lambda")
    return [float(s) for s in sparsities]


class _OutlierVisitor(BlockVisitor):
    """Dense pass: Wanda statistics per block, pooled into one outlier ratio per block; nothing is changed."""

    modifies = False

    def __init__(self, config: Any, layers_by_block: list[dict[str, nn.Module]]) -> None:
        self.config = config
        self.layers_by_block = layers_by_block
        self.ratios: list[float] = []

    def layers(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        return self.layers_by_block[index]

    def observer(self, name: str, layer: nn.Module, in_features: int) -> Observer:
        return WandaMethod(self.config, in_features, key=name)

    def finish(self, index: int, block: nn.Module, layers: dict[str, nn.Module],
               observers: dict[str, Observer]) -> None:
        scores = []
        for name, layer in layers.items():
            observer = observers[name]
            assert isinstance(observer, WandaMethod)
            scores.append(observer.scores(layer))
        self.ratios.append(outlier_ratio(scores, float(self.config.owl_m)))


def owl_allocation(model: nn.Module, calibration: torch.Tensor, config: Any, target: float,
                   layers_by_block: list[dict[str, nn.Module]], *, device: torch.device | str | None = None,
                   micro_batch_size: int = 0, progress: bool = True,
                   placement: BlockPlacement | None = None) -> tuple[list[float], list[float]]:
    """(per-block sparsity, per-block outlier ratio) from a dense pass over the calibration batch.

    Blocks with no selected layer get ratio 0 and take no part in the normalisation (sparsity 0).
    """
    visitor = _OutlierVisitor(config, layers_by_block)
    run_blockwise(model, calibration, visitor, device=device, micro_batch_size=micro_batch_size,
                  progress=progress, desc="owl outliers", placement=placement)
    ratios: list[float] = []
    counted = iter(visitor.ratios)
    for layers in layers_by_block:
        ratios.append(next(counted) if layers else 0.0)
    active = [i for i, layers in enumerate(layers_by_block) if layers]
    allocated = owl_sparsities([ratios[i] for i in active], target, float(config.owl_lambda))
    sparsities = [0.0] * len(layers_by_block)
    for i, value in zip(active, allocated, strict=True):
        sparsities[i] = value
    return sparsities, ratios
