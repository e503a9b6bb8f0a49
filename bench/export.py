"""Benchmark of shippable efficiency (issue 12): compressed sparse and quantised exports, and int8 CPU speed.

Model smollm2-135m (float32, 134.5 M parameters). Pruned one-shot from it, calibration 32 windows x 512
tokens of the austen calibration split (seed 0): wanda 50 % unstructured, wanda 2:4, heads-neurons ratio
0.5 (FLAP importance, bias compensation, uniform allocation: a plain transformers model). Each pruned
model is saved dense in float32 (its "dense-stored float32 self"), then exported from that folder as
`prunekit export` does. Size = bytes of the weight files (*.safetensors) against the dense float32 folder
of smollm2-135m. Perplexity: first 16,384 tokens of the austen eval split (Persuasion), non-overlapping
512-token windows, the same protocol (prunekit.evaluate.perplexity) for every model; an export is
reloaded with prunekit.load (float32 compute, values as stored) and compared with its dense-stored float32
self reloaded the same way. Checks per export: logits (bf16) equal to the dense-stored folder loaded in
bf16 (bitmask formats without quantisation), every zero kept, and whether plain
AutoModelForCausalLM.from_pretrained reloads it (its weights compared with prunekit.load's).

CPU speed: dense and structured 50 % models in float32 and with int8 dynamic linear layers
(prunekit.export.int8_dynamic: torch.ao dynamic quantisation, int8 weights per output channel, int8
activations per call; all nn.Linear including the head), and the wanda 50 % model with int8 layers;
timed by prunekit.evaluate.speed.compare_latency, interleaved, on the same seeded token ids: prefill of
512 tokens (batch 1, last position's logits, as generate does) and decode per token (greedy, KV cache,
32 new tokens after the 512-token prompt, prefill left out); ratios are medians over rounds of the
per-round ratio to dense float32. Perplexity of the int8 models on the same 16,384 tokens. Each int8
model also once with its FFN output layers (down_proj) and head left in float32: their inputs have outlier
channels that one activation scale per tensor cannot hold.
int4 weights use groups of 64 inputs: 128, the issue's suggestion, does not divide smollm2's hidden size 576.

    flock /tmp/prunekit-cpu.lock .venv/bin/python bench/export.py     # about 15 minutes on 2 cores

Writes bench/results/export.json and bench/results/export.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {  # export -> (size target vs dense float32 folder, perplexity change target); None: stated only
    "wanda 50% sparse-bitmask bf16": (0.34, 0.01),
    "wanda 2:4 sparse-24-bitmask bf16": (0.34, 0.01),
    "wanda 50% sparse-bitmask + int8": (0.25, 0.03),
    "dense + int8": (0.32, None),
}
EXPORTS = {  # name -> (pruned model, format, quantize)
    "wanda 50% sparse-bitmask bf16": ("wanda 50%", "sparse-bitmask", "none"),
    "wanda 2:4 sparse-24-bitmask bf16": ("wanda 2:4", "sparse-24-bitmask", "none"),
    "wanda 50% sparse-bitmask + int8": ("wanda 50%", "sparse-bitmask", "int8"),
    "dense + int8": ("dense", "dense", "int8"),
    "wanda 50% + int8 (no bitmask)": ("wanda 50%", "dense", "int8"),
    "wanda 2:4 sparse-24-bitmask + int8": ("wanda 2:4", "sparse-24-bitmask", "int8"),
    "dense + int4 g64": ("dense", "dense", "int4"),
    "heads-neurons 50% + int8": ("heads-neurons 50%", "dense", "int8"),
}
KEEP_FLOAT = ("down_proj", "lm_head")  # inputs with outlier channels: one activation scale per tensor cannot hold them
PRUNING = {"wanda 50%": {"method": "wanda", "sparsity": 0.5}, "wanda 2:4": {"method": "wanda", "structure": "2:4"},
           "heads-neurons 50%": {"method": "heads-neurons", "ratio": 0.5, "importance": "flap"}}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def weight_bytes(folder: Path | str) -> int:
    from prunekit.evaluate.size import weight_files

    return sum(f.stat().st_size for f in weight_files(folder))


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from prunekit.adapters import get_adapter

    return {name: layer.weight.detach() for name, layer in get_adapter(model).prunable_layers().items()}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_start": os.getloadavg()}


def checks(name: str, folder: Path, source: Path, quantize: str, ids: torch.Tensor) -> dict[str, Any]:
    """Same logits as the dense-stored folder in bf16 (unquantised), zeros kept, and what plain transformers does."""
    from transformers import AutoModelForCausalLM

    from prunekit.export import load
    from prunekit.models import load_model

    exported, _, record = load(folder, dtype="bfloat16")
    stored, _ = load_model(str(source), dtype="bfloat16", progress=False)
    out: dict[str, Any] = {"storage": record["export"]["storage"]}
    zeros_kept = new_zeros = 0
    for layer, weight in block_weights(exported).items():
        before = block_weights(stored)[layer] == 0
        zeros_kept += int(((weight == 0) & before).sum()) - int(before.sum())  # 0 when every zero is kept
        new_zeros += int(((weight == 0) & ~before).sum())
    out["zeros_lost"] = -zeros_kept
    out["new_zeros_from_rounding"] = new_zeros
    if quantize == "none":
        with torch.inference_mode():
            out["bf16_logits_equal_dense_stored"] = bool(torch.equal(exported(ids).logits, stored(ids).logits))
    if record["export"]["plain_transformers"]:
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.inference_mode():
            plain(ids)  # compressed-tensors decompresses on the first forward
        out["plain_transformers_weights_equal"] = all(
            torch.equal(plain.get_submodule(layer).weight, weight) for layer, weight in block_weights(exported).items())
    else:
        out["plain_transformers_weights_equal"] = None  # bitmask formats: compressed-tensors >= 0.15 cannot read them
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from prunekit.data import calibration_batch, eval_tokens, load_data
    from prunekit.evaluate import perplexity
    from prunekit.evaluate.speed import compare_latency
    from prunekit.export import ExportSettings, export_folder, int8_dynamic, load, save_model
    from prunekit.models import builtin_folder, load_model
    from prunekit.pruning import prune

    results: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                               "model": "smollm2-135m", "args": vars(args)}
    dense, tokenizer = load_model("smollm2-135m", progress=False)
    dense_bytes = weight_bytes(builtin_folder("smollm2-135m"))
    data = load_data("austen")
    calibration = calibration_batch(tokenizer, data, args.calib_samples, 512, seed=0)
    tokens = eval_tokens(tokenizer, data, "eval", max_tokens=args.eval_tokens)
    ids = torch.randint(0, int(dense.config.vocab_size), (1, 64), generator=torch.Generator().manual_seed(1))
    results["data"] = {"calibration": f"austen calibration, {args.calib_samples} x 512 tokens, seed 0",
                       "perplexity": f"austen eval, first {int(tokens.numel())} tokens, 512-token windows",
                       "dense_folder_bytes": dense_bytes}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="prunekit-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    def ppl(model: nn.Module) -> float:
        return float(perplexity(model, tokens, seq_len=512, progress=False).perplexity)

    models: dict[str, nn.Module] = {"dense": dense}
    folders: dict[str, Path] = {"dense": builtin_folder("smollm2-135m")}
    pruned: dict[str, Any] = {"dense": {"perplexity": ppl(dense)}}
    for name, settings in PRUNING.items():
        log(f"pruning {name}")
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        result = prune(model, dict(settings), calibration, progress=False)
        folders[name] = save_model(model, tokenizer, work / name.replace(" ", "_").replace("%", ""),
                                   {"pruning": result, "task": "causal-lm"}, overwrite=True)
        models[name], _, _ = load(folders[name])  # the dense-stored float32 self, reloaded
        pruned[name] = {"settings": settings, "prune_seconds": time.perf_counter() - start,
                        "sparsity": result.sparsity, "bytes": weight_bytes(folders[name]),
                        "perplexity": ppl(models[name])}
        log(f"{name}: perplexity {pruned[name]['perplexity']:.2f}")
    results["pruned"] = pruned

    exports: dict[str, Any] = {}
    for name, (source, fmt, quantize) in EXPORTS.items():
        log(f"export {name}")
        out = work / ("export-" + name.replace(" ", "_").replace("%", "").replace("+", "").replace(":", ""))
        start = time.perf_counter()
        export_folder(folders[source], out, ExportSettings(format=fmt, quantize=quantize, dtype="bfloat16",
                                                           group_size=args.group_size), overwrite=True)
        seconds = time.perf_counter() - start
        reloaded, _, _ = load(out)
        row = {"source": source, "format": fmt, "quantize": quantize, "export_seconds": seconds,
               "bytes": weight_bytes(out), "perplexity": ppl(reloaded)}
        row["size_ratio"] = row["bytes"] / dense_bytes
        row["perplexity_change"] = row["perplexity"] / pruned[source]["perplexity"] - 1
        row.update(checks(name, out, folders[source], quantize, ids))
        from prunekit.evaluate.size import disk_breakdown

        row["bytes_by_kind"], row["disk_format"] = disk_breakdown(out)
        if name in TARGETS:
            size_target, ppl_target = TARGETS[name]
            row["targets"] = {"size_ratio": size_target, "perplexity_change": ppl_target,
                              "size_met": row["size_ratio"] <= size_target,
                              "perplexity_met": None if ppl_target is None else row["perplexity_change"] <= ppl_target}
        exports[name] = row
        log(f"{name}: {row['size_ratio']:.3f}x size, perplexity {row['perplexity']:.2f} "
            f"({100 * row['perplexity_change']:+.2f} %)")
        del reloaded
    results["exports"] = exports
    write(results)

    log("int8 dynamic models")
    structured = models["heads-neurons 50%"]
    runtime = {"dense fp32": dense, "dense int8": int8_dynamic(dense),
               "dense int8, FFN-out + head fp32": int8_dynamic(dense, keep_float=KEEP_FLOAT),
               "heads-neurons 50% fp32": structured, "heads-neurons 50% int8": int8_dynamic(structured),
               "heads-neurons 50% int8, FFN-out + head fp32": int8_dynamic(structured, keep_float=KEEP_FLOAT),
               "wanda 50% int8": int8_dynamic(models["wanda 50%"])}
    quality = {"dense fp32": pruned["dense"]["perplexity"],
               "heads-neurons 50% fp32": pruned["heads-neurons 50%"]["perplexity"]}
    for name, model in runtime.items():
        if name not in quality:
            quality[name] = ppl(model)
    log(f"latency: {args.rounds} interleaved rounds of {len(runtime)} models")
    speed = compare_latency(runtime, seq_len=512, gen_tokens=32, repeats=args.rounds, warmup=2, device="cpu")
    results["cpu"] = {name: {"prefill_512_ms": value.forward_ms_median, "prefill_512_ratio": value.forward_ratio,
                             "decode_ms_per_token": value.decode_ms_per_token, "decode_ratio": value.decode_ratio,
                             "perplexity": quality[name], "last_logits_only": value.last_logits_only,
                             "prefill_ms_rounds": value.forward_ms_rounds, "decode_ms_rounds": value.decode_ms_rounds}
                      for name, value in speed.items()}
    results["cpu_target"] = {"model": "heads-neurons 50% int8", "prefill_512_ratio": 0.35,
                             "met": results["cpu"]["heads-neurons 50% int8"]["prefill_512_ratio"] <= 0.35}
    results["machine"]["load_average_end"] = os.getloadavg()
    write(results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return results


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "export.md").write_text(markdown(results))


def _mark(met: bool | None) -> str:
    return "stated" if met is None else ("met" if met else "**missed**")


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# Export benchmark: compressed and quantised smollm2-135m", "",
             f"Run {results['date']} on {m['cpu']} ({m['cores']} cores, {m['threads']} threads), torch {m['torch']}, "
             f"load average {m['load_average_start'][0]:.2f} at start"
             + (f", {m['load_average_end'][0]:.2f} at end." if "load_average_end" in m else "."), "",
             "## Protocol", "", (__doc__ or "").split("\n\n    flock")[0].strip(), "",
             f"Dense float32 folder: {results['data']['dense_folder_bytes'] / 1e6:.1f} MB of weights; "
             f"perplexity {results['pruned']['dense']['perplexity']:.2f}.", "",
             "## Size and perplexity", "",
             "| export | size vs dense fp32 | target | ppl (its fp32 self) | change | target | zeros lost | "
             "plain transformers |", "|" + "---|" * 8]
    for name, row in results.get("exports", {}).items():
        target = row.get("targets") or {}
        size_t = f"<= {target['size_ratio']}x: {_mark(target['size_met'])}" if target else "-"
        ppl_t = "-" if not target else (f"<= +{100 * target['perplexity_change']:.0f} %: "
                                        f"{_mark(target['perplexity_met'])}" if target["perplexity_change"]
                                        is not None else "stated")
        plain = {True: "yes, same weights", False: "weights differ", None: "no (bitmask)"}[
            row["plain_transformers_weights_equal"]]
        self_ppl = results["pruned"][row["source"]]["perplexity"]
        lines.append(f"| {name} | {row['bytes'] / 1e6:.1f} MB = {row['size_ratio']:.3f}x | {size_t} | "
                     f"{row['perplexity']:.2f} ({self_ppl:.2f}) | {100 * row['perplexity_change']:+.2f} % | {ppl_t} | "
                     f"{row['zeros_lost']} | {plain} |")
    lines.append("")
    for name, row in results.get("exports", {}).items():
        kinds = ", ".join(f"{k.replace('_', ' ')} {v / 1e6:.1f} MB" for k, v in (row["bytes_by_kind"] or {}).items())
        extra = (f"; bf16 logits equal to the dense-stored folder's: {row['bf16_logits_equal_dense_stored']}"
                 if "bf16_logits_equal_dense_stored" in row else "")
        lines.append(f"- {name}: {row['storage']}; {kinds}; {row['new_zeros_from_rounding']} weights rounded to "
                     f"zero by quantisation{extra}")
    cpu = results.get("cpu")
    if cpu:
        target = results["cpu_target"]
        lines += ["", "## CPU speed (interleaved, ratios to dense float32)", "",
                  "| model | prefill 512 | decode per token | perplexity |", "|---|---|---|---|"]
        for name, row in cpu.items():
            lines.append(f"| {name} | {row['prefill_512_ms']:.1f} ms ({row['prefill_512_ratio']:.2f}x) | "
                         f"{row['decode_ms_per_token']:.2f} ms ({row['decode_ratio']:.2f}x) | "
                         f"{row['perplexity']:.2f} |")
        lines += ["", f"Target: {target['model']} prefill-512 <= {target['prefill_512_ratio']}x of dense float32: "
                  f"{_mark(target['met'])} ({cpu[target['model']]['prefill_512_ratio']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds (default 10)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="int4 group (default 64: 128 does not divide smollm2's 576 inputs)")
    parser.add_argument("--keep", default=None, help="keep the pruned and exported folders here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    run(args)
    log("done: bench/results/export.md")


if __name__ == "__main__":
    main()
