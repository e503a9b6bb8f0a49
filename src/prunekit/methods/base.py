"""The contracts of pruning methods and the settings they share.

* :class:`EngineConfig`: settings of the block-by-block engine, shared by every one-shot and
  structured method (calibration samples per forward).
* :class:`SparsityConfig`: what every layer-wise one-shot method takes on top (sparsity, N:M
  structure, per-block allocation uniform or OWL, which layers by include/exclude patterns).
* :class:`LayerwiseMethod`: a one-shot method sees one *input stream* at a time: the engine
  (prunekit.calibration) creates one instance per group of layers that read the same input tensor
  (q/k/v of an attention, gate/up of a gated MLP), feeds it the calibration inputs with
  :meth:`LayerwiseMethod.add_batch`, then calls :meth:`LayerwiseMethod.prune` once per layer.
* :class:`TrainingMethod`: hooks around each optimiser step of prunekit's trainer.

Methods know nothing of model families or blocks: adapters name the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.masks import Structure, parse_structure
from prunekit.methods.registry import MethodConfig, setting


@dataclass(frozen=True)
class EngineConfig(MethodConfig):
    """Settings of the block-by-block engine that every one-shot and structured method shares."""

    micro_batch_size: int = setting(0, "calibration samples per forward in the block-by-block engine (with "
                                       "reconstruction: per Adam step); 0: automatic, on CPU as many as make "
                                       "512 tokens (at least 1), on a GPU 8")

    def check(self) -> None:
        super().check()
        if self.micro_batch_size < 0:
            raise PrunekitError(f"{self.method}: micro_batch_size {self.micro_batch_size} must be at least 1 "
                                "(or 0: automatic)")


@dataclass(frozen=True)
class SparsityConfig(EngineConfig):
    """Sparsity, structure and per-block allocation: the settings of every layer-wise one-shot method."""

    sparsity: float | None = setting(None, "fraction of weights to remove, e.g. 0.5 (implied by an N:M structure)")
    structure: str = setting("unstructured", "unstructured, or N:M such as 2:4 (N of every M inputs pruned)")
    allocation: str = setting("uniform", "sparsity per block: uniform, or owl (outlier-weighted, reads calibration)",
                              choices=("uniform", "owl"))
    owl_m: float = setting(5.0, "owl: a score is an outlier above owl_m x its block's mean score")
    owl_lambda: float = setting(0.08, "owl: block sparsities spread over 2 x owl_lambda")
    include: list[str] | None = setting(None, "fnmatch patterns of full layer names to prune (comma-separated); "
                                              "default every block linear")
    exclude: list[str] | None = setting(None, "fnmatch patterns of full layer names to keep (comma-separated)")
    refine: str = setting("none", "after each layer's mask: none, or swaps (one-for-one mask swaps per row that lower "
                                  "the layer's output error, from XᵀX; same sparsity and N:M)",
                          choices=("none", "swaps"))
    refine_iterations: int = setting(50, "swaps: at most this many swaps per output row")
    reconstruct_steps: int = setting(0, "after each block is pruned: Adam steps fitting its kept weights (masks "
                                        "fixed) to the dense block's outputs on the calibration inputs; 0: none")
    reconstruct_lr: float = setting(1e-4, "reconstruction: Adam learning rate")
    sequential: bool = setting(False, "within each block, prune its layers group by group in the order they run "
                                      "(q/k/v, then o, then gate/up, then down), each group's statistics collected "
                                      "after the earlier groups were pruned (SparseGPT's true-sequential); costs "
                                      "about two more passes of each block")

    def check(self) -> None:
        super().check()
        self._check_refinement()
        structure = self.structure_spec()
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise PrunekitError(f"sparsity {self.sparsity} is outside [0, 1): use a fraction such as 0.5")
        if self.allocation == "owl" and structure.is_nm:
            raise PrunekitError("owl allocation varies the sparsity per block, which N:M fixes: use unstructured")
        if not (self.owl_m > 0 and self.owl_lambda >= 0):
            raise PrunekitError("owl_m must be positive and owl_lambda non-negative (defaults 5 and 0.08)")
        if self.sequential and getattr(self, "compare", "row") == "global":
            raise PrunekitError(f"{self.method}: sequential prunes a block's layers group by group, but compare=global "
                                "chooses every layer's mask at once: use compare row or layer")
        if structure.is_nm and self.sparsity is not None and abs(self.sparsity - (structure.sparsity or 0.0)) > 1e-9:
            raise PrunekitError(f"sparsity {self.sparsity:g} contradicts structure {structure} (which prunes "
                                f"{structure.sparsity:g}): drop --sparsity or use unstructured")

    def _check_refinement(self) -> None:
        if self.refine_iterations < 1:
            raise PrunekitError(f"{self.method}: refine_iterations {self.refine_iterations} must be at least 1")
        if self.reconstruct_steps < 0:
            raise PrunekitError(f"{self.method}: reconstruct_steps {self.reconstruct_steps} must be 0 (none) or more")
        if not self.reconstruct_lr > 0:
            raise PrunekitError(f"{self.method}: reconstruct_lr {self.reconstruct_lr:g} must be positive (e.g. 1e-4)")
        if self.refine == "none" and self.reconstruct_steps == 0:
            return
        asked = "refine" if self.refine != "none" else "reconstruct_steps"
        if getattr(self, "compare", "row") == "global":
            raise PrunekitError(f"{self.method}: {asked} works block by block, but compare=global chooses every "
                                "layer's mask at once: use compare row or layer")
        if getattr(self, "include_lm_head", False):
            raise PrunekitError(f"{self.method}: {asked} works on the blocks' layers, not the LM head: drop "
                                "include_lm_head")

    def refines(self) -> bool:
        """Whether masks are refined or blocks reconstructed after the method (both read calibration)."""
        return self.refine != "none" or self.reconstruct_steps > 0

    def structure_spec(self) -> Structure:
        """The parsed ``structure`` (unstructured or N:M)."""
        return parse_structure(self.structure)

    def target_sparsity(self) -> float:
        """The sparsity asked for: given, or implied by N:M."""
        structure = self.structure_spec()
        if structure.is_nm:
            return structure.sparsity or 0.0
        if self.sparsity is None:
            raise PrunekitError(f"method {self.method} needs a sparsity: pass --sparsity (e.g. 0.5) or --structure 2:4")
        return float(self.sparsity)

    def ready(self) -> None:
        self.target_sparsity()

    def needs_calibration(self) -> bool:
        return self.allocation == "owl" or self.refines() or self.sequential


@dataclass(frozen=True)
class CompareConfig(SparsityConfig):
    """Layer-wise methods whose scores may be compared per row, per layer or (magnitude) across layers."""

    compare: str = setting("row", "which weights compete: row (each output row), layer, or global")

    def check(self) -> None:
        super().check()
        allowed = type(self).__dataclass_fields__["compare"].metadata.get("choices")
        if allowed and self.compare not in allowed:  # pragma: no cover - the field's choices check first
            raise PrunekitError(f"{self.method} compares by {' or '.join(allowed)}, not '{self.compare}'")
        if self.allocation == "owl" and self.compare == "global":
            raise PrunekitError("owl allocation and a global comparison both set per-layer sparsity: choose one")


class LayerwiseMethod:
    """Collect statistics from a layer's inputs, then prune the layer.

    Subclasses implement :meth:`prune`; methods that need calibration also implement :meth:`add_batch`
    and return True from their config's ``needs_calibration``.
    """

    def __init__(self, config: Any, in_features: int, key: str = "") -> None:
        """``key`` names the input stream (the full name of its first layer), e.g. to derive a seed."""
        self.config = config
        self.in_features = in_features
        self.key = key
        self.n_tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate statistics from one micro-batch of layer inputs shaped (..., in_features)."""
        self.n_tokens += inputs.numel() // max(1, inputs.shape[-1])

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        """Write the layer's new weights (in place) and return its keep-mask, shaped (out, in)."""
        raise NotImplementedError

    @classmethod
    def whole_model_masks(cls, layers: dict[str, nn.Module], sparsity: float, config: Any
                          ) -> dict[str, torch.Tensor] | None:
        """Masks for all layers at once (e.g. a global magnitude comparison), or None to go layer by layer."""
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly facts about this input stream (method, tokens seen)."""
        return {"method": self.config.method, "tokens": self.n_tokens}


def flat_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """A layer input as float32 rows (tokens, in_features)."""
    return inputs.reshape(-1, inputs.shape[-1]).float()


class TrainingMethod:
    """Hooks called by the trainer (prunekit.finetune), in this order each step:

    ``extra_loss`` (added to the task loss before backward) -> backward -> ``after_backward``
    (gradients present, before the optimiser step) -> optimiser step -> ``after_step``.
    ``setup`` runs once before training (it may replace layers and returns the model to train);
    ``finalize`` once after (it returns the exportable model and facts for the prunekit record).
    ``state_dict``/``load_state_dict`` make a run resumable from a checkpoint.
    """

    name: ClassVar[str] = "none"

    def setup(self, model: nn.Module, *, total_steps: int, n_train: int) -> nn.Module:
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Extra optimiser parameter groups (e.g. gates with their own learning rate).

        Parameters listed here are left out of the trainer's main groups.
        """
        return []

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        return None

    def finalize(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        return model, {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
