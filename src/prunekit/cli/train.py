"""`prunekit train MODEL --task DATA --method mgpp --sparsity 0.9 --out DIR`: prune while fine-tuning.

Classification data (reviews, glue/<task>, csv:PATH with labels) trains a sequence classifier (a
fresh head on an encoder); text data (austen, text:PATH) trains a causal LM on seq_len blocks.
Runs under ``accelerate launch`` too (every process computes the same masks; rank 0 writes).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from prunekit.cli.common import add_common, maybe_print_config, resolve
from prunekit.errors import PrunekitError

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 1.0, "lr": 5e-5, "batch_size": 32, "eval_batch_size": None, "max_steps": None, "grad_accum": 1,
    "max_length": 128, "seq_len": 256, "weight_decay": 0.0, "lr_warmup": 0.0, "max_grad_norm": 1.0,
    "eval_steps": None, "save_steps": None, "max_eval_examples": None, "eval_max_tokens": 16384,
    "checkpoint_dir": None, "resume": False, "stop_after": None, "keep_checkpoints": False, "out": None,
    "overwrite": False, "progress": True,
}
DEFAULTS: dict[str, Any] = {
    "model": None, "task": None, "method": "mgpp", "sparsity": 0.9, "initial_sparsity": 0.0, "warmup_steps": None,
    "final_steps": None, "update_every": 10, "compare": "global", "sigma0": 1e-10, "sigma1": 0.05,
    "prior_lambda": 0.1, "method_args": {}, **TRAIN_DEFAULTS,
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


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="prune while fine-tuning on a task (gmp, movement, mgpp, flop) on a cubic schedule",
        description="Fine-tune MODEL on a task and prune it on the way: the sparsity follows a cubic schedule "
                    "from --initial-sparsity (after --warmup-steps) to --sparsity (at T - --final-steps), masks "
                    "are updated every --update-every steps and enforced after every optimiser step. "
                    "--method none fine-tunes without pruning (the dense baseline).")
    parser.add_argument("model", nargs="?", default=None, help="minilm-l6, smollm2-135m, a folder or a hub id")
    parser.add_argument("--task", default=None, help="dataset: reviews, glue/<task>, csv:PATH, austen, text:PATH")
    parser.add_argument("--method", default=None, help="gmp, movement, mgpp, flop or none (default mgpp)")
    parser.add_argument("--sparsity", type=float, default=None, help="final sparsity s_f in [0, 1) (default 0.9)")
    parser.add_argument("--initial-sparsity", type=float, default=None, help="s_i at the end of warm-up (0)")
    parser.add_argument("--warmup-steps", type=float, default=None,
                        help="t_i: steps before pruning starts, or a fraction of the run if < 1 (default 0.1)")
    parser.add_argument("--final-steps", type=float, default=None,
                        help="t_f: last steps with the mask frozen, or a fraction of the run if < 1 (default 0.2)")
    parser.add_argument("--update-every", type=int, default=None, help="Δt: steps between mask updates (10)")
    parser.add_argument("--compare", default=None, help="gmp/movement: global or layer threshold (global)")
    parser.add_argument("--sigma0", type=float, default=None, help="mgpp: spike VARIANCE σ0² (1e-10)")
    parser.add_argument("--sigma1", type=float, default=None, help="mgpp: slab VARIANCE σ1² (0.05)")
    parser.add_argument("--prior-lambda", type=float, default=None, help="mgpp: slab weight λ (0.1), annealed")
    parser.add_argument("--method-arg", dest="method_arg", action="append", default=None, metavar="KEY=VALUE",
                        help="another setting of the method (repeatable), e.g. --method-arg gate_lr=0.01")
    add_training_flags(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def parse_method_args(items: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE strings -> dict, values read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PrunekitError(f"--method-arg '{item}' is not KEY=VALUE: write e.g. --method-arg gate_lr=0.01")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def steps_value(value: Any) -> int | float | None:
    """A step count from flags/YAML: whole numbers as int, fractions in (0, 1) as float."""
    if value is None:
        return None
    number = float(value)
    if 0.0 < number < 1.0:
        return number
    if number < 0 or not number.is_integer():
        raise PrunekitError(f"step count {value} must be a whole number of steps or a fraction in (0, 1)")
    return int(number)


def train_config(settings: dict[str, Any]) -> Any:
    """A TrainConfig from resolved settings."""
    from prunekit.finetune import TrainConfig

    for key in ("batch_size", "grad_accum", "max_length", "seq_len"):
        if int(settings[key]) < 1:
            raise PrunekitError(f"--{key.replace('_', '-')} {settings[key]} must be at least 1")
    if float(settings["lr"]) <= 0:
        raise PrunekitError(f"--lr {settings['lr']} must be positive")
    if settings["max_steps"] is not None and int(settings["max_steps"]) < 1:
        raise PrunekitError(f"--max-steps {settings['max_steps']} must be at least 1")
    if settings["max_steps"] is None and float(settings["epochs"]) <= 0:
        raise PrunekitError(f"--epochs {settings['epochs']} must be positive")
    return TrainConfig(
        epochs=float(settings["epochs"]), lr=float(settings["lr"]), batch_size=int(settings["batch_size"]),
        eval_batch_size=settings["eval_batch_size"], max_steps=settings["max_steps"],
        grad_accum=int(settings["grad_accum"]), max_length=int(settings["max_length"]),
        seq_len=int(settings["seq_len"]), max_train_tokens=settings.get("max_train_tokens"),
        max_eval_tokens=settings["eval_max_tokens"], max_eval_examples=settings["max_eval_examples"],
        weight_decay=float(settings["weight_decay"]), lr_warmup_ratio=float(settings["lr_warmup"]),
        max_grad_norm=float(settings["max_grad_norm"]), eval_steps=settings["eval_steps"],
        save_steps=settings["save_steps"], seed=int(settings["seed"]), device=str(settings["device"]),
        progress=bool(settings["progress"]), stop_after=settings["stop_after"],
        distill_temperature=float(settings.get("temperature", 2.0)),
        distill_alpha=float(settings.get("distill_alpha", 0.5)))


def checkpoint_folder(settings: dict[str, Any]) -> Path:
    """The checkpoint folder: --checkpoint-dir, or OUT.checkpoints beside the output folder."""
    if settings["checkpoint_dir"]:
        return Path(settings["checkpoint_dir"])
    out = Path(settings["out"])
    return out.with_name(out.name + ".checkpoints")


def is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """Barrier across processes (a no-op in a single-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def final_evaluation(model: Any, tokenizer: Any, data: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy (classification) or eval-split perplexity (causal LM) of the trained model."""
    from prunekit.data import ClassificationData, eval_tokens
    from prunekit.evaluate import accuracy, perplexity

    progress = bool(settings["progress"])
    batch = int(settings["eval_batch_size"] or settings["batch_size"])
    if isinstance(data, ClassificationData):
        split = "test" if data.splits.get("test") else "validation"
        result = accuracy(model, tokenizer, data.splits[split], batch_size=batch,
                          max_length=int(settings["max_length"]), progress=progress, split=split)
        return {"accuracy": result.accuracy, "split": split, "n_examples": result.n_examples}
    tokens = eval_tokens(tokenizer, data, "eval", max_tokens=settings["eval_max_tokens"])
    ppl = perplexity(model, tokens, seq_len=int(settings["seq_len"]), progress=progress)
    return {"perplexity": ppl.perplexity, "split": "eval", "n_tokens": ppl.n_tokens, "protocol": ppl.protocol}


def training_record(settings: dict[str, Any], result: Any, config: Any) -> dict[str, Any]:
    """The 'training' part of a record: settings, steps, processes, time and the evaluation history."""
    evals = [entry for entry in result.history if any(key.startswith("eval_") for key in entry)]
    return {**config.describe(), "steps": result.steps, "total_steps": result.total_steps, "n_train": result.n_train,
            "world_size": result.world_size, "train_seconds": result.train_seconds, "evaluations": evals,
            **result.extra, "data": settings.get("task") or settings.get("data")}


def sparsity_record(facts: dict[str, Any], target: float | None) -> dict[str, Any]:
    """{'target', 'total', 'layers': {name: sparsity}} as one-shot records have it."""
    layers = facts.get("layers") or {}
    return {"target": target, "total": facts.get("sparsity"),
            "layers": {name: info.get("sparsity") for name, info in layers.items() if isinstance(info, dict)}}


def finish(result: Any, tokenizer: Any, data: Any, settings: dict[str, Any], record: dict[str, Any],
           checkpoints: Path, title: str, before: dict[str, Any] | None = None) -> None:
    """Evaluate, write the model with its record (rank 0 only), print a summary, remove checkpoints.

    ``before``: the same evaluation of the model before training (a row "before" in the summary).
    """
    from prunekit.evaluate import format_table
    from prunekit.export import save_model

    if is_main_process():
        results = final_evaluation(result.model, tokenizer, data, settings)
        record["results"] = results
        if before is not None:
            record["results_before"] = before
        save_model(result.model, tokenizer, settings["out"], record, overwrite=bool(settings["overwrite"]))
        metrics = ("accuracy", "perplexity")
        rows = []
        if before is not None:
            rows.append({"model": f"{settings['model']} (before)", **{k: v for k, v in before.items() if k in metrics},
                         "sparsity": before.get("sparsity"), "steps": 0, "train_s": 0.0})
        rows.append({"model": str(settings["out"]), **{k: v for k, v in results.items() if k in metrics},
                     "sparsity": record.get("sparsity", {}).get("total"), "steps": result.steps,
                     "train_s": round(result.train_seconds, 1)})
        if results.get("protocol"):
            print(f"perplexity: {results['protocol']}")
        print(format_table(rows, title=title), end="")
        if checkpoints.exists() and not settings["keep_checkpoints"]:
            shutil.rmtree(checkpoints, ignore_errors=True)
        print(f"saved to {settings['out']}")
    wait_for_everyone()


def run(args: argparse.Namespace) -> int:
    from prunekit.utils import check_output_dir

    settings = resolve(args, DEFAULTS)
    settings["method_args"] = {**(settings.get("method_args") or {}), **parse_method_args(settings.pop("method_arg",
                                                                                                         None))}
    if maybe_print_config(args, settings):
        return 0
    if not settings["model"]:
        raise PrunekitError("no model given: prunekit train MODEL --task DATA --out DIR (MODEL: minilm-l6, a folder)")
    if not settings["task"]:
        raise PrunekitError("no task given: add --task reviews (or glue/sst2, csv:PATH, austen, text:PATH)")
    if not settings["out"]:
        raise PrunekitError("no output folder given: add --out DIR")
    if not 0.0 <= float(settings["sparsity"]) < 1.0:
        raise PrunekitError(f"--sparsity {settings['sparsity']} is outside [0, 1): give a fraction such as 0.9")
    check_output_dir(settings["out"], bool(settings["overwrite"]))
    return train_command(settings)


def train_command(settings: dict[str, Any]) -> int:
    """Load data and model, build the method, train, evaluate and export."""
    from prunekit.data import ClassificationData, load_data
    from prunekit.finetune import train_model
    from prunekit.methods.gradual import available_methods, build_training_method
    from prunekit.models import load_model
    from prunekit.utils import set_seed

    if settings["method"] not in available_methods():
        raise PrunekitError(f"unknown method '{settings['method']}': use one of {', '.join(available_methods())}")
    config = train_config(settings)
    method_settings = {**settings, "warmup_steps": steps_value(settings["warmup_steps"]),
                       "final_steps": steps_value(settings["final_steps"]), **settings["method_args"]}
    method = build_training_method(settings["method"], method_settings)
    data = load_data(settings["task"])
    classification = isinstance(data, ClassificationData)
    check_model_task(settings["model"], classification, data.name)
    set_seed(int(settings["seed"]))
    num_labels = len(data.label_names) if isinstance(data, ClassificationData) else 2
    model, tokenizer = load_model(settings["model"], task="classification" if classification else "causal-lm",
                                  num_labels=num_labels, device="cpu", dtype=settings["dtype"])
    head = int(getattr(getattr(model, "config", None), "num_labels", num_labels))
    if classification and head != num_labels:
        raise PrunekitError(f"the model's head has {head} classes but '{data.name}' has "
                            f"{num_labels} labels: use a model with a matching head, or a fresh model")
    checkpoints = checkpoint_folder(settings)
    result = train_model(model, tokenizer, data, method=method, config=config, checkpoint_dir=checkpoints,
                         resume=bool(settings["resume"]))
    if result.stopped_early:
        if is_main_process():
            print(f"stopped after {result.steps} of {result.total_steps} steps; the checkpoint is in {checkpoints}: "
                  "run the same command with --resume to continue")
        return 0
    facts = dict(result.facts)
    record: dict[str, Any] = {
        "task": "classification" if classification else "causal-lm", "source_model": settings["model"],
        "data": settings["task"], "method": facts.pop("method", settings["method"]),
        "method_settings": facts.pop("method_settings", {}), "schedule": facts.pop("schedule", None),
        "sparsity": sparsity_record(facts, float(settings["sparsity"]) if settings["method"] != "none" else None),
        "training": training_record(settings, result, config), "seed": int(settings["seed"]),
        "loader": facts.pop("loader", None), "layers": facts.pop("layers", None),
    }
    facts.pop("sparsity", None)
    facts.pop("target_sparsity", None)
    record["method_result"] = facts
    finish(result, tokenizer, data, settings, record, checkpoints, f"{settings['method']} on {settings['task']}")
    return 0


def check_model_task(model: str, classification: bool, data_name: str) -> None:
    """Refuse text data for an encoder-only model, before loading its weights."""
    from transformers import AutoConfig

    from prunekit.models import BUILTIN_MODELS, infer_task, resolve_model_source

    if classification:
        return
    if model in BUILTIN_MODELS:
        task = BUILTIN_MODELS[model].task
    else:
        source, _ = resolve_model_source(model, progress=False)
        try:
            task = infer_task(AutoConfig.from_pretrained(source))
        except (OSError, ValueError):
            return  # load_model will give the precise error
    if task != "causal-lm":
        raise PrunekitError(f"dataset '{data_name}' has no labels, and '{model}' is not a causal language model: "
                            "train an encoder on a labelled set (reviews, glue/sst2, csv:PATH with labels)")
