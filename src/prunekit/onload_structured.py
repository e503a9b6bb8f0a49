"""Sequential onloading for structured pruning: ``prunekit prune --onload`` with heads-neurons or blocks.

Structured methods change shapes, and which heads, neurons or blocks go is decided across all blocks,
so the source files are read twice, one block in memory at a time:

1. Scores (read only). heads-neurons: the block-by-block engine runs the calibration batch with the
   :class:`~prunekit.onload.Onloader` as its placement; while a block's weights are loaded its activation
   statistics are complete and its head and neuron scores are computed (importance magnitude without
   bias compensation needs no data: each block is read and scored). blocks: each block's influence,
   1 − cos(input, output), on what the engine feeds it. Nothing is written.
2. Surgery. The removals are chosen exactly as the full load chooses them (the same functions of
   :mod:`prunekit.methods.structured` on the same scores), and applied first to a copy of the skeleton on
   ``meta``: that gives the output's tensors (names, shapes, dtypes; compensation biases included), its
   config and record facts, and the shards are created at their full size. Then each kept block is read
   again, cut on its own (heads, neurons, FLAP's output biases from its own weights and statistics), written
   at its place and freed; blocks writes the kept blocks unchanged under their new numbers. Embeddings,
   final norm and head are copied from the source files.

The output equals the full load's tensor for tensor, and reloads the same way: plain ``from_pretrained``
when every block keeps the same sizes, :func:`prunekit.load` otherwise (``config.prunekit_structure``).
Importance taylor needs gradients through the whole model and is refused
(:func:`prunekit.pruning.onload_refusal`).
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit import surgery
from prunekit.adapters import weight_view
from prunekit.adapters.base import ModelAdapter, get_submodule
from prunekit.calibration import all_threads, run_blockwise
from prunekit.errors import PrunekitError
from prunekit.masks import layer_report, total_sparsity
from prunekit.methods.registry import MethodConfig, MethodSpec
from prunekit.methods.structured import (
    BlocksConfig,
    ChannelStats,
    HeadsNeuronsConfig,
    Scores,
    _apply_bias,
    _bias_deltas,
    _StatsVisitor,
    block_scores,
    blocks_facts,
    blocks_to_remove,
    heads_neurons_facts,
    heads_neurons_setup,
    lowest_influence,
    plan_heads,
    plan_neurons,
)
from prunekit.onload import Onloader, ShardWriter, _no_space, _saved_state
from prunekit.pruning import PruneResult, _resolve_run_device, check_calibration, onload_refusal
from prunekit.utils import count_parameters

CPU = torch.device("cpu")


def prune_structured(model: nn.Module, onloader: Onloader, spec: MethodSpec, config: MethodConfig,
                     calibration: torch.Tensor | None, out: Path, *, device: str | torch.device | None = None,
                     progress: bool = True) -> tuple[PruneResult, nn.Module]:
    """Prune the skeleton ``model`` by ``config`` from its files into ``out`` (a folder being assembled).

    Returns (PruneResult, the pruned model's skeleton on ``meta``: its config is the output's). Writes the
    safetensors shards (and index) only; config, tokenizer and record are the caller's.
    """
    reason = onload_refusal(spec, config)
    if spec.kind != "structured":
        raise PrunekitError(f"{spec.name} is not a structured method: onload it with prunekit.pruning.prune(..., "
                            "placement=Onloader(...))")
    if reason:
        raise PrunekitError(f"sequential onloading cannot run {reason}: load the whole model")
    if config.needs_calibration():
        calibration = check_calibration(model, calibration, spec.name)
    run_device = _resolve_run_device(model, device)
    started = time.perf_counter()
    if isinstance(config, HeadsNeuronsConfig):
        job: _Job = _HeadsNeurons(model, onloader, config, calibration, run_device, progress)
    else:
        assert isinstance(config, BlocksConfig)
        job = _Blocks(model, onloader, config, calibration, run_device, progress)
    estimate = job.estimate()
    if estimate is not None:  # the output's size before the long work (exact for uniform sizes)
        need = ShardWriter(out, _tensors(estimate)).total_bytes
        free = shutil.disk_usage(out).free
        if free < need:
            raise _no_space(out, need, free)
    job.score()
    scored = time.perf_counter()
    target = job.plan()
    writer = ShardWriter(out, _tensors(target))
    try:
        writer.open()  # every shard at full size: a disk too small fails here
        reports = job.write(writer)
        _write_rest(writer, onloader, target)
    except BaseException:
        writer.abort()
        raise
    facts = job.facts()
    for info in reports.values():
        info["target"] = None
    timing = {"scores_s": scored - started, "write_s": time.perf_counter() - scored,
              "total_s": time.perf_counter() - started}
    return PruneResult(config, None, total_sparsity(reports), reports, None, None, timing, facts,
                       kind=spec.kind), target


# ---- the two methods ------------------------------------------------------------------------------
class _Job:
    """One structured method in two passes: :meth:`score` (read only), :meth:`plan`, :meth:`write`."""

    def __init__(self, model: nn.Module, onloader: Onloader, calibration: torch.Tensor | None,
                 device: torch.device, progress: bool) -> None:
        self.model = model
        self.onloader = onloader
        self.calibration = calibration
        self.device = device
        self.progress = progress
        self.adapter = surgery.structured_adapter(model)
        self.named_blocks = self.adapter.all_blocks()
        self.before = count_parameters(model)
        self.sync: dict[str, Any] = {}

    def estimate(self) -> nn.Module | None:
        """The pruned skeleton for a stand-in choice of the same sizes, or None when that cannot be told."""
        raise NotImplementedError

    def score(self) -> None:
        raise NotImplementedError

    def plan(self) -> nn.Module:
        """The pruned model's skeleton on ``meta`` (its config synced), from the scores."""
        raise NotImplementedError

    def write(self, writer: ShardWriter) -> dict[str, dict[str, Any]]:
        """Write every kept block's tensors; returns the layer report of the pruned blocks' linears."""
        raise NotImplementedError

    def facts(self) -> dict[str, Any]:
        raise NotImplementedError

    def _bar(self, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=len(self.named_blocks), desc=desc, disable=not self.progress, leave=False)


class _ScoresVisitor(_StatsVisitor):
    """The full load's statistics visitor, also scoring each block while its weights are loaded."""

    def __init__(self, adapter: ModelAdapter, importance: str) -> None:
        super().__init__(adapter)
        self.importance = importance
        self.scores: Scores = {}
        self.threads = torch.get_num_threads()

    def finish(self, index: int, block: nn.Module, layers: dict[str, nn.Module], observers: dict[str, Any]) -> None:
        super().finish(index, block, layers, observers)
        with all_threads(self.threads):  # as many threads as the full load's scoring: the same sums
            self.scores[index] = block_scores(self.adapter, block, self.importance, self.stats[index], None)


class _HeadsNeurons(_Job):
    def __init__(self, model: nn.Module, onloader: Onloader, config: HeadsNeuronsConfig,
                 calibration: torch.Tensor | None, device: torch.device, progress: bool) -> None:
        super().__init__(model, onloader, calibration, device, progress)
        self.config = config
        self.heads_ratio, self.neurons_ratio, self.compensate, self.needs_stats = \
            heads_neurons_setup(config, calibration)
        self.shapes = [surgery.block_shape(self.adapter, block) for block in self.adapter.blocks()]
        self.stats: dict[int, dict[str, ChannelStats]] | None = None
        self.scores: Scores = {}
        self.heads: dict[int, list[int]] = {}
        self.neurons: dict[int, list[int]] = {}
        self.biased: set[str] = set()  # the parts ("attention", "mlp") given biases by the compensation
        self.compensated = False

    def _choose(self, scores: Scores) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        config = self.config
        return (plan_heads(self.shapes, scores, self.heads_ratio, config.allocation, config.gqa),
                plan_neurons(self.shapes, scores, self.neurons_ratio, config.allocation))

    def estimate(self) -> nn.Module | None:
        zero = {b: (torch.zeros(s.heads, dtype=torch.float64), torch.zeros(s.kv_heads, dtype=torch.float64),
                    torch.zeros(s.intermediate, dtype=torch.float64)) for b, s in enumerate(self.shapes)}
        heads, neurons = self._choose(zero)  # a ratio that empties a block fails here, before the long work
        try:
            return self._target(heads, neurons)[0]
        except PrunekitError:  # a stand-in choice the family refuses (sizes per block): the real one may not be
            return None

    def score(self) -> None:
        if self.needs_stats:
            assert self.calibration is not None
            visitor = _ScoresVisitor(self.adapter, self.config.importance)
            run_blockwise(self.model, self.calibration, visitor, device=self.device, progress=self.progress,
                          desc="statistics", micro_batch_size=self.config.micro_batch_size, placement=self.onloader)
            self.stats, self.scores = visitor.stats, visitor.scores
            return
        with self._bar("scores") as bar:
            for index, (_, block) in enumerate(self.named_blocks):
                self.onloader.enter(block, self.device)
                try:
                    self.scores[index] = block_scores(self.adapter, block, self.config.importance, None, None)
                finally:
                    self.onloader.leave(block, changed=False)
                bar.update(1)

    def _target(self, heads: dict[int, list[int]],
                neurons: dict[int, list[int]]) -> tuple[nn.Module, set[str], bool, dict[str, Any]]:
        """The skeleton cut as the full load cuts the model: (model, parts biased, compensated, config facts)."""
        target = copy.deepcopy(self.model)
        adapter = surgery.structured_adapter(target)
        with torch.no_grad():
            surgery.prune_heads(target, heads, sync=False)
            surgery.prune_neurons(target, neurons, sync=False)
            biased: set[str] = set()
            compensated = False
            if self.compensate:
                blocks = adapter.blocks()

                def stand_ins(name: str, removed: dict[int, list[int]]) -> dict[int, torch.Tensor]:
                    return {b: torch.zeros(weight_view(get_submodule(blocks[b], name)).shape[0], dtype=torch.float64,
                                           device="meta") for b, units in removed.items() if units}

                attention, mlp = stand_ins(adapter.o_proj, heads), stand_ins(adapter.mlp_out, neurons)
                attention_done = _apply_bias(target, adapter, "attention", attention)
                compensated = attention_done and _apply_bias(target, adapter, "mlp", mlp)
                biased = {part for part, deltas, done in (("attention", attention, attention_done),
                                                          ("mlp", mlp, compensated)) if deltas and done}
        facts = surgery.sync_config(target)
        return target, biased, compensated, facts

    def plan(self) -> nn.Module:
        self.heads, self.neurons = self._choose(self.scores)
        target, self.biased, self.compensated, self.sync = self._target(self.heads, self.neurons)
        return target

    def write(self, writer: ShardWriter) -> dict[str, dict[str, Any]]:
        reports: dict[str, dict[str, Any]] = {}
        with self._bar("surgery") as bar:
            for index, (name, block) in enumerate(self.named_blocks):
                self.onloader.enter(block, CPU)  # the full load cuts the model on the CPU
                try:
                    with torch.no_grad(), _only_block(self.model, self.adapter, block):
                        self._cut(index, block)
                    _write_block(writer, name, block)
                    reports.update(_report(self.adapter, name, block))
                finally:
                    self.onloader.leave(block, changed=False)
                    _free(block)
                bar.update(1)
        return reports

    def _cut(self, index: int, block: nn.Module) -> None:
        """Cut one block as the full load cuts it; the model holds this block only (:func:`_only_block`)."""
        model = self.model
        view = surgery.structured_adapter(model)
        deltas: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] = ({}, {})
        if self.compensate and self.stats is not None:  # from the weights before the cut, as in the full load
            deltas = _bias_deltas(view, {0: self.stats[index]}, {0: self.heads[index]}, {0: self.neurons[index]})
        surgery.prune_heads(model, {0: self.heads[index]}, sync=False)
        surgery.prune_neurons(model, {0: self.neurons[index]}, sync=False)
        for part, delta, layer in (("attention", deltas[0], view.o_proj), ("mlp", deltas[1], view.mlp_out)):
            if part in self.biased:
                surgery.enable_biases(model, part)  # zero biases on this block's layers of that part
                if 0 in delta:
                    surgery.add_output_bias(get_submodule(block, layer), delta[0])

    def facts(self) -> dict[str, Any]:
        return heads_neurons_facts(self.config, self.shapes, self.heads, self.neurons, self.compensate,
                                   self.compensated, self.before, self.sync)


class _Blocks(_Job):
    def __init__(self, model: nn.Module, onloader: Onloader, config: BlocksConfig,
                 calibration: torch.Tensor | None, device: torch.device, progress: bool) -> None:
        super().__init__(model, onloader, calibration, device, progress)
        self.config = config
        self.count = blocks_to_remove(config, len(self.named_blocks), calibration)
        self.influence: list[float] = []
        self.removed: list[int] = []
        self.new_names: list[str] = []

    def _target(self, removed: list[int]) -> nn.Module:
        target = copy.deepcopy(self.model)
        surgery.remove_blocks(target, removed, sync=False)
        self.sync = surgery.sync_config(target)
        return target

    def estimate(self) -> nn.Module | None:
        try:
            return self._target(list(range(len(self.named_blocks) - self.count, len(self.named_blocks))))
        except PrunekitError:
            return None

    def score(self) -> None:
        """1 − mean cos(block input, block output) over the calibration tokens, as the full load's forward sees them."""
        from prunekit.calibration.capture import capture_block_inputs

        assert self.calibration is not None
        inputs = capture_block_inputs(self.model, self.calibration, device=self.device,
                                      micro_batch_size=self.config.micro_batch_size,
                                      placement=self.onloader)
        sums = [0.0] * len(self.named_blocks)
        counts = [0] * len(self.named_blocks)
        with self._bar("influence") as bar, torch.inference_mode():
            for index, (_, block) in enumerate(self.named_blocks):
                self.onloader.enter(block, self.device)
                try:
                    for inp in inputs:
                        out = inp.call(block, index)
                        x, y = inp.hidden.float(), out.float()
                        cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]),
                                                                    y.reshape(-1, y.shape[-1]), dim=-1)
                        sums[index] += float(cos.sum())
                        counts[index] += cos.numel()
                        inp.hidden = out
                finally:
                    self.onloader.leave(block, changed=False)
                bar.update(1)
        self.influence = [1.0 - s / max(1, c) for s, c in zip(sums, counts, strict=True)]

    def plan(self) -> nn.Module:
        self.removed = lowest_influence(self.influence, self.count)
        target = self._target(self.removed)
        self.new_names = [name for name, _ in surgery.structured_adapter(target).all_blocks()]
        return target

    def write(self, writer: ShardWriter) -> dict[str, dict[str, Any]]:
        reports: dict[str, dict[str, Any]] = {}
        kept = [i for i in range(len(self.named_blocks)) if i not in self.removed]
        with self._bar("copy") as bar:
            for new_name, old in zip(self.new_names, kept, strict=True):
                _, block = self.named_blocks[old]
                self.onloader.enter(block, CPU)
                try:
                    _write_block(writer, new_name, block)
                    reports.update(_report(self.adapter, new_name, block))
                finally:
                    self.onloader.leave(block, changed=False)
                bar.update(1)
        return reports

    def facts(self) -> dict[str, Any]:
        return blocks_facts(self.influence, self.removed, self.before, self.sync)


# ---- helpers ------------------------------------------------------------------------------------
def _tensors(model: nn.Module) -> list[tuple[str, list[int], torch.dtype]]:
    """(name, shape, dtype) of every tensor a save_pretrained of ``model`` would write, in its order."""
    return [(name, list(tensor.shape), tensor.dtype) for name, tensor in _saved_state(model).items()]


@contextmanager
def _only_block(model: nn.Module, adapter: ModelAdapter, block: nn.Module) -> Iterator[None]:
    """The model's block list holds ``block`` alone meanwhile, so surgery (which reads and checks every block of
    the list) cuts this one as if the others were already cut alike; the real list is put back after."""
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = get_submodule(adapter.base_model, parent_path)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([block]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


def _write_block(writer: ShardWriter, name: str, block: nn.Module) -> None:
    """Write the block's parameters as the block ``name`` of the output (every one planned)."""
    for relative, param in block.named_parameters():
        full = f"{name}.{relative}"
        if full not in writer.where:  # pragma: no cover - the plan is the same surgery on meta
            raise RuntimeError(f"{full}: not among the planned output tensors")
        writer.write(full, param)


def _report(adapter: ModelAdapter, name: str, block: nn.Module) -> dict[str, dict[str, Any]]:
    return layer_report({f"{name}.{layer}": module for layer, module in adapter.block_linears(block).items()})


def _free(block: nn.Module) -> None:
    """Every parameter of the block back on ``meta`` (the Onloader frees those it read; surgery made new ones)."""
    for module in block.modules():
        for attr, param in list(module._parameters.items()):
            if param is not None and param.device.type != "meta":
                module._parameters[attr] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                        requires_grad=param.requires_grad)


def _write_rest(writer: ShardWriter, onloader: Onloader, target: nn.Module) -> None:
    """Copy the weights outside the blocks from the source files, write the buffers, close the shards."""
    outside = set(onloader.outside_groups)
    state = _saved_state(target)
    for name in [name for name in writer.where if name not in writer.written]:
        if name in outside:
            group = onloader.groups[name]
            assert group.source is not None
            value = onloader.files.read([group.source])[group.source]
            writer.write(name, value.to(group.parameter.dtype))
        elif state[name].device.type != "meta":  # persistent buffers
            writer.write(name, state[name])
    missing = writer.close()
    if missing:  # pragma: no cover - every block parameter is written by the job
        raise RuntimeError(f"output tensors never written: {missing[:3]}")
