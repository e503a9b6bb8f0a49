"""Training-aware pruning on one cubic schedule: gmp, movement and mgpp as TrainingMethods.

All three prune the same layers as one-shot pruning (the linear layers of the transformer blocks,
from the model's adapter; never embeddings, norms or the task head), recompute their masks every
``update_every`` steps between the warm-up and the final phase, and enforce the mask after every
optimiser step (Adam's momentum would otherwise revive pruned weights). They differ only in the
score that decides which weights stay, and in what they add to the gradients:

* ``gmp`` (Zhu & Gupta 2017): |θ|; one global threshold or one per layer.
* ``movement`` (Sanh et al. 2020): S = −Σ_t θ·∂L/∂θ accumulated over all steps; pruned weights keep
  their last value aside and their score keeps moving, so a mask update may bring them back.
* ``mgpp`` (Zhang, Sun, Liang): |θ| with ONE global threshold, and the gradient of a spike-and-slab
  prior (see :func:`prior_gradient`) added after backward with an annealed λ.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prunekit.adapters import get_adapter, weight_view
from prunekit.errors import PrunekitError
from prunekit.finetune.hooks import TrainingMethod
from prunekit.masks import global_masks, layer_mask, layer_report
from prunekit.methods.schedule import CubicSchedule, resolve_steps
from prunekit.utils import import_optional

COMPARES = ("global", "layer")


def grad_view(layer: nn.Module) -> torch.Tensor | None:
    """The layer's weight gradient as (out_features, in_features), or None before backward."""
    weight: Any = layer.weight
    grad: torch.Tensor | None = weight.grad
    if grad is None:
        return None
    return grad.t() if isinstance(layer, Conv1D) else grad


class GradualPruning(TrainingMethod):
    """Shared machinery: the schedule, the masks, their enforcement and their checkpointed state.

    Subclasses give :meth:`scores` (higher = keep). ``warmup_steps``/``final_steps`` are steps, or a
    fraction of the run when a float in (0, 1); None means 10 % and 20 % of the run.
    """

    name = "gradual"
    compares: ClassVar[tuple[str, ...]] = COMPARES

    def __init__(self, sparsity: float, initial_sparsity: float = 0.0, warmup_steps: int | float | None = None,
                 final_steps: int | float | None = None, update_every: int = 10, compare: str = "global") -> None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise PrunekitError(f"--sparsity {sparsity} is outside [0, 1): give a fraction such as 0.9")
        if compare not in self.compares:
            raise PrunekitError(f"{self.name} compares scores {' or '.join(self.compares)}, not '{compare}'")
        self.target = float(sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.warmup_setting = warmup_steps
        self.final_setting = final_steps
        self.update_every = int(update_every)
        self.compare = compare
        self.layers: dict[str, nn.Module] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.schedule: CubicSchedule | None = None
        self.current_sparsity = 0.0
        self.updates = 0

    # ---- setup and settings --------------------------------------------------------------
    def setup(self, model: nn.Module, *, total_steps: int, n_train: int) -> nn.Module:
        self.schedule = CubicSchedule(
            total_steps=int(total_steps), final_sparsity=self.target, initial_sparsity=self.initial_sparsity,
            warmup_steps=resolve_steps(self.warmup_setting, total_steps, 0.1),
            final_steps=resolve_steps(self.final_setting, total_steps, 0.2), update_every=self.update_every)
        self.layers = get_adapter(model).prunable_layers()
        if not self.layers:
            raise PrunekitError(f"{self.name}: the model has no prunable linear layers in its blocks")
        self.masks = {name: torch.ones_like(weight_view(layer), dtype=torch.bool)
                      for name, layer in self.layers.items()}
        self.n_train = int(n_train)
        return model

    def settings(self) -> dict[str, Any]:
        """The method's own settings, for the prunekit record."""
        return {"sparsity": self.target, "initial_sparsity": self.initial_sparsity, "update_every": self.update_every,
                "compare": self.compare}

    # ---- scores and masks ----------------------------------------------------------------
    def scores(self) -> dict[str, torch.Tensor]:
        """Importance per prunable weight, shaped like weight_view; the lowest are pruned."""
        raise NotImplementedError

    def update_masks(self, sparsity: float) -> None:
        """Recompute every mask at ``sparsity`` from :meth:`scores` (globally or per layer)."""
        scores = self.scores()
        if self.compare == "global":
            new = global_masks(scores, sparsity)
        else:
            new = {name: layer_mask(score, sparsity) for name, score in scores.items()}
        for name, mask in new.items():
            mask = mask.to(weight_view(self.layers[name]).device)
            self.on_mask_change(name, self.masks[name], mask)
            self.masks[name] = mask
        self.current_sparsity = sparsity
        self.updates += 1

    def on_mask_change(self, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
        """Called before a layer's mask is replaced (movement keeps pruned values aside here)."""
        return None

    def mask_on(self, name: str, device: torch.device) -> torch.Tensor:
        """The layer's mask, moved (once) to ``device`` when the trainer moved the model."""
        if self.masks[name].device != device:
            self.masks[name] = self.masks[name].to(device)
        return self.masks[name]

    def apply_masks(self) -> None:
        """Zero every pruned weight in place."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                weight = weight_view(layer)
                weight.mul_(self.mask_on(name, weight.device).to(dtype=weight.dtype))

    def zero_pruned_grads(self) -> None:
        """Pruned weights get no gradient (so only Adam's old momentum could move them; after_step undoes that)."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                grad = grad_view(layer)
                if grad is not None:
                    grad.mul_(self.mask_on(name, grad.device).to(dtype=grad.dtype))

    # ---- hooks ---------------------------------------------------------------------------
    def after_backward(self, model: nn.Module, step: int) -> None:
        self.zero_pruned_grads()

    def after_step(self, model: nn.Module, step: int) -> None:
        """``step`` is the 0-based index of the step just taken, so ``step + 1`` steps are done."""
        assert self.schedule is not None, "setup() was not called"
        done = step + 1
        if self.schedule.is_update(done):
            self.update_masks(self.schedule.sparsity(done))
        self.apply_masks()

    def finalize(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        assert self.schedule is not None, "setup() was not called"
        self.apply_masks()
        report = layer_report(self.layers)
        total = sum(int(entry["params"]) for entry in report.values())  # type: ignore[call-overload]
        nonzero = sum(int(entry["nonzero"]) for entry in report.values())  # type: ignore[call-overload]
        facts = {"method": self.name, "method_settings": self.settings(), "schedule": self.schedule.describe(),
                 "target_sparsity": self.target, "sparsity": 1.0 - nonzero / max(1, total),
                 "mask_updates": self.updates, "layers": report}
        return model, facts

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()},
                "current_sparsity": self.current_sparsity, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mask in state["masks"].items():
            if name not in self.masks:
                raise PrunekitError(f"the checkpoint has a mask for '{name}', which this model lacks: "
                                    "resume with the same model and settings")
            self.masks[name] = mask.to(self.masks[name].device)
        self.current_sparsity = float(state["current_sparsity"])
        self.updates = int(state["updates"])


class GMP(GradualPruning):
    """Gradual magnitude pruning (Zhu & Gupta 2017): keep the largest |θ|, globally or per layer."""

    name = "gmp"

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: weight_view(layer).abs() for name, layer in self.layers.items()}


class Movement(GradualPruning):
    """Movement pruning (Sanh et al. 2020): S = −Σ θ·∂L/∂θ over steps; weights moving away from zero stay."""

    name = "movement"

    def setup(self, model: nn.Module, *, total_steps: int, n_train: int) -> nn.Module:
        model = super().setup(model, total_steps=total_steps, n_train=n_train)
        self.importance = {name: torch.zeros_like(weight_view(layer), dtype=torch.float32)
                           for name, layer in self.layers.items()}
        self.kept_aside = {name: torch.zeros_like(weight_view(layer)) for name, layer in self.layers.items()}
        return model

    def after_backward(self, model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                grad = grad_view(layer)
                if grad is None:
                    continue
                mask = self.mask_on(name, grad.device)
                if self.importance[name].device != grad.device:
                    self.importance[name] = self.importance[name].to(grad.device)
                    self.kept_aside[name] = self.kept_aside[name].to(grad.device)
                # a pruned weight's score moves with the value it had when pruned (straight-through)
                theta = torch.where(mask, weight_view(layer), self.kept_aside[name])
                self.importance[name].sub_((theta * grad).float())
        super().after_backward(model, step)

    def on_mask_change(self, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
        weight = weight_view(self.layers[name])
        old = old.to(weight.device)
        self.kept_aside[name] = self.kept_aside[name].to(weight.device)
        with torch.no_grad():
            newly_pruned = old & ~new
            self.kept_aside[name] = torch.where(newly_pruned, weight, self.kept_aside[name])
            revived = ~old & new
            weight.copy_(torch.where(revived, self.kept_aside[name], weight))

    def scores(self) -> dict[str, torch.Tensor]:
        return dict(self.importance)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["importance"] = {name: value.cpu() for name, value in self.importance.items()}
        state["kept_aside"] = {name: value.cpu() for name, value in self.kept_aside.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("importance", "kept_aside"):
            target = getattr(self, key)
            for name, value in state[key].items():
                target[name] = value.to(target[name].device)


def prior_gradient(theta: torch.Tensor, prior_lambda: float, sigma0: float, sigma1: float, n: int) -> torch.Tensor:
    """Gradient of −log π(θ)/n for π = λ·N(0, σ1) + (1 − λ)·N(0, σ0), σ0 and σ1 VARIANCES (mgpp spec).

    (1/n)·θ·[q/σ0 + (1 − q)/σ1] with q = 1/(1 + exp(c1 + c2·θ²)) the spike's posterior weight,
    c1 = log λ − log(1 − λ) + ½ log σ0 − ½ log σ1 and c2 = 1/(2σ0) − 1/(2σ1).
    """
    c1 = math.log(prior_lambda) - math.log1p(-prior_lambda) + 0.5 * math.log(sigma0) - 0.5 * math.log(sigma1)
    c2 = 0.5 / sigma0 - 0.5 / sigma1
    work = theta.float() if theta.dtype in (torch.float16, torch.bfloat16) else theta
    spike = torch.sigmoid(-(c1 + c2 * work * work))  # = 1/(1 + exp(c1 + c2 θ²)), without overflow
    return (work * (spike / sigma0 + (1.0 - spike) / sigma1) / n).to(theta.dtype)


class MGPP(GradualPruning):
    """Magnitude pruning under a mixture Gaussian prior: prior gradient + ONE global magnitude threshold.

    ``sigma0``/``sigma1`` are the spike and slab VARIANCES; λ is annealed from ``prior_lambda`` to
    ``prior_lambda·alpha_final`` over the pruning phase; n is the training-set size.
    """

    name = "mgpp"
    compares = ("global",)

    def __init__(self, sparsity: float, initial_sparsity: float = 0.0, warmup_steps: int | float | None = None,
                 final_steps: int | float | None = None, update_every: int = 10, compare: str = "global",
                 sigma0: float = 1e-10, sigma1: float = 0.05, prior_lambda: float = 0.1, alpha_initial: float = 1.0,
                 alpha_final: float = 0.001) -> None:
        super().__init__(sparsity, initial_sparsity, warmup_steps, final_steps, update_every, compare)
        if not (0 < sigma0 < sigma1):
            raise PrunekitError(f"--sigma0 {sigma0} and --sigma1 {sigma1} must be variances with 0 < sigma0 < sigma1 "
                                "(e.g. 1e-10 and 0.05)")
        if not 0 < prior_lambda < 1:
            raise PrunekitError(f"--prior-lambda {prior_lambda} must lie in (0, 1), e.g. 0.1")
        if not (0 < alpha_final <= alpha_initial <= 1 / prior_lambda):
            raise PrunekitError("the λ annealing factors need 0 < alpha_final <= alpha_initial (e.g. 0.001 and 1)")
        self.sigma0, self.sigma1 = float(sigma0), float(sigma1)
        self.prior_lambda = float(prior_lambda)
        self.alpha_initial, self.alpha_final = float(alpha_initial), float(alpha_final)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "sigma0": self.sigma0, "sigma1": self.sigma1, "prior_lambda": self.prior_lambda,
                "alpha_initial": self.alpha_initial, "alpha_final": self.alpha_final,
                "n_train": getattr(self, "n_train", None)}

    def lambda_at(self, step: int) -> float:
        """λ_t = λ·[α_f + (α_i − α_f)(1 − progress)], progress through the pruning phase in [0, 1]."""
        assert self.schedule is not None, "setup() was not called"
        progress = self.schedule.progress(step)
        return self.prior_lambda * (self.alpha_final + (self.alpha_initial - self.alpha_final) * (1.0 - progress))

    def after_backward(self, model: nn.Module, step: int) -> None:
        prior_lambda = self.lambda_at(step)
        n = max(1, self.n_train)
        with torch.no_grad():
            for layer in self.layers.values():
                grad = grad_view(layer)
                if grad is not None:
                    grad.add_(prior_gradient(weight_view(layer), prior_lambda, self.sigma0, self.sigma1, n))
        super().after_backward(model, step)

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: weight_view(layer).abs() for name, layer in self.layers.items()}


class DenseTraining(TrainingMethod):
    """No pruning: plain fine-tuning (the dense baseline)."""

    name = "none"


TRAINING_METHODS: dict[str, type[TrainingMethod]] = {
    "none": DenseTraining, "gmp": GMP, "movement": Movement, "mgpp": MGPP}

# modules that register more training methods into TRAINING_METHODS when imported
PLUGIN_MODULES = ("prunekit.methods.flop",)


def _import_plugins() -> None:
    import_optional(PLUGIN_MODULES)


def available_methods() -> list[str]:
    """Names of the training-aware methods (plugins included)."""
    _import_plugins()
    return sorted(TRAINING_METHODS)


def build_training_method(name: str, settings: dict[str, Any]) -> TrainingMethod:
    """Instantiate a registered method, passing the settings its constructor names (others are ignored)."""
    _import_plugins()
    if name not in TRAINING_METHODS:
        raise PrunekitError(f"unknown training method '{name}': use one of {', '.join(sorted(TRAINING_METHODS))}")
    cls = TRAINING_METHODS[name]
    if cls.__init__ is object.__init__:
        return cls()
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {key: value for key, value in settings.items()
              if value is not None and (accepts_any or (key in params and key != "self"))}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise PrunekitError(f"method '{name}' cannot be built from these settings ({exc}): see prunekit train --help") \
            from exc
