"""GPU checks (CUDA needed): what 2:4 sparsity and structured pruning buy on a GPU.

STATUS: written in a session without a GPU and NOT RUN YET (its CPU-side steps, building and pruning
the models, were run; the CUDA timing and the semi-structured swap were not). No result of it is
quoted anywhere until a session with a GPU runs it.

Model: SmolLM2-135M's architecture (Llama, 30 blocks, hidden 576, 9 query / 3 key-value heads, FFN
1536, vocabulary 49,152) with random weights (seed 0), because the real weights do not travel to
the GPU machine; speed does not depend on the values. Half precision (fp16) throughout.

Part 1, 2:4 kernels, per layer: F.linear with a dense fp16 weight vs the same weight, 2:4-pruned by
magnitude, converted with torch.sparse.to_sparse_semi_structured (cuSPARSELt where present, else
CUTLASS), for SmolLM2's layer shapes and LLaMA-7B's (4096 x 4096, 11008 x 4096, 4096 x 11008), at
512 and 4096 tokens. The output of the sparse kernel is checked against the dense product of the
pruned weight.

Part 2, whole models: dense; `prunekit.prune(method="magnitude", structure="2:4")` with every block
linear's weight then swapped for its semi-structured form; `heads-neurons` at ratio 0.5
(magnitude importance, uniform, GQA rule "query": 2 of 3 query heads per group and half the FFN
neurons). Latency of a forward of batch x 512 tokens (logits for the last position), and per
generated token (greedy, KV cache, 128-token prompt, (t(65 new) - t(1 new)) / 64).

Timing: CUDA events around each call after warm-up, median of --repeats calls; models interleaved.

    python bench/gpu.py --out bench/results      # on a machine with an NVIDIA GPU (Ampere or newer for 2:4)

Writes gpu.json and gpu.md into --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
SHAPES = {"smollm2 q/o 576x576": (576, 576), "smollm2 k/v 192x576": (192, 576),
          "smollm2 gate/up 1536x576": (1536, 576), "smollm2 down 576x1536": (576, 1536),
          "llama-7b q 4096x4096": (4096, 4096), "llama-7b gate 11008x4096": (11008, 4096),
          "llama-7b down 4096x11008": (4096, 11008)}


def cuda_time(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` by CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 consecutive inputs (the 2:4 pattern the kernels need)."""
    from prunekit.masks import nm_mask, parse_structure

    return weight * nm_mask(weight.abs(), parse_structure("2:4"))


def part_kernels(args: argparse.Namespace) -> dict[str, Any]:
    from torch.sparse import to_sparse_semi_structured

    rows: dict[str, Any] = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (out_features, in_features) in SHAPES.items():
        weight = two_four(torch.randn(out_features, in_features, device="cuda", dtype=torch.float16, generator=gen))
        sparse = to_sparse_semi_structured(weight)
        for tokens in args.tokens:
            x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16, generator=gen)
            dense_ms = cuda_time(lambda x=x, w=weight: F.linear(x, w), args.repeats)
            sparse_ms = cuda_time(lambda x=x, s=sparse: F.linear(x, s), args.repeats)
            diff = (F.linear(x, sparse) - F.linear(x, weight)).abs().max().item()
            rows[f"{name} @ {tokens} tokens"] = {"dense_ms": dense_ms, "sparse_ms": sparse_ms,
                                                 "ratio": sparse_ms / dense_ms, "max_abs_diff": diff}
            print(f"  {name} @ {tokens}: dense {dense_ms:.4f} ms, 2:4 {sparse_ms:.4f} ms "
                  f"({sparse_ms / dense_ms:.2f}x), max diff {diff:.2e}", flush=True)
    return rows


def semi_structured(model: nn.Module) -> int:
    """Swap every block linear's (2:4-pruned) weight for its semi-structured form; returns how many."""
    from torch.sparse import to_sparse_semi_structured

    from prunekit.adapters import get_adapter

    count = 0
    for layer in get_adapter(model).prunable_layers().values():
        layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
        count += 1
    return count


def part_models(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunekit.methods import method_config
    from prunekit.pruning import prune

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    models: dict[str, nn.Module] = {"dense": dense}
    two = copy.deepcopy(dense)
    prune(two, method_config("magnitude", structure="2:4"), progress=False)
    models["2:4 magnitude (semi-structured)"] = two
    small = copy.deepcopy(dense)
    prune(small, method_config("heads-neurons", ratio=0.5, importance="magnitude"), progress=False)
    models["heads-neurons 50%"] = small
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    for model in models.values():
        model.to("cuda", torch.float16)
    swapped = semi_structured(two)
    rows: dict[str, Any] = {name: {"parameters": params[name]} for name in models}
    rows["2:4 magnitude (semi-structured)"]["semi_structured_layers"] = swapped
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (max(args.batches), 512), device="cuda", generator=gen)
    with torch.inference_mode():
        reference = dense(input_ids=ids[:1, :64]).logits.float()
        for name, model in models.items():
            logits = model(input_ids=ids[:1, :64]).logits.float()
            rows[name]["max_logit_diff_vs_dense"] = (logits - reference).abs().max().item()
        for batch in args.batches:
            for name, model in models.items():
                ms = cuda_time(lambda m=model, b=batch: m(input_ids=ids[:b], use_cache=False, logits_to_keep=1),
                               args.repeats)
                rows[name][f"prefill_{batch}x512_ms"] = ms
            for name in models:
                rows[name][f"prefill_{batch}x512_ratio"] = (rows[name][f"prefill_{batch}x512_ms"]
                                                            / rows["dense"][f"prefill_{batch}x512_ms"])
                print(f"  {name}: prefill {batch}x512 {rows[name][f'prefill_{batch}x512_ms']:.2f} ms "
                      f"({rows[name][f'prefill_{batch}x512_ratio']:.2f}x)", flush=True)
        prompt = ids[:1, :128]

        def generate(model: nn.Module, n: int) -> Any:
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,  # type: ignore[operator]
                                  min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

        for name, model in models.items():
            one = cuda_time(lambda m=model: generate(m, 1), max(3, args.repeats // 4))
            many = cuda_time(lambda m=model: generate(m, 65), max(3, args.repeats // 4))
            rows[name]["decode_ms_per_token"] = (many - one) / 64
        for name in models:
            rows[name]["decode_ratio"] = rows[name]["decode_ms_per_token"] / rows["dense"]["decode_ms_per_token"]
            print(f"  {name}: decode {rows[name]['decode_ms_per_token']:.2f} ms/token "
                  f"({rows[name]['decode_ratio']:.2f}x)", flush=True)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# GPU checks ({results['device']}, torch {results['torch']}, {results['date']})", "",
             "Random weights in SmolLM2-135M's architecture, fp16. See bench/gpu.py for the protocol.", "",
             "## 2:4 kernels per layer", "", "| layer @ tokens | dense | 2:4 | ratio | max abs diff |",
             "|---|---|---|---|---|"]
    for name, row in results.get("kernels", {}).items():
        lines.append(f"| {name} | {row['dense_ms']:.4f} ms | {row['sparse_ms']:.4f} ms | {row['ratio']:.2f}x | "
                     f"{row['max_abs_diff']:.1e} |")
    models = results.get("models", {})
    if models:
        batches = results["args"]["batches"]
        head = " | ".join(f"prefill {b}x512" for b in batches)
        lines += ["", "## Whole models", "", f"| model | params | {head} | decode / token | max logit diff |",
                  "|---|---|" + "---|" * len(batches) + "---|---|"]
        for name, row in models.items():
            cells = " | ".join(f"{row[f'prefill_{b}x512_ms']:.2f} ms ({row[f'prefill_{b}x512_ratio']:.2f}x)"
                               for b in batches)
            lines.append(f"| {name} | {row['parameters'] / 1e6:.1f} M | {cells} | "
                         f"{row['decode_ms_per_token']:.2f} ms ({row['decode_ratio']:.2f}x) | "
                         f"{row['max_logit_diff_vs_dense']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (none is visible): run it on a machine with an NVIDIA GPU")
    results: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "machine": platform.machine(), "args": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        (out / "gpu.json").write_text(json.dumps(results, indent=2))
        (out / "gpu.md").write_text(markdown(results))

    if not args.skip_kernels:
        print("2:4 kernels per layer", flush=True)
        try:
            results["kernels"] = part_kernels(args)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a GPU older than Ampere
            results["kernels_error"] = str(exc).splitlines()[0]
            print("  2:4 kernels unavailable:", results["kernels_error"], flush=True)
        write()
    if not args.skip_models:
        print("whole models", flush=True)
        results["models"] = part_models(args)
        write()
    print(f"done: {out / 'gpu.md'}")


if __name__ == "__main__":
    main()
