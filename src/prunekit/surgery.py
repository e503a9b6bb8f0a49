"""Physical removal of attention heads, FFN neurons and whole blocks; the config is kept consistent.

After surgery the model is a normal, smaller model of its family. Whether plain
``AutoModelFor*.from_pretrained`` can reload it depends on whether its config can say its shapes:

- FFN neurons: yes when every block keeps the same number (``intermediate_size`` / ``ffn_dim`` / ``n_inner``).
- Heads: yes for the Llama family (Llama, Qwen2, Mistral...) and Phi-3 when every block keeps the same
  numbers (``num_attention_heads``, ``num_key_value_heads`` and an explicit ``head_dim``); never for GPT-2,
  GPT-NeoX, Falcon, OPT and BERT, whose configs derive the head size from ``hidden_size / num_attention_heads``.
- Blocks: always (``num_hidden_layers``, ``layer_types`` and every ``layer_idx`` are renumbered).

Whatever the config cannot say is written to ``config.prunekit_structure`` (per-block heads, key/value
heads and FFN size); :mod:`prunekit.structured_load` rebuilds such a model before loading its weights.

Fused q/k/v layers keep the rows of the kept heads in their order, wherever the adapter says a head's rows
are (:meth:`~prunekit.adapters.base.ModelAdapter.qkv_rows`); query/key norms that span all heads (OLMo 2)
lose the removed heads' features. Grouped-query attention: query head ``h`` reads key/value group
``h // (heads / kv_heads)``. A removal is allowed when the groups that keep any query head all keep the
same number; a group whose query heads are all removed loses its key/value head too. So both "remove
whole groups" and "remove the same number of query heads from every group" are possible, and anything
else is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunekit.adapters import keep_inputs, keep_outputs, structured_adapter, weight_view
from prunekit.adapters.base import ModelAdapter, get_submodule
from prunekit.errors import PrunekitError
from prunekit.record import STRUCTURE_ATTR
from prunekit.utils import count_parameters


@dataclass(frozen=True)
class LayerShape:
    """What one block keeps: query heads, key/value heads and FFN neurons."""

    heads: int
    kv_heads: int
    intermediate: int


# ---- changing one linear layer (slicing: adapters.keep_outputs / keep_inputs) ----------------
def add_output_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` to the layer's bias, creating a zero bias first if it has none."""
    layer: Any = module
    out_features = weight_view(layer).shape[0]
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(out_features, dtype=layer.weight.dtype, device=layer.weight.device))
    layer.bias.data += delta.to(layer.bias.dtype).to(layer.bias.device)


def _rows(units: Sequence[int], size: int) -> torch.Tensor:
    """Indices of the features of ``units`` when each unit owns ``size`` consecutive features."""
    if not units:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


# ---- reading the current shapes ---------------------------------------------------------------
def block_shape(adapter: ModelAdapter, block: nn.Module) -> LayerShape:
    """The heads, key/value heads and FFN neurons a block has now, read from its layers."""
    head_dim = adapter.head_dim()
    heads = weight_view(get_submodule(block, adapter.o_proj)).shape[1] // head_dim
    if adapter.qkv_fused:  # heads + 2 · kv_heads heads of rows
        kv_heads = (weight_view(get_submodule(block, adapter.qkv_fused)).shape[0] // head_dim - heads) // 2
    else:
        kv_heads = weight_view(get_submodule(block, adapter.k_proj or "")).shape[0] // head_dim
    intermediate = weight_view(get_submodule(block, adapter.mlp_out)).shape[1]
    return LayerShape(heads, kv_heads, intermediate)


def structure(model: nn.Module) -> list[LayerShape]:
    """Per-block shapes of the model."""
    adapter = structured_adapter(model)
    return [block_shape(adapter, block) for block in adapter.blocks()]


# ---- heads ------------------------------------------------------------------------------------
def check_head_removal(heads: int, kv_heads: int, remove: Sequence[int],
                       where: str = "") -> tuple[list[int], list[int]]:
    """Validate a removal of query heads; return (query heads kept, key/value groups kept).

    Raises a one-line PrunekitError when a head index is out of range, every head would go, or the
    grouped-query layout would be broken (groups left with different numbers of query heads).
    """
    removed = set(int(h) for h in remove)
    bad = sorted(h for h in removed if not 0 <= h < heads)
    if bad:
        raise PrunekitError(f"{where}head index {bad[0]} is out of range: the block has {heads} heads (0..{heads - 1})")
    if len(removed) >= heads:
        raise PrunekitError(f"{where}removing {len(removed)} of {heads} heads would leave none: "
                            "lower the heads ratio so that every block keeps at least one head")
    if heads % kv_heads:
        raise PrunekitError(f"{where}{heads} query heads do not split into {kv_heads} key/value groups: "
                            "the model's attention layout is not supported")
    group = heads // kv_heads
    kept_q = [h for h in range(heads) if h not in removed]
    kept_groups = sorted({h // group for h in kept_q})
    sizes = {g: sum(1 for h in kept_q if h // group == g) for g in kept_groups}
    if len(set(sizes.values())) > 1:
        raise PrunekitError(
            f"{where}grouped-query attention has {kv_heads} key/value groups of {group} query heads; removing "
            f"heads {sorted(removed)} leaves groups of sizes {sorted(sizes.values())}: remove whole groups or the "
            "same number of query heads from every group")
    return kept_q, kept_groups


def _set_head_attributes(attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Update the head counts that attention modules keep as attributes (names differ by family)."""
    module: Any
    for module in attention.modules():
        for name in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, heads)
        for name in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, kv_heads)
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            module.num_key_value_groups = heads // kv_heads
        for name in ("all_head_size", "split_size", "inner_dim"):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, heads * head_dim)


def prune_heads(model: nn.Module, removals: Mapping[int, Sequence[int]], sync: bool = True) -> None:
    """Remove query heads (by index, per block index); key/value groups left empty go with them.

    All removals are validated before any layer is changed, so a refused call changes nothing.
    """
    adapter = structured_adapter(model)
    blocks = adapter.blocks()
    head_dim = adapter.head_dim()
    plans = {}
    for index, remove in removals.items():
        if not 0 <= index < len(blocks):
            raise PrunekitError(f"block {index} does not exist: the model has {len(blocks)} blocks")
        shape = block_shape(adapter, blocks[index])
        plans[index] = (shape, *check_head_removal(shape.heads, shape.kv_heads, remove, f"block {index}: "))
        for name, count in zip(adapter.head_norms, (shape.heads, shape.kv_heads), strict=False):
            _head_norm(blocks[index], name, count * head_dim, head_dim)  # refuses an unknown size before any change
    if any(len(kept_q) < shape.heads for shape, kept_q, _ in plans.values()):
        adapter.check_head_removal()
        if adapter.heads_from_config:
            _check_same_heads(adapter, plans)
    for index, (shape, kept_q, kept_groups) in plans.items():
        if len(kept_q) == shape.heads:
            continue
        block = blocks[index]
        q_rows, kv_rows = _rows(kept_q, head_dim), _rows(kept_groups, head_dim)
        if adapter.qkv_fused:
            q, k, v = adapter.qkv_rows(shape.heads, shape.kv_heads, head_dim)
            fused = torch.cat([q[kept_q].reshape(-1), k[kept_groups].reshape(-1), v[kept_groups].reshape(-1)])
            keep_outputs(get_submodule(block, adapter.qkv_fused), fused.sort().values)
        else:
            keep_outputs(get_submodule(block, adapter.q_proj or ""), q_rows)
            keep_outputs(get_submodule(block, adapter.k_proj or ""), kv_rows)
            keep_outputs(get_submodule(block, adapter.v_proj or ""), kv_rows)
        keep_inputs(get_submodule(block, adapter.o_proj), q_rows)
        for name, rows, count in zip(adapter.head_norms, (q_rows, kv_rows), (shape.heads, shape.kv_heads),
                                     strict=False):
            norm = _head_norm(block, name, count * head_dim, head_dim)
            if norm is not None:
                _keep_norm_features(norm, rows)
        _set_head_attributes(adapter.attention(block), len(kept_q), len(kept_groups), head_dim)
    if sync:
        sync_config(model)


def _check_same_heads(adapter: ModelAdapter, plans: Mapping[int, tuple[LayerShape, list[int], list[int]]]) -> None:
    """Refuse a removal that leaves blocks with different head counts in a family that reads them from the config."""
    after = {(len(kept_q), len(kept_groups)) for _, kept_q, kept_groups in plans.values()}
    untouched = {(s.heads, s.kv_heads) for i, block in enumerate(adapter.blocks()) if i not in plans
                 for s in [block_shape(adapter, block)]}
    if len(after | untouched) > 1:
        raise PrunekitError(f"{adapter.family} reads its head count from the config, so every block must keep the "
                            "same number of heads: use --allocation uniform")


def _head_norm(block: nn.Module, name: str, full: int, head_dim: int) -> Any:
    """The query/key norm ``name`` when it spans all heads (``full`` features); None when absent or per head."""
    try:
        norm: Any = get_submodule(block, name)
    except AttributeError:
        return None
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == head_dim:
        return None
    if weight.numel() != full:
        raise PrunekitError(f"{name} has {weight.numel()} features, neither one head ({head_dim}) nor all heads "
                            f"({full}): this attention layout is not supported for head removal")
    return norm


def _keep_norm_features(norm: Any, rows: torch.Tensor) -> None:
    """Keep only the features ``rows`` of a norm's weight and bias."""
    for attr in ("weight", "bias"):
        param = getattr(norm, attr, None)
        if isinstance(param, nn.Parameter):
            setattr(norm, attr, nn.Parameter(param.data[rows.to(param.device)].clone(),
                                             requires_grad=param.requires_grad))
    if isinstance(getattr(norm, "normalized_shape", None), tuple):
        norm.normalized_shape = (len(rows),)


# ---- FFN neurons ------------------------------------------------------------------------------
def prune_neurons(model: nn.Module, removals: Mapping[int, Sequence[int]], sync: bool = True) -> None:
    """Remove FFN neurons (by index, per block index): rows of every MLP input layer, columns of the output."""
    adapter = structured_adapter(model)
    blocks = adapter.blocks()
    plans = {}
    for index, remove in removals.items():
        if not 0 <= index < len(blocks):
            raise PrunekitError(f"block {index} does not exist: the model has {len(blocks)} blocks")
        size = block_shape(adapter, blocks[index]).intermediate
        removed = set(int(n) for n in remove)
        bad = sorted(n for n in removed if not 0 <= n < size)
        if bad:
            raise PrunekitError(f"block {index}: neuron index {bad[0]} is out of range (the FFN has {size} neurons)")
        if len(removed) >= size:
            raise PrunekitError(f"block {index}: removing {len(removed)} of {size} FFN neurons would leave none: "
                                "lower the neurons ratio so that every block keeps at least one neuron")
        plans[index] = torch.tensor([n for n in range(size) if n not in removed], dtype=torch.long)
    for index, keep in plans.items():
        block = blocks[index]
        size = block_shape(adapter, block).intermediate
        rows = torch.cat([keep + part * size for part in range(adapter.mlp_in_chunks)])  # gate/up halves alike
        for name in adapter.mlp_in:
            keep_outputs(get_submodule(block, name), rows)
        keep_inputs(get_submodule(block, adapter.mlp_out), keep)
        for name in (*adapter.mlp_in, adapter.mlp_out):
            parent: Any = get_submodule(block, name.rpartition(".")[0])
            if isinstance(getattr(parent, "intermediate_size", None), int):
                parent.intermediate_size = len(keep)
    if sync:
        sync_config(model)


def enable_biases(model: nn.Module, part: str) -> bool:
    """Give every layer of ``part`` ("attention" or "mlp") a bias, if the family's config can say so.

    Returns False when the config has no such switch (the caller then cannot add an output bias and
    keep the model reloadable). Added biases are zero, so outputs do not change.
    """
    adapter = structured_adapter(model)
    out_name = adapter.o_proj if part == "attention" else adapter.mlp_out
    first = get_submodule(adapter.blocks()[0], out_name)
    if getattr(first, "bias", None) is not None:
        return True
    flag = adapter.bias_flag(part)
    if flag is None:
        return False
    setattr(model.config, flag, True)
    names = (*adapter.attention_inputs(), adapter.o_proj) if part == "attention" else (*adapter.mlp_in, adapter.mlp_out)
    for block in adapter.blocks():
        for name in names:
            layer = get_submodule(block, name)
            if getattr(layer, "bias", None) is None:
                add_output_bias(layer, torch.zeros(weight_view(layer).shape[0]))
    return True


# ---- blocks -----------------------------------------------------------------------------------
def remove_blocks(model: nn.Module, indices: Sequence[int], sync: bool = True) -> None:
    """Delete whole blocks; the rest are renumbered (``layer_idx``) and the config updated."""
    adapter = structured_adapter(model)
    blocks = adapter.blocks()
    removed = sorted(set(int(i) for i in indices))
    if any(not 0 <= i < len(blocks) for i in removed):
        raise PrunekitError(f"block indices {removed} are out of range: the model has {len(blocks)} blocks "
                            f"(0..{len(blocks) - 1})")
    if len(removed) >= len(blocks):
        raise PrunekitError(f"removing {len(removed)} of {len(blocks)} blocks would leave none: "
                            f"remove at most {len(blocks) - 1}")
    kept = [i for i in range(len(blocks)) if i not in removed]
    adapter.check_block_removal(kept)
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    setattr(get_submodule(adapter.base_model, parent_path), attr, new_blocks)
    module: Any
    for new_index, block in enumerate(new_blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config: Any = model.config
    for name in adapter.layers_attrs:
        if getattr(config, name, None) is not None:
            setattr(config, name, len(kept))
            break
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        config.layer_types = [layer_types[i] for i in kept]
    old = getattr(config, STRUCTURE_ATTR, None)
    if isinstance(old, dict) and len(old.get("layers", [])) == len(blocks):
        old["layers"] = [old["layers"][i] for i in kept]
    if sync:
        sync_config(model)


# ---- config -----------------------------------------------------------------------------------
def _set_first(config: Any, attrs: Sequence[str], value: int) -> None:
    for name in attrs:
        if hasattr(config, name):
            setattr(config, name, value)
            return
    setattr(config, attrs[0], value)


def sync_config(model: nn.Module) -> dict[str, Any]:
    """Make the config describe the model's shapes; record per-block shapes where it cannot.

    Returns facts for the prunekit record: per-block shapes, whether plain ``from_pretrained``
    reloads the model, the loader needed otherwise, and the parameter count.
    """
    adapter = structured_adapter(model)
    config: Any = model.config
    shapes = structure(model)
    head_dim = adapter.head_dim()
    heads, kv_heads = adapter.num_heads(), adapter.num_kv_heads()
    describable = True
    if len({s.intermediate for s in shapes}) == 1:
        _set_first(config, adapter.intermediate_attrs, shapes[0].intermediate)
    else:
        describable = False
    if {(s.heads, s.kv_heads) for s in shapes} != {(heads, kv_heads)}:
        if len({(s.heads, s.kv_heads) for s in shapes}) == 1 and adapter.config_head_dim:
            config.head_dim = head_dim
            _set_first(config, adapter.heads_attrs, shapes[0].heads)
            _set_first(config, adapter.kv_heads_attrs, shapes[0].kv_heads)
        else:
            describable = False
    layers = [asdict(s) for s in shapes]
    if describable:
        if hasattr(config, STRUCTURE_ATTR):
            delattr(config, STRUCTURE_ATTR)
    else:
        setattr(config, STRUCTURE_ATTR, {"layers": layers})
    return {"layers": layers, "uniform": describable, "plain_reload": describable,
            "loader": None if describable else "structured", "parameters": count_parameters(model)}


def shrink_to(model: nn.Module, shapes: Sequence[Mapping[str, int]]) -> None:
    """Cut a freshly built model down to recorded per-block shapes (the weights are loaded afterwards).

    Keeps the first key/value groups, the first query heads of each group and the first neurons.
    """
    adapter = structured_adapter(model)
    blocks = adapter.blocks()
    if len(shapes) != len(blocks):
        raise PrunekitError(f"the record describes {len(shapes)} blocks but the config builds {len(blocks)}: "
                            "the saved folder is inconsistent, save it again")
    head_removals: dict[int, list[int]] = {}
    neuron_removals: dict[int, list[int]] = {}
    for index, (block, want) in enumerate(zip(blocks, shapes, strict=True)):
        now = block_shape(adapter, block)
        group, want_group = now.heads // now.kv_heads, want["heads"] // want["kv_heads"]
        head_removals[index] = [h for h in range(now.heads)
                                if h // group >= want["kv_heads"] or h % group >= want_group]
        neuron_removals[index] = list(range(want["intermediate"], now.intermediate))
    prune_heads(model, head_removals, sync=False)
    prune_neurons(model, neuron_removals, sync=False)


# ---- ranks ------------------------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """y = P·(Q·x) + b as two dense layers: ``q`` (d_in → rank, no bias), then ``p`` (rank → d_out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.q = nn.Linear(in_features, rank, bias=False)
        self.p = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p(self.q(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
