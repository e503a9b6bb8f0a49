"""What movement pruning's first mask updates remove, on the mgpp preset's schedule (minilm-l6 / reviews).

The mgpp study's movement runs end at the majority class (52.84 %) at 50, 80 and 90 %. This probe
trains the same way (3-epoch schedule: batch 32, 64 tokens, lr 1e-4, warm-up 80 steps, masks every
10 steps, seed 0) and stops after 130 steps; at each of the first mask updates it prints how many
weights were removed, how large they were against all block weights (the share among the largest
10 % and 1 %), and the layers that lost most; the training loss every 5 steps shows what followed.
Lines go to the terminal and to bench/results/movement-probe-COMPARE.txt.

    python bench/movement_probe.py --compare global      # or layer
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", default="global", choices=("global", "layer"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=130, help="stop after this many of the 795 steps")
    args = parser.parse_args()

    from prunekit.adapters import weight_view
    from prunekit.data import load_data
    from prunekit.finetune import train_model
    from prunekit.finetune.trainer import TrainConfig
    from prunekit.methods.gradual import Movement
    from prunekit.models import load_model
    from prunekit.utils import set_seed

    out = RESULTS / f"movement-probe-{args.compare}.txt"
    lines: list[str] = [f"# movement {args.sparsity:.0%} ({args.compare} threshold), minilm-l6 / reviews, seed 0, "
                        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"]

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)
        out.write_text("\n".join(lines) + "\n")

    class Probe(Movement):
        def update_masks(self, sparsity: float) -> None:
            before = {name: mask.clone() for name, mask in self.masks.items()}
            weights = torch.cat([weight_view(layer).detach().abs().flatten() for layer in self.layers.values()])
            super().update_masks(sparsity)
            removed, per_layer = [], {}
            for name in self.layers:
                gone = before[name] & ~self.masks[name]
                removed.append(self.kept_aside[name][gone].abs())
                per_layer[name.replace("bert.encoder.layer.", "block ")] = int(gone.sum())
            pruned = torch.cat(removed)
            if pruned.numel() == 0:
                return
            sample = weights[torch.randperm(weights.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
            q90, q99 = torch.quantile(sample, torch.tensor([0.9, 0.99])).tolist()
            most = sorted(per_layer.items(), key=lambda kv: -kv[1])[:4]
            say(f"mask update {self.updates} (target {sparsity:.2%}): {pruned.numel():,} weights removed, mean |w| "
                f"{pruned.mean():.4f} against {weights.mean():.4f} for all; {(pruned > q90).float().mean():.1%} "
                f"of them among the largest 10 % of block weights, {(pruned > q99).float().mean():.1%} among the "
                f"largest 1 %; most from {', '.join(f'{n} ({c:,})' for n, c in most)}")

    set_seed(0)
    data = load_data("reviews")
    model, tokenizer = load_model("minilm-l6", task="classification", num_labels=2, device="cpu")
    method = Probe(sparsity=args.sparsity, warmup_steps=0.1, final_steps=0.2, update_every=10,
                   compare=args.compare)
    config = TrainConfig(epochs=3, lr=1e-4, batch_size=32, max_length=64, max_eval_examples=200, eval_steps=0,
                         logging_steps=5, stop_after=args.steps, progress=False)
    with tempfile.TemporaryDirectory() as checkpoints:
        result = train_model(model, tokenizer, data, method=method, config=config, checkpoint_dir=checkpoints)
    losses: list[Any] = [(h["step"], h["loss"]) for h in result.history if "loss" in h and "step" in h]
    say("training loss (mean of the 5 steps up to): " + ", ".join(f"{s}: {loss:.3f}" for s, loss in losses))


if __name__ == "__main__":
    main()
