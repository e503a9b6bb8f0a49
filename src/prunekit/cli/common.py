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
        if key in ("config", "print_config", "func", "debug", "command", "method_setting_names"):
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


# ---- method settings: flags generated from the methods' config dataclasses --------------------------------------
def _flag_type(info: Any) -> Any:
    """The argparse type of a setting: numbers parse as numbers, everything else stays text for the config."""
    import types
    import typing

    members = set(typing.get_args(info.type)) if isinstance(info.type, types.UnionType) else {info.type}
    members.discard(type(None))
    if members == {bool}:
        return bool
    if members == {int}:
        return int
    if members and members <= {int, float}:
        return float
    return None


def add_method_flags(parser: argparse.ArgumentParser, kinds: tuple[str, ...], title: str = "method settings"
                     ) -> list[str]:
    """One flag per setting of the methods of these kinds, generated from their configs; returns the setting names.

    Settings declared ``cli=False`` have no flag (YAML or ``--method-arg KEY=VALUE`` set them).
    A flag's argparse default is None, so an unset flag never counts as given.
    """
    from prunekit.methods import available_methods

    by_name: dict[str, list[tuple[str, Any]]] = {}
    for spec in available_methods():
        if spec.kind in kinds:
            for info in spec.config.settings():
                by_name.setdefault(info.name, []).append((spec.name, info))
    group = parser.add_argument_group(title, "each method takes only its own settings: `prunekit methods` lists them")
    for name, users in by_name.items():
        info = users[0][1]
        if not any(i.cli for _, i in users):
            continue
        total = sum(1 for s in available_methods() if s.kind in kinds)
        by_help: dict[tuple[str, str], list[str]] = {}
        for method, item in users:
            default = f"; default {item.default}" if item.default is not None else ""
            by_help.setdefault((item.help, default), []).append(method)
        parts = [f"{help_}{default}" + ("" if len(by_help) == 1 and len(methods) == total else
                                        f" [{', '.join(methods)}]")
                 for (help_, default), methods in by_help.items()]
        text = "; ".join(parts).replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        kind = _flag_type(info)
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            choices = sorted({c for _, i in users for c in (i.choices or ())}) or None
            # choices are checked by the method's config (one-line error naming the method), shown here
            group.add_argument(flag, dest=name, type=kind, default=None, help=text,
                               metavar=name.upper() if choices is None else "{" + ",".join(choices) + "}")
    group.add_argument("--method-arg", dest="method_arg", action="append", default=None, metavar="KEY=VALUE",
                       help="another setting of the method (repeatable), e.g. --method-arg gate_lr=0.01")
    return [name for name in by_name if name not in COMMON_DEFAULTS]  # the command's --seed fills a method's seed


def parse_method_args(items: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE strings -> dict, values read as YAML scalars (numbers, booleans, strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PrunekitError(f"--method-arg '{item}' is not KEY=VALUE: write e.g. --method-arg gate_lr=0.01")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def resolve_method(settings: dict[str, Any], names: list[str], kinds: tuple[str, ...], ready: bool = True) -> Any:
    """The chosen method's validated config from the settings given (flags, YAML, --method-arg).

    Only settings given count: a setting the method does not take is a one-line error naming those it takes.
    The command's seed fills a method's ``seed`` setting when that is not given. Returns (spec, config).
    """
    from prunekit.methods import get_method

    spec = get_method(str(settings["method"]), kinds)
    given = {name: settings[name] for name in names if settings.get(name) is not None}
    given.update(settings.get("method_args") or {})
    if "seed" in spec.config.names() and "seed" not in given:
        given["seed"] = int(settings.get("seed", 0))
    config = spec.make_config(given)
    if ready:
        config.ready()
    return spec, config


def method_defaults(names: list[str]) -> dict[str, Any]:
    """The settings table entries of method settings: None until given (the method's config has the defaults)."""
    return {name: None for name in names} | {"method_args": {}}


def printable(settings: dict[str, Any], names: list[str], config: Any) -> dict[str, Any]:
    """Resolved settings for --print-config: the command's and the chosen method's (a valid --config file)."""
    out = {k: v for k, v in settings.items() if k not in names and k not in ("method_args", "method_arg")}
    out.update(config.to_dict())
    return out


# ---- what train and finetune share -------------------------------------------------------------------------
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 1.0, "lr": 5e-5, "batch_size": 32, "eval_batch_size": None, "max_steps": None, "grad_accum": 1,
    "max_length": 128, "seq_len": 256, "weight_decay": 0.0, "lr_warmup": 0.0, "max_grad_norm": 1.0,
    "eval_steps": None, "save_steps": None, "max_eval_examples": None, "eval_max_tokens": 16384,
    "checkpoint_dir": None, "resume": False, "stop_after": None, "keep_checkpoints": False, "out": None,
    "overwrite": False, "progress": True, "bos": True, "tasks": None, "num_fewshot": None, "limit": None,
    "export_format": None, "export_quantize": "none", "export_dtype": "bfloat16",
}


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `train` and `finetune`: budget, optimiser, evaluation, checkpoints, output."""
    parser.add_argument("--epochs", type=float, default=None, help="passes over the training split (default 1)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimiser steps; wins over --epochs")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (linear decay)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples or blocks per step and process")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="batch size of evaluations")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step (default 1)")
    parser.add_argument("--max-length", type=int, default=None, help="classification: tokens per example (128)")
    parser.add_argument("--seq-len", type=int, default=None, help="causal LM: tokens per training block (256)")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    parser.add_argument("--lr-warmup", type=float, default=None, help="fraction of steps warming up the lr (0)")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="evaluate every N steps (default: 4 times a run; 0: never)")
    parser.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: eval steps)")
    parser.add_argument("--max-eval-examples", type=int, default=None,
                        help="classification: validation examples per evaluation during training (default all)")
    parser.add_argument("--eval-max-tokens", type=int, default=None,
                        help="causal LM: tokens of the eval split, during training and at the end (16384)")
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default OUT.checkpoints)")
    parser.add_argument("--resume", action="store_const", const=True, default=None,
                        help="continue from the newest checkpoint in the checkpoint folder")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after N steps with a checkpoint (continue later with --resume)")
    parser.add_argument("--keep-checkpoints", action="store_const", const=True, default=None,
                        help="keep the checkpoint folder after a finished run (default: removed)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bars")
    parser.add_argument("--out", default=None, help="output folder for the trained model (required)")
    parser.add_argument("--overwrite", action="store_const", const=True, default=None,
                        help="replace an existing output folder")
    parser.add_argument("--no-bos", dest="bos", action="store_const", const=False, default=None,
                        help="causal LM: perplexity windows without the tokenizer's BOS token (the earlier protocol)")
    add_harness_flags(parser, "on the trained model")
    add_export_flags(parser)


def add_export_flags(parser: argparse.ArgumentParser) -> None:
    """--export-format / --export-quantize / --export-dtype: write --out in a compressed-tensors format."""
    export = parser.add_argument_group("compressed output (see prunekit export --help)")
    export.add_argument("--export-format", default=None,
                        help="write --out compressed: sparse-bitmask, sparse-24-bitmask or dense (default: plain)")
    export.add_argument("--export-quantize", default=None, help="none (default), int8 or int4 weights")
    export.add_argument("--export-dtype", default=None, help="stored values: bfloat16 (default), float16, float32")


def add_harness_flags(parser: argparse.ArgumentParser, on: str) -> None:
    """--tasks / --num-fewshot / --limit: lm-evaluation-harness tasks run on the model in memory."""
    harness = parser.add_argument_group(f"lm-evaluation-harness {on} (pip install 'prunekit[eval]')")
    harness.add_argument("--tasks", default=None, metavar="NAMES",
                         help="comma-separated lm-eval tasks: austen-cloze, austen-nextsent, reviews-zeroshot "
                              "(offline) or lm-eval's own (need the Hugging Face hub)")
    harness.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    harness.add_argument("--limit", type=float, default=None,
                         help="documents per task (a count, or a fraction below 1; default all)")


def print_outcome(job: Any, settings: dict[str, Any], title: str) -> None:
    """What a training or recovery job did: a table of the result (and the model before), or how to resume."""
    from prunekit.evaluate import format_table
    from prunekit.jobs import is_main_process

    if not is_main_process():
        return
    result = job.result
    if result.stopped_early:
        print(f"stopped after {result.steps} of {result.total_steps} steps; the checkpoint is in {job.checkpoints}: "
              "run the same command with --resume to continue")
        return
    metrics = ("accuracy", "perplexity")
    rows = []
    if job.before is not None:
        rows.append({"model": f"{settings['model']} (before)", **{k: v for k, v in job.before.items() if k in metrics},
                     "sparsity": job.before.get("sparsity"), "steps": 0, "train_s": 0.0})
    results = job.results or {}
    rows.append({"model": str(settings["out"]), **{k: v for k, v in results.items() if k in metrics},
                 "sparsity": (job.record or {}).get("sparsity", {}).get("total"), "steps": result.steps,
                 "train_s": round(result.train_seconds, 1)})
    if results.get("protocol"):
        print(f"perplexity: {results['protocol']}")
    print(format_table(rows, title=title), end="")
    if results.get("tasks"):
        from prunekit.evaluate.harness import task_rows

        before = (job.before or {}).get("tasks")
        summaries = {**({"before": before} if before else {}), str(settings["out"]): results["tasks"]}
        print(format_table(task_rows(summaries), title="lm-evaluation-harness: accuracy ± standard error"), end="")
        print(f"tasks protocol: {results['tasks_protocol']}")
    print(f"saved to {settings['out']}")
