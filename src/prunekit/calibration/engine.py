"""The block-by-block engine: observe, change and replay each block on what it really receives.

1. What every block receives is captured (:mod:`prunekit.calibration.capture`): the first block's
   hidden states and EVERY positional and keyword argument of every block (attention masks, position
   ids, rotary ``position_embeddings`` — per layer type where a family mixes sliding-window and global
   layers —, encoder states, cache flags), one entry per calibration micro-batch.
2. For each block: its layers to observe are hooked and the calibration inputs run through the dense
   block with that block's own arguments (the *stats pass*; it stops after the last hooked layer has
   seen its input); a visitor then changes the block (prunes it); the inputs run through the changed
   block (the *replay*), and its outputs become the next block's hidden states.
3. An encoder-decoder has two stacks of blocks: the encoder's are visited first, then the decoder's
   blocks are captured afresh (their inputs include the output of the already-changed encoder).

Layers that read the very same input tensor (q/k/v, gate/up) share one observer, so statistics are
gathered once per input stream. Only the current block and the activations live on ``device``.
Where a block's weights come from and go to is the ``placement``'s business
(:mod:`prunekit.calibration.placement`): moved from the model in memory and back (default), or read
from the files and written out (sequential onloading, :mod:`prunekit.onload`).
Blocks are numbered across stacks (encoder blocks first) in what the visitor sees.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.calibration.capture import BlockInputs, StopForward, auto_micro_batch, capture_block_inputs
from prunekit.calibration.placement import BlockPlacement, MovePlacement, module_device
from prunekit.errors import PrunekitError


class Observer(Protocol):
    """Anything that collects statistics from a layer's inputs."""

    def add_batch(self, inputs: torch.Tensor) -> None: ...


class BlockVisitor:
    """What the engine does with each block; subclass and override what you need.

    ``modifies = False`` promises the block is left unchanged, so the stats pass runs to the end and
    its outputs are reused instead of a replay.
    """

    modifies: bool = True
    # the stats pass runs the whole dense block and its outputs go to refit() after finish()
    wants_dense_outputs: bool = False
    # finish() is called once per group of layers in the order they run (layers reading one input stream form a
    # group), each group's statistics collected with the earlier groups already changed
    sequential: bool = False

    def layers(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        """Layers of this block to observe, by full module name (empty: no stats pass)."""
        return {}

    def observer(self, name: str, layer: nn.Module, in_features: int) -> Observer:
        """A new observer for the input stream first read by ``name``."""
        raise NotImplementedError

    def finish(self, index: int, block: nn.Module, layers: dict[str, nn.Module],
               observers: dict[str, Observer]) -> None:
        """Called after the stats pass: change the block (``observers`` maps each layer to its observer)."""

    def outputs(self, index: int, hidden: list[torch.Tensor]) -> None:
        """Called with the block's output hidden states, one tensor per micro-batch."""

    def refit(self, index: int, position: int, block: nn.Module, inputs: list[BlockInputs],
              dense: list[torch.Tensor]) -> None:
        """With ``wants_dense_outputs``: called after finish() (outside inference mode, every thread) with the
        block's inputs and the dense block's outputs on them, one per micro-batch; may change the block again."""


@dataclass
class EngineReport:
    """What the engine did and how long it took (seconds)."""

    blocks: int = 0
    samples: int = 0
    tokens: int = 0
    micro_batch_size: int = 0
    capture_s: float = 0.0
    stats_s: float = 0.0
    change_s: float = 0.0
    replay_s: float = 0.0
    device: str = "cpu"

    @property
    def total_s(self) -> float:
        return self.capture_s + self.stats_s + self.change_s + self.replay_s


@contextmanager
def single_thread(device: torch.device | str = "cpu") -> Iterator[int]:
    """Run many small CPU ops (mask selection, SparseGPT's column sweep) on one thread; yield the count before.

    A thread barrier per small op costs more than the op: on 2 cores shared with other work, 2 threads
    made these steps 10-50x slower than 1. Forward passes (large matmuls) keep all threads, and so can
    one large op inside: ``with single_thread(device) as threads: ... with all_threads(threads): big_op()``.
    On another device nothing changes. The process's thread count is restored on exit.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu":
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


@contextmanager
def all_threads(threads: int) -> Iterator[None]:
    """Run one large operation (a factorisation, a big matmul) on ``threads`` threads, then restore the count.

    ``threads`` is what the caller had: the count :func:`single_thread` yielded, or one recorded before.
    """
    current = torch.get_num_threads()
    if threads <= current:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(current)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _StatsPass:
    """Hooks on a block's layers that feed one observer per shared input stream."""

    def __init__(self, layers: dict[str, nn.Module], visitor: BlockVisitor) -> None:
        self.layers = layers
        self.visitor = visitor
        self.observers: dict[str, Observer] = {}
        self.leader: dict[str, str] = {}
        self.seen: list[tuple[torch.Tensor, str]] = []
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self.first = True
        self.stop_after: str | None = None

    def hook_for(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            shared = next((owner for t, owner in self.seen if t is x), None)
            if self.first:
                if name in self.leader:  # a second call of the same layer in one forward
                    self.calls[name] += 1
                    self.observers[name].add_batch(x)
                    return
                self.calls[name] = 1
                self.order.append(name)
                if shared is None:
                    self.observers[name] = self.visitor.observer(name, module, x.shape[-1])
                    self.seen.append((x, name))
                    shared = name
                else:
                    self.observers[name] = self.observers[shared]
                self.leader[name] = shared
            else:
                if shared is None:
                    self.seen.append((x, name))
                    shared = name
                if self.leader.get(name) != shared:
                    raise RuntimeError(f"layer {name} shared its input differently between micro-batches")
            if shared == name:
                self.observers[name].add_batch(x)
            if name == self.stop_after:
                raise StopForward
        return hook

    def run(self, block: nn.Module, position: int, inputs: list[BlockInputs],
            keep_outputs: bool) -> list[torch.Tensor]:
        handles = [layer.register_forward_pre_hook(self.hook_for(name), with_kwargs=True)
                   for name, layer in self.layers.items()]
        outputs: list[torch.Tensor] = []
        try:
            for inp in inputs:
                self.seen = []
                try:
                    out = inp.call(block, position)
                    if keep_outputs:
                        outputs.append(out)
                except StopForward:
                    pass
                if self.first:
                    self.first = False
                    # every layer ran once: later micro-batches may stop after the last one's input
                    if not keep_outputs and self.order and all(c == 1 for c in self.calls.values()):
                        self.stop_after = self.order[-1]
        finally:
            for handle in handles:
                handle.remove()
            self.seen = []
        missing = [name for name in self.layers if name not in self.observers]
        if missing:
            raise PrunekitError(f"layers {', '.join(missing)} were never called by their block, so they got no "
                                "calibration inputs: exclude them (--exclude)")
        return outputs


def run_blockwise(model: nn.Module, calibration: torch.Tensor, visitor: BlockVisitor, *,
                  device: str | torch.device | None = None, micro_batch_size: int = 0, progress: bool = True,
                  desc: str = "blocks", placement: BlockPlacement | None = None) -> EngineReport:
    """Go through the model's blocks in order with ``visitor`` (see the module docstring).

    ``placement`` brings each block's weights to the device for its turn and takes them back (default:
    moved there and back; :mod:`prunekit.onload` reads them from the files and writes them out).
    ``micro_batch_size`` 0 picks one by device (:func:`auto_micro_batch`).
    """
    from tqdm.auto import tqdm

    from prunekit.utils import resolve_device

    if calibration.dim() != 2 or calibration.dtype != torch.long:
        raise PrunekitError(f"calibration must be a LongTensor [samples, seq_len] of token ids, got "
                            f"{calibration.dtype} with shape {tuple(calibration.shape)}")
    run_device = resolve_device(device)
    micro_batch_size = auto_micro_batch(micro_batch_size, run_device, int(calibration.shape[1]))
    placement = placement or MovePlacement()
    stacks = get_adapter(model).stacks()
    total = sum(len(stack) for stack in stacks)
    report = EngineReport(blocks=total, samples=int(calibration.shape[0]), tokens=int(calibration.numel()),
                          micro_batch_size=micro_batch_size, device=str(run_device))
    with _eval_mode(model), tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        offset = 0
        for number, blocks in enumerate(stacks):
            start = time.perf_counter()
            inputs = capture_block_inputs(model, calibration, device=run_device, micro_batch_size=micro_batch_size,
                                          stack=number, placement=placement)
            report.capture_s += time.perf_counter() - start
            for position, block in enumerate(blocks):
                placement.enter(block, run_device)
                try:
                    _visit_block(offset + position, position, block, inputs, visitor, report,
                                 last=position == len(blocks) - 1)
                except BaseException:
                    placement.leave(block, changed=False)
                    raise
                placement.leave(block, changed=visitor.modifies)
                bar.update(1)
            offset += len(blocks)
    return report


def _sequential_groups(stats: _StatsPass) -> list[list[str]]:
    """The block's layers in the order they ran, consecutive layers reading one input stream as one group.

    A Llama block gives [q, k, v], [o], [gate, up], [down]; a layer called twice in one forward, or a
    stream read again later, joins the group of the stream's first reader.
    """
    groups: list[list[str]] = []
    group_of: dict[str, int] = {}
    for name in stats.order:
        leader = stats.leader[name]
        if leader in group_of:
            groups[group_of[leader]].append(name)
        else:
            group_of[leader] = len(groups)
            groups.append([name])
        group_of[name] = group_of[leader]
    return groups


def _visit_block(index: int, position: int, block: nn.Module, inputs: list[BlockInputs], visitor: BlockVisitor,
                 report: EngineReport, last: bool = False) -> None:
    """Stats pass, change, replay (or reuse) for one block; the inputs are replaced by its outputs.

    ``index`` numbers the block across stacks, ``position`` within its own. The last block's replay is
    skipped when the visitor does not look at outputs (nothing reads them: a next stack is captured afresh).
    """
    layers = visitor.layers(index, block)
    outputs: list[torch.Tensor] = []
    start = time.perf_counter()
    if layers:
        stats = _StatsPass(layers, visitor)
        with torch.inference_mode():
            outputs = stats.run(block, position, inputs,
                                keep_outputs=not visitor.modifies or visitor.wants_dense_outputs)
        report.stats_s += time.perf_counter() - start
        start = time.perf_counter()
        groups = _sequential_groups(stats) if visitor.sequential and visitor.modifies else [list(layers)]
        with torch.inference_mode(), single_thread(module_device(block)):
            if len(groups) == 1:  # every layer from the dense block's statistics, in the block's own order
                visitor.finish(index, block, layers, stats.observers)
            else:
                visitor.finish(index, block, {name: layers[name] for name in groups[0]},
                               {name: stats.observers[name] for name in groups[0]})
        for group in groups[1:]:  # sequential: this group's statistics with the earlier groups changed
            report.change_s += time.perf_counter() - start
            start = time.perf_counter()
            again = _StatsPass({name: layers[name] for name in group}, visitor)
            if all(stats.calls[name] == 1 for name in group):
                again.stop_after = group[-1]  # nothing after the group's last layer is needed
            with torch.inference_mode():
                again.run(block, position, inputs, keep_outputs=False)
            report.stats_s += time.perf_counter() - start
            start = time.perf_counter()
            with torch.inference_mode(), single_thread(module_device(block)):
                visitor.finish(index, block, {name: layers[name] for name in group}, again.observers)
        if visitor.wants_dense_outputs and visitor.modifies:
            visitor.refit(index, position, block, inputs, outputs)
            outputs = []  # the block changed: its outputs come from the replay
        report.change_s += time.perf_counter() - start
        start = time.perf_counter()
    if last and type(visitor).outputs is BlockVisitor.outputs:
        report.replay_s += time.perf_counter() - start
        return
    if outputs:  # the block is unchanged: the stats pass's outputs are its outputs
        for inp, out in zip(inputs, outputs, strict=True):
            inp.hidden = out
    else:
        with torch.inference_mode():
            for inp in inputs:  # replace as we go: one micro-batch's input is needed by its own call only
                inp.hidden = inp.call(block, position)
    report.replay_s += time.perf_counter() - start
    visitor.outputs(index, [inp.hidden for inp in inputs])
