"""The contract of a layer-wise (one-shot) pruning method.

A method sees one *input stream* at a time: the engine (prunekit.calibration) creates one instance per
group of layers that read the same input tensor (q/k/v of an attention, gate/up of a gated MLP), feeds it
the calibration inputs with :meth:`LayerwiseMethod.add_batch`, then calls :meth:`LayerwiseMethod.prune`
once per layer of the group. A method knows nothing of model families or blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from prunekit.masks import Structure

if TYPE_CHECKING:
    from prunekit.pruning import PruneConfig


class LayerwiseMethod:
    """Collect statistics from a layer's inputs, then prune the layer.

    Subclasses set the class attributes and implement :meth:`prune`; methods that need calibration
    also implement :meth:`add_batch`. ``settings`` names the PruneConfig fields the method reads
    (listed by ``prunekit methods``); ``compares`` the allowed values of ``compare`` (first = default).
    """

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    settings: ClassVar[tuple[str, ...]] = ("sparsity", "structure", "allocation", "include", "exclude")
    compares: ClassVar[tuple[str, ...]] = ("row",)

    def __init__(self, config: PruneConfig, in_features: int, key: str = "") -> None:
        """``key`` names the input stream (the full name of its first layer), e.g. to derive a seed."""
        self.config = config
        self.in_features = in_features
        self.key = key
        self.n_tokens = 0

    @classmethod
    def default_compare(cls) -> str:
        """The comparison used when the config names none."""
        return cls.compares[0]

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate statistics from one micro-batch of layer inputs shaped (..., in_features)."""
        self.n_tokens += inputs.numel() // max(1, inputs.shape[-1])

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        """Write the layer's new weights (in place) and return its keep-mask, shaped (out, in)."""
        raise NotImplementedError

    @classmethod
    def whole_model_masks(cls, layers: dict[str, nn.Module], sparsity: float, config: PruneConfig
                          ) -> dict[str, torch.Tensor] | None:
        """Masks for all layers at once (e.g. a global magnitude comparison), or None to go layer by layer."""
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly facts about this input stream (method, tokens seen)."""
        return {"method": self.name, "tokens": self.n_tokens}


def flat_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """A layer input as float32 rows (tokens, in_features)."""
    return inputs.reshape(-1, inputs.shape[-1]).float()
