"""Zero-shot accuracy of pruned smollm2-135m on prunekit's offline lm-eval tasks (and perplexity beside it).

Protocol: `prunekit prune smollm2-135m --method M --sparsity S --calib austen` (64 x 512 calibration tokens,
seed 0) for each configuration, then `prunekit eval MODEL --data austen --max-tokens 16384 --tasks
austen-cloze,austen-nextsent,reviews-zeroshot --no-latency` in its own process: lm-evaluation-harness on
the model in memory, 0-shot, every document, batch 8; perplexity on the first 16,384 tokens of Persuasion
in 512-token windows that start with the BOS token. With --check-lm-eval, the dense model is also run
through lm-eval's own command line (`lm_eval --model hf --include_path TASKS`) and the numbers compared.

    python bench/zeroshot.py                          # dense, wanda/sparsegpt/magnitude 50 %, magnitude 70 %
    python bench/zeroshot.py --limit 50 --check-lm-eval

Writes bench/results/zeroshot.json and bench/results/zeroshot.md. Pruned models go to --work (kept, reused).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TASKS = "austen-cloze,austen-nextsent,reviews-zeroshot"
CONFIGS = [("dense", None), ("wanda", 0.5), ("sparsegpt", 0.5), ("magnitude", 0.5), ("magnitude", 0.7)]


def label(method: str, sparsity: float | None) -> str:
    return "dense" if sparsity is None else f"{method} {100 * sparsity:.0f} %"


def prunekit(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli.main", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prunekit {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return proc


def model_folder(method: str, sparsity: float | None, args: argparse.Namespace) -> tuple[str, float | None]:
    """The model to evaluate (pruned into --work unless already there) and the pruning wall time."""
    if sparsity is None:
        return args.model, None
    out = Path(args.work) / f"{method}-{int(100 * sparsity)}"
    if (out / "prunekit.json").is_file():
        return str(out), None
    start = time.perf_counter()
    prunekit("prune", args.model, "--method", method, "--sparsity", str(sparsity), "--calib", "austen",
             "--calib-samples", str(args.calib_samples), "--seq-len", "512", "--seed", str(args.seed),
             "--device", "cpu", "--out", str(out))
    return str(out), time.perf_counter() - start


def evaluate(model: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="prunekit-zeroshot-") as tmp:
        command = ["eval", model, "--data", "austen", "--max-tokens", str(args.eval_tokens), "--tasks", TASKS,
                   "--no-latency", "--device", "cpu", "--seed", str(args.seed), "--json", f"{tmp}/out.json"]
        if args.limit:
            command += ["--limit", str(args.limit)]
        start = time.perf_counter()
        prunekit(*command)
        results = json.loads(Path(f"{tmp}/out.json").read_text())
    results["eval_wall_s"] = time.perf_counter() - start
    results["command"] = "prunekit " + " ".join(command[:-2])
    return results


def lm_eval_cli(folder: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same tasks through lm-eval's own command line on the saved model folder."""
    from prunekit.evaluate.harness import TASK_DIR

    lm_eval = Path(sys.executable).with_name("lm_eval")
    with tempfile.TemporaryDirectory(prefix="prunekit-lmeval-") as tmp:
        command = [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", TASKS,
                   "--include_path", str(TASK_DIR), "--device", "cpu", "--batch_size", "8", "--output_path", tmp]
        if args.limit:
            command += ["--limit", str(args.limit)]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"lm_eval failed:\n{proc.stderr[-4000:]}")
        found = sorted(Path(tmp).rglob("results_*.json"))
        raw = json.loads(found[-1].read_text())
    metrics = {task: {k.split(",")[0]: v for k, v in result.items() if "," in k}
               for task, result in raw["results"].items()}
    return {"command": " ".join(["lm_eval", *command[1:-2]]), "wall_s": time.perf_counter() - start,
            "metrics": metrics, "n_samples": raw.get("n-samples")}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def pct(metrics: dict[str, Any], key: str) -> str:
    value, error = metrics.get(key), metrics.get(f"{key}_stderr")
    if not isinstance(value, float):
        return "-"
    return f"{100 * value:.1f} ± {100 * error:.1f}" if isinstance(error, float) else f"{100 * value:.1f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], check: dict[str, Any] | None) -> str:
    counts = rows[0]["tasks"]["tasks"]
    n = {task: counts[task]["n_samples"] for task in counts}
    lines = [
        "# Zero-shot accuracy after pruning", "",
        f"- model: {meta['model']}; calibration: {meta['calib_samples']} x 512 tokens of the austen calibration "
        f"split (Emma, Mansfield Park, Pride and Prejudice, Sense and Sensibility), seed {meta['seed']}",
        f"- tasks: prunekit's offline lm-eval tasks ({meta['task_folder']}), 0-shot, lm-evaluation-harness "
        f"{meta['lm_eval']}, batch 8; documents: austen-cloze {n['austen-cloze']}, austen-nextsent "
        f"{n['austen-nextsent']}, reviews-zeroshot {n['reviews-zeroshot']}",
        f"- perplexity: first {meta['eval_tokens']:,} tokens of Persuasion, 512-token windows, each the BOS token "
        "followed by 511 text tokens",
        f"- machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; {meta['date']}", "",
        "| model | austen-cloze acc | austen-nextsent acc | austen-nextsent acc_norm | reviews-zeroshot acc "
        "| perplexity (Persuasion) | eval s |",
        "|---|---|---|---|---|---|---|",
        "| chance | ≈ 0 | 25.0 | 25.0 | 50.0 (majority class 52.8) | - | - |"]
    for row in rows:
        tasks = {name: entry["metrics"] for name, entry in row["tasks"]["tasks"].items()}
        lines.append(f"| {row['label']} | {pct(tasks['austen-cloze'], 'acc')} | {pct(tasks['austen-nextsent'], 'acc')} "
                     f"| {pct(tasks['austen-nextsent'], 'acc_norm')} | {pct(tasks['reviews-zeroshot'], 'acc')} | "
                     f"{row['perplexity']['perplexity']:.2f} | {row['eval_wall_s']:.0f} |")
    lines += ["", "Accuracies in percent ± lm-eval's standard error (the sample standard deviation over documents "
              "/ sqrt(n)); 'eval s' = the whole `prunekit eval` command (load, perplexity, three tasks)."]
    if check:
        lines += ["", f"Cross-check on the dense model: `{check['command']}` gives"]
        for task, metrics in check["metrics"].items():
            ours = rows[0]["tasks"]["tasks"][task]["metrics"]
            same = all(abs(ours[k] - v) < 1e-9 for k, v in metrics.items() if isinstance(v, float) and k in ours)
            shown = ", ".join(f"{k} {v:.6g}" for k, v in metrics.items() if isinstance(v, float))
            lines.append(f"- {task}: {shown} ({'identical to' if same else 'DIFFERENT from'} prunekit eval)")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-lm-eval", action="store_true", help="also run lm-eval's CLI on the dense model")
    parser.add_argument("--work", default="out/zeroshot", help="folder for the pruned models (reused)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import torch

    import prunekit
    from prunekit.evaluate.harness import TASK_DIR, lm_eval_version
    from prunekit.models import builtin_folder

    meta = {"model": args.model, "calib_samples": args.calib_samples, "eval_tokens": args.eval_tokens,
            "limit": args.limit, "seed": args.seed, "tasks": TASKS, "task_folder": "src/prunekit/evaluate/tasks",
            "lm_eval": lm_eval_version(), "machine": machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "prunekit": prunekit.__version__,
            "load_average": os.getloadavg()[0], "date": datetime.datetime.now().isoformat(timespec="seconds")}
    rows: list[dict[str, Any]] = []
    for method, sparsity in CONFIGS:
        folder, prune_s = model_folder(method, sparsity, args)
        result = evaluate(folder, args)
        row = {"label": label(method, sparsity), "method": method, "sparsity": sparsity, "model": folder,
               "prune_wall_s": prune_s, **{k: result[k] for k in ("tasks", "perplexity", "protocol", "eval_wall_s",
                                                                  "command")}}
        rows.append(row)
        accs = {task: round(100 * entry["metrics"]["acc"], 2) for task, entry in result["tasks"]["tasks"].items()}
        print(f"{row['label']:<16} {accs} ppl {result['perplexity']['perplexity']:.2f} "
              f"({result['eval_wall_s']:.0f} s)", flush=True)
    check = lm_eval_cli(str(builtin_folder(args.model)), args) if args.check_lm_eval else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta["task_folder_path"] = str(TASK_DIR)
    (out / "zeroshot.json").write_text(json.dumps({"meta": meta, "results": rows, "lm_eval_cli": check},
                                                  indent=2) + "\n")
    (out / "zeroshot.md").write_text(markdown(rows, meta, check))
    print(f"wrote {out / 'zeroshot.json'} and {out / 'zeroshot.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
