"""One registry for every pruning method: one-shot, structured and training-aware.

A method is an implementation (a class, or a function for structured methods) plus a frozen
dataclass of exactly the settings it takes. Each setting is declared once, with its default, help
text and allowed values (:func:`setting`); the command line flags, YAML keys, ``--print-config``
and ``prunekit methods`` are generated from these declarations. Registering is one call::

    @dataclass(frozen=True)
    class MyConfig(SparsityConfig):
        power: float = setting(1.0, "exponent of |W|")

    @register("my-method", kind="one-shot", config=MyConfig, description="score |W|^power")
    class MyMethod(LayerwiseMethod): ...

This module imports nothing of prunekit but its errors, so every layer can import it.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from prunekit.errors import PrunekitError

KINDS = ("one-shot", "structured", "training")
T = TypeVar("T")


def setting(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, cli: bool = True) -> Any:
    """Declare one setting of a method config: default, one-line help, allowed values.

    ``cli=False`` keeps a rarely used setting off the flags (YAML and ``--method-arg KEY=VALUE`` still set it).
    """
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclass(frozen=True)
class SettingInfo:
    """What ``prunekit methods``, the flags and the docs know of one setting."""

    name: str
    type: Any  # the resolved annotation, e.g. float | None
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    cli: bool

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's settings: frozen, type-checked, validated when built.

    Subclasses declare fields with :func:`setting` and may override :meth:`check` (settings that do
    not fit together), :meth:`ready` (what a run needs, e.g. a sparsity) and :meth:`needs_calibration`.
    ``renamed`` maps an old or other method's setting name to this config's word for it (for errors).
    """

    method: ClassVar[str] = ""  # set by :func:`register`
    renamed: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for item in dataclasses.fields(self):
            value = _coerce(self.method or type(self).__name__, item.name, getattr(self, item.name),
                            hints[item.name])
            choices = item.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise PrunekitError(f"{self.method or type(self).__name__}: unknown {item.name} '{value}': use "
                                    f"one of {', '.join(map(str, choices))}")
            object.__setattr__(self, item.name, value)
        self.check()

    def check(self) -> None:
        """Refuse settings that do not fit together (one-line PrunekitError)."""

    def ready(self) -> None:
        """Refuse a config that cannot run as it is (e.g. no sparsity given); called before any model work."""

    def needs_calibration(self) -> bool:
        """Whether this configuration reads calibration activations."""
        return False

    @classmethod
    def settings(cls) -> list[SettingInfo]:
        """Every setting of this config, in declaration order."""
        hints = _hints(cls)
        return [SettingInfo(f.name, hints[f.name], f.default, f.metadata.get("help", ""), f.metadata.get("choices"),
                            f.metadata.get("cli", True)) for f in dataclasses.fields(cls)]

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build from YAML / flags / a user's dict: a setting this method does not take is an error."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        values.pop("method", None)
        known = cls.names()
        unknown = [key for key in values if key not in known]
        if unknown:
            name = cls.method or cls.__name__
            named = ", ".join(f"{key} (use {cls.renamed[key]})" if key in cls.renamed else key for key in unknown)
            takes = ", ".join(known) if known else "no settings"
            raise PrunekitError(f"method {name} does not take {named}; it takes {takes} (see prunekit methods)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


C = TypeVar("C", bound=MethodConfig)


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: name, kind, settings and implementation."""

    name: str
    kind: str  # one of KINDS
    config: type[MethodConfig]
    implementation: Any  # LayerwiseMethod subclass, structured function, or TrainingMethod subclass
    description: str

    def make_config(self, values: Mapping[str, Any] | MethodConfig | None = None) -> MethodConfig:
        """This method's config from a dict of settings (or the config itself)."""
        if isinstance(values, MethodConfig):
            if not isinstance(values, self.config):
                raise PrunekitError(f"method {self.name} takes a {self.config.__name__}, not a "
                                    f"{type(values).__name__}")
            return values
        return self.config.from_dict(values or {})

    def build(self, config: MethodConfig, **context: Any) -> Any:
        """Instantiate a training method: its config's settings, plus the context values it asks for by name
        (e.g. ``seed``, the trainer's ``lr``) that are not settings of its own."""
        if self.kind != "training":
            raise PrunekitError(f"{self.name} is a {self.kind} method: prune with prunekit.prune, not a trainer")
        params = inspect.signature(self.implementation.__init__).parameters
        extra = {k: v for k, v in context.items() if k in params and k not in config.names() and v is not None}
        return self.implementation(**config.to_dict(), **extra)


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, kind: str, config: type[MethodConfig], description: str) -> Callable[[T], T]:
    """Register ``implementation`` under ``name`` (a decorator); a second, different method of that name is refused."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not (dataclasses.is_dataclass(config) and issubclass(config, MethodConfig)):
        raise TypeError(f"config of {name} must be a frozen dataclass subclassing MethodConfig")

    def decorate(implementation: T) -> T:
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.implementation) != _qualname(implementation):
            raise PrunekitError(f"a method named '{name}' is already registered ({_qualname(old.implementation)}): "
                                "choose another name")
        owner = config.__dict__.get("method")
        if owner and owner != name:
            raise TypeError(f"{config.__name__} already belongs to method {config.method}: subclass it for {name}")
        config.method = name
        _REGISTRY[name] = MethodSpec(name, kind, config, implementation, description)
        return implementation

    return decorate


def registered() -> dict[str, MethodSpec]:
    """The registry as it is now (built-in methods are loaded by :mod:`prunekit.methods`)."""
    return _REGISTRY


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


# ---- types ------------------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _members(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint: Any) -> str:
    names = []
    for member in _members(hint):
        if member is type(None):
            continue
        if typing.get_origin(member) is list:
            names.append("list")
        else:
            names.append({float: "number", int: "whole number", bool: "true/false", str: "text"}.get(
                member, getattr(member, "__name__", str(member))))
    return " or ".join(names)


def _coerce(method: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation (ints are fine for floats; commas split lists)."""
    members = _members(hint)
    if value is None:
        if type(None) in members:
            return None
        raise PrunekitError(f"{method}: {name} needs a value ({_type_name(hint)})")
    for member in members:
        if member is bool and isinstance(value, bool):
            return value
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if member is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if member is str and isinstance(value, str):
            return value
        if typing.get_origin(member) is list:
            items = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
            if isinstance(items, list | tuple) and all(isinstance(p, str) for p in items):
                cleaned = [p.strip() for p in items if p.strip()]
                return cleaned or None
    raise PrunekitError(f"{method}: {name} must be {_type_name(hint)}, not {value!r}")
