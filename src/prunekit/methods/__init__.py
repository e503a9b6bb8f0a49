"""Pruning methods: one registry for every kind (one-shot, structured, training-aware).

Each method lives in one module that declares its config dataclass and registers itself with
:func:`prunekit.methods.registry.register`; adding a method is that module plus one line in
:data:`BUILTIN_MODULES` (or an import of your own module before use). See docs/adding-a-method.md.

    from prunekit.methods import get_method, method_config
    config = method_config("wanda", sparsity=0.5)          # a frozen WandaConfig, validated
    get_method("gmp").kind                                   # "training"
"""

from __future__ import annotations

import importlib
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.methods.registry import KINDS, MethodConfig, MethodSpec, register, registered, setting

# the modules of the built-in methods, imported (and so registered) on first use of the registry
BUILTIN_MODULES = ("prunekit.methods.magnitude", "prunekit.methods.random_method", "prunekit.methods.wanda",
                   "prunekit.methods.sparsegpt", "prunekit.methods.ria", "prunekit.methods.structured",
                   "prunekit.methods.gradual", "prunekit.methods.flop")


def _load_builtin() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def available_methods(kind: str | None = None) -> list[MethodSpec]:
    """Every registered method (of one kind, if given), built-in ones first."""
    _load_builtin()
    if kind is not None and kind not in KINDS:
        raise PrunekitError(f"unknown method kind '{kind}': use one of {', '.join(KINDS)}")
    order = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    specs = [spec for spec in registered().values() if kind is None or spec.kind == kind]
    position = {spec.name: i for i, spec in enumerate(specs)}  # registration order breaks ties
    return sorted(specs, key=lambda spec: (KINDS.index(spec.kind),
                                           order.get(getattr(spec.implementation, "__module__", ""), len(order)),
                                           position[spec.name]))


def get_method(name: str, kinds: tuple[str, ...] = KINDS) -> MethodSpec:
    """The method ``name``, or a one-line error listing the methods of the kinds wanted."""
    _load_builtin()
    spec = registered().get(name)
    if spec is None:
        known = ", ".join(s.name for s in available_methods() if s.kind in kinds)
        raise PrunekitError(f"unknown method '{name}': use one of {known}")
    if spec.kind not in kinds:
        where = "prunekit train" if spec.kind == "training" else "prunekit prune"
        raise PrunekitError(f"{name} is a {spec.kind} method: run it with {where}")
    return spec


def method_config(name: str, **settings: Any) -> MethodConfig:
    """The validated config of method ``name`` from keyword settings, e.g. ``method_config("wanda", sparsity=0.5)``."""
    return get_method(name).make_config(settings)


def config_for(value: MethodConfig | dict[str, Any], kinds: tuple[str, ...] = KINDS) -> tuple[MethodSpec,
                                                                                             MethodConfig]:
    """(spec, config) from a config object or a dict with a ``method`` key (e.g. YAML, the README's example)."""
    if isinstance(value, MethodConfig):
        if not type(value).method:
            raise PrunekitError(f"{type(value).__name__} belongs to no registered method: register it first")
        spec = get_method(type(value).method, kinds)
        return spec, spec.make_config(value)
    if not isinstance(value, dict):
        raise PrunekitError(f"a method config must be a MethodConfig or a dict with a 'method' key, not "
                            f"{type(value).__name__}")
    settings = dict(value)
    name = settings.pop("method", None)
    if not name:
        raise PrunekitError("the settings name no method: add 'method' (e.g. {'method': 'wanda', 'sparsity': 0.5})")
    spec = get_method(str(name), kinds)
    return spec, spec.make_config(settings)


__all__ = ["KINDS", "MethodConfig", "MethodSpec", "available_methods", "config_for", "get_method", "method_config",
           "register", "setting"]
