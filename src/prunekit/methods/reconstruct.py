"""Block-output reconstruction: after a block is pruned, fit its kept weights so it computes what the dense block did.

As in Wanda++'s regional optimisation, BESA or "a free lunch" block reconstruction: the engine hands over the
block's calibration inputs (the outputs of the blocks before it, already pruned) and the dense block's
outputs on those same inputs; Adam then minimises the mean squared difference between the pruned block's
outputs and the dense ones for ``steps`` steps, one calibration micro-batch per step in turn, with every
mask fixed (the gradients of pruned weights are zeroed, so Adam never moves them, and the masks are applied
again after each step). Only the pruned layers' weights train; norms and biases stay. Memory: one block,
its inputs, the dense outputs and one micro-batch's activations and gradients.

The loss on the first micro-batch is measured before and after; if the fit made it worse (a learning rate
too high), the block's weights are put back as they were.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.adapters import grad_view, weight_view
from prunekit.calibration import BlockArgs, BlockInputs


def _detached(value: Any) -> Any:
    """A copy of ``value`` whose tensors are ordinary (not inference-mode) tensors, so autograd may save them."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_detached(item) for item in value)
    if isinstance(value, list):
        return [_detached(item) for item in value]
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value


def _trainable_inputs(inputs: list[BlockInputs], position: int) -> list[BlockInputs]:
    """The micro-batches with their hidden states and this block's own arguments copied for autograd."""
    out: list[BlockInputs] = []
    for inp in inputs:
        own = inp.blocks[position]
        blocks = list(inp.blocks)
        blocks[position] = BlockArgs(_detached(own.args), _detached(own.kwargs), own.hidden_key)
        out.append(BlockInputs(inp.hidden.clone(), blocks))
    return out


def reconstruct_block(block: nn.Module, layers: dict[str, nn.Module], inputs: list[BlockInputs],
                      dense: list[torch.Tensor], position: int, steps: int, lr: float) -> dict[str, Any]:
    """Fit the kept weights of ``layers`` (inside ``block``) to ``dense``; facts for the record."""
    if steps == 0 or not layers or not inputs:
        return {"steps": 0}
    weights = [weight_view(layer) for layer in layers.values()]
    params: list[torch.Tensor] = [layer.get_parameter("weight") for layer in layers.values()]
    masks = [w != 0 for w in weights]
    saved = [w.detach().clone() for w in weights]
    grads = {id(p): p.requires_grad for p in block.parameters()}
    batches = _trainable_inputs(inputs, position)
    targets = [out.clone().float() for out in dense]
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        before = _loss(block, batches[0], targets[0], position)
        optimiser = torch.optim.Adam(params, lr=lr)
        losses: list[float] = []
        for step in range(steps):
            k = step % len(batches)
            optimiser.zero_grad(set_to_none=True)
            out = batches[k].call(block, position)
            loss = torch.nn.functional.mse_loss(out.float(), targets[k])
            loss.backward()
            with torch.no_grad():
                for layer, mask in zip(layers.values(), masks, strict=True):
                    grad = grad_view(layer)  # (out, in) whatever the layer's layout
                    if grad is not None:
                        grad.mul_(mask)
            optimiser.step()
            with torch.no_grad():
                for weight, mask in zip(weights, masks, strict=True):
                    weight.mul_(mask)
            losses.append(float(loss.detach()))
        after = _loss(block, batches[0], targets[0], position)
        kept = after <= before
        if not kept:
            with torch.no_grad():
                for weight, old in zip(weights, saved, strict=True):
                    weight.copy_(old)
    finally:
        for p in block.parameters():
            p.requires_grad_(grads.get(id(p), True))
            p.grad = None
    return {"steps": steps, "loss_before": before, "loss_after": after, "kept": kept,
            "first_loss": losses[0], "last_loss": losses[-1]}


def _loss(block: nn.Module, batch: BlockInputs, target: torch.Tensor, position: int) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(batch.call(block, position).float(), target))
