"""Weight quantisation and bitmask packing of one layer, done by compressed-tensors.

Quantisation is symmetric (zero point 0), so a weight that is exactly zero stays exactly zero: pruned
zeros survive quantisation. int8 has one scale per output channel; int4 one per group of ``group_size``
inputs. The scales come from compressed-tensors' ``calculate_qparams`` (scale = max |w| / 127.5 for int8,
/ 7.5 for int4, over the channel or group), and the weights are quantised and stored by its compressor
for the format (``pack-quantized`` for weights alone, as compressed-tensors chooses; ``naive-quantized``,
an int8 tensor, under a bitmask). Bitmasks follow compressed-tensors' ``sparse-bitmask`` and
``sparse-24-bitmask`` layouts, packed with its ``pack_bitmasks``.
"""

from __future__ import annotations

from typing import Any

import torch

BITS = {"int8": 8, "int4": 4}
STACKED_FORMAT = "naive-quantized"  # the int8 tensor a bitmask can hold (pack-quantized packs it into int32)


def weight_args(quantize: str, group_size: int) -> Any:
    """compressed-tensors' QuantizationArgs for ``int8`` (per channel) or ``int4`` (per group)."""
    from compressed_tensors.quantization import QuantizationArgs

    if quantize == "int8":
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)


def quant_format(quantize: str, group_size: int, sparse: bool) -> str:
    """The compressed-tensors format of the quantised weights: the library's own choice, or an int8 tensor
    when a bitmask is to be laid over it."""
    if sparse:
        return STACKED_FORMAT
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(quantize, group_size))
    return str(infer_module_format(torch.nn.Linear, scheme).value)


def scheme_for(names: list[str], quantize: str, group_size: int, fmt: str) -> Any:
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=list(names), weights=weight_args(quantize, group_size), format=fmt)


def scales(weight: torch.Tensor, args: Any, dtype: torch.dtype) -> torch.Tensor:
    """Per-channel (out, 1) or per-group (out, in / group) scales of ``weight``, stored in ``dtype``."""
    from compressed_tensors.quantization.utils import calculate_qparams

    values = weight.float()
    if args.strategy == "group":
        values = values.reshape(values.shape[0], -1, int(args.group_size))
        low, high = values.amin(dim=-1), values.amax(dim=-1)
    else:
        low, high = values.amin(dim=-1, keepdim=True), values.amax(dim=-1, keepdim=True)
    scale, _zero = calculate_qparams(low, high, args)
    return scale.to(dtype)


def quantize_weight(weight: torch.Tensor, scheme: Any, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's stored tensors (local names: ``weight`` or ``weight_packed``, ``weight_scale``, ...).

    ``weight`` in float32: each value is rounded to the grid of the scale as stored (in ``dtype``), in float32."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {"weight": weight.float(), "weight_scale": scales(weight, scheme.weights, dtype)}
    return dict(compressor.compress(state, scheme))


def bitmask(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The bitmask form of a 2-D weight (local names ``compressed``, ``bitmask``, ``shape`` [, ``row_offsets``]),
    laid out as compressed-tensors' ``sparse-bitmask`` / ``sparse-24-bitmask`` compressors lay it out."""
    from compressed_tensors.utils import pack_bitmasks

    rows, cols = weight.shape
    if fmt == "sparse-24-bitmask":
        # the two largest magnitudes of every four (a group with fewer nonzeros keeps some zeros)
        groups = weight.reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.float().abs().topk(2, dim=1).indices, True)  # float: int8 abs(-128) overflows
        keep = keep.reshape(rows, cols)
        return {"shape": torch.tensor([rows, cols]).reshape(-1, 1), "compressed": weight[keep].reshape(rows, cols // 2),
                "bitmask": pack_bitmasks(keep)}
    keep = weight != 0
    counts = keep.sum(dim=-1)
    return {"shape": torch.tensor([rows, cols]), "compressed": weight[keep], "bitmask": pack_bitmasks(keep),
            "row_offsets": torch.cumsum(counts, 0) - counts}
