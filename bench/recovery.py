"""Recovery fine-tuning after one-shot pruning: smollm2-135m, Wanda 50 %, Austen.

Perplexity on the austen eval split (non-overlapping windows of --eval-seq-len tokens over the first
--eval-tokens tokens) for: the dense model, the Wanda-pruned model, and the pruned model after
recovery fine-tuning on the train split (full fine-tuning with masks kept, LoRA merged and
re-masked, optionally with distillation from the dense model) for a stated token budget.
"gap closed" = (pruned − recovered) / (pruned − dense). Training speed is measured first
(--probe-steps) and the projected time printed, so a budget can be chosen that fits.

    python bench/recovery.py --budget 1M --modes full,lora
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
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="austen")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--budget", default="1M", help="training tokens per recovery run (e.g. 1M, 200k)")
    parser.add_argument("--modes", default="full,lora", help="any of full, lora, full+distill, lora+distill")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-lora", type=float, default=2e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--probe-steps", type=int, default=2, help="timed steps before the runs (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--second-split", default="extra",
                        help="a second held-out split of --data (austen: 'extra' = Northanger Abbey, never used for "
                             "calibration or training); '' to skip")
    parser.add_argument("--out", default=str(RESULTS / "recovery"), help="results path without extension")
    return parser.parse_args()


def ppl(model: Any, tokenizer: Any, data: Any, args: argparse.Namespace, split: str = "eval") -> float:
    from prunekit.data import eval_tokens
    from prunekit.evaluate import perplexity

    tokens = eval_tokens(tokenizer, data, split, max_tokens=args.eval_tokens)
    return perplexity(model, tokens, seq_len=args.eval_seq_len, progress=False).perplexity


def second(args: argparse.Namespace) -> str | None:
    """The split of the second held-out text, or None when the dataset has none."""
    return args.second_split or None


def recover_once(folder: Path, data: Any, mode: str, steps: int, args: argparse.Namespace,
                 work: Path) -> tuple[Any, Any, float]:
    """Load the pruned folder, recover it for ``steps`` steps; return (model, tokenizer, seconds)."""
    from prunekit.export import load
    from prunekit.finetune import LoraSettings, TrainConfig, recover
    from prunekit.models import load_model
    from prunekit.utils import set_seed

    set_seed(args.seed)
    model, tokenizer, _ = load(folder, task="causal-lm")
    lora = LoraSettings(rank=args.lora_rank, alpha=2 * args.lora_rank) if mode.startswith("lora") else None
    teacher = None
    if "distill" in mode:
        teacher, _ = load_model(args.model, task="causal-lm", device="cpu")
    config = TrainConfig(max_steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr_lora if lora else args.lr_full, max_train_tokens=steps * args.batch_size *
                         args.seq_len, eval_steps=0, save_steps=0, seed=args.seed, device="cpu", lr_warmup_ratio=0.05,
                         distill_alpha=0.5 if teacher is not None else 0.0)
    start = time.perf_counter()
    result = recover(model, tokenizer, data, config=config, lora=lora, teacher=teacher,
                     checkpoint_dir=work / f"ckpt-{mode}-{steps}")
    return result.model, tokenizer, time.perf_counter() - start


def write(path: Path, payload: dict[str, Any]) -> None:
    from prunekit.utils import atomic_write_text

    atomic_write_text(path.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    s = payload["settings"]
    dense, pruned = payload.get("dense_ppl"), payload.get("pruned_ppl")
    lines = [f"# Recovery fine-tuning: {s['model']}, {s['method']} {s['sparsity']:.0%}, {s['data']}", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "out"), "",
             f"Machine: {payload['machine']}", "",
             (f"Training speed (probe): {payload['tokens_per_second']:.0f} tokens/s "
              f"(full fine-tuning, batch {s['batch_size']} x {s['seq_len']})" if payload.get("tokens_per_second")
              else f"Batch {s['batch_size']} x {s['seq_len']} tokens per step; 'train s' is each run's wall time"), "",
             f"| model | training tokens | perplexity (eval) | gap closed | perplexity ({s.get('second_split')}) "
             "| gap closed | sparsity | same zeros | train s |", "|---|---|---|---|---|---|---|---|---|",
             f"| dense | - | {dense:.2f} | - | {_fmt(payload.get('dense_ppl2'))} | - | 0 | - | - |" if dense else
             "| dense | - | ? | - | - | - | - | - | - |",
             f"| {s['method']} {s['sparsity']:.0%} | - | {pruned:.2f} | 0 | {_fmt(payload.get('pruned_ppl2'))} | 0 | "
             f"{payload.get('pruned_sparsity', 0):.2%} | - | - |" if pruned else
             "| pruned | - | ? | - | - | - | - | - | - |"]
    for run in payload["runs"]:
        gap2 = f"{run['gap_closed2']:.0%}" if run.get("gap_closed2") is not None else "-"
        lines.append(f"| + {run['mode']} | {run['tokens']:,} | {run['perplexity']:.2f} | {run['gap_closed']:.0%} | "
                     f"{_fmt(run.get('perplexity2'))} | {gap2} | {run['sparsity']:.2%} | "
                     f"{'yes' if run.get('same_zeros') else 'NO'} | {run['train_seconds']:.0f} |")
    lines += ["", f"Perplexity protocol (each held-out text): {payload.get('protocol', '')}",
              "Training text: the austen train split (Emma, Mansfield Park, Pride and Prejudice, Sense and "
              "Sensibility); 'eval' = Persuasion; 'extra' = Northanger Abbey."]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")


def zero_masks(model: Any) -> dict[str, torch.Tensor]:
    """Where the prunable block weights are exactly zero, by layer name."""
    from prunekit.adapters import get_adapter, weight_view

    return {name: weight_view(layer) == 0 for name, layer in get_adapter(model).prunable_layers().items()}


def _fmt(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def main() -> None:
    from prunekit.data import calibration_batch, eval_tokens, load_data
    from prunekit.evaluate import perplexity
    from prunekit.export import save_model
    from prunekit.finetune.recovery import sparsity_facts
    from prunekit.jobs import parse_count
    from prunekit.models import load_model
    from prunekit.pruning import prune
    from prunekit.utils import set_seed

    args = parse_args()
    budget = parse_count(args.budget) or 0
    steps = max(1, -(-budget // (args.batch_size * args.seq_len)))
    path = Path(args.out)
    payload: dict[str, Any] = {"settings": vars(args), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
                               f"threads, torch {torch.__version__}", "runs": []}
    data = load_data(args.data)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model, task="causal-lm", device="cpu")
    tokens = eval_tokens(tokenizer, data, "eval", max_tokens=args.eval_tokens)
    dense = perplexity(model, tokens, seq_len=args.eval_seq_len)
    payload.update(dense_ppl=dense.perplexity, protocol=dense.protocol)
    if second(args):
        payload["dense_ppl2"] = ppl(model, tokenizer, data, args, second(args))
    print(f"dense perplexity {dense.perplexity:.2f}")
    calibration = calibration_batch(tokenizer, data, args.calib_samples, args.calib_seq_len, seed=args.seed)
    start = time.perf_counter()
    result = prune(model, {"method": args.method, "sparsity": args.sparsity}, calibration)
    payload["prune_seconds"] = time.perf_counter() - start
    payload["pruned_ppl"] = ppl(model, tokenizer, data, args)
    payload["pruned_sparsity"] = sparsity_facts(model)["sparsity"]
    if second(args):
        payload["pruned_ppl2"] = ppl(model, tokenizer, data, args, second(args))
    print(f"{args.method} {args.sparsity:.0%}: perplexity {payload['pruned_ppl']:.2f}")
    work = Path(tempfile.mkdtemp(prefix="prunekit-recovery-"))
    try:
        folder = save_model(model, tokenizer, work / "pruned", {"task": "causal-lm", "source_model": args.model,
                                                                **result.record()})
        zeros = zero_masks(model)
        del model
        write(path, payload)
        if args.probe_steps:
            _, _, seconds = recover_once(folder, data, "full", args.probe_steps, args, work)
            payload["tokens_per_second"] = args.probe_steps * args.batch_size * args.seq_len / seconds
            hours = budget / payload["tokens_per_second"] / 3600
            print(f"probe: {payload['tokens_per_second']:.0f} tokens/s -> about {hours:.1f} h per full run of "
                  f"{budget:,} tokens")
        for mode in [m for m in args.modes.split(",") if m]:
            recovered, tok, seconds = recover_once(folder, data, mode, steps, args, work)
            value = ppl(recovered, tok, data, args)
            gap = payload["pruned_ppl"] - payload["dense_ppl"]
            run = {"mode": mode, "tokens": steps * args.batch_size * args.seq_len, "steps": steps,
                   "perplexity": value, "gap_closed": (payload["pruned_ppl"] - value) / gap,
                   "sparsity": sparsity_facts(recovered)["sparsity"], "train_seconds": seconds,
                   "same_zeros": zero_masks(recovered).keys() == zeros.keys() and all(
                       torch.equal(mask, zeros[name]) for name, mask in zero_masks(recovered).items())}
            if second(args):
                run["perplexity2"] = ppl(recovered, tok, data, args, second(args))
                run["gap_closed2"] = (payload["pruned_ppl2"] - run["perplexity2"]) / (
                    payload["pruned_ppl2"] - payload["dense_ppl2"])
            payload["runs"].append(run)
            print(f"{mode}: perplexity {value:.2f} ({payload['runs'][-1]['gap_closed']:.0%} of the gap closed)")
            write(path, payload)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
