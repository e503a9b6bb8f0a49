"""`prunekit prune MODEL --method wanda --sparsity 0.5 --out DIR`: one-shot pruning, saved with its record.

Load the model, draw the calibration batch, prune (block by block for methods that read activations),
write the model and ``prunekit.json`` atomically (nothing is left behind on failure). With ``--eval NAME``
the dense and the pruned model are measured the same way and shown side by side.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from prunekit.cli.common import (
    add_common,
    add_export_flags,
    add_harness_flags,
    add_method_flags,
    method_defaults,
    parse_method_args,
    printable,
    resolve,
    resolve_method,
)

KINDS = ("one-shot", "structured")

DEFAULTS: dict[str, Any] = {
    "model": None, "out": None, "overwrite": False, "task": None, "method": "wanda",
    "calib": "austen", "calib_samples": 64, "seq_len": 512,
    "eval": None, "eval_tokens": 32768, "eval_seq_len": None, "latency": True,
    "bos": True, "tasks": None, "num_fewshot": None, "limit": None,
    "export_format": None, "export_quantize": "none", "export_dtype": "bfloat16", "onload": "auto",
    "progress": True,
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prune", help="prune a model one-shot (magnitude, random, wanda, sparsegpt, heads-neurons, blocks) and save it",
        description="Prune MODEL (built-in name, folder or hub id) with a one-shot or structured method and save it "
                    "with its record. `prunekit methods` lists the methods and the settings each takes. Settings "
                    "come from defaults < --config YAML < flags.")
    parser.add_argument("model", nargs="?", default=None, help="smollm2-135m, minilm-l6, a folder or a hub id")
    parser.add_argument("--out", default=None, help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_const", const=True, default=None,
                        help="replace an existing output folder (only once the new one is complete)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bars (pruning, evaluation, lm-eval tasks)")
    parser.add_argument("--task", default=None, help="causal-lm, classification or base (default: from the model)")
    parser.add_argument("--onload", default=None, choices=("auto", "always", "never"),
                        help="sequential onloading: read each block from the files only while it is pruned, write it "
                             "out and free it (peak memory about two blocks plus activations); auto (default) does "
                             "so when the model would not fit comfortably in memory")
    parser.add_argument("--method", default=None, help="pruning method (default wanda; see `prunekit methods`)")
    names = add_method_flags(parser, KINDS)
    parser.set_defaults(method_setting_names=names)
    data = parser.add_argument_group("data")
    data.add_argument("--calib", default=None, help="calibration text set (default austen; text:PATH works)")
    data.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 64)")
    data.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    data.add_argument("--eval", default=None, help="also measure dense and pruned perplexity on this set's eval split")
    data.add_argument("--eval-tokens", type=int, default=None, help="eval token budget (default 32768)")
    data.add_argument("--eval-seq-len", type=int, default=None, help="eval window length (default --seq-len)")
    data.add_argument("--no-latency", dest="latency", action="store_const", const=False, default=None,
                      help="skip the latency measurement of --eval (structured methods only: zeros change no speed)")
    data.add_argument("--no-bos", dest="bos", action="store_const", const=False, default=None,
                      help="perplexity windows of --eval without the tokenizer's BOS token (the earlier protocol)")
    add_harness_flags(parser, "on dense and pruned")
    add_export_flags(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """(settings, method spec, method config) from defaults < YAML < flags, validated before any model work."""
    names = list(args.method_setting_names)
    settings = resolve(args, {**DEFAULTS, **method_defaults(names)})
    settings["method_args"] = {**(settings.get("method_args") or {}), **parse_method_args(settings.pop("method_arg",
                                                                                                         None))}
    spec, config = resolve_method(settings, names, KINDS, ready=False)
    return settings, spec, config


def run(args: argparse.Namespace) -> int:
    from prunekit.errors import PrunekitError
    from prunekit.jobs import prune_job
    from prunekit.utils import check_output_dir

    settings, spec, config = resolve_settings(args)
    if args.print_config:
        print(yaml.safe_dump(printable(settings, list(args.method_setting_names), config), sort_keys=True), end="")
        return 0
    config.ready()
    if not settings["model"]:
        raise PrunekitError("no model given: prunekit prune MODEL --method wanda --sparsity 0.5 --out DIR")
    if not settings["out"]:
        raise PrunekitError("no output folder given: add --out DIR")
    check_output_dir(settings["out"], bool(settings["overwrite"]))  # before the long work
    job = prune_job(settings, spec, config)
    _print_summary(settings, spec, job)
    return 0


def _print_summary(settings: dict[str, Any], spec: Any, job: Any) -> None:
    from prunekit.evaluate import format_table, summary_row
    from prunekit.evaluate.size import weight_files

    config, result, evaluation, timing = job.result.config, job.result, job.evaluation, job.timing
    structure = getattr(config, "structure", "unstructured")
    label = spec.name + (f" {structure}" if structure != "unstructured" else f" {result.target_sparsity or 0:g}"
                         if result.target_sparsity else "")
    label += " owl" if getattr(config, "allocation", None) == "owl" else ""
    if evaluation:
        rows = [summary_row(f"{settings['model']} (dense)", evaluation["dense"]), summary_row(label,
                                                                                             evaluation["pruned"])]
        rows[1]["disk_bytes"] = sum(f.stat().st_size for f in weight_files(job.out))
        speed = evaluation.get("latency") or {}
        if speed.get("measured"):
            for row, name in zip(rows, ("dense", "pruned"), strict=True):
                row.update(_latency_columns(speed[name]))
        on = f" on {settings['eval']}" if settings["eval"] else ""
        print(format_table(rows, title=f"{settings['model']}: dense vs pruned{on}"))
        protocol = evaluation["pruned"].get("protocol") or {}
        if protocol.get("perplexity"):
            print(f"protocol: {protocol['perplexity']}")
        if evaluation["pruned"].get("tasks"):
            from prunekit.evaluate.harness import task_rows

            print(format_table(task_rows({"dense": evaluation["dense"]["tasks"], label: evaluation["pruned"]["tasks"]}),
                               title="lm-evaluation-harness: accuracy ± standard error"))
            print(f"tasks protocol: {protocol['tasks']}")
        if speed.get("measured"):
            print("latency: dense and pruned timed alternately in one run, same input ids")
    took = f"in {timing.get('prune_wall_s', 0):.1f} s (total {timing.get('total_s', 0):.1f} s); saved to {job.out}"
    extra = result.extra or {}
    if "parameters_after" in extra:  # structured: the model shrank, its remaining weights are dense
        what = (f"removed {100 * extra['heads_removed_fraction']:.0f}% of heads and "
                f"{100 * extra['neurons_removed_fraction']:.0f}% of FFN neurons"
                if "heads_removed_fraction" in extra else f"removed blocks {extra.get('blocks_removed')}")
        print(f"{spec.name}: {what}; parameters {extra['parameters_before'] / 1e6:.2f} M -> "
              f"{extra['parameters_after'] / 1e6:.2f} M {took}")
    else:
        print(f"pruned {len(result.layers)} layers to {100 * result.sparsity:.2f}% sparsity with {spec.name} {took}")
        if not settings.get("export_format"):
            print("note: these zeros shrink neither the files nor dense matmuls: the model runs as fast as the dense "
                  "one (latency not timed); --export-format sparse-bitmask stores them compressed")
    if settings.get("export_format"):
        from prunekit.export import read_record

        info = read_record(job.out).get("export") or {}
        stored = sum(f.stat().st_size for f in weight_files(job.out))
        print(f"stored as {info.get('storage', settings['export_format'])} ({info.get('values')}): weights "
              f"{stored / 1e6:.1f} MB; reload with prunekit.load")


def _latency_columns(measured: Any) -> dict[str, Any]:
    """Table columns from one model's interleaved latency result (whatever fields it has)."""
    columns: dict[str, Any] = {}
    for key, column in (("forward_ms_median", "latency_ms"), ("decode_ms_per_token", "decode_ms_per_token"),
                        ("forward_ratio", "forward_x_dense"), ("decode_ratio", "decode_x_dense")):
        if isinstance(measured, dict) and measured.get(key) is not None and column not in columns:
            columns[column] = measured[key]
    return columns
