"""Masks: which weights to keep, chosen from scores per row, per layer, globally or N:M; apply, keep and report.

Convention: a mask is a bool tensor shaped like ``weight_view(layer)`` (out_features, in_features),
``True`` where the weight is KEPT. Every selector prunes an exact number of weights: ties in the
scores are broken by position, never by pruning more than asked. :class:`KeptMasks` is the one
mechanism that keeps masks during training (pruned weights and their gradients stay zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.adapters import grad_view, weight_view
from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class Structure:
    """What a mask must look like: ``unstructured`` (n = m = 0) or N:M (keep n of every m consecutive inputs)."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None when unstructured)."""
        return 1.0 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_structure(structure: str | Structure | None) -> Structure:
    """``'unstructured'`` (or None) or ``'N:M'`` with 0 < N < M, e.g. ``'2:4'``."""
    if isinstance(structure, Structure):
        return structure
    if structure is None or str(structure).strip().lower() in ("", "unstructured", "none"):
        return Structure()
    text = str(structure).strip()
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise PrunekitError(f"unknown structure '{text}': use unstructured or N:M such as 2:4 or 4:8")
    n, m = int(parts[0]), int(parts[1])
    if n < 1 or n >= m:
        raise PrunekitError(f"structure {n}:{m} is invalid: N must be at least 1 and smaller than M (e.g. 2:4)")
    return Structure(n, m)


def count_to_prune(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a sparsity prunes: the nearest whole number (halves round up)."""
    return min(total, max(0, math.floor(total * sparsity + 0.5)))


def prune_lowest(scores: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """Keep-mask for a 2-D ``scores``: in each row prune exactly ``counts`` (per row or one int) lowest scores.

    Ties at the threshold are pruned left to right, so the count is always exact.
    """
    rows, cols = scores.shape
    k = torch.as_tensor(counts, dtype=torch.long).reshape(-1).expand(rows).clamp(0, cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if cols == 0 or int(k.max()) == 0:
        return keep
    values = scores if scores.dtype == torch.float32 else scores.float()
    if bool((k == k[0]).all()):
        kth = values.kthvalue(int(k[0]), dim=1, keepdim=True).values
    else:  # different counts per row: sort each row once
        kth = values.sort(dim=1).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    prune = values <= kth
    if not bool((prune.sum(dim=1) == k).all()):  # ties at the threshold: prune them left to right
        below = values < kth
        tied = values == kth
        need = (k.unsqueeze(1) - below.sum(dim=1, keepdim=True)).clamp(min=0)
        prune = below | (tied & (tied.cumsum(dim=1) <= need))
    prune[k == 0] = False
    return ~prune


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the lowest ``sparsity`` fraction of each row (per-output comparison)."""
    return prune_lowest(scores, count_to_prune(scores.shape[1], sparsity))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the lowest ``sparsity`` fraction of the whole tensor (per-layer comparison)."""
    flat = scores.reshape(1, -1)
    return prune_lowest(flat, count_to_prune(flat.shape[1], sparsity)).reshape(scores.shape)


def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks pruning the lowest ``sparsity`` fraction of all scores of all layers together."""
    names = list(scores)
    flat = torch.cat([scores[name].reshape(-1).float() for name in names]).unsqueeze(0)
    keep = prune_lowest(flat, count_to_prune(flat.shape[1], sparsity)).reshape(-1)
    out: dict[str, torch.Tensor] = {}
    start = 0
    for name in names:
        size = scores[name].numel()
        out[name] = keep[start:start + size].reshape(scores[name].shape)
        start += size
    return out


def check_nm(in_features: int, structure: Structure, name: str = "layer") -> None:
    """Raise a PrunekitError when M does not divide the layer's input size."""
    if structure.is_nm and in_features % structure.m:
        raise PrunekitError(f"{structure} pruning needs the input size to be a multiple of {structure.m}, but {name} "
                            f"has {in_features} inputs: choose an M that divides it or exclude the layer")


def nm_mask(scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Keep-mask keeping the N highest scores in every group of M consecutive inputs of each row."""
    rows, cols = scores.shape
    check_nm(cols, structure)
    groups = scores.float().reshape(rows, cols // structure.m, structure.m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(structure.n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, structure: Structure, compare: str = "row") -> torch.Tensor:
    """Keep-mask from scores: N:M groups, or the lowest fraction per ``row`` or per ``layer``."""
    if structure.is_nm:
        return nm_mask(scores, structure)
    if compare == "row":
        return row_mask(scores, sparsity)
    if compare == "layer":
        return layer_mask(scores, sparsity)
    raise PrunekitError(f"unknown comparison '{compare}' for one layer: use row or layer")


def apply_mask(layer: nn.Module, mask: torch.Tensor) -> None:
    """Zero the layer's weights where ``mask`` is False (in place; the bias is left alone)."""
    weight = weight_view(layer)
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
    with torch.no_grad():
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def weight_mask(layer: nn.Module) -> torch.Tensor:
    """The keep-mask a layer's weights currently have (True where nonzero)."""
    return weight_view(layer) != 0


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    total = tensor.numel()
    return 0.0 if total == 0 else 1.0 - int(torch.count_nonzero(tensor)) / total


def is_nm_sparse(weight: torch.Tensor, structure: Structure) -> bool:
    """True if every group of M consecutive inputs of every row has at most N nonzero weights."""
    rows, cols = weight.shape
    if cols % structure.m:
        return False
    nonzero = (weight != 0).reshape(rows, cols // structure.m, structure.m).sum(dim=2)
    return bool((nonzero <= structure.n).all())


def layer_report(layers: Mapping[str, nn.Module]) -> dict[str, dict[str, object]]:
    """Per layer: shape (out, in), parameters, nonzero weights and sparsity, counted from the weights."""
    report: dict[str, dict[str, object]] = {}
    for name, layer in layers.items():
        weight = weight_view(layer)
        nonzero = int(torch.count_nonzero(weight))
        report[name] = {"shape": list(weight.shape), "params": weight.numel(), "nonzero": nonzero,
                        "sparsity": 1.0 - nonzero / max(1, weight.numel())}
    return report


def _count(value: object) -> int:
    if not isinstance(value, int):
        raise TypeError(f"a layer report count must be an int, got {type(value).__name__}")
    return value


def total_sparsity(report: Mapping[str, Mapping[str, object]]) -> float:
    """Sparsity of all the layers of a :func:`layer_report` together: 1 - Σ nonzero / Σ params (0 when empty)."""
    params = sum(_count(entry["params"]) for entry in report.values())
    nonzero = sum(_count(entry["nonzero"]) for entry in report.values())
    return 1.0 - nonzero / params if params else 0.0


class KeptMasks:
    """Fixed keep-masks of named linear layers, enforced during training.

    :meth:`apply` zeroes the pruned weights (after an optimiser step: momentum would revive them),
    :meth:`zero_grads` the gradients of pruned weights (after backward). A mask follows its layer to
    the layer's device the first time it is used there. ``masks`` may be replaced one by one.
    """

    def __init__(self, layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(masks) - set(layers))
        if missing:
            raise PrunekitError(f"a mask is given for '{missing[0]}', which is not one of the layers kept masked")
        self.layers: dict[str, nn.Module] = dict(layers)
        self.masks: dict[str, torch.Tensor] = dict(masks)

    @classmethod
    def from_weights(cls, layers: Mapping[str, nn.Module]) -> KeptMasks:
        """Masks read from the weights as they are now: a zero weight is a pruned one."""
        return cls(layers, {name: weight_mask(layer) for name, layer in layers.items()})

    @classmethod
    def all_kept(cls, layers: Mapping[str, nn.Module]) -> KeptMasks:
        """Masks that keep every weight (before any pruning)."""
        return cls(layers, {name: torch.ones_like(weight_view(layer), dtype=torch.bool)
                            for name, layer in layers.items()})

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """The layer's mask on ``device`` (moved there once, when the trainer moved the model)."""
        mask = self.masks[name]
        if mask.device != device:
            mask = self.masks[name] = mask.to(device)
        return mask

    def apply(self) -> None:
        """Zero every pruned weight in place."""
        with torch.no_grad():
            for name in self.masks:
                weight = weight_view(self.layers[name])
                weight.mul_(self.on(name, weight.device).to(dtype=weight.dtype))

    def zero_grads(self) -> None:
        """Zero the gradient of every pruned weight in place (layers without a gradient are skipped)."""
        with torch.no_grad():
            for name in self.masks:
                grad = grad_view(self.layers[name])
                if grad is not None:
                    grad.mul_(self.on(name, grad.device).to(dtype=grad.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The masks on the CPU, by layer name (for a checkpoint)."""
        return {name: mask.cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Masks from :meth:`state_dict`, each put where the mask it replaces was."""
        for name, mask in masks.items():
            if name not in self.masks:
                raise PrunekitError(f"the checkpoint has a mask for '{name}', which this model lacks: "
                                    "resume with the same model and settings")
            self.masks[name] = mask.to(self.masks[name].device)
