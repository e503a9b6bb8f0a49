"""Training-aware pruning on a task: minilm-l6 on reviews, dense baseline vs gmp, movement and mgpp.

Every method runs the same budget (epochs or --max-steps, batch, lr, max length) and the same cubic
schedule (t_i, t_f, Δt, s_i); the test split's accuracy and the wall time are recorded. Results
are written after every run to bench/results/gradual.json and .md (runs already there are skipped
unless --fresh), so an interrupted benchmark continues where it stopped.

    python bench/gradual.py --sparsities 0.9 --methods mgpp,gmp,movement --epochs 1
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--task", default="reviews")
    parser.add_argument("--sparsities", default="0.9,0.8,0.5")
    parser.add_argument("--methods", default="mgpp,gmp,movement")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense fine-tuned baseline")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=float, default=0.1, help="t_i (steps, or a fraction of the run)")
    parser.add_argument("--final-steps", type=float, default=0.2, help="t_f (steps, or a fraction of the run)")
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--initial-sparsity", type=float, default=0.0)
    parser.add_argument("--sigma0", type=float, default=1e-10)
    parser.add_argument("--sigma1", type=float, default=0.05)
    parser.add_argument("--prior-lambda", type=float, default=0.1)
    parser.add_argument("--eval-examples", type=int, default=500, help="validation examples per evaluation")
    parser.add_argument("--evals", type=int, default=4, help="evaluations per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "gradual"), help="results path without extension")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in the output file")
    return parser.parse_args()


def steps_value(value: float) -> int | float:
    return value if 0 < value < 1 else int(value)


def one_run(args: argparse.Namespace, method_name: str, sparsity: float) -> dict[str, Any]:
    """Fine-tune (and prune) once; return accuracy, sparsity, timing and the evaluation history."""
    from prunekit.data import load_data
    from prunekit.evaluate import accuracy
    from prunekit.finetune import TrainConfig, train_model
    from prunekit.methods.gradual import build_training_method
    from prunekit.models import load_model
    from prunekit.utils import set_seed

    data = load_data(args.task)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model, task="classification", num_labels=len(data.label_names), device="cpu")
    n_train = len(data.splits["train"])
    total = args.max_steps or int(-(-n_train // args.batch_size) * args.epochs)
    settings: dict[str, Any] = {
        "sparsity": sparsity, "initial_sparsity": args.initial_sparsity, "update_every": args.update_every,
        "warmup_steps": steps_value(args.warmup_steps), "final_steps": steps_value(args.final_steps)}
    if method_name == "mgpp":  # the prior's settings belong to mgpp alone
        settings.update(sigma0=args.sigma0, sigma1=args.sigma1, prior_lambda=args.prior_lambda)
    if method_name == "none":  # the dense baseline takes no pruning settings
        settings = {}
    method = build_training_method(method_name, settings)
    config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                         max_length=args.max_length, eval_steps=max(1, total // args.evals), save_steps=0,
                         max_eval_examples=args.eval_examples, eval_batch_size=128, seed=args.seed, device="cpu")
    folder = Path(tempfile.mkdtemp(prefix="prunekit-bench-"))
    try:
        start = time.perf_counter()
        result = train_model(model, tokenizer, data, method=method, config=config, checkpoint_dir=folder / "ckpt")
        train_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    test = accuracy(result.model, tokenizer, data.splits["test"], batch_size=128, max_length=args.max_length,
                    split="test")
    validation = accuracy(result.model, tokenizer, data.splits["validation"], batch_size=128,
                          max_length=args.max_length, split="validation")
    evals = [{"step": e["step"], "accuracy": e["eval_accuracy"]} for e in result.history if "eval_accuracy" in e]
    return {"method": "dense" if method_name == "none" else method_name,
            "target_sparsity": sparsity if method_name != "none" else 0.0,
            "sparsity": result.facts.get("sparsity", 0.0), "test_accuracy": test.accuracy,
            "validation_accuracy": validation.accuracy, "n_test": test.n_examples, "steps": result.steps,
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - start, 1),
            "schedule": result.facts.get("schedule"), "method_settings": result.facts.get("method_settings"),
            "evaluations": evals}


def write(path: Path, payload: dict[str, Any]) -> None:
    """JSON and a markdown table with the settings, written through temporary names."""
    from prunekit.utils import atomic_write_text

    atomic_write_text(path.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    settings = payload["settings"]
    lines = [f"# Training-aware pruning: {settings['model']} on {settings['task']}", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("fresh", "out")), "",
             f"Machine: {payload['machine']}", "",
             "| method | target | achieved sparsity | test accuracy | validation accuracy | steps | train s |",
             "|---|---|---|---|---|---|---|"]
    runs = sorted(payload["runs"], key=lambda r: (r["target_sparsity"], r["method"]))
    for run in runs:
        lines.append(f"| {run['method']} | {run['target_sparsity']:.0%} | {run['sparsity']:.2%} | "
                     f"{run['test_accuracy']:.2%} | {run['validation_accuracy']:.2%} | {run['steps']} | "
                     f"{run['train_seconds']:.0f} |")
    majority = payload.get("test_majority_share")
    lines += ["", f"Test split: {runs[0]['n_test'] if runs else '?'} examples; accuracy = argmax of the logits"
              + (f"; always answering the most common class scores {majority:.2%}." if majority else "."),
              "Sparsity counts the weights of the block linear layers (embeddings, norms and head are dense)."]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.out)
    earlier: dict[str, Any] = {}
    if path.with_suffix(".json").exists() and not args.fresh:
        earlier = json.loads(path.with_suffix(".json").read_text())
    settings = {k: v for k, v in vars(args).items() if k not in ("fresh", "out", "threads", "sparsities", "methods",
                                                                 "no_dense")}
    if earlier and earlier.get("settings") != settings:
        raise SystemExit(f"{path}.json holds results with other settings: pass --fresh or another --out")
    payload = {"settings": settings, "machine": f"{platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads, torch {torch.__version__}", "runs": earlier.get("runs", [])}
    from collections import Counter

    from prunekit.data import load_data

    test_labels = Counter(label for _, label in load_data(args.task).splits["test"])
    payload["test_majority_share"] = max(test_labels.values()) / sum(test_labels.values())
    plan = [] if args.no_dense else [("none", 0.0)]
    for sparsity in [float(s) for s in args.sparsities.split(",") if s]:
        plan += [(method, sparsity) for method in args.methods.split(",") if method]
    for method, sparsity in plan:
        label = "dense" if method == "none" else method
        if any(r["method"] == label and r["target_sparsity"] == (sparsity if method != "none" else 0.0)
               for r in payload["runs"]):
            print(f"skip {label} at {sparsity:.0%}: already in {path}.json")
            continue
        print(f"== {label} at {sparsity:.0%}")
        run = one_run(args, method, sparsity)
        print(f"   test accuracy {run['test_accuracy']:.4f}, sparsity {run['sparsity']:.4f}, "
              f"{run['train_seconds']:.0f} s")
        payload["runs"].append(run)
        write(path, payload)


if __name__ == "__main__":
    main()
