"""Fine-tuning on the transformers Trainer, with hooks for training-aware pruning methods.

    result = train_model(model, tokenizer, data, method=build_training_method("mgpp", {"sparsity": 0.9}),
                         config=TrainConfig(epochs=2), checkpoint_dir="run.ckpt")
    result = recover(pruned, tokenizer, load_data("austen"), lora=LoraSettings(rank=8), checkpoint_dir="rec.ckpt")

Names are imported lazily, so that ``prunekit.finetune.hooks`` can be imported without the Trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainingMethod": "prunekit.finetune.hooks",
    "TrainConfig": "prunekit.finetune.trainer",
    "TrainResult": "prunekit.finetune.trainer",
    "PrunekitTrainer": "prunekit.finetune.trainer",
    "MethodCallback": "prunekit.finetune.trainer",
    "train_model": "prunekit.finetune.trainer",
    "distillation_loss": "prunekit.finetune.trainer",
    "recover": "prunekit.finetune.recovery",
    "KeepMasks": "prunekit.finetune.recovery",
    "LoraSettings": "prunekit.finetune.recovery",
    "LoraMerge": "prunekit.finetune.recovery",
    "merge_lora": "prunekit.finetune.recovery",
    "masks_from_weights": "prunekit.finetune.recovery",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunekit.finetune' has no attribute '{name}'")
