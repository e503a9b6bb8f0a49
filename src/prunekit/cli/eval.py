"""`prunekit eval MODEL --data NAME`: perplexity or accuracy, size and speed, under a stated protocol."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prunekit.cli.common import add_common, maybe_print_config, resolve

DEFAULTS: dict[str, Any] = {
    "model": None, "data": None, "split": None, "seq_len": 512, "stride": None, "max_tokens": 32768,
    "batch_size": 1, "latency": True, "latency_seq_len": 128, "gen_tokens": 32, "json": None, "task": None,
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval", help="measure a model: perplexity/accuracy, parameters, sparsity, bytes, latency",
        description="Evaluate a model (built-in name, folder or hub id) on a dataset. Perplexity uses "
                    "windows of --seq-len tokens with --stride (default: non-overlapping) over the first "
                    "--max-tokens tokens of the evaluation split; the protocol is printed with the result.")
    parser.add_argument("model", nargs="?", default=None, help="smollm2-135m, minilm-l6, a folder or a hub id")
    parser.add_argument("--data", default=None, help="dataset name (austen, reviews, text:PATH, ...)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: eval for text, test for labels)")
    parser.add_argument("--task", default=None, help="causal-lm, classification or base (default: from the model)")
    parser.add_argument("--seq-len", type=int, default=None, help="window length in tokens (default 512)")
    parser.add_argument("--stride", type=int, default=None, help="window step (default: --seq-len)")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget of the split (default 32768)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows or examples per forward (default 1)")
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
    if not settings["data"]:
        raise PrunekitError("no dataset given: add --data NAME (austen, reviews, text:PATH, ...)")
    results = evaluate_model(settings)
    if settings["json"]:
        from prunekit.utils import atomic_write_text

        atomic_write_text(settings["json"], json.dumps(results, indent=2) + "\n")
        print(f"results written to {settings['json']}")
    return 0


def evaluate_model(settings: dict[str, Any]) -> dict[str, Any]:
    """Load the model and data named in settings, evaluate, print a table; return the results."""
    from prunekit.data import ClassificationData, load_data
    from prunekit.evaluate import evaluate, format_table, summary_row
    from prunekit.models import load_model
    from prunekit.utils import set_seed

    set_seed(int(settings["seed"]))
    data = load_data(settings["data"])  # first: a bad dataset name fails before the model loads
    task = settings["task"] or ("classification" if isinstance(data, ClassificationData) else None)
    model, tokenizer = load_model(settings["model"], task=task, device=settings["device"], dtype=settings["dtype"],
                                  num_labels=len(getattr(data, "label_names", [])) or 2)
    split = settings["split"] or ("test" if isinstance(data, ClassificationData) else "eval")
    results = evaluate(
        model, tokenizer, data, seq_len=int(settings["seq_len"]), stride=settings["stride"],
        max_tokens=settings["max_tokens"], split=split, latency_seq_len=int(settings["latency_seq_len"]),
        gen_tokens=int(settings["gen_tokens"]), path=_folder_or_none(settings["model"]),
        device=settings["device"], measure_latency=bool(settings["latency"]), batch_size=int(settings["batch_size"]),
        progress=sys.stderr.isatty())
    results["model"] = settings["model"]
    results["data"] = settings["data"]
    print(format_table([summary_row(settings["model"], results)], title=f"{settings['model']} on {settings['data']}"))
    for key in ("perplexity", "accuracy"):
        if results.get("protocol", {}).get(key):
            print(f"{key} protocol: {results['protocol'][key]}")
    return results


def _folder_or_none(model: str) -> str | None:
    from pathlib import Path

    from prunekit.models import BUILTIN_MODELS, builtin_folder

    if model in BUILTIN_MODELS:
        return str(builtin_folder(model))
    return model if Path(model).is_dir() else None
