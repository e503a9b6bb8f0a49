"""One-shot structured pruning: remove whole attention heads and FFN neurons, or whole blocks.

``heads-neurons`` scores every head and neuron, chooses which go (``uniform``: the same number in
every block, so plain ``from_pretrained`` reloads Llama-family models; ``global``: scores normalised
by their block's mean and compared across blocks, so sizes differ per block), and removes them
physically (:mod:`prunekit.surgery`). Scores (summed over a structure's weights):

- ``magnitude``: |W|.
- ``wanda``: |W|·‖X‖ (‖X‖: the norm of the weight's input channel over the calibration tokens).
- ``flap`` (An et al. 2024; the default, clearly the best one-shot on smollm2-135m): fluctuation
  Var(X_c)·‖W[:, c]‖² of the output projection's input channels, with bias compensation: the mean
  contribution of removed channels goes into the bias.
- ``taylor`` (first order, LLM-Pruner style): |Σ θ·∂L/∂θ|, gradients of the model's loss on the
  calibration data (LM loss; a classifier's own predictions as labels when it has no LM head).

Grouped-query attention, rule ``gqa="query"`` (default): every key/value group loses the same number
of query heads, round-half-up(ratio × group size), and keeps its key/value head; ``gqa="groups"``:
whole groups go, round-half-up(ratio × groups). The fraction actually removed is recorded.

Settings: :class:`HeadsNeuronsConfig` (``ratio``, or ``heads_ratio``/``neurons_ratio``; ``importance``;
``allocation`` uniform or global; ``gqa``; ``bias_compensation``, default on for flap only).

``blocks`` removes the N blocks of lowest influence, 1 − mean cosine(block input, block output) on
the calibration tokens (ShortGPT, Men et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit import surgery
from prunekit.adapters import grad_view, model_head, weight_view
from prunekit.adapters.base import ModelAdapter, get_submodule
from prunekit.calibration import BlockVisitor, block_output, run_blockwise
from prunekit.calibration.engine import auto_micro_batch
from prunekit.errors import PrunekitError
from prunekit.methods.base import EngineConfig
from prunekit.methods.registry import register, setting
from prunekit.utils import count_parameters

IMPORTANCES = ("magnitude", "wanda", "flap", "taylor")
ALLOCATIONS = ("uniform", "global")
GQA_RULES = ("query", "groups")
# block -> (score per query head, per key/value head, per FFN neuron)
Scores = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5 + 1e-9))


# ---- activation statistics ---------------------------------------------------------------------
class ChannelStats:
    """Per input channel: sum, sum of squares and token count (an observer of the engine)."""

    def __init__(self, channels: int) -> None:
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).double().cpu()
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        self.count += x.shape[0]

    def norm(self) -> torch.Tensor:
        return self.sumsq.clone().sqrt()

    def mean(self) -> torch.Tensor:
        return self.sum.clone() / max(1, self.count)

    def variance(self) -> torch.Tensor:
        return (self.sumsq.clone() / max(1, self.count) - self.mean() ** 2).clamp_min(0)


class _StatsVisitor(BlockVisitor):
    """Collect input statistics of the attention input, o_proj, MLP input and MLP output layers."""

    modifies = False

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.prefix = adapter.blocks_prefix()
        self.roles = {"attn_in": adapter.attention_inputs()[0], "o": adapter.o_proj,
                      "mlp_in": adapter.mlp_in[0], "mlp_out": adapter.mlp_out}
        self.stats: dict[int, dict[str, ChannelStats]] = {}

    def layers(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        return {f"{self.prefix}.{index}.{name}": get_submodule(block, name) for name in self.roles.values()}

    def observer(self, name: str, layer: nn.Module, in_features: int) -> ChannelStats:
        return ChannelStats(in_features)

    def finish(self, index: int, block: nn.Module, layers: dict[str, nn.Module], observers: dict[str, Any]) -> None:
        self.stats[index] = {role: observers[f"{self.prefix}.{index}.{name}"] for role, name in self.roles.items()}


def collect_stats(model: nn.Module, calibration: torch.Tensor, device: torch.device,
                  progress: bool, micro_batch_size: int = 0) -> dict[int, dict[str, ChannelStats]]:
    """Input statistics per block, from the block-by-block engine on the dense model."""
    visitor = _StatsVisitor(surgery.structured_adapter(model))
    run_blockwise(model, calibration, visitor, device=device, progress=progress, desc="statistics",
                  micro_batch_size=micro_batch_size)
    return visitor.stats


@contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run with the model on ``device``, then put it back where it was."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _forward(model: nn.Module, ids: torch.Tensor, **extra: Any) -> Any:
    is_lm = model_head(model) == "causal-lm"
    return model(input_ids=ids, **({"use_cache": False} if is_lm else {}), **extra)


def taylor_gradients(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, device: torch.device,
                     batch_size: int = 8) -> dict[int, dict[str, torch.Tensor]]:
    """Weight gradients (as (out, in)) of the block linears, summed over the calibration batches."""
    was_training = model.training
    model.eval()
    grads: dict[int, dict[str, torch.Tensor]] = {}
    is_lm = model_head(model) == "causal-lm"
    requires = {id(p): p.requires_grad for p in model.parameters()}
    with placed(model, device):
        try:
            model.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.requires_grad_(True)
            for start in range(0, calibration.shape[0], batch_size):
                ids = calibration[start:start + batch_size].to(device)
                if is_lm:
                    loss = _forward(model, ids, labels=ids).loss
                else:
                    with torch.no_grad():
                        labels = _forward(model, ids).logits.argmax(-1)
                    loss = _forward(model, ids, labels=labels).loss
                loss.backward()
            for index, block in enumerate(adapter.blocks()):
                grads[index] = {}
                for name, layer in adapter.block_linears(block).items():
                    grad = grad_view(layer)
                    if grad is None:
                        raise PrunekitError(f"block {index} layer {name} got no gradient: taylor importance needs "
                                            "a model whose loss reaches every block; use --importance wanda")
                    grads[index][name] = grad.detach().to("cpu", torch.float64)
        finally:
            model.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.requires_grad_(requires[id(p)])
            model.train(was_training)
    return grads


# ---- scores -------------------------------------------------------------------------------------
def _score_matrix(importance: str, weight: torch.Tensor, stats: ChannelStats | None, grad: torch.Tensor | None,
                  is_output: bool) -> torch.Tensor | None:
    """Per-weight contribution to a structure's score, shaped (out, in); None when the layer does not count."""
    w = weight.detach().to("cpu", torch.float64)
    if importance == "magnitude":
        return w.abs()
    if importance == "wanda":
        assert stats is not None
        return w.abs() * stats.norm()[None, :]
    if importance == "flap":
        assert stats is not None
        return w.pow(2) * stats.variance()[None, :] if is_output else None
    assert grad is not None
    return w * grad


def block_scores(adapter: ModelAdapter, block: nn.Module, importance: str, stats: dict[str, ChannelStats] | None,
                 grads: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed sums of the contributions per query head, per key/value head and per FFN neuron."""
    shape = surgery.block_shape(adapter, block)
    head_dim = adapter.head_dim()

    def matrix(name: str, role: str | None, is_output: bool) -> torch.Tensor | None:
        layer = get_submodule(block, name)
        return _score_matrix(importance, weight_view(layer), (stats or {}).get(role) if role else None,
                             (grads or {}).get(name), is_output)

    def rows(m: torch.Tensor | None, units: int, offset: int = 0) -> torch.Tensor:
        if m is None:
            return torch.zeros(units, dtype=torch.float64)
        return m[offset:offset + units * head_dim].sum(1).reshape(units, head_dim).sum(1)

    o = matrix(adapter.o_proj, "o", True)
    q_score = torch.zeros(shape.heads, dtype=torch.float64) if o is None else \
        o.sum(0).reshape(shape.heads, head_dim).sum(1)
    if adapter.qkv_fused:
        fused = matrix(adapter.qkv_fused, "attn_in", False)
        kv_score = torch.zeros(shape.kv_heads, dtype=torch.float64)
        if fused is not None:
            per_row = fused.sum(1)
            q, k, v = adapter.qkv_rows(shape.heads, shape.kv_heads, head_dim)
            q_score = q_score + per_row[q].sum(1)
            kv_score = per_row[k].sum(1) + per_row[v].sum(1)
    else:
        q_score = q_score + rows(matrix(adapter.q_proj or "", "attn_in", False), shape.heads)
        kv_score = rows(matrix(adapter.k_proj or "", "attn_in", False), shape.kv_heads) + \
            rows(matrix(adapter.v_proj or "", "attn_in", False), shape.kv_heads)
    down = matrix(adapter.mlp_out, "mlp_out", True)
    neuron_score = torch.zeros(shape.intermediate, dtype=torch.float64) if down is None else down.sum(0)
    for name in adapter.mlp_in:
        m = matrix(name, "mlp_in", False)
        if m is not None:  # a fused gate/up layer holds one row per neuron in each of its parts
            neuron_score = neuron_score + m.sum(1).reshape(adapter.mlp_in_chunks, shape.intermediate).sum(0)
    return q_score, kv_score, neuron_score


# ---- allocation ---------------------------------------------------------------------------------
def _check_ratio(ratio: float, what: str) -> None:
    if not 0.0 <= ratio < 1.0:
        raise PrunekitError(f"--ratio {ratio:g} for {what} is outside [0, 1): a ratio of 1 would remove every "
                            f"{what[:-1]} of a block; use a fraction such as 0.5")


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _global_counts(per_block: dict[int, torch.Tensor], ratio: float, keep_min: dict[int, int]) -> dict[int, int]:
    """How many units each block loses when the lowest normalised scores across blocks go."""
    pool = sorted((float(v), b) for b, s in per_block.items() for v in _normalised(s).tolist())
    budget = round_half_up(ratio * len(pool))
    counts = dict.fromkeys(per_block, 0)
    for _, b in pool:
        if budget == 0:
            break
        if len(per_block[b]) - counts[b] > keep_min[b]:
            counts[b] += 1
            budget -= 1
    return counts


def plan_heads(shapes: list[surgery.LayerShape], scores: Scores, ratio: float, allocation: str,
               gqa: str) -> dict[int, list[int]]:
    """Query heads to remove per block (see the module docstring for the rules)."""
    _check_ratio(ratio, "heads")
    plan: dict[int, list[int]] = {}
    units: dict[int, torch.Tensor] = {}
    modes: dict[int, str] = {}
    for b, shape in enumerate(shapes):
        group = shape.heads // shape.kv_heads
        q, kv, _ = scores[b]
        modes[b] = "groups" if group == 1 else gqa
        units[b] = (q.reshape(shape.kv_heads, group).sum(1) + kv).abs() if modes[b] == "groups" else q.abs()
    if allocation == "uniform":
        counts = {}
        for b, shape in enumerate(shapes):
            group = shape.heads // shape.kv_heads
            size = shape.kv_heads if modes[b] == "groups" else group
            counts[b] = round_half_up(ratio * size)
            if counts[b] >= size:
                what = "key/value groups" if modes[b] == "groups" else "query heads of each group"
                raise PrunekitError(
                    f"--ratio {ratio:g} would remove all {size} {what} of block {b} ({shape.heads} query heads, "
                    f"{shape.kv_heads} key/value heads): lower the ratio")
            if modes[b] == "query":
                counts[b] *= shape.kv_heads
    else:
        keep_min = {b: 1 if modes[b] == "groups" else shapes[b].kv_heads for b in units}
        counts = _global_counts(units, ratio, keep_min)
    for b, shape in enumerate(shapes):
        group = shape.heads // shape.kv_heads
        if modes[b] == "groups":
            plan[b] = [g * group + i for g in _lowest(units[b], counts[b]) for i in range(group)]
        else:
            per_group = min(group - 1, round_half_up(counts[b] / shape.kv_heads))
            plan[b] = sorted(g * group + i for g in range(shape.kv_heads)
                             for i in _lowest(units[b][g * group:(g + 1) * group], per_group))
    return plan


def plan_neurons(shapes: list[surgery.LayerShape], scores: Scores, ratio: float,
                 allocation: str) -> dict[int, list[int]]:
    """FFN neurons to remove per block: the lowest scores, per block or compared across blocks."""
    _check_ratio(ratio, "neurons")
    per_block = {b: scores[b][2].abs() for b in range(len(shapes))}
    if allocation == "uniform":
        counts = {b: round_half_up(ratio * shape.intermediate) for b, shape in enumerate(shapes)}
        for b, shape in enumerate(shapes):
            if counts[b] >= shape.intermediate:
                raise PrunekitError(f"--ratio {ratio:g} would remove all {shape.intermediate} FFN neurons of block "
                                    f"{b}: lower the ratio")
    else:
        counts = _global_counts(per_block, ratio, dict.fromkeys(per_block, 1))
    return {b: _lowest(per_block[b], counts[b]) for b in per_block}


# ---- the methods ----------------------------------------------------------------------------------
def _bias_deltas(adapter: ModelAdapter, stats: dict[int, dict[str, ChannelStats]], heads: dict[int, list[int]],
                 neurons: dict[int, list[int]]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """FLAP bias compensation: W[:, removed] · mean(X[removed]) for the attention output and the MLP output."""
    blocks = adapter.blocks()
    head_dim = adapter.head_dim()
    attention, mlp = {}, {}
    for b, removed in heads.items():
        if removed:
            cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in removed])
            w = weight_view(get_submodule(blocks[b], adapter.o_proj)).detach().double().cpu()
            attention[b] = w[:, cols] @ stats[b]["o"].mean()[cols]
    for b, removed in neurons.items():
        if removed:
            w = weight_view(get_submodule(blocks[b], adapter.mlp_out)).detach().double().cpu()
            mlp[b] = w[:, removed] @ stats[b]["mlp_out"].mean()[removed]
    return attention, mlp


def _apply_bias(model: nn.Module, adapter: ModelAdapter, part: str, deltas: dict[int, torch.Tensor]) -> bool:
    if not deltas:
        return True
    if not surgery.enable_biases(model, part):
        return False
    name = adapter.o_proj if part == "attention" else adapter.mlp_out
    for b, delta in deltas.items():
        surgery.add_output_bias(get_submodule(adapter.blocks()[b], name), delta)
    return True


@dataclass(frozen=True)
class HeadsNeuronsConfig(EngineConfig):
    """Settings of ``heads-neurons``."""

    renamed = {"compare": "allocation"}

    ratio: float | None = setting(None, "fraction of attention heads and of FFN neurons to remove, e.g. 0.5")
    heads_ratio: float | None = setting(None, "fraction of heads to remove (default: ratio)")
    neurons_ratio: float | None = setting(None, "fraction of FFN neurons to remove (default: ratio)")
    importance: str = setting("flap", "score of a head or neuron: flap, wanda, magnitude (no calibration) or taylor",
                              choices=IMPORTANCES)
    allocation: str = setting("uniform", "sizes per block: uniform (same in every block; plain from_pretrained "
                              "reloads) or global (scores compared across blocks)", choices=ALLOCATIONS)
    gqa: str = setting("query", "grouped-query attention: query (remove query heads evenly within key/value "
                       "groups) or groups (remove whole key/value groups)", choices=GQA_RULES)
    bias_compensation: bool | None = setting(None, "add the mean output of what is removed as a bias "
                                             "(default: on for flap)")

    def check(self) -> None:
        super().check()
        for name in ("ratio", "heads_ratio", "neurons_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise PrunekitError(f"heads-neurons: {name} {value} is outside [0, 1): use a fraction such as 0.5")

    def ratios(self) -> tuple[float, float]:
        """(heads, neurons) fractions to remove."""
        heads = self.heads_ratio if self.heads_ratio is not None else self.ratio
        neurons = self.neurons_ratio if self.neurons_ratio is not None else self.ratio
        if heads is None or neurons is None:
            raise PrunekitError("heads-neurons needs --ratio (the fraction of heads and FFN neurons to remove, "
                                "e.g. 0.5)")
        return float(heads), float(neurons)

    def compensate(self) -> bool:
        return self.bias_compensation if self.bias_compensation is not None else self.importance == "flap"

    def ready(self) -> None:
        self.ratios()

    def needs_calibration(self) -> bool:
        return self.importance != "magnitude" or self.compensate()


def prune_heads_neurons(model: nn.Module, config: HeadsNeuronsConfig, calibration: torch.Tensor | None,
                        device: torch.device, progress: bool = True) -> dict[str, Any]:
    """The ``heads-neurons`` method: score, allocate, remove; returns facts for the prunekit record."""
    adapter = surgery.structured_adapter(model)
    heads_ratio, neurons_ratio, compensate, needs_stats = heads_neurons_setup(config, calibration)
    importance, allocation, gqa = config.importance, config.allocation, config.gqa
    stats = (collect_stats(model, calibration, device, progress, config.micro_batch_size)
             if needs_stats and calibration is not None else None)
    grads = None
    if importance == "taylor" and calibration is not None:
        grads = taylor_gradients(model, adapter, calibration, device)
    blocks = adapter.blocks()
    shapes = [surgery.block_shape(adapter, block) for block in blocks]
    scores: Scores = {b: block_scores(adapter, block, importance, stats[b] if stats else None,
                                      grads[b] if grads else None) for b, block in enumerate(blocks)}
    heads = plan_heads(shapes, scores, heads_ratio, allocation, gqa)
    neurons = plan_neurons(shapes, scores, neurons_ratio, allocation)
    attention_delta, mlp_delta = _bias_deltas(adapter, stats, heads, neurons) if compensate and stats else ({}, {})
    before = count_parameters(model)
    with torch.no_grad():
        surgery.prune_heads(model, heads, sync=False)
        surgery.prune_neurons(model, neurons, sync=False)
        compensated = _apply_bias(model, adapter, "attention", attention_delta) and \
            _apply_bias(model, adapter, "mlp", mlp_delta)
    facts = surgery.sync_config(model)
    return heads_neurons_facts(config, shapes, heads, neurons, compensate, compensated, before, facts)


def heads_neurons_setup(config: HeadsNeuronsConfig,
                        calibration: torch.Tensor | None) -> tuple[float, float, bool, bool]:
    """(heads ratio, neurons ratio, bias compensation, activation statistics needed), refusing what cannot run."""
    heads_ratio, neurons_ratio = config.ratios()
    _check_ratio(heads_ratio, "heads")
    _check_ratio(neurons_ratio, "neurons")
    importance = config.importance
    if importance != "magnitude" and calibration is None:
        raise PrunekitError(f"importance '{importance}' needs calibration data: pass --calib, "
                            "or use --importance magnitude")
    compensate = config.compensate()
    if compensate and calibration is None:
        raise PrunekitError("bias compensation needs calibration data (the mean output of what is removed): pass "
                            "--calib, or --no-bias-compensation")
    return heads_ratio, neurons_ratio, compensate, importance in ("wanda", "flap") or compensate


def heads_neurons_facts(config: HeadsNeuronsConfig, shapes: list[surgery.LayerShape], heads: dict[int, list[int]],
                        neurons: dict[int, list[int]], compensate: bool, compensated: bool, before: int,
                        facts: dict[str, Any]) -> dict[str, Any]:
    """What the record says of a heads-neurons run (``facts``: from :func:`prunekit.surgery.sync_config`)."""
    heads_ratio, neurons_ratio = config.ratios()
    importance, allocation, gqa = config.importance, config.allocation, config.gqa
    total_heads = sum(s.heads for s in shapes)
    total_neurons = sum(s.intermediate for s in shapes)
    return {
        "structured": "heads-neurons", "importance": importance, "allocation": allocation,
        "gqa_rule": ("query: the same number of query heads removed from every key/value group, key/value heads kept"
                     if gqa == "query" else "groups: whole key/value groups (their query heads and K/V) removed"),
        "heads_ratio": heads_ratio, "neurons_ratio": neurons_ratio,
        "heads_removed_fraction": sum(len(v) for v in heads.values()) / max(1, total_heads),
        "neurons_removed_fraction": sum(len(v) for v in neurons.values()) / max(1, total_neurons),
        "heads_removed": {str(b): v for b, v in heads.items() if v},
        "bias_compensation": (not compensate and "off") or ("on" if compensated else
                                                             "skipped: this family's config has no output biases"),
        "parameters_before": before, "parameters_after": facts["parameters"],
        "structure": {"layers": facts["layers"]}, "uniform": facts["uniform"],
        "plain_reload": facts["plain_reload"], "loader": facts["loader"],
    }


def block_influence(model: nn.Module, calibration: torch.Tensor, device: torch.device,
                    batch_size: int = 8) -> list[float]:
    """Per block: 1 − mean over calibration tokens of cos(block input, block output)."""
    blocks = surgery.structured_adapter(model).blocks()
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)
    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_hook(index: int) -> Any:
        def hook(_module: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
            x, y = inputs.pop(index).float(), block_output(out).float()
            cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
            sums[index] += float(cos.sum())
            counts[index] += cos.numel()
        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with placed(model, device), torch.inference_mode():
            for start in range(0, calibration.shape[0], batch_size):
                _forward(model, calibration[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [1.0 - s / max(1, c) for s, c in zip(sums, counts, strict=True)]


@dataclass(frozen=True)
class BlocksConfig(EngineConfig):
    """Settings of ``blocks``."""

    remove: int | None = setting(None, "number of blocks to remove")
    ratio: float | None = setting(None, "fraction of the blocks to remove (rounded half up), instead of remove")

    def check(self) -> None:
        super().check()
        if self.remove is not None and self.ratio is not None:
            raise PrunekitError("blocks takes --remove N or --ratio R, not both")

    def ready(self) -> None:
        if self.remove is None and self.ratio is None:
            raise PrunekitError("the blocks method needs --remove N (number of blocks to remove, at least 1)")

    def needs_calibration(self) -> bool:
        return True


def prune_blocks(model: nn.Module, config: BlocksConfig, calibration: torch.Tensor | None, device: torch.device,
                 progress: bool = True) -> dict[str, Any]:
    """The ``blocks`` method: remove the ``remove`` blocks of lowest influence (or ``ratio`` of them)."""
    n_blocks = len(surgery.structured_adapter(model).blocks())
    remove = blocks_to_remove(config, n_blocks, calibration)
    assert calibration is not None
    influence = block_influence(model, calibration, device,
                                batch_size=auto_micro_batch(config.micro_batch_size, device, calibration.shape[1]))
    removed = lowest_influence(influence, remove)
    before = count_parameters(model)
    surgery.remove_blocks(model, removed)
    facts = surgery.sync_config(model)
    return blocks_facts(influence, removed, before, facts)


def blocks_to_remove(config: BlocksConfig, n_blocks: int, calibration: torch.Tensor | None) -> int:
    """How many of ``n_blocks`` blocks go (``remove``, or ``ratio`` rounded half up), refusing what cannot run."""
    remove, ratio = config.remove, config.ratio
    if remove is None and ratio is not None:
        remove = round_half_up(float(ratio) * n_blocks)
    if remove is None or int(remove) < 1:
        raise PrunekitError("the blocks method needs --remove N (number of blocks to remove, at least 1)")
    if int(remove) >= n_blocks:
        raise PrunekitError(f"--remove {remove} would remove all {n_blocks} blocks: remove at most {n_blocks - 1}")
    if calibration is None:
        raise PrunekitError("the blocks method needs calibration data to measure block influence: pass --calib")
    return int(remove)


def lowest_influence(influence: list[float], remove: int) -> list[int]:
    """The indices of the ``remove`` blocks of lowest influence (ties: the earlier block), in order."""
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return sorted(order[:remove])


def blocks_facts(influence: list[float], removed: list[int], before: int, facts: dict[str, Any]) -> dict[str, Any]:
    """What the record says of a blocks run (``facts``: from :func:`prunekit.surgery.sync_config`)."""
    n_blocks = len(influence)
    return {"structured": "blocks", "importance": "influence (1 - cos(input, output), ShortGPT)",
            "block_influence": influence, "blocks_removed": removed, "num_blocks": n_blocks - len(removed),
            "parameters_before": before, "parameters_after": facts["parameters"],
            "structure": {"layers": facts["layers"]}, "uniform": facts["uniform"],
            "plain_reload": facts["plain_reload"], "loader": facts["loader"]}


register("heads-neurons", kind="structured", config=HeadsNeuronsConfig,
         description="remove whole attention heads and FFN neurons (importance flap by default; --allocation global "
                     "for sizes that differ per block)")(prune_heads_neurons)
register("blocks", kind="structured", config=BlocksConfig,
         description="remove whole transformer blocks of lowest influence (ShortGPT)")(prune_blocks)
