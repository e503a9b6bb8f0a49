"""`prunekit eval MODEL --data NAME [--tasks NAMES]`: perplexity or accuracy, lm-eval tasks, size and speed,
under a stated protocol."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prunekit.cli.common import add_common, maybe_print_config, resolve

DEFAULTS: dict[str, Any] = {
    "model": None, "data": None, "split": None, "seq_len": 512, "stride": None, "max_tokens": 32768,
    "batch_size": None, "latency": True, "latency_seq_len": 128, "gen_tokens": 32, "json": None, "task": None,
    "bos": True, "tasks": None, "num_fewshot": None, "limit": None, "onload": "auto",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval", help="measure a model: perplexity/accuracy, parameters, sparsity, bytes, latency",
        description="Evaluate a model (built-in name, folder or hub id) on a dataset and/or lm-evaluation-harness "
                    "tasks. Perplexity uses windows of --seq-len tokens, each starting with the tokenizer's BOS "
                    "token (unless --no-bos), with --stride (default: non-overlapping) over the first --max-tokens "
                    "tokens of the split (a local file: the whole file unless --split names one); the protocol "
                    "is printed with the result. prunekit's offline tasks: austen-cloze, austen-nextsent, "
                    "reviews-zeroshot.")
    parser.add_argument("model", nargs="?", default=None, help="smollm2-135m, minilm-l6, a folder or a hub id")
    parser.add_argument("--data", default=None, help="dataset name (austen, reviews, text:PATH, ...)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: all of a local text file, eval for "
                        "built-in text, test for labels)")
    parser.add_argument("--task", default=None, help="causal-lm, classification or base (default: from the model)")
    parser.add_argument("--onload", default=None, choices=("auto", "always", "never"),
                        help="sequential onloading: perplexity block by block, each block read from the files only "
                             "while every window runs through it (peak memory about two blocks plus activations; "
                             "same result); auto (default) does so when the model would not fit comfortably in "
                             "memory. --tasks and labelled data load the whole model; latency is not timed")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per window, its BOS token included (default 512)")
    parser.add_argument("--stride", type=int, default=None,
                        help="window step in text tokens (default: non-overlapping windows)")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget of the split (default 32768)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows or examples per forward (default 1), lm-eval requests per forward "
                             "(default 8)")
    parser.add_argument("--no-bos", dest="bos", action="store_const", const=False, default=None,
                        help="perplexity windows without the BOS token: each starts mid-text and its first token is "
                             "context only (the earlier protocol)")
    harness = parser.add_argument_group("lm-evaluation-harness (pip install 'prunekit[eval]')")
    harness.add_argument("--tasks", default=None, metavar="NAMES",
                         help="comma-separated lm-eval tasks: austen-cloze, austen-nextsent, reviews-zeroshot "
                              "(offline), or lm-eval's own (arc_easy, hellaswag, ...: need the Hugging Face hub)")
    harness.add_argument("--num-fewshot", type=int, default=None,
                         help="examples in each prompt (default: the task's own)")
    harness.add_argument("--limit", type=float, default=None,
                         help="documents per task (a count, or a fraction below 1; default all)")
    parser.add_argument("--no-latency", dest="latency", action="store_const", const=False, default=None,
                        help="skip the latency measurement")
    parser.add_argument("--latency-seq-len", type=int, default=None, help="tokens per timed forward (default 128)")
    parser.add_argument("--gen-tokens", type=int, default=None, help="tokens generated to time decoding (default 32)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prunekit.errors import PrunekitError

    settings = resolve(args, DEFAULTS)
    if maybe_print_config(args, settings):
        return 0
    if not settings["model"]:
        raise PrunekitError("no model given: prunekit eval MODEL --data NAME (smollm2-135m, minilm-l6, a folder)")
    if not settings["data"] and not settings["tasks"]:
        raise PrunekitError("nothing to evaluate: add --data NAME (austen, reviews, text:PATH, ...) and/or "
                            "--tasks NAMES (austen-cloze, austen-nextsent, reviews-zeroshot, ...)")
    results = evaluate_model(settings)
    if settings["json"]:
        from prunekit.utils import atomic_write_text

        atomic_write_text(settings["json"], json.dumps(results, indent=2) + "\n")
        print(f"results written to {settings['json']}")
    return 0


def evaluate_model(settings: dict[str, Any]) -> dict[str, Any]:
    """Load the model and data named in settings, evaluate, print tables; return the results."""
    from prunekit.data import ClassificationData, load_data
    from prunekit.evaluate import evaluate, format_table, summary_row
    from prunekit.evaluate.harness import lm_eval_version, parse_tasks
    from prunekit.models import load_model
    from prunekit.utils import set_seed

    set_seed(int(settings["seed"]))
    tasks = parse_tasks(settings["tasks"])
    if tasks:
        lm_eval_version()  # a missing lm-eval fails before the model loads
    data = load_data(settings["data"]) if settings["data"] else None  # a bad dataset name fails before the model
    results = _evaluate_onloaded(settings, data, tasks)
    if results is None:
        task = settings["task"] or ("classification" if isinstance(data, ClassificationData) else None)
        model, tokenizer = load_model(settings["model"], task=task, device=settings["device"],
                                      dtype=settings["dtype"], num_labels=len(getattr(data, "label_names", [])) or 2)
        split = settings["split"] or default_split(data)
        limit, batch = settings["limit"], settings["batch_size"]
        results = evaluate(
            model, tokenizer, data, seq_len=int(settings["seq_len"]), stride=settings["stride"],
            max_tokens=settings["max_tokens"], split=split, latency_seq_len=int(settings["latency_seq_len"]),
            gen_tokens=int(settings["gen_tokens"]), path=_folder_or_none(settings["model"]),
            device=settings["device"], measure_latency=bool(settings["latency"]), batch_size=int(batch or 1),
            task_batch_size=int(batch or 8), progress=sys.stderr.isatty(), bos=bool(settings["bos"]), tasks=tasks,
            num_fewshot=settings["num_fewshot"],
            limit=int(limit) if limit is not None and float(limit) >= 1 else limit, seed=int(settings["seed"]))
    results["model"] = settings["model"]
    results["data"] = settings["data"]
    title = f"{settings['model']} on {settings['data']}" if settings["data"] else settings["model"]
    print(format_table([summary_row(settings["model"], results)], title=title))
    print_protocols(results)
    return results


def _evaluate_onloaded(settings: dict[str, Any], data: Any, tasks: list[str]) -> dict[str, Any] | None:
    """Perplexity and size with sequential onloading (:mod:`prunekit.onload_eval`), or None for a full load."""
    from prunekit.onload import return_freed_memory
    from prunekit.onload_eval import LATENCY_NOTE, eval_plan, evaluate_onloaded, load_tokenizer
    from prunekit.onload_job import note

    plan = eval_plan(settings, data, tasks)
    if plan is None:
        return None
    tokenizer = load_tokenizer(plan.folder)
    return_freed_memory()  # activations freed go back to the OS (see its docstring)
    results = evaluate_onloaded(
        plan.folder, plan.task, tokenizer, data, split=settings["split"] or default_split(data),
        seq_len=int(settings["seq_len"]), stride=settings["stride"], max_tokens=settings["max_tokens"],
        batch_size=int(settings["batch_size"] or 1), device=settings["device"], dtype=settings["dtype"],
        progress=sys.stderr.isatty(), bos=bool(settings["bos"]), path=_folder_or_none(settings["model"]),
        mode=str(settings.get("onload") or "auto"))
    if results is not None and settings["latency"]:
        note(LATENCY_NOTE)
    return results


def default_split(data: Any) -> str:
    """The split scored when none is named: a local text file whole, else eval (text) or test (labels)."""
    from prunekit.data import ClassificationData
    from prunekit.data.core import WHOLE_SPLIT

    if data is None:
        return "eval"
    if isinstance(data, ClassificationData):
        return "test"
    return WHOLE_SPLIT if WHOLE_SPLIT in data.splits else "eval"


def print_protocols(results: dict[str, Any]) -> None:
    """The lm-eval table, then one line per protocol (perplexity/accuracy, tasks, latency)."""
    from prunekit.evaluate import format_table
    from prunekit.evaluate.harness import task_rows

    protocol = results.get("protocol", {})
    if results.get("tasks"):
        print(format_table(task_rows({str(results.get("model") or "model"): results["tasks"]}),
                          title="lm-evaluation-harness: accuracy ± standard error"))
    for key in ("perplexity", "accuracy", "tasks"):
        if protocol.get(key):
            print(f"{key} protocol: {protocol[key]}")
    speed = results.get("latency")
    if speed:
        low, high = speed["forward_ms_iqr"]
        print(f"latency: {speed['forward_ms_median']:.1f} ms per forward (quartiles {low:.1f}-{high:.1f} ms) is an "
              f"absolute figure for this machine ({speed['device']}, {speed['threads']} threads, batch "
              f"{speed['batch_size']} x {speed['seq_len']} tokens): it moves with the hardware and whatever else "
              "runs; compare models only side by side in one run")


def _folder_or_none(model: str) -> str | None:
    from pathlib import Path

    from prunekit.models import BUILTIN_MODELS, builtin_folder

    if model in BUILTIN_MODELS:
        return str(builtin_folder(model))
    return model if Path(model).is_dir() else None
