"""Benchmark of sequential onloading (issue 15): peak memory of one-shot pruning, as the OS measures it.

Each configuration is its own process, `prunekit prune MODEL --method sparsegpt --sparsity 0.5 --calib austen
--calib-samples 64 --seq-len 512 --seed 0 --device cpu --onload {always,never} --out DIR`, and its peak resident
set size is its ru_maxrss as the kernel reports it, read by GNU time (`/usr/bin/time -f %M`; that process
alone, every page it touched, file-backed pages of memory-mapped weights included). Not os.wait4 from this
script: a child's ru_maxrss starts from its parent's high-water mark at the fork (Linux keeps it across
exec), and this script holds a 60-block model at one point. Wall time is the child's from start to exit
(imports, loading, calibration, pruning, writing). Runs go one after the other, never
two at once; the smollm2-135m pair runs `--rounds` times in alternating order, and its wall-time ratio
compares the fastest run of each mode (the one least disturbed by other work on the machine).

Models: smollm2-135m (30 blocks, float32, 538 MB of weights), and a random-weight model of the very same
shapes with 60 blocks, built and saved here (seeded, float32, tied head, smollm2's tokenizer). Depth
target: its onloaded peak is less than 0.1 GB above smollm2-135m's onloaded peak (the highest of the
rounds; the weights' values change no allocation).
Same result: the two smollm2 outputs are compared tensor by tensor, and their perplexity is measured on
the first `--eval-tokens` tokens of the austen eval split (Persuasion), 512-token windows
(prunekit.evaluate.perplexity, BOS first), in this process after all timed runs.

    flock /tmp/prunekit-cpu.lock .venv/bin/python bench/memory.py     # about 20 minutes on 2 cores

Evaluation rows: `prunekit eval smollm2-135m --data austen --max-tokens 8192 --seq-len 512 --no-latency --seed 0
--device cpu --onload {always,never} --json FILE`, peak RSS read the same way; the onloaded perplexity must equal the
full load's. `--eval-only` runs just these two (a few minutes).

Writes bench/results/memory.json and bench/results/memory.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PRUNEKIT = Path(sys.executable).with_name("prunekit")
TIME = "/usr/bin/time"  # GNU time
TARGETS = {"peak_gb": 0.8, "wall_ratio": 1.15, "depth_gb": 0.1}
COMMAND = ["--method", "sparsegpt", "--sparsity", "0.5", "--calib", "austen", "--calib-samples", "64",
           "--seq-len", "512", "--seed", "0", "--device", "cpu"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), None) if Path("/proc/meminfo").exists() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory, "torch": torch.__version__,
            "python": platform.python_version(), "load_average_start": os.getloadavg(),
            "onload_malloc": "glibc mmap threshold " + os.environ.get("PRUNEKIT_MMAP_THRESHOLD", "4194304 (prunekit's)")
                             + " bytes, malloc_trim after each block"}


def measure(model: str, onload: str, out: Path) -> dict[str, Any]:
    """Run one `prunekit prune` as a child process; its peak RSS (bytes) and wall time (s)."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(PRUNEKIT), "prune", model, *COMMAND, "--onload", onload, "--out", str(out)]
    peak_file = out.with_suffix(".maxrss")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as output:
        code = subprocess.call([TIME, "-f", "%M", "-o", str(peak_file), *argv], stdout=output,
                               stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): see {out.with_suffix('.log')}")
    peak_kb = int(peak_file.read_text().split()[-1])
    record = json.loads((out / "prunekit.json").read_text())
    row = {"model": model, "onload": onload, "peak_rss_bytes": peak_kb * 1024, "wall_s": wall,
           "prune_wall_s": record["timing"].get("prune_wall_s"), "load_average_before": load,
           "onloaded": "onload" in record, "blocks_in_memory_at_most":
           (record.get("onload") or {}).get("blocks_in_memory_at_most"), "sparsity": record["sparsity"]["total"]}
    log(f"{model} --onload {onload}: peak {row['peak_rss_bytes'] / 1e9:.3f} GB, {wall:.1f} s")
    return row


EVAL_COMMAND = ["--data", "austen", "--max-tokens", "8192", "--seq-len", "512", "--no-latency", "--seed", "0",
                "--device", "cpu"]


def measure_eval(model: str, onload: str, out: Path) -> dict[str, Any]:
    """Run one `prunekit eval` as a child process; its peak RSS (bytes), wall time (s) and perplexity."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = out.with_suffix(".json")
    argv = [str(PRUNEKIT), "eval", model, *EVAL_COMMAND, "--onload", onload, "--json", str(result)]
    peak_file = out.with_suffix(".maxrss")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as output:
        code = subprocess.call([TIME, "-f", "%M", "-o", str(peak_file), *argv], stdout=output,
                               stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): see {out.with_suffix('.log')}")
    data = json.loads(result.read_text())
    row = {"model": model, "onload": onload, "peak_rss_bytes": int(peak_file.read_text().split()[-1]) * 1024,
           "wall_s": wall, "load_average_before": load, "perplexity": data["perplexity"]["perplexity"],
           "onloaded": "onload" in data,
           "blocks_in_memory_at_most": (data.get("onload") or {}).get("blocks_in_memory_at_most")}
    log(f"eval {model} --onload {onload}: peak {row['peak_rss_bytes'] / 1e9:.3f} GB, {wall:.1f} s, "
        f"perplexity {row['perplexity']:.4f}")
    return row


def eval_rows(work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The evaluation pair (full load, then onloaded) and its summary."""
    rows = [measure_eval("smollm2-135m", mode, work / f"eval-{mode}") for mode in ("never", "always")]
    by_mode = {row["onload"]: row for row in rows}
    summary = {"peak_rss_bytes": {mode: row["peak_rss_bytes"] for mode, row in by_mode.items()},
               "perplexity": {mode: row["perplexity"] for mode, row in by_mode.items()},
               "same": by_mode["always"]["perplexity"] == by_mode["never"]["perplexity"]}
    return rows, summary


def random_model(source: Path, blocks: int, out: Path) -> Path:
    """A seeded random-weight model with smollm2's shapes and ``blocks`` blocks, saved with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = blocks
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out


def same_weights(a: Path, b: Path) -> dict[str, Any]:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                found.update({key: file for key in handle.keys()})
        return found

    left, right = tensors(a), tensors(b)
    differ = [name for name in left if name not in right]
    for name in left:
        if name in right:
            with safe_open(str(left[name]), framework="pt") as x, safe_open(str(right[name]), framework="pt") as y:
                if not torch.equal(x.get_tensor(name), y.get_tensor(name)):
                    differ.append(name)
    return {"tensors": len(left), "same_names": sorted(left) == sorted(right), "differing": differ,
            "equal": not differ and sorted(left) == sorted(right)}


def perplexities(folders: dict[str, Path], tokens: int) -> dict[str, float]:
    from prunekit.data import eval_tokens, load_data
    from prunekit.evaluate import perplexity
    from prunekit.export import load

    out: dict[str, float] = {}
    for name, folder in folders.items():
        model, tokenizer, _ = load(folder)
        ids = eval_tokens(tokenizer, load_data("austen"), "eval", max_tokens=tokens)
        out[name] = perplexity(model, ids, seq_len=512, progress=False).perplexity
        del model
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from prunekit.models import builtin_folder

    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} (GNU time) is needed to read each run's peak memory: apt-get install time")
    source = builtin_folder("smollm2-135m")
    results: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                               "command": f"prunekit prune MODEL {' '.join(COMMAND)} --onload MODE --out DIR",
                               "data": {"calibration": "austen calibration split", "samples": 64, "seq_len": 512,
                                        "seed": 0, "eval_tokens": args.eval_tokens},
                               "targets": TARGETS, "runs": []}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="prunekit-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.eval_only:
        try:
            results["eval_runs"], results["eval_summary"] = eval_rows(work)
            results["machine"]["load_average_end"] = os.getloadavg()
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "memory_eval.json").write_text(json.dumps(results, indent=2) + "\n")
        return results
    try:
        log(f"building the random-weight 60-block model in {work}")
        models = {"random-60": random_model(source, 60, work / "random-60")}
        order = ["never", "always"]
        for round_number in range(args.rounds):
            for mode in order if round_number % 2 == 0 else order[::-1]:
                row = measure("smollm2-135m", mode, work / f"smollm2-{mode}")
                results["runs"].append({**row, "round": round_number})
        for name, folder in models.items():
            row = measure(str(folder), "always", work / f"{name}-always")
            results["runs"].append({**row, "model": name, "round": 0})
        results["machine"]["load_average_end"] = os.getloadavg()
        smol = {mode: [r for r in results["runs"] if r["model"] == "smollm2-135m" and r["onload"] == mode]
                for mode in order}
        depth = {r["model"]: r for r in results["runs"] if r["model"].startswith("random-")}
        peak = {mode: max(r["peak_rss_bytes"] for r in rows) for mode, rows in smol.items()}
        wall = {mode: min(r["wall_s"] for r in rows) for mode, rows in smol.items()}
        weights = same_weights(work / "smollm2-never", work / "smollm2-always")
        ppl = perplexities({mode: work / f"smollm2-{mode}" for mode in order}, args.eval_tokens)
        results["eval_runs"], results["eval_summary"] = eval_rows(work)
        growth = depth["random-60"]["peak_rss_bytes"] - peak["always"]
        results["summary"] = {
            "peak_rss_bytes": peak, "wall_s_fastest": wall, "wall_ratio": wall["always"] / wall["never"],
            "same_weights": weights, "perplexity": ppl, "depth_growth_bytes": growth,
            "met": {"peak": peak["always"] <= TARGETS["peak_gb"] * 1e9,
                    "wall": wall["always"] / wall["never"] <= TARGETS["wall_ratio"],
                    "same": weights["equal"] and ppl["always"] == ppl["never"],
                    "depth": growth < TARGETS["depth_gb"] * 1e9}}
        log(f"summary: {results['summary']['met']}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write(results)
    return results


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "memory.md").write_text(markdown(results))


def _mark(met: bool) -> str:
    return "met" if met else "**missed**"


def markdown(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["summary"]
    lines = ["# Memory benchmark: sequential onloading", "",
             f"Run {results['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB), "
             f"torch {m['torch']}, load average {m['load_average_start'][0]:.2f} at start, "
             f"{m['load_average_end'][0]:.2f} at end. Allocator of the onloaded runs: "
             f"{m.get('onload_malloc', 'not recorded')}.", "",
             "## Protocol", "", (__doc__ or "").split("\n\n    flock")[0].strip(), "",
             f"Command: `{results['command']}`.", "",
             "## Runs (in the order they ran)", "",
             "| model | --onload | peak RSS | wall | pruning | blocks in memory at most | load before |",
             "|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        blocks = row["blocks_in_memory_at_most"] if row["blocks_in_memory_at_most"] is not None else "all"
        lines.append(f"| {row['model']} | {row['onload']} | {row['peak_rss_bytes'] / 1e9:.3f} GB | "
                     f"{row['wall_s']:.1f} s | {row['prune_wall_s']:.1f} s | {blocks} | "
                     f"{row['load_average_before']:.2f} |")
    peak, wall, ppl, weights = s["peak_rss_bytes"], s["wall_s_fastest"], s["perplexity"], s["same_weights"]
    lines += ["", "## Targets", "",
              f"- smollm2-135m peak RSS with onloading {peak['always'] / 1e9:.3f} GB (without: "
              f"{peak['never'] / 1e9:.3f} GB), target <= {TARGETS['peak_gb']} GB: {_mark(s['met']['peak'])}.",
              f"- Wall time with onloading {wall['always']:.1f} s against {wall['never']:.1f} s without (fastest "
              f"of each): {s['wall_ratio']:.3f}x, target <= {TARGETS['wall_ratio']}x: {_mark(s['met']['wall'])}.",
              f"- Same result: {weights['tensors']} saved tensors, equal one by one: {weights['equal']}; perplexity "
              f"{ppl['always']:.4f} with onloading, {ppl['never']:.4f} without: {_mark(s['met']['same'])}.",
              f"- Depth: the 60-block random model peaks {s['depth_growth_bytes'] / 1e9:+.3f} GB against "
              f"smollm2-135m's 30 blocks (both onloaded), target < +{TARGETS['depth_gb']} GB: "
              f"{_mark(s['met']['depth'])}."]
    if results.get("eval_runs"):
        e = results["eval_summary"]
        lines += ["", "## Evaluation (perplexity)", "",
                  f"Command: `prunekit eval smollm2-135m {' '.join(EVAL_COMMAND)} --onload MODE --json FILE`.", "",
                  "| --onload | peak RSS | wall | perplexity | blocks in memory at most |", "|---|---|---|---|---|"]
        for row in results["eval_runs"]:
            blocks = row["blocks_in_memory_at_most"] if row["blocks_in_memory_at_most"] is not None else "all"
            lines.append(f"| {row['onload']} | {row['peak_rss_bytes'] / 1e9:.3f} GB | {row['wall_s']:.1f} s | "
                         f"{row['perplexity']:.4f} | {blocks} |")
        lines += ["", f"Same perplexity onloaded and not: {e['same']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="smollm2 runs of each mode, alternating (default 2)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--keep", default=None, help="keep the models and outputs in this folder")
    parser.add_argument("--eval-only", action="store_true",
                        help="only the two `prunekit eval` runs (writes bench/results/memory_eval.json)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run(args)
    log("done: bench/results/memory_eval.json" if args.eval_only else "done: bench/results/memory.md")


if __name__ == "__main__":
    main()
