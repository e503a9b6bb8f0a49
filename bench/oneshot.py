"""Benchmark of one-shot pruning on smollm2-135m: perplexity, pruning time and peak memory per method.

Protocol: calibration = 64 windows x 512 tokens drawn (seed 0) from the austen calibration split;
perplexity on the first 32,768 tokens of the austen eval split (Persuasion) in non-overlapping
512-token windows. Each configuration runs in its own process (fresh model, honest peak memory).

    python bench/oneshot.py                      # every configuration (about an hour on 2 cores)
    python bench/oneshot.py --quick              # dense, magnitude 50%, wanda and sparsegpt 50% and 2:4
    python bench/oneshot.py --only wanda,sparsegpt --cli

Writes bench/results/oneshot.json and bench/results/oneshot.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

# reference implementations under the same protocol (perplexity; pruning seconds on 2 cores)
REFERENCE = {("dense", None): 42.75, ("magnitude", "0.5"): 439.77, ("magnitude", "2:4"): 1122.37,
             ("wanda", "0.5"): 75.71, ("wanda", "2:4"): 180.27, ("sparsegpt", "0.5"): 63.31,
             ("sparsegpt", "2:4"): 97.13}
REFERENCE_SECONDS = {"wanda": 131.0, "sparsegpt": 212.0}


def configurations(quick: bool) -> list[dict[str, Any]]:
    """The runs, as prune() settings (method 'dense' = no pruning)."""
    runs: list[dict[str, Any]] = [{"method": "dense"}]
    one_shot = ["magnitude"] if quick else ["magnitude", "random"]
    for method in one_shot:
        runs.append({"method": method, "sparsity": 0.5})
        if not quick:
            runs.append({"method": method, "structure": "2:4"})
    for method in ("wanda", "sparsegpt"):
        runs += [{"method": method, "sparsity": 0.5}, {"method": method, "structure": "2:4"}]
        if not quick:
            for sparsity in (0.6, 0.7):
                runs += [{"method": method, "sparsity": sparsity},
                         {"method": method, "sparsity": sparsity, "allocation": "owl"}]
    return runs


# issue 11 (--plus): RIA, channel permutation, mask refinement (swaps), block reconstruction; ablations
# filled in by --recon-steps / --recon-lr; a step fits one micro-batch of 2 samples (1,024 tokens)
RECON: dict[str, Any] = {"reconstruct_steps": 0, "reconstruct_lr": 1e-4, "micro_batch_size": 2}


def plus_configurations() -> list[dict[str, Any]]:
    """The --plus runs: RIA and permutation rows, then each part of the best recipe added one at a time."""
    runs: list[dict[str, Any]] = [{"method": "dense"},
                                  {"method": "ria", "sparsity": 0.5}, {"method": "ria", "structure": "2:4"},
                                  {"method": "ria", "structure": "2:4", "permute": True},
                                  {"method": "wanda", "structure": "2:4", "permute": True},
                                  # sequential (each layer group's statistics after the earlier groups are pruned)
                                  {"method": "wanda", "structure": "2:4", "sequential": True},
                                  {"method": "ria", "structure": "2:4", "permute": True, "sequential": True},
                                  {"method": "ria", "structure": "2:4", "permute": True, "sequential": True,
                                   "refine": "swaps"},
                                  {"method": "ria", "structure": "2:4", "permute": True, "sequential": True,
                                   "reconstruct_steps": "RECON"}]
    for amount in ({"sparsity": 0.5}, {"structure": "2:4"}, {"sparsity": 0.7}):
        runs += [{"method": "sparsegpt", **amount, "sequential": True},
                 {"method": "sparsegpt", **amount, "refine": "swaps"},
                 {"method": "sparsegpt", **amount, "reconstruct_steps": "RECON"},
                 {"method": "sparsegpt", **amount, "refine": "swaps", "reconstruct_steps": "RECON"}]
    return runs


def resolved(run: dict[str, Any]) -> dict[str, Any]:
    """A run's settings with the reconstruction placeholders filled in."""
    out = dict(run)
    if out.get("reconstruct_steps") == "RECON":
        out.update(RECON)
    return out


def label(run: dict[str, Any]) -> str:
    if run["method"] == "dense":
        return "dense"
    amount = run.get("structure") or f"{100 * run['sparsity']:.0f}%"
    text = f"{run['method']} {amount}" + (" owl" if run.get("allocation") == "owl" else "")
    if run.get("permute"):
        text += " +permute"
    if run.get("sequential"):
        text += " +sequential"
    if run.get("refine", "none") != "none":
        text += f" +{run['refine']}"
    if run.get("reconstruct_steps"):
        text += f" +recon{run['reconstruct_steps']}"
    return text


def _status_mb(key: str) -> float:
    """A memory figure (MB) from /proc/self/status, or the peak so far where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident memory (MB)."""
    return _status_mb("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak resident memory (MB) since start or the last reset_peak()."""
    return _status_mb("VmHWM")


def run_one(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Load, calibrate, prune, measure: one configuration, in this process."""
    import torch

    from prunekit.data import calibration_batch, eval_tokens, load_data
    from prunekit.evaluate import perplexity
    from prunekit.methods import get_method
    from prunekit.models import load_model
    from prunekit.pruning import prune

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, progress=False)
    data = load_data(args.data)
    tokens = eval_tokens(tokenizer, data, max_tokens=args.eval_tokens)
    out: dict[str, Any] = {"label": label(run), "settings": run, "load_s": time.perf_counter() - started}
    if run["method"] != "dense":
        calib = calibration_batch(tokenizer, data, args.samples, args.seq_len, seed=args.seed)
        with torch.no_grad():  # page every weight in (they may be memory-mapped), so the baseline holds the model
            touched = sum(float(p.float().abs().sum()) for p in model.parameters())
        out["rss_before_prune_mb"] = rss_mb()
        out["weights_abs_sum"] = touched
        exact_peak = reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        settings = dict(run)
        if "seed" in get_method(run["method"]).config.names():  # random's seed; the others take none
            settings["seed"] = args.seed
        result = prune(model, settings, calib, device=args.device, progress=False)
        out["prune_s"] = time.perf_counter() - start
        out["prune_cpu_s"] = time.process_time() - cpu  # all threads; wall time on a busy machine overstates
        out["load_during_prune"] = os.getloadavg()[0]
        out["peak_rss_prune_mb"] = peak_mb()
        out["peak_is_process_wide"] = not exact_peak
        out["timing"] = result.timing
        out["sparsity"] = result.sparsity
        out["block_sparsity"] = result.block_sparsity
        out["method_result"] = result.extra
        del calib
    start = time.perf_counter()
    ppl = perplexity(model, tokens, seq_len=args.seq_len, device=args.device, progress=False)
    out.update(perplexity=ppl.perplexity, eval_tokens=ppl.n_tokens, eval_windows=ppl.n_windows,
               eval_protocol=ppl.protocol, eval_s=time.perf_counter() - start,
               model_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
               threads=torch.get_num_threads())
    return out


def time_cli(args: argparse.Namespace, method: str = "sparsegpt", settings: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Wall time of the whole `prunekit prune` command (load, calibrate, prune, save)."""
    import tempfile

    flags: list[str] = ["--sparsity", "0.5"]
    for key, value in (settings or {}).items():
        if key not in ("method", "sparsity"):
            flags += ["--method-arg", f"{key}={value}"]
    with tempfile.TemporaryDirectory(prefix="prunekit-bench-") as tmp:
        command = [sys.executable, "-m", "prunekit.cli.main", "prune", args.model, "--method", method,
                   *flags, "--calib", args.data, "--calib-samples", str(args.samples), "--seq-len",
                   str(args.seq_len), "--seed", str(args.seed), "--device", args.device, "--out", f"{tmp}/out"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = after.ru_maxrss / 1024
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"prunekit prune failed:\n{proc.stderr}")
    return {"label": f"prunekit prune --method {method} {' '.join(flags)} (load, prune, save)", "wall_s": wall,
            "cpu_s": cpu, "load_average": os.getloadavg()[0], "peak_rss_mb": peak,
            "command": "prunekit " + " ".join(command[3:])}


def child(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", json.dumps(run), "--model", args.model, "--data", args.data,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--eval-tokens", str(args.eval_tokens),
               "--seed", str(args.seed), "--device", args.device]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label(run)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: list[dict[str, Any]], cli: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    lines = [
        "# One-shot pruning benchmark", "",
        f"- model: {meta['model']}; data: {meta['data']} (calibration split for calibration, eval split = "
        f"Persuasion for perplexity)",
        f"- calibration: {meta['samples']} x {meta['seq_len']} tokens, seed {meta['seed']}; perplexity: first "
        f"{meta['eval_tokens']} eval tokens in non-overlapping {meta['seq_len']}-token windows",
        f"- machine: {meta['machine']}; torch threads {meta['threads']}; load average at start {meta['load']} "
        "(other work on the same cores inflates wall times; CPU s counts this process's threads)",
        f"- date: {meta['date']}; prunekit {meta['prunekit']}, torch {meta['torch']}", "",
        "| configuration | perplexity | x dense | reference | sparsity | prune s (CPU s) "
        "| peak RSS MB in prune (before) |",
        "|---|---|---|---|---|---|---|"]
    dense = next((row["perplexity"] for row in results if row["label"] == "dense"), None)
    for row in results:
        settings = row["settings"]
        amount = settings.get("structure") or (str(settings.get("sparsity")) if "sparsity" in settings else None)
        plain = not (settings.get("allocation") or settings.get("permute") or settings.get("reconstruct_steps")
                     or settings.get("sequential") or settings.get("refine", "none") != "none")
        ref = REFERENCE.get((settings["method"], amount)) if plain else None
        ratio = f"{row['perplexity'] / dense:.2f}x" if dense else "-"
        prune_s = f"{row['prune_s']:.1f} ({row['prune_cpu_s']:.0f})" if "prune_s" in row else "-"
        memory = (f"{row['peak_rss_prune_mb']:.0f} ({row['rss_before_prune_mb']:.0f})"
                  if "peak_rss_prune_mb" in row else "-")
        sparsity = f"{100 * row['sparsity']:.2f}%" if "sparsity" in row else "0%"
        lines.append(f"| {row['label']} | {row['perplexity']:.2f} | {ratio} | {ref if ref is not None else '-'} "
                     f"| {sparsity} "
                     f"| {prune_s} | {memory} |")
    lines += ["", f"Reference pruning time on 2 cores: wanda {REFERENCE_SECONDS['wanda']:.0f} s, sparsegpt "
              f"{REFERENCE_SECONDS['sparsegpt']:.0f} s. 'prune s' is prunekit.prune() alone (model already loaded)."]
    for timed in (cli, meta.get("cli_recipe")):
        if timed:
            lines += ["", f"End to end: `{timed['command']}`: {timed['wall_s']:.1f} s wall "
                          f"({timed.get('cpu_s', 0):.0f} CPU s), peak RSS {timed['peak_rss_mb']:.0f} MB."]
    lines += ["", "Unstructured and 2:4 zeros are stored densely: file size and dense-kernel speed do not change."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--only", default=None, help="comma-separated methods to run (dense always runs)")
    parser.add_argument("--cli", action="store_true", help="also time `prunekit prune --method sparsegpt` end to end")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="austen")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--plus", action="store_true", help="issue 11's runs (RIA, permutation, refinement, "
                        "reconstruction) into NAME=oneshot_plus")
    parser.add_argument("--labels", default=None, help="semicolon-separated row labels to run (e.g. 'ria 2:4')")
    parser.add_argument("--recon-steps", type=int, default=0, help="--plus: reconstruction steps per block")
    parser.add_argument("--recon-lr", type=float, default=1e-4, help="--plus: reconstruction learning rate")
    parser.add_argument("--cli-recipe", default=None, help="JSON settings of a recipe whose whole `prunekit prune` "
                        "command is timed right after SparseGPT's (both at 50 %%)")
    parser.add_argument("--name", default=None, help="results file stem (default oneshot, or oneshot_plus)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), args)))
        return 0

    import torch

    import prunekit

    RECON.update(reconstruct_steps=args.recon_steps, reconstruct_lr=args.recon_lr)
    runs = [resolved(run) for run in plus_configurations()] if args.plus else configurations(args.quick)
    if args.labels:
        wanted_labels = {item.strip() for item in args.labels.split(";")}
        runs = [r for r in runs if label(r) in wanted_labels]
    if args.only:
        wanted = {m.strip() for m in args.only.split(",")}
        runs = [r for r in runs if r["method"] == "dense" or r["method"] in wanted]
    meta = {"model": args.model, "data": args.data, "samples": args.samples, "seq_len": args.seq_len,
            "eval_tokens": args.eval_tokens, "seed": args.seed, "device": args.device,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads(), "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "prunekit": prunekit.__version__,
            "torch": torch.__version__}
    cli = time_cli(args) if args.cli or args.cli_recipe else None  # first: the children's peak memory is then its
    if cli:
        print(f"{cli['label']}: {cli['wall_s']:.1f} s", flush=True)
    if args.cli_recipe:  # the recipe's whole command right after SparseGPT's, same machine state
        recipe = json.loads(args.cli_recipe)
        timed = time_cli(args, recipe["method"], recipe)
        print(f"{timed['label']}: {timed['wall_s']:.1f} s", flush=True)
        meta["cli_recipe"] = timed
    results = []
    for run in runs:
        row = child(run, args)
        results.append(row)
        print(f"{row['label']:<22} ppl {row['perplexity']:9.2f}  prune {row.get('prune_s', 0):6.1f} s  "
              f"peak {row.get('peak_rss_prune_mb', 0):6.0f} MB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("oneshot_plus" if args.plus else "oneshot")
    if args.plus and (out / f"{name}.json").exists():  # --plus adds its rows to the earlier ones (same label: new)
        earlier = json.loads((out / f"{name}.json").read_text())["results"]
        fresh = {row["label"] for row in results}
        order = [label(resolved(run)) for run in plus_configurations()]
        merged = {row["label"]: row for row in [row for row in earlier if row["label"] not in fresh] + results}
        results = sorted(merged.values(),
                         key=lambda row: order.index(row["label"]) if row["label"] in order else len(order))
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results, "cli": cli,
                                                  "reference": {f"{k[0]} {k[1]}": v for k, v in REFERENCE.items()},
                                                  "reference_seconds": REFERENCE_SECONDS}, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(results, cli, meta))
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
