"""prunekit's SparseGPT against the reference implementation, side by side on one machine in one run.

The reference is IST-DASLab/sparsegpt (its ``SparseGPT`` class: ``add_batch`` + ``fasterprune``),
driven block by block the way its ``llama.py`` does: a catcher on the first block stores the inputs
of every calibration sample (all keyword arguments, so that today's Llama blocks get their rotary
``position_embeddings``), then each block's linear layers are hooked, the samples run through the
block one at a time, every layer is pruned, and the samples run again to give the next block's input.
Its pruning time counts exactly that (calibration forward passes included), with the model already
loaded. prunekit's time is the whole ``prunekit prune`` command: load, calibrate, prune, save.

Same model, same calibration windows (``prunekit.data.calibration_batch``, seed 0), same perplexity
protocol as ``bench/oneshot.py``. The reference code is not part of prunekit: fetch it yourself, e.g.

    git clone https://github.com/IST-DASLab/sparsegpt /tmp/sparsegpt-ref     # or from a local mirror
    python bench/reference.py --sparsegpt-dir /tmp/sparsegpt-ref

Writes bench/results/reference.json and bench/results/reference.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
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


def evaluate_ppl(model: Any, tokenizer: Any, args: argparse.Namespace) -> tuple[float, str]:
    from prunekit.data import eval_tokens, load_data
    from prunekit.evaluate import perplexity

    tokens = eval_tokens(tokenizer, load_data(args.data), max_tokens=args.eval_tokens)
    result = perplexity(model, tokens, seq_len=args.seq_len, progress=False)
    return result.perplexity, result.protocol


def linear_layers(module: Any) -> dict[str, Any]:
    from torch import nn

    return {name: child for name, child in module.named_modules() if isinstance(child, nn.Linear)}


def run_reference(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, then time the reference's block-by-block SparseGPT on the calibration set."""
    import torch

    from prunekit.data import calibration_batch, load_data
    from prunekit.models import load_model

    sys.path.insert(0, str(Path(args.sparsegpt_dir).resolve()))
    torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally; a CPU build has no CUDA
    from sparsegpt import SparseGPT  # type: ignore[import-not-found]

    model, tokenizer = load_model(args.model, progress=False)
    model.config.use_cache = False
    calib = calibration_batch(tokenizer, load_data(args.data), args.samples, args.seq_len, seed=args.seed)
    layers = model.model.layers
    torch.set_num_threads(args.threads)

    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the reference prints per layer
        inps = torch.zeros(args.samples, args.seq_len, model.config.hidden_size)
        cache: dict[str, Any] = {"i": 0, "kwargs": None}

        class Catcher(torch.nn.Module):
            def __init__(self, module: Any) -> None:
                super().__init__()
                self.module = module

            def forward(self, inp: Any, **kwargs: Any) -> Any:
                inps[cache["i"]] = inp
                cache["i"] += 1
                cache["kwargs"] = kwargs
                raise ValueError

        layers[0] = Catcher(layers[0])
        for j in range(args.samples):
            try:
                model(calib[j:j + 1])
            except ValueError:
                pass
        layers[0] = layers[0].module
        kwargs = cache["kwargs"]
        outs = torch.zeros_like(inps)

        def block_out(out: Any) -> Any:  # older transformers return a tuple, newer the tensor
            return (out[0] if isinstance(out, tuple) else out).reshape(inps.shape[1:])

        for i in range(len(layers)):
            layer = layers[i]
            subset = linear_layers(layer)
            gpts = {name: SparseGPT(subset[name]) for name in subset}

            def add_batch(name: str, gpts: dict[str, Any] = gpts) -> Any:
                def hook(_: Any, inp: Any, out: Any) -> None:
                    gpts[name].add_batch(inp[0].data, out.data)
                return hook

            handles = [subset[name].register_forward_hook(add_batch(name)) for name in subset]
            for j in range(args.samples):
                outs[j] = block_out(layer(inps[j].unsqueeze(0), **kwargs))
            for handle in handles:
                handle.remove()
            for name in subset:
                gpts[name].fasterprune(args.sparsity, prunen=0, prunem=0, percdamp=0.01, blocksize=128)
                gpts[name].free()
            for j in range(args.samples):
                outs[j] = block_out(layer(inps[j].unsqueeze(0), **kwargs))
            inps, outs = outs, inps
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu

    zeros = total = 0
    for layer in layers:
        for child in linear_layers(layer).values():
            zeros += int((child.weight == 0).sum())
            total += child.weight.numel()
    ppl, protocol = evaluate_ppl(model, tokenizer, args)
    return {"label": "reference sparsegpt 50% (prune only, model loaded)", "wall_s": wall, "cpu_s": cpu,
            "sparsity": zeros / total, "perplexity": ppl, "protocol": protocol}


def run_prunekit(args: argparse.Namespace) -> dict[str, Any]:
    """Time the whole `prunekit prune` command, then measure the saved model's perplexity."""
    from prunekit.export import load

    with tempfile.TemporaryDirectory(prefix="prunekit-ref-bench-") as tmp:
        command = [sys.executable, "-m", "prunekit.cli.main", "prune", args.model, "--method", "sparsegpt",
                   "--sparsity", str(args.sparsity), "--calib", args.data, "--calib-samples", str(args.samples),
                   "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--out", f"{tmp}/out"]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"prunekit prune failed:\n{proc.stderr[-4000:]}")
        model, tokenizer, record = load(f"{tmp}/out")
        ppl, protocol = evaluate_ppl(model, tokenizer, args)
    return {"label": "prunekit prune --method sparsegpt (load, prune, save)", "wall_s": wall,
            "sparsity": record.get("sparsity", {}).get("total"), "perplexity": ppl, "protocol": protocol,
            "command": "prunekit " + " ".join(command[3:])}


def child(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--arm", arm, "--sparsegpt-dir", args.sparsegpt_dir, "--model", args.model,
               "--data", args.data, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--eval-tokens", str(args.eval_tokens), "--seed", str(args.seed), "--sparsity", str(args.sparsity),
               "--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsegpt-dir", required=True, help="a checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--arm", choices=["reference", "prunekit"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="austen")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (Path(args.sparsegpt_dir) / "sparsegpt.py").is_file():
        parser.error(f"{args.sparsegpt_dir} has no sparsegpt.py: pass a checkout of IST-DASLab/sparsegpt")
    if args.arm:
        print(json.dumps(run_reference(args) if args.arm == "reference" else run_prunekit(args)))
        return 0

    load = os.getloadavg()
    rows = []
    for arm in ("prunekit", "reference"):
        print(f"[{datetime.datetime.now():%H:%M:%S}] {arm} ...", flush=True)
        rows.append(child(arm, args))
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[0]["wall_s"] / rows[1]["wall_s"]
    meta = {"model": args.model, "data": args.data, "calibration": f"{args.samples} x {args.seq_len} tokens, seed "
            f"{args.seed}", "sparsity": args.sparsity, "threads": args.threads, "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average_at_start": load, "date": datetime.datetime.now().isoformat()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reference.json").write_text(json.dumps({"meta": meta, "rows": rows, "ratio": ratio}, indent=2) + "\n")
    lines = ["# SparseGPT: prunekit against the reference code, one run, one machine", "",
             f"- model {args.model}; calibration {meta['calibration']} of the {args.data} calibration split; "
             f"sparsity {args.sparsity:.0%} unstructured",
             f"- perplexity: {rows[0]['protocol']}",
             f"- {meta['machine']}, {meta['cpus']} CPUs, {args.threads} torch threads; load average at start "
             f"{load[0]:.2f}; {meta['date'][:19]}", "",
             "| run | wall s | sparsity | perplexity |", "|---|---|---|---|"]
    lines += [f"| {row['label']} | {row['wall_s']:.1f} | {100 * (row['sparsity'] or 0):.2f}% "
              f"| {row['perplexity']:.2f} |" for row in rows]
    lines += ["", f"prunekit's whole command / the reference's pruning alone: **{ratio:.2f}×** (target ≤ 0.80×)."]
    (RESULTS / "reference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
