"""Why is prunekit's Wanda 2:4 worse than the reference's? Both arms on the same windows, one protocol.

Issue 11 measured prunekit's Wanda 2:4 at 1.085x the reference's perplexity (195.6 vs 180.3), with
prunekit calibrated by its CLI as documented (64 windows from the four calibration novels) and the
reference on 64 windows of Emma. Three explanations were open: (1) the calibration sample, (2) the
statistics of a block's later layers collected before or after its earlier layers are pruned, (3) a
real difference in the method. This script separates them. Every arm prunes a fresh copy of the model:

- ``prunekit``: ``prunekit.pruning.prune(model, {"method": "wanda", ...}, calib)``, as the CLI runs it;
- ``reference``: locuslab/wanda's own ``WrappedGPT`` (lib/layerwrapper.py) driven block by block the way
  its ``prune_wanda`` does: every linear layer of a block hooked, the calibration samples run through the
  DENSE block, every layer pruned with its mask rule (N:M: ``topk(..., largest=False)`` per group of M
  input columns), then the samples run through the pruned block to give the next block's inputs;
- ``prunekit-sequential``: prunekit's ``sequential`` setting (each layer group's statistics taken after the
  block's earlier groups were pruned);
- ``reference-sequential``: the reference loop, but a block's layers are pruned group by group (q/k/v, o,
  gate/up, down) and each group's statistics are collected after the earlier groups were pruned.

Each arm is run with the same windows, ``prunekit.data.calibration_batch(tokenizer, DATA, 64, 512,
seed=0)``, for two calibration sets: ``austen`` (what the CLI uses by default: Emma, Mansfield Park,
Pride and Prejudice, Sense and Sensibility) and ``austen:emma`` (Emma alone, as the reference was run).
Perplexity: bench/oneshot.py's protocol (first 32,768 tokens of Persuasion, 512-token windows). The
masks of prunekit and the reference are compared weight by weight. The reference code is not part of
prunekit: fetch it yourself, e.g.

    git clone https://github.com/locuslab/wanda /tmp/wanda-ref
    python bench/wanda_reference.py --wanda-dir /tmp/wanda-ref

Writes bench/results/wanda_reference.json and .md. Perplexity only: no timing, so the load does not matter.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def linear_layers(module: Any) -> dict[str, Any]:
    from torch import nn

    return {name: child for name, child in module.named_modules() if isinstance(child, nn.Linear)}


def reference_wanda(model: Any, calib: Any, wanda_dir: str, n: int, m: int, sparsity: float,
                    sequential: bool) -> None:
    """locuslab/wanda's prune_wanda loop (all keyword arguments of the first block replayed, as today's Llama needs)."""
    import torch

    sys.path.insert(0, str(Path(wanda_dir).resolve() / "lib"))
    from layerwrapper import WrappedGPT  # type: ignore[import-not-found]

    layers = model.model.layers
    samples, seq_len = calib.shape
    inps = torch.zeros(samples, seq_len, model.config.hidden_size)
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

    with torch.no_grad():
        layers[0] = Catcher(layers[0])
        for j in range(samples):
            try:
                model(calib[j:j + 1])
            except ValueError:
                pass
        layers[0] = layers[0].module
        kwargs = cache["kwargs"]
        outs = torch.zeros_like(inps)

        def run_block(layer: Any) -> None:
            for j in range(samples):
                out = layer(inps[j].unsqueeze(0), **kwargs)
                outs[j] = (out[0] if isinstance(out, tuple) else out).reshape(inps.shape[1:])

        for layer in layers:
            subset = linear_layers(layer)
            order = [[name for name in subset if name.split(".")[-1] in group] for group in GROUPS] if sequential \
                else [list(subset)]
            for names in order:
                wrapped = {name: WrappedGPT(subset[name]) for name in names}

                def add_batch(name: str, wrapped: dict[str, Any] = wrapped) -> Any:
                    def hook(_: Any, inp: Any, out: Any) -> None:
                        wrapped[name].add_batch(inp[0].data, out.data)
                    return hook

                handles = [subset[name].register_forward_hook(add_batch(name)) for name in names]
                run_block(layer)
                for handle in handles:
                    handle.remove()
                for name in names:  # the reference's mask rule, verbatim in effect
                    metric = subset[name].weight.data.abs() * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
                    mask = torch.zeros_like(metric) == 1
                    if n:
                        for ii in range(0, metric.shape[1], m):
                            tmp = metric[:, ii:ii + m].float()
                            mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
                    else:
                        order_ = torch.sort(metric, dim=-1, stable=True)[1]
                        mask.scatter_(1, order_[:, :int(metric.shape[1] * sparsity)], True)
                    subset[name].weight.data[mask] = 0
            run_block(layer)
            inps, outs = outs, inps


def masks(model: Any) -> dict[str, Any]:
    return {f"{i}.{name}": (child.weight == 0) for i, layer in enumerate(model.model.layers)
            for name, child in linear_layers(layer).items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from prunekit.data import calibration_batch, eval_tokens, load_data
    from prunekit.evaluate import perplexity
    from prunekit.models import load_model
    from prunekit.pruning import prune

    torch.set_num_threads(args.threads)
    n, m = (int(x) for x in args.structure.split(":")) if args.structure != "unstructured" else (0, 0)
    rows: list[dict[str, Any]] = json.loads(Path(args.keep).read_text()) if args.keep else []
    eval_ids = None
    dense_ppl = None
    for calib_name in args.calib:
        kept: dict[str, Any] = {}
        for arm in args.arms:
            model, tokenizer = load_model(args.model, progress=False)
            model.config.use_cache = False
            if eval_ids is None:
                eval_ids = eval_tokens(tokenizer, load_data(args.data), max_tokens=args.eval_tokens)
                dense = perplexity(model, eval_ids, seq_len=args.seq_len, progress=False)
                dense_ppl = dense.perplexity
                protocol = dense.protocol
            calib = calibration_batch(tokenizer, load_data(calib_name), args.samples, args.seq_len, seed=args.seed)
            start = time.perf_counter()
            if arm.startswith("prunekit"):
                settings: dict[str, Any] = {"method": "wanda", "sequential": arm == "prunekit-sequential"}
                settings.update({"structure": args.structure} if n else {"sparsity": args.sparsity})
                prune(model, settings, calib, progress=False)
            else:
                with contextlib.redirect_stdout(io.StringIO()):
                    reference_wanda(model, calib, args.wanda_dir, n, m, args.sparsity, arm == "reference-sequential")
            took = time.perf_counter() - start
            ppl = perplexity(model, eval_ids, seq_len=args.seq_len, progress=False).perplexity
            kept[arm] = masks(model)
            row = {"calibration": calib_name, "arm": arm, "perplexity": ppl, "x_dense": ppl / dense_ppl,
                   "prune_s": took}
            if arm != "prunekit" and "prunekit" in kept:
                same = sum(int((kept[arm][k] == kept["prunekit"][k]).sum()) for k in kept[arm])
                total = sum(v.numel() for v in kept[arm].values())
                row["mask_agreement_with_prunekit"] = same / total
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    return {"rows": rows, "dense_perplexity": dense_ppl, "protocol": protocol}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wanda-dir", required=True, help="a checkout of locuslab/wanda")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="austen", help="evaluation text (its eval split)")
    parser.add_argument("--calib", nargs="+", default=["austen", "austen:emma"])
    parser.add_argument("--arms", nargs="+", default=["prunekit", "reference", "prunekit-sequential"],
                        choices=["prunekit", "reference", "prunekit-sequential", "reference-sequential"])
    parser.add_argument("--structure", default="2:4")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--keep", default=None, help="a JSON list of rows measured earlier with the same settings "
                        "(this script's printed lines), put before this run's")
    args = parser.parse_args()
    if not (Path(args.wanda_dir) / "lib" / "layerwrapper.py").is_file():
        parser.error(f"{args.wanda_dir} has no lib/layerwrapper.py: pass a checkout of locuslab/wanda")
    load = os.getloadavg()
    result = run(args)
    what = args.structure if args.structure != "unstructured" else f"{args.sparsity:.0%} unstructured"
    meta = {"model": args.model, "eval": f"{args.data} eval split, first {args.eval_tokens} tokens",
            "calibration": f"{args.samples} x {args.seq_len} tokens, seed {args.seed}", "pruning": f"wanda {what}",
            "threads": args.threads, "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average_at_start": load, "date": datetime.datetime.now().isoformat()}
    RESULTS.mkdir(exist_ok=True)
    name = f"wanda_reference{args.tag}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    lines = [f"# Wanda {what}: prunekit against locuslab/wanda on the same windows", "",
             f"- model {args.model}; calibration {meta['calibration']} (prunekit.data.calibration_batch) of the "
             "named set; every arm prunes a fresh copy with the same windows",
             f"- perplexity: {result['protocol']}; dense {result['dense_perplexity']:.2f}",
             f"- {meta['machine']}, {meta['cpus']} CPUs, {args.threads} torch threads; load average at start "
             f"{load[0]:.2f}; {meta['date'][:19]}; perplexity only (no timing)", "",
             "| calibration | arm | perplexity | x dense | mask agreement with prunekit |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        agree = row.get("mask_agreement_with_prunekit")
        lines.append(f"| {row['calibration']} | {row['arm']} | {row['perplexity']:.2f} | {row['x_dense']:.2f}x | "
                     f"{'' if agree is None else f'{100 * agree:.3f} %'} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
