"""Recovery fine-tuning of an already pruned model, with every zero kept.

* full fine-tuning: the masks are read from the loaded weights (zero = pruned), the gradients of
  pruned weights are zeroed before each optimiser step and the mask is re-applied after it;
* LoRA (peft) on the prunable layers: the base weights are frozen, the adapters are merged back
  after training and the merged weights are re-masked, so sparsity is unchanged;
* optional distillation from the dense model (KL on temperature-softened logits), mixed with the
  task loss (see :class:`prunekit.finetune.trainer.TrainConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.adapters import get_adapter, model_head, weight_view
from prunekit.errors import PrunekitError
from prunekit.finetune.hooks import TrainingMethod
from prunekit.finetune.trainer import TrainConfig, TrainResult, train_model
from prunekit.masks import KeptMasks, layer_report, total_sparsity


def masks_from_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of the prunable layers as the weights are now (True where nonzero)."""
    return KeptMasks.from_weights(get_adapter(model).prunable_layers()).masks


def sparsity_facts(model: nn.Module) -> dict[str, Any]:
    """Prunable-weight sparsity and the per-layer report, counted from the weights."""
    report = layer_report(get_adapter(model).prunable_layers())
    return {"sparsity": total_sparsity(report), "layers": report}


class KeepMasks(TrainingMethod):
    """Fine-tune with fixed masks read from the weights at setup: no gradient to, and no revival of, a zero."""

    name = "keep-masks"

    def __init__(self) -> None:
        self.kept = KeptMasks({}, {})

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The keep-mask of every prunable layer, read from its weights at setup."""
        return self.kept.masks

    def setup(self, model: nn.Module, *, total_steps: int, n_train: int) -> nn.Module:
        self.kept = KeptMasks.from_weights(get_adapter(model).prunable_layers())
        return model

    def after_backward(self, model: nn.Module, step: int) -> None:
        self.kept.zero_grads()

    def after_step(self, model: nn.Module, step: int) -> None:
        self.kept.apply()

    def finalize(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        self.kept.apply()
        return model, {"method": self.name, **sparsity_facts(model)}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.kept.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept.load_state_dict(state["masks"])


@dataclass
class LoraSettings:
    """LoRA on the prunable layers: rank r, scale alpha/r, dropout."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0


def check_lora_rank(model: nn.Module, rank: int) -> None:
    """Refuse a rank below 1 or above the smallest side of a target layer."""
    if rank < 1:
        raise PrunekitError(f"--lora-rank {rank} must be at least 1")
    for name, layer in get_adapter(model).prunable_layers().items():
        out_features, in_features = weight_view(layer).shape
        if rank > min(out_features, in_features):
            raise PrunekitError(f"--lora-rank {rank} is larger than layer {name} ({out_features}x{in_features}) "
                                f"allows: use at most {min(out_features, in_features)}")


class LoraMerge(TrainingMethod):
    """Wrap the prunable layers in LoRA adapters at setup; merge them and re-mask at finalize."""

    name = "lora"

    def __init__(self, settings: LoraSettings) -> None:
        self.settings = settings
        self.masks: dict[str, torch.Tensor] = {}
        self.trainable = 0

    def setup(self, model: nn.Module, *, total_steps: int, n_train: int) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        check_lora_rank(model, self.settings.rank)
        self.masks = masks_from_weights(model)
        task_type = "SEQ_CLS" if model_head(model) == "classification" else "CAUSAL_LM"
        config = LoraConfig(r=self.settings.rank, lora_alpha=self.settings.alpha,
                            lora_dropout=self.settings.dropout,
                            target_modules=list(self.masks), task_type=task_type, bias="none")
        wrapped = get_peft_model(model, config)
        self.trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        return wrapped

    def finalize(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        merged = merge_lora(model, self.masks)
        return merged, {"method": "lora", "lora": vars(self.settings), "lora_trainable_params": self.trainable,
                        **sparsity_facts(merged)}


def merge_lora(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Merge a peft LoRA model into plain weights and zero every weight that was pruned before."""
    merge: Any = getattr(model, "merge_and_unload", None)
    merged: nn.Module = merge() if merge is not None else model
    KeptMasks(get_adapter(merged).prunable_layers(), masks).apply()
    return merged


def recover(model: nn.Module, tokenizer: Any, data: Any, *, config: TrainConfig | None = None,
            lora: LoraSettings | None = None, teacher: nn.Module | None = None,
            checkpoint_dir: str | Path, resume: bool = False) -> TrainResult:
    """Fine-tune a pruned model keeping its zeros: full (masks enforced) or LoRA (merged, re-masked)."""
    method: TrainingMethod = LoraMerge(lora) if lora is not None else KeepMasks()
    before = sparsity_facts(model)["sparsity"]
    result = train_model(model, tokenizer, data, method=method, config=config, checkpoint_dir=checkpoint_dir,
                         resume=resume, teacher=teacher)
    result.extra["sparsity_before"] = before
    return result
