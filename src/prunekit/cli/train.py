"""`prunekit train MODEL --task DATA --method mgpp --sparsity 0.9 --out DIR`: prune while fine-tuning.

Classification data (reviews, glue/<task>, csv:PATH with labels) trains a sequence classifier (a
fresh head on an encoder); text data (austen, text:PATH) trains a causal LM on seq_len blocks.
Runs under ``accelerate launch`` too (every process computes the same masks; rank 0 writes).
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from prunekit.cli.common import (
    TRAIN_DEFAULTS,
    add_common,
    add_method_flags,
    add_training_flags,
    method_defaults,
    parse_method_args,
    print_outcome,
    printable,
    resolve,
    resolve_method,
)
from prunekit.errors import PrunekitError

KINDS = ("training",)
DEFAULTS: dict[str, Any] = {"model": None, "task": None, "method": "mgpp", **TRAIN_DEFAULTS}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="prune while fine-tuning on a task (gmp, movement, mgpp, flop) on a cubic schedule",
        description="Fine-tune MODEL on a task and prune it on the way: the sparsity follows a cubic schedule "
                    "from --initial-sparsity (after --warmup-steps) to --sparsity (at T - --final-steps), masks "
                    "are updated every --update-every steps and enforced after every optimiser step. "
                    "--method none fine-tunes without pruning (the dense baseline). `prunekit methods --kind "
                    "training` lists each method's settings.")
    parser.add_argument("model", nargs="?", default=None, help="minilm-l6, smollm2-135m, a folder or a hub id")
    parser.add_argument("--task", default=None, help="dataset: reviews, glue/<task>, csv:PATH, austen, text:PATH")
    parser.add_argument("--method", default=None, help="gmp, movement, mgpp, flop or none (default mgpp)")
    names = add_method_flags(parser, KINDS)
    parser.set_defaults(method_setting_names=names)
    add_training_flags(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prunekit.jobs import train_job
    from prunekit.utils import check_output_dir

    names = list(args.method_setting_names)
    settings = resolve(args, {**DEFAULTS, **method_defaults(names)})
    settings["method_args"] = {**(settings.get("method_args") or {}), **parse_method_args(settings.pop("method_arg",
                                                                                                         None))}
    spec, config = resolve_method(settings, names, KINDS)
    if args.print_config:
        print(yaml.safe_dump(printable(settings, names, config), sort_keys=True), end="")
        return 0
    if not settings["model"]:
        raise PrunekitError("no model given: prunekit train MODEL --task DATA --out DIR (MODEL: minilm-l6, a folder)")
    if not settings["task"]:
        raise PrunekitError("no task given: add --task reviews (or glue/sst2, csv:PATH, austen, text:PATH)")
    if not settings["out"]:
        raise PrunekitError("no output folder given: add --out DIR")
    check_output_dir(settings["out"], bool(settings["overwrite"]))
    job = train_job(settings, spec, config)
    print_outcome(job, settings, f"{spec.name} on {settings['task']}")
    return 0
