"""Benchmark of structured pruning: real speed from removing heads, neurons and blocks, and what it costs.

Part 1 (smollm2-135m, causal LM): dense; heads-neurons at ratio 0.25 and 0.5 (FLAP importance with
bias compensation, uniform allocation, GQA rule "query": the same number of query heads removed
from each of the 3 key/value groups, round-half-up(ratio x 3) -> 1 of 3 at 0.25 and 2 of 3 at 0.5;
so 33 % and 67 % of query heads, the fraction actually removed is reported); the 50 % model once
more without bias compensation (SmolLM2's config can only give all attention or all MLP layers a
bias, so compensation brings 7 biases per block, 5 of them zero); 4 blocks removed by
block influence (ShortGPT). Calibration: 32 windows x 512 tokens (seed 0) of the austen calibration
split. The uniform models are saved and reloaded with plain AutoModelForCausalLM.from_pretrained
(logits compared). Latency on 2 CPU threads, batch 1, random token ids (seed 0): a forward of 128 and
512 tokens with logits for every position ("forward") and for the last one only ("prefill", as
generate does), and per generated token (greedy, KV cache, 128-token prompt: (t(33 new) - t(1 new)) / 32).
Measurements are interleaved: each round times every model per measurement (the fastest of 2
back-to-back calls), rounds repeat, and each pruned/dense ratio is the median over rounds of the
per-round ratio (slow drifts of a shared machine cancel). Perplexity: first 32,768 tokens of the
austen eval split, non-overlapping 512-token windows; then a short recovery fine-tune
(prunekit.finetune.recover: full fine-tuning, 30 steps of 4 x 256 tokens of the austen train split,
lr 1e-4; tiny, because a step takes tens of seconds on 2 shared cores) and perplexity again.

Part 2 (minilm-l6 on reviews, optional --skip-flop): fine-tuned dense; FLOP at 50 % and 70 %; GMP at
the parameter count FLOP reached (GMP zeros weights, so it runs at dense speed). Same training
budget for all (1 epoch of the train split, batch 32, at most 64 tokens per example, lr 5e-5; FLOP
with its defaults: gates start open (drop_init 0.01), gates lr 0.2, λ lr 0.05, target ramped from the
initial expected sparsity over half the run, λ1 reset when the target is crossed); accuracy on the
test split; latency of a 128-token forward, batch 1, interleaved.

    python bench/structured.py                   # everything (a few hours on 2 busy cores)
    python bench/structured.py --skip-flop --skip-recovery --eval-tokens 8192

Writes bench/results/structured.json and bench/results/structured.md (after each part).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def block_params(model: nn.Module) -> int:
    from prunekit.adapters import get_adapter

    return sum(p.numel() for p in get_adapter(model).blocks().parameters())


def interleaved(models: dict[str, nn.Module], measures: dict[str, Callable[[nn.Module], Any]], rounds: int,
                repeats: int = 2) -> dict[str, dict[str, list[float]]]:
    """Seconds per (model, measure) per round: the fastest of ``repeats`` back-to-back calls (on a shared
    machine the fastest call is the one least disturbed). One untimed warm-up round; the model order
    rotates every round."""
    times: dict[str, dict[str, list[float]]] = {name: {m: [] for m in measures} for name in models}
    names = list(models)
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for measure, fn in measures.items():
                for name in order:
                    best = float("inf")
                    for _ in range(repeats if round_index > 0 else 1):
                        start = time.perf_counter()
                        fn(models[name])
                        best = min(best, time.perf_counter() - start)
                    if round_index > 0:
                        times[name][measure].append(best)
    return times


def ratios(times: dict[str, dict[str, list[float]]], reference: str) -> dict[str, dict[str, Any]]:
    """Per model and measure: median ms, and the median over rounds of the per-round ratio to ``reference``."""
    out: dict[str, dict[str, Any]] = {}
    for name, per_measure in times.items():
        out[name] = {}
        for measure, values in per_measure.items():
            ref = np.array(times[reference][measure])
            ratio = np.median(np.array(values) / ref)
            out[name][measure] = {"ms": 1e3 * float(np.median(values)), "ratio": float(ratio)}
    return out


def causal_measures(vocab: int) -> dict[str, Callable[[nn.Module], Any]]:
    ids = torch.randint(0, vocab, (1, 512), generator=torch.Generator().manual_seed(0))

    prompt = ids[:, :128]

    def generate(n: int) -> Callable[[nn.Module], Any]:
        def call(model: Any) -> Any:
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        return call
    return {
        "forward_128": lambda m: m(input_ids=ids[:, :128], use_cache=False),
        "forward_512": lambda m: m(input_ids=ids, use_cache=False),
        "prefill_128": lambda m: m(input_ids=ids[:, :128], use_cache=False, logits_to_keep=1),
        "prefill_512": lambda m: m(input_ids=ids, use_cache=False, logits_to_keep=1),
        "generate_1": generate(1),
        "generate_33": generate(33),
    }


def decode_ratios(times: dict[str, dict[str, list[float]]], reference: str) -> dict[str, dict[str, float]]:
    per_token = {name: (np.array(t["generate_33"]) - np.array(t["generate_1"])) / 32 for name, t in times.items()}
    return {name: {"ms": 1e3 * float(np.median(v)), "ratio": float(np.median(v / per_token[reference]))}
            for name, v in per_token.items()}


def verify_plain_reload(model: nn.Module, tokenizer: Any, folder: Path) -> bool:
    """Save with prunekit, reload with plain transformers, compare logits."""
    from transformers import AutoModelForCausalLM

    from prunekit.export import save_model

    save_model(model, tokenizer, folder, {"task": "causal-lm"})
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return bool(torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4))


def part_smollm(args: argparse.Namespace, results: dict[str, Any]) -> None:
    from prunekit.data import calibration_batch, eval_tokens, load_data
    from prunekit.evaluate import perplexity
    from prunekit.models import load_model
    from prunekit.pruning import prune

    dense, tokenizer = load_model("smollm2-135m", progress=False)
    data = load_data("austen")
    calibration = calibration_batch(tokenizer, data, 32, 512, seed=0)
    variants = {"heads-neurons 25%": {"method": "heads-neurons", "ratio": 0.25, "importance": "flap"},
                "heads-neurons 50%": {"method": "heads-neurons", "ratio": 0.5, "importance": "flap"},
                "heads-neurons 50% no bias": {"method": "heads-neurons", "ratio": 0.5, "importance": "flap",
                                              "bias_compensation": False},
                "blocks -4": {"method": "blocks", "remove": 4}}
    models: dict[str, nn.Module] = {"dense": dense}
    rows: dict[str, dict[str, Any]] = {"dense": {"parameters": sum(p.numel() for p in dense.parameters()),
                                                 "block_parameters": block_params(dense)}}
    tmp = Path(tempfile.mkdtemp(prefix="prunekit-bench-"))
    for name, settings in variants.items():
        log(f"pruning {name}")
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        facts = prune(model, dict(settings), calibration, progress=False).extra
        row = {"settings": settings, "prune_seconds": time.perf_counter() - start,
               "parameters": sum(p.numel() for p in model.parameters()), "block_parameters": block_params(model),
               **{k: facts[k] for k in ("heads_removed_fraction", "neurons_removed_fraction", "gqa_rule",
                                        "bias_compensation", "blocks_removed", "plain_reload") if k in facts}}
        if facts.get("plain_reload"):
            row["plain_reload_verified"] = verify_plain_reload(model, tokenizer, tmp / name.replace(" ", "_"))
        rows[name] = row
        models[name] = model.eval()
    for row in rows.values():
        row["block_parameter_ratio"] = row["block_parameters"] / rows["dense"]["block_parameters"]
        row["parameter_ratio"] = row["parameters"] / rows["dense"]["parameters"]
    earlier = results.get("smollm2", {}).get("models", {})
    if args.skip_ppl:  # keep what an earlier run measured
        for name, row in rows.items():
            row.update({k: v for k, v in earlier.get(name, {}).items() if k in ("perplexity", "recovery")})
    results["smollm2"] = {"models": rows}

    log(f"latency: {args.rounds} interleaved rounds")
    times = interleaved(models, causal_measures(int(dense.config.vocab_size)), args.rounds, args.repeats)
    speed = ratios(times, "dense")
    decode = decode_ratios(times, "dense")
    for name in models:
        rows[name]["latency"] = {k: v for k, v in speed[name].items() if not k.startswith("generate")}
        rows[name]["latency"]["decode_per_token"] = decode[name]
    write(results)

    tokens = eval_tokens(tokenizer, data, "eval", max_tokens=args.eval_tokens)
    if not args.skip_ppl:
        for name, model in models.items():
            log(f"perplexity {name}")
            rows[name]["perplexity"] = perplexity(model, tokens, seq_len=512, progress=False).perplexity
            write(results)
    if not args.skip_recovery:
        recovery(args, models, tokenizer, data, tokens, results, tmp)
    write(results)


def recovery(args: argparse.Namespace, models: dict[str, nn.Module], tokenizer: Any, data: Any,
             tokens: torch.Tensor, results: dict[str, Any], tmp: Path) -> None:
    """A short full fine-tune of every pruned model on the austen train split, then perplexity again."""
    from prunekit.evaluate import perplexity
    from prunekit.finetune import TrainConfig, recover

    seq_len = args.recovery_seq_len
    config = TrainConfig(max_steps=args.recovery_steps, lr=args.recovery_lr, batch_size=4, seq_len=seq_len,
                         eval_steps=0, save_steps=0, progress=False, device="cpu",
                         max_train_tokens=args.recovery_steps * 4 * seq_len + seq_len)
    rows = results["smollm2"]["models"]
    for name, model in models.items():
        if name == "dense":
            continue
        log(f"recovery fine-tune {name} ({args.recovery_steps} steps)")
        result = recover(model, tokenizer, data, config=config, checkpoint_dir=tmp / f"ckpt-{name.replace(' ', '_')}")
        rows[name]["recovery"] = {"steps": result.steps, "batch": f"4 x {seq_len} tokens", "lr": args.recovery_lr,
                                  "train_seconds": result.train_seconds,
                                  "perplexity": perplexity(result.model, tokens, 512, progress=False).perplexity}
        write(results)


def part_flop(args: argparse.Namespace, results: dict[str, Any]) -> None:
    from prunekit.data import load_data
    from prunekit.evaluate import accuracy
    from prunekit.finetune import TrainConfig, train_model
    from prunekit.methods.gradual import build_training_method
    from prunekit.models import load_model

    data = load_data("reviews")
    config = TrainConfig(epochs=args.flop_epochs, lr=args.flop_lr, batch_size=32, max_length=args.flop_max_length,
                         eval_steps=0,
                         save_steps=0, progress=False, device="cpu")
    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    results["minilm_reviews"] = {"training": config.describe(), "models": rows}
    tmp = Path(tempfile.mkdtemp(prefix="prunekit-flop-"))

    def run(name: str, method: str, settings: dict[str, Any]) -> dict[str, Any]:
        log(f"training {name}")
        model, tokenizer = load_model("minilm-l6", task="classification", num_labels=2, progress=False)
        result = train_model(model, tokenizer, data, method=build_training_method(method, settings), config=config,
                             checkpoint_dir=tmp / name.replace(" ", "_"))
        trained = result.model.eval()
        acc = accuracy(trained, tokenizer, data.splits["test"], batch_size=64, max_length=args.flop_max_length,
                       progress=False)
        facts = result.facts
        rows[name] = {"method": method, "settings": settings, "accuracy": acc.accuracy,
                      "sparsity_of_block_weights": facts.get("sparsity"),
                      "expected_sparsity": facts.get("expected_sparsity"),
                      "parameters_in_memory": sum(p.numel() for p in trained.parameters()),
                      "nonzero_block_weights": _nonzero_block_weights(trained), "train_seconds": result.train_seconds,
                      "loader": facts.get("loader")}
        if method == "flop":  # export as a user would, reload with prunekit.load, compare logits
            rows[name].update(_export_reload(trained, tokenizer, facts, tmp / f"export-{name.replace(' ', '_')}"))
        models[name] = trained
        write(results)
        return facts

    run("dense fine-tuned", "none", {})
    for target in args.flop_targets:
        facts = run(f"flop {target:.0%}", "flop", {"sparsity": target, "gate_lr": args.gate_lr,
                                                   "lambda_lr": args.lambda_lr, "warmup_steps": 0.5})
        run(f"gmp @ flop {target:.0%}", "gmp", {"sparsity": round(float(facts["sparsity"]), 4)})
    log("latency of the classifiers")
    ids = torch.randint(0, 30000, (1, 128), generator=torch.Generator().manual_seed(0))
    times = interleaved(models, {"forward_128": lambda m: m(input_ids=ids)}, args.rounds, args.repeats)
    for name, value in ratios(times, "dense fine-tuned").items():
        rows[name]["latency"] = value
    write(results)


def _export_reload(model: nn.Module, tokenizer: Any, facts: dict[str, Any], out: Path) -> dict[str, Any]:
    from prunekit.evaluate.size import weight_files
    from prunekit.export import load, save_model

    save_model(model, tokenizer, out, {"loader": facts.get("loader"), "layers": facts.get("layers")})
    reloaded, _, record = load(out)
    ids = torch.randint(0, 30000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model.eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits
    return {"reloaded_with": f"prunekit.load (loader {record.get('loader')})",
            "reload_max_logit_diff": float((before - after).abs().max()),
            "bytes_on_disk": sum(f.stat().st_size for f in weight_files(out))}


def _nonzero_block_weights(model: nn.Module) -> int:
    from prunekit.adapters import get_adapter

    blocks = get_adapter(model).blocks()
    return sum(int((p != 0).sum()) for n, p in blocks.named_parameters() if not n.endswith("bias") and p.dim() == 2)


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "structured.md").write_text(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Structured pruning benchmark", "", f"Run {results['date']} on {results['machine']}, "
             f"torch {results['torch']}, {results['threads']} threads.", "", "## Protocol", "",
             (__doc__ or "").split("\n\n    python")[0].strip(), ""]
    smol = results.get("smollm2")
    if smol:
        lines += ["## smollm2-135m", "", "| model | params | block params ratio | fwd128 | fwd512 | prefill128 | "
                  "prefill512 | decode/token | ppl | ppl after recovery |", "|" + "---|" * 10]
        for name, row in smol["models"].items():
            lat = row.get("latency", {})

            def cell(key: str, lat: dict[str, Any] = lat) -> str:
                v = lat.get(key)
                return f"{v['ms']:.1f} ms ({v['ratio']:.2f}x)" if v else "-"
            ppl = row.get("perplexity")
            rec = row.get("recovery", {}).get("perplexity")
            ppl_cell = f"{ppl:.2f}" if ppl else "not run"
            rec_cell = f"{rec:.2f}" if rec else ("-" if name == "dense" else "not run")
            lines.append(f"| {name} | {row['parameters'] / 1e6:.1f}M | {row['block_parameter_ratio']:.3f} | "
                         f"{cell('forward_128')} | {cell('forward_512')} | {cell('prefill_128')} | "
                         f"{cell('prefill_512')} | {cell('decode_per_token')} | {ppl_cell} | {rec_cell} |")
        lines.append("")
        for name, row in smol["models"].items():
            extra = {k: row[k] for k in ("heads_removed_fraction", "neurons_removed_fraction", "blocks_removed",
                                         "plain_reload_verified", "prune_seconds", "recovery") if k in row}
            if extra:
                lines.append(f"- {name}: {json.dumps(extra)}")
        lines.append("")
    flop = results.get("minilm_reviews")
    if flop:
        lines += ["## minilm-l6 on reviews", "", "| model | accuracy | block-weight sparsity | params in memory | "
                  "nonzero block weights | fwd128 latency |", "|" + "---|" * 6]
        for name, row in flop["models"].items():
            lat = (row.get("latency") or {}).get("forward_128")
            sparsity = row.get("sparsity_of_block_weights")
            speed = f"{lat['ms']:.1f} ms ({lat['ratio']:.2f}x)" if lat else "-"
            kept = f"{sparsity:.3f}" if sparsity is not None else "-"
            lines.append(f"| {name} | {row['accuracy']:.4f} | {kept} | {row['parameters_in_memory'] / 1e6:.2f}M | "
                         f"{row['nonzero_block_weights'] / 1e6:.2f}M | {speed} |")
        lines.append("")
        for name, row in flop["models"].items():
            if "reloaded_with" in row:
                lines.append(f"- {name}: saved ({row['bytes_on_disk'] / 2**20:.1f} MiB of weights) and reloaded with "
                             f"{row['reloaded_with']}; max logit difference {row['reload_max_logit_diff']:.2e}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (default 7)")
    parser.add_argument("--repeats", type=int, default=2, help="calls per model and round; the fastest counts")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--recovery-steps", type=int, default=30)
    parser.add_argument("--recovery-seq-len", type=int, default=256)
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--skip-smollm", action="store_true")
    parser.add_argument("--skip-flop", action="store_true")
    parser.add_argument("--flop-targets", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--flop-epochs", type=float, default=1.0)
    parser.add_argument("--flop-max-length", type=int, default=64)
    parser.add_argument("--flop-lr", type=float, default=5e-5)
    parser.add_argument("--gate-lr", type=float, default=None, help="FLOP gates' rate (default: the method's)")
    parser.add_argument("--lambda-lr", type=float, default=None, help="FLOP λ rate (default: the method's)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    previous = RESULTS / "structured.json"
    if previous.exists():  # keep the part not re-run
        old = json.loads(previous.read_text())
        for key in ("smollm2", "minilm_reviews"):
            if key in old:
                results[key] = old[key]
    if not args.skip_smollm:
        part_smollm(args, results)
    if not args.skip_flop:
        part_flop(args, results)
    write(results)
    log("done: bench/results/structured.md")


if __name__ == "__main__":
    main()
