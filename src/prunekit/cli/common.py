"""What every subcommand shares: settings from defaults < YAML file < flags, and --print-config.

A subcommand declares its settings once, as a dict of defaults, and adds flags whose argparse
default is ``None`` (so an unset flag never hides a YAML value). :func:`resolve` merges them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import PrunekitError


def add_common(parser: argparse.ArgumentParser, *, with_device: bool = True) -> None:
    """Flags that every heavy subcommand takes: --config, --print-config, --seed, --device, --dtype."""
    parser.add_argument("--config", metavar="YAML", help="read settings from a YAML file (flags win over it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    if with_device:
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default auto)")
        parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default float32)")


COMMON_DEFAULTS: dict[str, Any] = {"seed": 0, "device": "auto", "dtype": "float32"}


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML settings file; keys may use dashes or underscores."""
    file = Path(path)
    if not file.is_file():
        raise PrunekitError(f"config file '{path}' not found: check the path given to --config")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PrunekitError(
            f"config file '{path}' is not valid YAML ({exc.__class__.__name__}): fix its syntax") from exc
    if not isinstance(loaded, dict):
        raise PrunekitError(f"config file '{path}' must hold a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def resolve(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge defaults < YAML (--config) < flags given on the command line."""
    settings = {**COMMON_DEFAULTS, **defaults}
    if getattr(args, "config", None):
        from_file = load_yaml(args.config)
        unknown = sorted(set(from_file) - set(settings))
        if unknown:
            raise PrunekitError(
                f"config file '{args.config}' has unknown settings {', '.join(unknown)}: "
                f"known are {', '.join(sorted(settings))}")
        for key, value in from_file.items():
            _check_type(args.config, key, value, settings[key])
        settings.update(from_file)
    for key, value in vars(args).items():
        if key in ("config", "print_config", "func", "debug", "command"):
            continue
        if value is not None:
            settings[key] = value
    return settings


def _check_type(path: str, key: str, value: Any, default: Any) -> None:
    """A YAML value must have its default's type (an int is fine for a float), or a later int() crashes."""
    if default is None or value is None:
        return
    expected: type | tuple[type, ...]
    if isinstance(default, bool):
        expected, name = bool, "true or false"
    elif isinstance(default, int):
        expected, name = int, "a whole number"
    elif isinstance(default, float):
        expected, name = (int, float), "a number"
    elif isinstance(default, str):
        expected, name = str, "a string"
    else:
        return
    if not isinstance(value, expected) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise PrunekitError(f"config file '{path}': {key} must be {name}, not {value!r}")


def maybe_print_config(args: argparse.Namespace, settings: dict[str, Any]) -> bool:
    """Print the resolved settings as YAML when --print-config was given; True if printed."""
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(settings, sort_keys=True), end="")
        return True
    return False
