"""Capture what every transformer block really receives, for each calibration micro-batch.

A block's arguments besides its hidden states (attention mask, position ids, rotary
``position_embeddings``, cache flags, encoder states, ...) are computed by the model, and may
differ from block to block: Gemma 2/3 give sliding-window and global layers different rotary
embeddings and masks. So the calibration batch runs through the whole model, one micro-batch at a
time, with every block of the stack replaced by a *stand-in* that records the arguments it gets and
hands its input hidden states on unchanged (no block computes anything). The first micro-batch
also runs through the real blocks: the stand-ins are used only if every block received the very
same arguments both ways. Otherwise (a model that passes one block's output to the next as an
argument, as T5 does with its position bias) every micro-batch runs through the real blocks, each
block moved to the device for its call and back. Caches are disabled (``use_cache=False``) and any
captured cache object is replaced by None.

The first block's hidden states are kept; a later block's come from the engine's replay of the
blocks before it. Blocks that receive the very same objects share them (nothing is copied).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.calibration.placement import BlockPlacement, MovePlacement
from prunekit.errors import PrunekitError

CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")
NEEDS_ADAPTER = "this model family needs an adapter (see prunekit/adapters)"


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (private to the calibration package)."""


@dataclass
class BlockArgs:
    """What one block receives in one call besides its hidden states."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_key: str | None = None  # set when the hidden states were passed by keyword


@dataclass
class BlockInputs:
    """One calibration micro-batch: the hidden states entering the current block, and every block's own arguments."""

    hidden: torch.Tensor
    blocks: list[BlockArgs]  # by position in the stack

    @property
    def args(self) -> tuple[Any, ...]:
        return self.blocks[0].args

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.blocks[0].kwargs

    @property
    def hidden_key(self) -> str | None:
        return self.blocks[0].hidden_key

    def call(self, block: nn.Module, position: int = 0) -> torch.Tensor:
        """Run ``block`` (at ``position`` in its stack) on these inputs; returns its output hidden states."""
        own = self.blocks[position]
        if own.hidden_key is not None:
            out = block(*own.args, **{**own.kwargs, own.hidden_key: self.hidden})
        else:
            out = block(self.hidden, *own.args, **own.kwargs)
        return block_output(out)


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returned: a tensor (transformers 5) or the first item of a tuple/ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) or hasattr(out, "to_tuple"):
        first = out[0]
        if isinstance(first, torch.Tensor):
            return first
    raise PrunekitError(f"a transformer block returned {type(out).__name__}, not hidden states: {NEEDS_ADAPTER}")


def _neutralise(value: Any) -> Any:
    """Replace cache objects (which would grow across calls) by None."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return value
    return None if isinstance(value, Cache) else value


def _split_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockArgs]:
    """(hidden states, the rest) of one block call, caches disabled."""
    kwargs = {k: (None if k in CACHE_KWARGS else _neutralise(v)) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args:
        return args[0], BlockArgs(tuple(_neutralise(a) for a in args[1:]), kwargs)
    if "hidden_states" in kwargs:
        hidden = kwargs.pop("hidden_states")
        return hidden, BlockArgs((), kwargs, hidden_key="hidden_states")
    raise PrunekitError(f"a transformer block was called without hidden states: {NEEDS_ADAPTER}")


def _forward_flags(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` when the model's forward takes it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


class _Pass:
    """One forward pass of one micro-batch that records every block's call (stand-ins or the real blocks)."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, stand_in: bool, output: Any = None,
                 placement: BlockPlacement | None = None) -> None:
        self.blocks = blocks
        self.device = device
        self.placement = placement or MovePlacement()
        self.stand_in = stand_in
        self.output = output  # the first block's real output (for the stand-ins to mimic its structure)
        self.calls: list[list[tuple[torch.Tensor | None, BlockArgs]]] = [[] for _ in blocks]

    def record(self, position: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        hidden, own = _split_call(args, kwargs)
        # only the first block's hidden states are kept: later blocks' come from the engine's replay, and
        # keeping every block's (a whole forward pass of activations) would cost memory for nothing
        self.calls[position].append((hidden if position == 0 else None, own))
        if position == len(self.blocks) - 1:
            raise StopForward  # nothing after the last block is needed
        return hidden

    def stand_in_for(self, position: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = self.record(position, args, kwargs)
            if isinstance(self.output, tuple | list):
                return (hidden, *[None] * (len(self.output) - 1))
            return hidden
        return forward

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Stand-ins in place of the blocks' forwards, or hooks that record the real calls (and place each block)."""
        saved: list[tuple[nn.Module, Any]] = []
        handles: list[Any] = []
        homes: set[int] = set()  # blocks entered and not yet left
        try:
            for position, block in enumerate(self.blocks):
                if self.stand_in:
                    saved.append((block, block.__dict__.get("forward")))
                    block.forward = self.stand_in_for(position)
                    continue
                handles.append(block.register_forward_pre_hook(self._pre_hook(position, homes), with_kwargs=True))
                handles.append(block.register_forward_hook(self._post_hook(position, homes)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for block, forward in saved:
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward
            for position in sorted(homes):  # a pass stopped inside a block: put it back
                self.placement.leave(self.blocks[position], changed=False)

    def _pre_hook(self, position: int, homes: set[int]) -> Any:
        def hook(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.record(position, args, kwargs)
            homes.add(position)
            self.placement.enter(block, self.device)
        return hook

    def _post_hook(self, position: int, homes: set[int]) -> Any:
        def hook(block: nn.Module, _args: Any, out: Any) -> None:
            if position == 0 and self.output is None:
                self.output = out
            if position in homes:
                homes.discard(position)
                self.placement.leave(block, changed=False)
        return hook

    def run(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        with self.installed():
            try:
                model(**inputs)
            except StopForward:
                pass
        for position, calls in enumerate(self.calls):
            if len(calls) != 1:
                raise PrunekitError(f"block {position} of the model was called {len(calls)} times in one forward pass, "
                                    f"not once: {NEEDS_ADAPTER}")


def same(a: Any, b: Any) -> bool:
    """Exactly equal arguments: tensors value by value, containers item by item, anything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, tuple | list) or isinstance(b, tuple | list):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # objects without a usable ==
        return False


def _stand_ins_agree(real: _Pass, stand: _Pass) -> bool:
    for real_calls, stand_calls in zip(real.calls, stand.calls, strict=True):
        (_, mine), (_, theirs) = real_calls[0], stand_calls[0]
        if mine.hidden_key != theirs.hidden_key or not same(mine.args, theirs.args) or \
                not same(mine.kwargs, theirs.kwargs):
            return False
    return same(real.calls[0][0][0], stand.calls[0][0][0])


# tokens per forward on CPU when the micro-batch is automatic: on smollm2-135m (2-core EPYC, 512-token windows,
# sparsegpt 50 %, 32 windows) one window per forward took 68 s where 8 took 74-80 s (and 2 took 70 s): bigger
# batches only add attention buffers of tens of MB that fall out of the caches and the allocator's reuse
CPU_TOKENS_PER_FORWARD = 512
GPU_MICRO_BATCH = 8


def auto_micro_batch(requested: int, device: torch.device | str, seq_len: int) -> int:
    """The micro-batch size to run: ``requested`` when positive; 0 means automatic (see ``CPU_TOKENS_PER_FORWARD``)."""
    if requested > 0:
        return int(requested)
    if torch.device(device).type == "cpu":
        return max(1, CPU_TOKENS_PER_FORWARD // max(1, int(seq_len)))
    return GPU_MICRO_BATCH


def capture_block_inputs(model: nn.Module, calibration: torch.Tensor, *, device: torch.device,
                         micro_batch_size: int = 0, stack: int = 0,
                         placement: BlockPlacement | None = None) -> list[BlockInputs]:
    """Run the calibration batch through the model one micro-batch at a time; return what each block receives.

    ``stack`` picks the block list (0, or 1 for an encoder-decoder's decoder); see the module docstring.
    ``placement`` brings the weights to ``device`` (default: moved there and back; see
    :mod:`prunekit.calibration.placement`). ``micro_batch_size`` 0 picks one by device
    (:func:`auto_micro_batch`).
    """
    micro_batch_size = auto_micro_batch(micro_batch_size, device, int(calibration.shape[1]))
    placement = placement or MovePlacement()
    adapter = get_adapter(model)
    blocks = adapter.stacks()[stack]
    flags = _forward_flags(model)
    captured: list[BlockInputs] = []
    stand_in = False
    output: Any = None
    with placement.outside(model, blocks, device), torch.inference_mode():
        for start in range(0, calibration.shape[0], micro_batch_size):
            inputs = {**adapter.forward_inputs(calibration[start:start + micro_batch_size].to(device)), **flags}
            recorded = _Pass(blocks, device, stand_in, output, placement)
            recorded.run(model, inputs)
            if start == 0:
                output = recorded.output
                stand_in = _try_stand_ins(model, inputs, recorded, blocks, device)
            first = recorded.calls[0][0][0]
            assert first is not None
            captured.append(BlockInputs(first, [own for ((_, own),) in recorded.calls]))
    return captured


def _try_stand_ins(model: nn.Module, inputs: dict[str, Any], real: _Pass, blocks: nn.ModuleList,
                   device: torch.device) -> bool:
    """Whether stand-ins give every block the same arguments as the real blocks did on this micro-batch."""
    if not isinstance(real.output, torch.Tensor | tuple | list):
        return False
    stand = _Pass(blocks, device, stand_in=True, output=real.output)
    try:
        stand.run(model, inputs)
    except Exception:  # the model needs what the blocks really compute
        return False
    return _stand_ins_agree(real, stand)
