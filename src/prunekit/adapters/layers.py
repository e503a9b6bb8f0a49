"""Layer kinds: the one place that knows how each kind of linear layer stores its weight.

Everything else sees a linear layer as (out_features, in_features) through these helpers.
``nn.Linear`` stores its weight (out, in); GPT-2's ``Conv1D`` stores it (in, out). A new kind of
linear layer is added here, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for the layer types prunekit prunes: nn.Linear and GPT-2's Conv1D."""
    return isinstance(module, LINEAR_TYPES)


def _not_linear(layer: object) -> TypeError:
    return TypeError(f"{type(layer).__name__} is not a linear layer")


def weight_view(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out_features, in_features); a view, so in-place edits write through.

    nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out) and is returned transposed.
    """
    if isinstance(layer, Conv1D):
        return layer.weight.data.t()
    if isinstance(layer, nn.Linear):
        return layer.weight.data
    raise _not_linear(layer)


def grad_view(layer: nn.Module) -> torch.Tensor | None:
    """The layer's weight gradient as (out_features, in_features), or None before backward (a view)."""
    if not is_linear(layer):
        raise _not_linear(layer)
    weight: Any = layer.weight
    grad: torch.Tensor | None = weight.grad
    if grad is None:
        return None
    return grad.t() if isinstance(layer, Conv1D) else grad


def _param(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=like.requires_grad)


def keep_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the output features ``keep`` (indices) of a linear layer, and of its bias."""
    layer: Any = module
    keep = keep.to(layer.weight.device)
    if isinstance(layer, Conv1D):
        layer.weight = _param(layer.weight.data[:, keep], layer.weight)
        layer.nf = len(keep)
    elif isinstance(layer, nn.Linear):
        layer.weight = _param(layer.weight.data[keep], layer.weight)
        layer.out_features = len(keep)
    else:
        raise _not_linear(layer)
    if layer.bias is not None:
        layer.bias = _param(layer.bias.data[keep], layer.bias)


def keep_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the input features ``keep`` (indices) of a linear layer."""
    layer: Any = module
    keep = keep.to(layer.weight.device)
    if isinstance(layer, Conv1D):
        layer.weight = _param(layer.weight.data[keep, :], layer.weight)
        layer.nx = len(keep)
    elif isinstance(layer, nn.Linear):
        layer.weight = _param(layer.weight.data[:, keep], layer.weight)
        layer.in_features = len(keep)
    else:
        raise _not_linear(layer)


def reorder_outputs(module: nn.Module, order: torch.Tensor, chunks: int = 1) -> None:
    """Reorder the output features of a linear layer (and its bias) in place: new feature i = old ``order[i]``.

    ``chunks``: the outputs are that many equal parts (Phi-3's gate_up_proj: gate, then up), each
    reordered alike; ``order`` indexes one part.
    """
    layer: Any = module
    weight = weight_view(layer)
    size = weight.shape[0] // chunks
    if weight.shape[0] % chunks or order.numel() != size:
        raise ValueError(f"an order of {order.numel()} features does not fit {weight.shape[0]} outputs in "
                         f"{chunks} parts")
    order = order.to(weight.device)
    rows = torch.cat([order + part * size for part in range(chunks)])
    with torch.no_grad():
        weight.copy_(weight[rows].clone())
        if layer.bias is not None:
            layer.bias.data.copy_(layer.bias.data[rows].clone())


def reorder_inputs(module: nn.Module, order: torch.Tensor) -> None:
    """Reorder the input features of a linear layer in place: new input j = old input ``order[j]``."""
    weight = weight_view(module)
    if order.numel() != weight.shape[1]:
        raise ValueError(f"an order of {order.numel()} features does not fit {weight.shape[1]} inputs")
    with torch.no_grad():
        weight.copy_(weight[:, order.to(weight.device)].clone())


def make_linear_like(weight: torch.Tensor, bias: torch.Tensor | None,
                     like: nn.Module | type[nn.Module]) -> nn.Module:
    """A new layer of the same kind as ``like`` (a layer or its class) holding ``weight`` (out, in) and ``bias``.

    On ``weight``'s device and dtype. A Conv1D always has a bias (zeros when ``bias`` is None).
    """
    kind = like if isinstance(like, type) else type(like)
    out_features, in_features = weight.shape
    layer: nn.Module
    if issubclass(kind, Conv1D):
        layer = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.t().contiguous())
        layer.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(out_features, dtype=weight.dtype))
    elif issubclass(kind, nn.Linear):
        layer = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype)
        layer.weight = nn.Parameter(weight.contiguous())
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone())
    else:
        raise TypeError(f"{kind.__name__} is not a linear layer")
    return layer.to(weight.device)
