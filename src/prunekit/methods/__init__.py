"""Pruning methods and their registry: registering a method is one call.

Two kinds of method:

- *layer-wise* (magnitude, random, wanda, sparsegpt): a :class:`~prunekit.methods.base.LayerwiseMethod`
  subclass; the shared engine feeds it calibration inputs and asks it to prune each layer.
  ``register_method(MyMethod)`` (usable as a class decorator).
- *whole-model* (e.g. structured removal of heads, neurons or blocks): a function
  ``fn(model, config, calibration, device, progress) -> dict`` that changes the model in place and
  returns facts for the record. ``register_whole_model_method(name, fn, description, needs_calibration)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prunekit.errors import PrunekitError
from prunekit.methods.base import LayerwiseMethod
from prunekit.methods.magnitude import MagnitudeMethod
from prunekit.methods.random_method import RandomMethod
from prunekit.methods.sparsegpt import SparseGPTMethod
from prunekit.methods.wanda import WandaMethod
from prunekit.utils import import_optional

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunekit.pruning import PruneConfig

WholeModelFn = Callable[["nn.Module", "PruneConfig", "torch.Tensor | None", "torch.device", bool], dict[str, Any]]

# modules that register more methods when imported (absent ones are skipped)
PLUGIN_MODULES = ("prunekit.methods.structured",)


@dataclass(frozen=True)
class MethodInfo:
    """One registered method: its kind, what it needs and which PruneConfig settings it reads."""

    name: str
    kind: str  # "layer-wise" or "whole-model"
    description: str
    needs_calibration: bool
    settings: tuple[str, ...]
    layerwise: type[LayerwiseMethod] | None = None
    fn: WholeModelFn | None = None
    calibration_rule: Callable[[Any], bool] | None = None  # decides needs_calibration per config when given


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(cls: type[LayerwiseMethod]) -> type[LayerwiseMethod]:
    """Register a layer-wise method class under ``cls.name`` (later registrations win)."""
    _REGISTRY[cls.name] = MethodInfo(cls.name, "layer-wise", cls.description, cls.needs_calibration,
                                     tuple(cls.settings), layerwise=cls)
    return cls


def register_whole_model_method(name: str, fn: WholeModelFn, description: str, needs_calibration: bool,
                                settings: tuple[str, ...] = ("ratio", "remove", "importance"),
                                calibration_rule: Callable[[Any], bool] | None = None) -> None:
    """Register a function that prunes a whole model in place: ``fn(model, config, calibration, device, progress)``.

    ``calibration_rule(config)``, when given, says whether this config needs calibration data (e.g. not
    for magnitude importance); ``needs_calibration`` is what listings show.
    """
    _REGISTRY[name] = MethodInfo(name, "whole-model", description, needs_calibration, tuple(settings), fn=fn,
                                 calibration_rule=calibration_rule)


def _load_plugins() -> None:
    import_optional(PLUGIN_MODULES)


def available_methods() -> list[MethodInfo]:
    """Every registered method, in registration order."""
    _load_plugins()
    return list(_REGISTRY.values())


def get_method(name: str) -> MethodInfo:
    """The registered method ``name``, or a PrunekitError that lists the known ones."""
    _load_plugins()
    if name not in _REGISTRY:
        raise PrunekitError(f"unknown method '{name}': use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


for _cls in (MagnitudeMethod, RandomMethod, WandaMethod, SparseGPTMethod):
    register_method(_cls)

__all__ = ["LayerwiseMethod", "MagnitudeMethod", "MethodInfo", "RandomMethod", "SparseGPTMethod", "WandaMethod",
           "available_methods", "get_method", "register_method", "register_whole_model_method"]
