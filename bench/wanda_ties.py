"""Where two Wanda models first disagree, and which one the exact scores side with (issue 11).

prunekit's Wanda 50 % and llm-compressor's WandaPruningModifier ran on the same model and the same
calibration windows (bench/peers.py) give perplexities 0.15 % apart, while their 2:4 models are equal.
This script finds the first block whose masks differ between two saved models, rebuilds the statistics
that block's masks were chosen from (the dense model with the first model's earlier, identical, pruned
blocks in front, so its inputs are exactly what both tools saw), sums each differing layer's squared
input norms in float64, and prints, for every weight the two masks disagree on, its Wanda score
|W_ij| * ||X_j||. In each row the tools kept different members of a pair; the exact (float64) scores
say which member Wanda keeps.

    python bench/wanda_ties.py --a PRUNEKIT_DIR --b LLMCOMPRESSOR_DIR [--model smollm2-135m --data austen
                               --samples 64 --seq-len 512 --seed 0]

Writes bench/results/wanda-ties.md (and prints it).
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch
from safetensors.torch import load_file

RESULTS = Path(__file__).resolve().parent / "results"


class _Stop(Exception):
    pass


def block_of(key: str) -> int | None:
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="first pruned model folder (prunekit's)")
    parser.add_argument("--b", required=True, help="second pruned model folder (the peer's)")
    parser.add_argument("--a-label", default="a", help="what made a (for the report)")
    parser.add_argument("--b-label", default="b", help="what made b (for the report)")
    parser.add_argument("--model", default="smollm2-135m", help="the dense model both were pruned from")
    parser.add_argument("--data", default="austen")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "wanda-ties.md"))
    args = parser.parse_args()

    from prunekit.data import calibration_batch, load_data
    from prunekit.models import load_model

    a = load_file(str(Path(args.a) / "model.safetensors"))
    b = load_file(str(Path(args.b) / "model.safetensors"))
    index = {k: i for k in a if a[k].dim() == 2 and k in b and (i := block_of(k)) is not None}
    matrices = sorted(index, key=lambda k: (index[k], k))
    per_block: dict[int, dict[str, int]] = {}
    total = differing = 0
    for key in matrices:
        diff = int(((a[key] != 0) != (b[key] != 0)).sum())
        total += a[key].numel()
        differing += diff
        per_block.setdefault(index[key], {})[key] = diff
    first = next((i for i in sorted(per_block) if any(per_block[i].values())), None)
    lines = [f"# Where two Wanda masks first differ ({datetime.date.today().isoformat()})", "",
             f"- a: {args.a_label} (`{args.a}`)", f"- b: {args.b_label} (`{args.b}`)",
             f"- dense model {args.model}; calibration {args.samples} x "
             f"{args.seq_len} tokens of {args.data} (seed {args.seed}); machine {platform.machine()}, "
             f"torch {torch.__version__}",
             f"- mask entries that differ: {differing:,} of {total:,} ({differing / total:.3%})"]
    if first is None:
        lines.append("- the masks are identical")
        return _write(args.out, lines)
    earlier_equal = all(torch.equal(a[k], b[k]) for k in matrices if index[k] < first)
    same = "identical" if earlier_equal else "NOT identical"
    lines.append(f"- blocks 0-{first - 1}: masks identical, weights {same}; "
                 f"first difference in block {first}: " +
                 ", ".join(f"{k.split('.', 3)[-1].removesuffix('.weight')} {n}"
                           for k, n in per_block[first].items() if n))

    model, tokenizer = load_model(args.model, progress=False)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = calibration_batch(tokenizer, load_data(args.data), args.samples, args.seq_len, seed=args.seed)
    with torch.no_grad():  # the earlier blocks as pruned (equal in a and b)
        state = model.state_dict()
        for key in matrices:
            if index[key] < first:
                state[key].copy_(a[key])
    targets = [k for k, n in per_block[first].items() if n]
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    for key in targets:
        name = key.removesuffix(".weight")
        sums[name] = torch.zeros(a[key].shape[1], dtype=torch.float64)

        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            sums[name].add_(x.double().square().sum(dim=0))
        modules[name].register_forward_pre_hook(hook)
    stop_at = modules[targets[0].split(".layers.")[0] + f".layers.{first}"]

    def stop(_module: torch.nn.Module, _inputs: tuple[torch.Tensor, ...], _output: object) -> None:
        raise _Stop
    stop_at.register_forward_hook(stop)
    with torch.inference_mode():
        for i in range(ids.shape[0]):
            try:
                model(ids[i:i + 1])
            except _Stop:
                pass

    lines += ["", "| layer | row | column | a keeps | b keeps | exact score (float64) |", "|---|---|---|---|---|---|"]
    agree = {"a": 0, "b": 0}
    for key in targets:
        name = key.removesuffix(".weight")
        norm = sums[name].sqrt()
        weight = dense[key].double().abs()
        cells = ((a[key] != 0) != (b[key] != 0)).nonzero().tolist()
        by_row: dict[int, list[int]] = {}
        for row, col in cells:
            by_row.setdefault(row, []).append(col)
            score = float(weight[row, col] * norm[col])
            lines.append(f"| {name} | {row} | {col} | {bool(a[key][row, col] != 0)} | {bool(b[key][row, col] != 0)} "
                         f"| {score:.9g} |")
        for row, cols in by_row.items():
            scores = {col: float(weight[row, col] * norm[col]) for col in cols}
            best = max(cols, key=lambda c: scores[c])
            agree["a" if a[key][row, best] != 0 else "b"] += 1
    lines += ["", f"In each row that differs, the higher exact score was kept by a in {agree['a']} row(s), by b in "
              f"{agree['b']} row(s). Every later difference follows from these: the blocks after take different "
              "inputs."]
    return _write(args.out, lines)


def _write(path: str, lines: list[str]) -> int:
    text = "\n".join(lines) + "\n"
    print(text)
    Path(path).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
