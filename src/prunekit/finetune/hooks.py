"""The contract between prunekit's trainer and training-aware pruning methods (gmp, movement, mgpp, flop).

The trainer (prunekit.finetune) owns the loop, data, optimiser, checkpoints and evaluation; a method
only says what happens around each step. Methods know nothing of the task or the model family: they
get the prunable layers from prunekit.adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TrainingMethod:
    """Hooks called by the trainer, in this order each step:

    ``extra_loss`` (added to the task loss before backward) -> backward -> ``after_backward``
    (gradients present, before the optimiser step) -> optimiser step -> ``after_step``.
    ``setup`` runs once before training (it may replace layers and returns the model to train);
    ``finalize`` once after (it returns the exportable model and facts for the prunekit record).
    ``state_dict``/``load_state_dict`` make a run resumable from a checkpoint.
    """

    name = "none"

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
