"""int8 inference on CPU: a copy of a model whose linear layers run int8 x int8 matmuls.

:func:`int8_dynamic` replaces every ``nn.Linear`` (blocks and output head) by PyTorch's dynamically quantised
linear layer (``torch.ao.quantization.quantize_dynamic``, fbgemm / x86 kernels): weights are quantised once
to int8 with one scale per output channel, activations per call, per tensor, from their observed range.
Pruned zeros stay zero (symmetric weight quantisation), but the kernels are dense: unstructured zeros save
nothing; only a structurally smaller model does less work. The model stays float32 elsewhere (embeddings,
norms, attention). One scale for a whole activation tensor cannot hold a few outlier channels: in Llama-like
models the FFN output layers' inputs (SiLU(gate) x up) have them, and ``keep_float=("down_proj", "lm_head")``
leaves those layers (and the head) in float32 at some cost in speed (bench/export.py measures both).
``torch.ao.quantization`` is deprecated in favour of torchao but still ships with torch; torchao's int8
dynamic layers (per-token activation scales) ran 2-4x slower than these on this CPU, and slower than
float32 for one token.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from prunekit.errors import PrunekitError


def int8_dynamic(model: nn.Module, inplace: bool = False, keep_float: Iterable[str] = ()) -> nn.Module:
    """An int8 dynamically quantised copy of ``model`` (or the model itself with ``inplace``), for CPU inference.

    ``keep_float``: linear layers left in float32, by name or name ending (``"down_proj"``, ``"lm_head"``).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if "x86" not in torch.backends.quantized.supported_engines and "fbgemm" not in \
            torch.backends.quantized.supported_engines:
        raise PrunekitError("this PyTorch build has no int8 CPU kernels (fbgemm / x86): use an x86 build of torch")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise PrunekitError("int8 dynamic quantisation runs on the CPU: move the model there first (--device cpu)")
    kept = tuple(keep_float)
    target = model if inplace else copy.deepcopy(model)
    target.float().eval()
    names = {name for name, module in target.named_modules() if isinstance(module, nn.Linear)
             and not any(name == k or name.endswith("." + k) for k in kept)}
    if not names:
        raise PrunekitError("no linear layer left to quantise: keep fewer layers in float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices, once per layer
        quantize_dynamic(target, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8, inplace=True)
    return target
