"""`prunekit prune MODEL --method wanda --sparsity 0.5 --out DIR`: one-shot pruning, saved with its record.

Load the model, draw the calibration batch, prune (block by block for methods that read activations),
write the model and ``prunekit.json`` atomically (nothing is left behind on failure). With ``--eval NAME``
the dense and the pruned model are measured the same way and shown side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from prunekit.cli.common import add_common, maybe_print_config, resolve

CONFIG_KEYS = ("method", "sparsity", "structure", "allocation", "compare", "include", "exclude", "include_lm_head",
               "block_size", "dampening", "owl_m", "owl_lambda", "micro_batch_size", "ratio", "remove", "importance",
               "heads_ratio", "neurons_ratio", "gqa", "bias_compensation")

RECORD_KEYS = ("loader", "structure", "factorised")  # facts of whole-model methods that export.load reads

DEFAULTS: dict[str, Any] = {
    "model": None, "out": None, "overwrite": False, "task": None,
    "method": "wanda", "sparsity": None, "structure": "unstructured", "allocation": "uniform", "compare": None,
    "include": None, "exclude": None, "include_lm_head": False, "block_size": 128, "dampening": 0.01,
    "owl_m": 5.0, "owl_lambda": 0.08, "micro_batch_size": 8, "ratio": None, "remove": None, "importance": None,
    "heads_ratio": None, "neurons_ratio": None, "gqa": None, "bias_compensation": None,
    "calib": "austen", "calib_samples": 64, "seq_len": 512,
    "eval": None, "eval_tokens": 32768, "eval_seq_len": None, "latency": True,
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prune", help="prune a model one-shot (magnitude, random, wanda, sparsegpt, ...) and save it",
        description="Prune MODEL (built-in name, folder or hub id) with a one-shot method and save it with its "
                    "pruning record. `prunekit methods` lists the methods and their settings. Settings come from "
                    "defaults < --config YAML < flags.")
    parser.add_argument("model", nargs="?", default=None, help="smollm2-135m, minilm-l6, a folder or a hub id")
    parser.add_argument("--out", default=None, help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_const", const=True, default=None,
                        help="replace an existing output folder (only once the new one is complete)")
    parser.add_argument("--task", default=None, help="causal-lm, classification or base (default: from the model)")
    group = parser.add_argument_group("method")
    group.add_argument("--method", default=None, help="pruning method (default wanda; see `prunekit methods`)")
    group.add_argument("--sparsity", type=float, default=None, help="fraction of weights to remove, e.g. 0.5")
    group.add_argument("--structure", default=None, help="unstructured (default) or N:M such as 2:4")
    group.add_argument("--allocation", default=None, help="sparsity per block: uniform (default) or owl")
    group.add_argument("--compare", default=None, help="magnitude: layer|row|global; wanda: row|layer")
    group.add_argument("--include", default=None, help="comma-separated fnmatch patterns of layers to prune")
    group.add_argument("--exclude", default=None, help="comma-separated fnmatch patterns of layers to keep")
    group.add_argument("--include-lm-head", action="store_const", const=True, default=None,
                       help="also prune the LM head (magnitude, random)")
    group.add_argument("--block-size", type=int, default=None, help="sparsegpt column block (default 128)")
    group.add_argument("--dampening", type=float, default=None, help="sparsegpt dampening (default 0.01)")
    group.add_argument("--owl-m", type=float, default=None, help="owl outlier threshold M (default 5)")
    group.add_argument("--owl-lambda", type=float, default=None, help="owl sparsity spread lambda (default 0.08)")
    group.add_argument("--micro-batch-size", type=int, default=None, help="calibration samples per forward (8)")
    group.add_argument("--ratio", type=float, default=None, help="structured methods: fraction to remove")
    group.add_argument("--remove", type=int, default=None, help="structured methods: how many to remove")
    group.add_argument("--importance", default=None, help="structured methods: importance score")
    group.add_argument("--heads-ratio", type=float, default=None, help="heads-neurons: fraction of heads (--ratio)")
    group.add_argument("--neurons-ratio", type=float, default=None,
                       help="heads-neurons: fraction of FFN neurons (--ratio)")
    group.add_argument("--gqa", default=None, help="heads-neurons with grouped-query attention: query (remove query "
                       "heads evenly within key/value groups, default) or groups (remove whole key/value groups)")
    group.add_argument("--bias-compensation", dest="bias_compensation", action=argparse.BooleanOptionalAction,
                       default=None, help="heads-neurons: add the mean output of removed heads/neurons as a bias "
                       "(default: on for flap importance)")
    data = parser.add_argument_group("data")
    data.add_argument("--calib", default=None, help="calibration text set (default austen; text:PATH works)")
    data.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 64)")
    data.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    data.add_argument("--eval", default=None, help="also measure dense and pruned perplexity on this set's eval split")
    data.add_argument("--eval-tokens", type=int, default=None, help="eval token budget (default 32768)")
    data.add_argument("--eval-seq-len", type=int, default=None, help="eval window length (default --seq-len)")
    data.add_argument("--no-latency", dest="latency", action="store_const", const=False, default=None,
                      help="skip the latency measurement of --eval")
    add_common(parser)
    parser.set_defaults(func=run)


def prune_config(settings: dict[str, Any]) -> Any:
    """The PruneConfig named by the resolved settings (validated, before any model is loaded)."""
    from prunekit.pruning import PruneConfig

    config = PruneConfig.from_dict({key: settings[key] for key in CONFIG_KEYS} | {"seed": int(settings["seed"])})
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    from prunekit.errors import PrunekitError
    from prunekit.utils import check_output_dir

    settings = resolve(args, DEFAULTS)
    if maybe_print_config(args, settings):
        return 0
    if not settings["model"]:
        raise PrunekitError("no model given: prunekit prune MODEL --method wanda --sparsity 0.5 --out DIR")
    if not settings["out"]:
        raise PrunekitError("no output folder given: add --out DIR")
    config = prune_config(settings)
    check_output_dir(settings["out"], bool(settings["overwrite"]))  # before the long work
    prune_and_save(settings, config)
    return 0


def prune_and_save(settings: dict[str, Any], config: Any) -> dict[str, Any]:
    """Load, calibrate, prune, (evaluate), save; prints a summary and returns the record written."""
    from prunekit import __version__
    from prunekit.data import TextData, calibration_batch, load_data
    from prunekit.errors import PrunekitError
    from prunekit.export import save_model
    from prunekit.models import infer_task, load_model
    from prunekit.pruning import prune
    from prunekit.utils import set_seed

    started = time.perf_counter()
    seed = int(settings["seed"])
    set_seed(seed)
    calib_data = load_data(settings["calib"]) if config.needs_calibration() else None  # bad names fail fast
    if calib_data is not None and not isinstance(calib_data, TextData):
        raise PrunekitError(f"calibration set '{settings['calib']}' holds labelled examples, not text: "
                            "use a text set such as austen, wikitext2 or text:PATH")
    eval_data = load_data(settings["eval"]) if settings["eval"] else None
    model, tokenizer = load_model(settings["model"], task=settings["task"], device="cpu", dtype=settings["dtype"])
    loaded = time.perf_counter()
    calibration = None
    calib_record: dict[str, Any] | None = None
    if calib_data is not None:
        calibration = calibration_batch(tokenizer, calib_data, int(settings["calib_samples"]),
                                        int(settings["seq_len"]), seed=seed)
        calib_record = {"data": settings["calib"], "split": "calibration", "samples": int(calibration.shape[0]),
                        "seq_len": int(calibration.shape[1]), "seed": seed}
    evaluation: dict[str, Any] = {}
    if eval_data is not None:
        evaluation["dense"] = _evaluate(model, tokenizer, eval_data, settings, path=_source_folder(settings["model"]))
        model.to("cpu")  # the engine moves one block at a time to the device
    prepared = time.perf_counter()
    result = prune(model, config, calibration, device=settings["device"], progress=True)
    pruned_at = time.perf_counter()
    if eval_data is not None:
        model.to("cpu")
        evaluation["pruned"] = _evaluate(model, tokenizer, eval_data, settings)
    model.to("cpu")
    summary = result.record()
    timing = {**summary["timing"], "load_s": loaded - started, "prune_wall_s": pruned_at - prepared}
    record: dict[str, Any] = {"prunekit_version": __version__, "task": settings["task"] or infer_task(model.config),
                              "source_model": settings["model"], "method": dataclasses.asdict(config),
                              "calibration": calib_record, "sparsity": summary["sparsity"], "timing": timing}
    if "method_result" in summary:  # whole-model methods: how to rebuild changed shapes goes to the top level
        record["method_result"] = summary["method_result"]
        record.update({key: record["method_result"][key] for key in RECORD_KEYS if key in record["method_result"]})
    if evaluation:
        record["evaluation"] = evaluation
    out = save_model(model, tokenizer, settings["out"], record, overwrite=bool(settings["overwrite"]))
    _print_summary(settings, config, result, evaluation, out, {**timing, "total_s": time.perf_counter() - started})
    return record


def _evaluate(model: Any, tokenizer: Any, data: Any, settings: dict[str, Any], path: str | None = None
              ) -> dict[str, Any]:
    from prunekit.evaluate import evaluate

    seq_len = int(settings["eval_seq_len"] or settings["seq_len"])
    return evaluate(model, tokenizer, data, seq_len=seq_len, max_tokens=settings["eval_tokens"], path=path,
                    device=settings["device"], measure_latency=bool(settings["latency"]), progress=True)


def _source_folder(model: str) -> str | None:
    """The local folder the dense model was read from (for its bytes on disk), or None for a hub id."""
    from prunekit.models import resolve_model_source

    source, _builtin = resolve_model_source(model, progress=False)
    return source if Path(source).is_dir() else None


def _print_summary(settings: dict[str, Any], config: Any, result: Any, evaluation: dict[str, Any], out: Path,
                   timing: dict[str, float]) -> None:
    from prunekit.evaluate import format_table, summary_row
    from prunekit.evaluate.size import weight_files

    structure = config.structure if config.structure != "unstructured" else f"{result.target_sparsity or 0:g}"
    label = f"{config.method} {structure}" + (" owl" if config.allocation == "owl" else "")
    if evaluation:
        rows = [summary_row(f"{settings['model']} (dense)", evaluation["dense"]),
                summary_row(label, evaluation["pruned"])]
        rows[1]["disk_bytes"] = sum(f.stat().st_size for f in weight_files(out))
        print(format_table(rows, title=f"{settings['model']}: dense vs pruned on {settings['eval']}"))
        protocol = (evaluation["pruned"].get("perplexity") or {}).get("protocol")
        if protocol:
            print(f"protocol: {protocol}")
    took = f"in {timing.get('prune_wall_s', 0):.1f} s (total {timing.get('total_s', 0):.1f} s); saved to {out}"
    extra = result.extra or {}
    if "parameters_after" in extra:  # structured: the model shrank, its remaining weights are dense
        what = (f"removed {100 * extra['heads_removed_fraction']:.0f}% of heads and "
                f"{100 * extra['neurons_removed_fraction']:.0f}% of FFN neurons"
                if "heads_removed_fraction" in extra else f"removed blocks {extra.get('blocks_removed')}")
        print(f"{config.method}: {what}; parameters {extra['parameters_before'] / 1e6:.2f} M -> "
              f"{extra['parameters_after'] / 1e6:.2f} M {took}")
    else:
        print(f"pruned {len(result.layers)} layers to {100 * result.sparsity:.2f}% sparsity with {config.method} "
              f"{took}")
    if config.structure == "unstructured" and result.target_sparsity:
        print("note: unstructured zeros shrink neither the files nor dense matmuls; the model runs as fast as before")
