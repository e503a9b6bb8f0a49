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

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.adapters import get_adapter, grad_view, weight_view
from prunekit.errors import PrunekitError
from prunekit.masks import KeptMasks, global_masks, layer_mask, layer_report, total_sparsity
from prunekit.methods.base import TrainingMethod
from prunekit.methods.registry import MethodConfig, register, setting
from prunekit.methods.schedule import CubicSchedule, resolve_steps, steps_setting

COMPARES = ("global", "layer")


@dataclass(frozen=True)
class GradualConfig(MethodConfig):
    """Settings of the cubic schedule shared by gmp, movement and mgpp."""

    sparsity: float = setting(0.9, "final sparsity s_f of the block weights, in [0, 1)")
    initial_sparsity: float = setting(0.0, "s_i, the sparsity when pruning starts")
    warmup_steps: int | float | None = setting(None, "t_i: steps before pruning starts, or a fraction of the run "
                                                     "if < 1 (default 0.1)")
    final_steps: int | float | None = setting(None, "t_f: last steps with the mask frozen, or a fraction of the run "
                                                    "if < 1 (default 0.2)")
    update_every: int = setting(10, "steps between mask updates")
    compare: str = setting("global", "one threshold over all layers (global) or one per layer", choices=COMPARES)

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.sparsity < 1.0:
            raise PrunekitError(f"--sparsity {self.sparsity} is outside [0, 1): give a fraction such as 0.9")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise PrunekitError(f"--initial-sparsity {self.initial_sparsity} must lie in [0, sparsity]")
        if self.update_every < 1:
            raise PrunekitError(f"--update-every {self.update_every} must be at least 1")
        for name in ("warmup_steps", "final_steps"):
            object.__setattr__(self, name, steps_setting(getattr(self, name), f"--{name.replace('_', '-')}"))


@dataclass(frozen=True)
class GMPConfig(GradualConfig):
    """Gradual magnitude pruning."""


@dataclass(frozen=True)
class MovementConfig(GradualConfig):
    """Movement pruning."""


@dataclass(frozen=True)
class MGPPConfig(GradualConfig):
    """MGPP: the schedule, one global threshold, and the spike-and-slab prior (VARIANCES sigma0 < sigma1)."""

    compare: str = setting("global", "mgpp compares all layers with one threshold", choices=("global",))
    sigma0: float = setting(1e-10, "spike VARIANCE σ0²")
    sigma1: float = setting(0.05, "slab VARIANCE σ1²")
    prior_lambda: float = setting(0.1, "slab weight λ, annealed over the pruning phase")
    alpha_initial: float = setting(1.0, "λ annealing factor at the start of pruning", cli=False)
    alpha_final: float = setting(0.001, "λ annealing factor at the end of pruning", cli=False)

    def check(self) -> None:
        super().check()
        if not (0 < self.sigma0 < self.sigma1):
            raise PrunekitError(f"--sigma0 {self.sigma0} and --sigma1 {self.sigma1} must be variances with "
                                "0 < sigma0 < sigma1 (e.g. 1e-10 and 0.05)")
        if not 0 < self.prior_lambda < 1:
            raise PrunekitError(f"--prior-lambda {self.prior_lambda} must lie in (0, 1), e.g. 0.1")
        if not (0 < self.alpha_final <= self.alpha_initial <= 1 / self.prior_lambda):
            raise PrunekitError("the λ annealing factors need 0 < alpha_final <= alpha_initial (e.g. 0.001 and 1)")


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """Plain fine-tuning takes no pruning settings."""


class GradualPruning(TrainingMethod):
    """Shared machinery: the schedule, the masks, their enforcement and their checkpointed state.

    Subclasses give :meth:`scores` (higher = keep). ``warmup_steps``/``final_steps`` are steps, or a
    fraction of the run when a float in (0, 1); None means 10 % and 20 % of the run.
    """

    name = "gradual"

    config_class: ClassVar[type[GradualConfig]] = GradualConfig

    def __init__(self, sparsity: float = 0.9, **settings: Any) -> None:
        """``sparsity`` and the other fields of :attr:`config_class` (validated there)."""
        config = self.config_class(sparsity=sparsity, **settings)
        self.config = config
        self.target = config.sparsity
        self.initial_sparsity = config.initial_sparsity
        self.warmup_setting = config.warmup_steps
        self.final_setting = config.final_steps
        self.update_every = config.update_every
        self.compare = config.compare
        self.layers: dict[str, nn.Module] = {}
        self.kept = KeptMasks({}, {})
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
        self.kept = KeptMasks.all_kept(self.layers)
        self.n_train = int(n_train)
        return model

    def settings(self) -> dict[str, Any]:
        """The method's resolved settings, for the prunekit record."""
        return self.config.to_dict()

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

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current keep-mask of every prunable layer (held and enforced by :attr:`kept`)."""
        return self.kept.masks

    def mask_on(self, name: str, device: torch.device) -> torch.Tensor:
        """The layer's mask, moved (once) to ``device`` when the trainer moved the model."""
        return self.kept.on(name, device)

    def apply_masks(self) -> None:
        """Zero every pruned weight in place."""
        self.kept.apply()

    def zero_pruned_grads(self) -> None:
        """Pruned weights get no gradient (so only Adam's old momentum could move them; after_step undoes that)."""
        self.kept.zero_grads()

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
        facts = {"method": self.name, "method_settings": self.settings(), "schedule": self.schedule.describe(),
                 "target_sparsity": self.target, "sparsity": total_sparsity(report),
                 "mask_updates": self.updates, "layers": report}
        return model, facts

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.kept.state_dict(), "current_sparsity": self.current_sparsity, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept.load_state_dict(state["masks"])
        self.current_sparsity = float(state["current_sparsity"])
        self.updates = int(state["updates"])


@register("gmp", kind="training", config=GMPConfig,
          description="gradual magnitude pruning (Zhu & Gupta 2017) on a cubic schedule, global or per layer")
class GMP(GradualPruning):
    """Gradual magnitude pruning (Zhu & Gupta 2017): keep the largest |θ|, globally or per layer."""

    name = "gmp"
    config_class = GMPConfig

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: weight_view(layer).abs() for name, layer in self.layers.items()}


@register("movement", kind="training", config=MovementConfig,
          description="movement pruning (Sanh et al. 2020): keep the weights moving away from zero")
class Movement(GradualPruning):
    """Movement pruning (Sanh et al. 2020): S = −Σ θ·∂L/∂θ over steps; weights moving away from zero stay."""

    name = "movement"
    config_class = MovementConfig

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


@register("mgpp", kind="training", config=MGPPConfig,
          description="magnitude pruning under a mixture Gaussian (spike-and-slab) prior, one global threshold")
class MGPP(GradualPruning):
    """Magnitude pruning under a mixture Gaussian prior: prior gradient + ONE global magnitude threshold.

    ``sigma0``/``sigma1`` are the spike and slab VARIANCES; λ is annealed from ``prior_lambda`` to
    ``prior_lambda·alpha_final`` over the pruning phase; n is the training-set size.
    """

    name = "mgpp"
    config_class = MGPPConfig

    def __init__(self, sparsity: float = 0.9, **settings: Any) -> None:
        super().__init__(sparsity, **settings)
        config = self.config
        assert isinstance(config, MGPPConfig)
        self.sigma0, self.sigma1 = config.sigma0, config.sigma1
        self.prior_lambda = config.prior_lambda
        self.alpha_initial, self.alpha_final = config.alpha_initial, config.alpha_final

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "n_train": getattr(self, "n_train", None)}

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


@register("none", kind="training", config=DenseConfig, description="no pruning: plain fine-tuning (the dense "
                                                                     "baseline)")
class DenseTraining(TrainingMethod):
    """No pruning: plain fine-tuning (the dense baseline)."""

    name = "none"

    def __init__(self) -> None:
        self.config = DenseConfig()


def available_methods() -> list[str]:
    """Names of the training-aware methods."""
    from prunekit.methods import available_methods as every

    return sorted(spec.name for spec in every("training"))


def build_training_method(name: str, settings: dict[str, Any] | None = None, **context: Any) -> TrainingMethod:
    """A training method from its name and settings (a setting it does not take is an error).

    ``context`` gives values of the run that a method may ask for by name (``seed``, the trainer's ``lr``).
    """
    from prunekit.methods import get_method

    spec = get_method(name, ("training",))
    method: TrainingMethod = spec.build(spec.make_config(settings or {}), **context)
    return method
