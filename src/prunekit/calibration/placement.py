"""Where the engine finds a block's weights while it works on it, and where they go afterwards.

The default, :class:`MovePlacement`, moves a block (and, during capture, everything outside the blocks)
to the compute device and back. Sequential onloading (:mod:`prunekit.onload`) gives the engine another
placement: the model is a skeleton on the ``meta`` device, a block's weights are read from the
safetensors files when the engine reaches it, written out when it is done with it, and freed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); cpu for a module with neither."""
    for param in module.parameters():
        return param.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


class BlockPlacement(Protocol):
    """Brings blocks and the rest of the model onto the compute device, and puts them back."""

    def outside(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> AbstractContextManager[None]:
        """A context in which every weight NOT inside ``blocks`` is on ``device`` (embeddings, norms, head)."""
        ...

    def enter(self, block: nn.Module, device: torch.device) -> None:
        """Make ``block``'s weights ready on ``device``."""
        ...

    def leave(self, block: nn.Module, changed: bool) -> None:
        """Done with ``block`` for now; ``changed``: it holds its final weights (pruned), keep them."""
        ...


class MovePlacement:
    """The whole model is in memory: move each block to the device for its turn and back (the default)."""

    def __init__(self) -> None:
        self.homes: dict[int, torch.device] = {}

    @contextmanager
    def outside(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
        old = _move_outside(model, blocks, device)
        try:
            yield
        finally:
            _restore_outside(model, old)

    def enter(self, block: nn.Module, device: torch.device) -> None:
        home = module_device(block)
        if home != device:
            self.homes[id(block)] = home
            with torch.no_grad():
                block.to(device)

    def leave(self, block: nn.Module, changed: bool) -> None:
        home = self.homes.pop(id(block), None)
        if home is not None:
            with torch.no_grad():
                block.to(home)


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> dict[int, torch.device]:
    """Move every parameter and buffer NOT inside ``blocks`` to ``device``; returns their old devices."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    old: dict[int, torch.device] = {}
    with torch.no_grad():
        for module in model.modules():
            for attr in ("_parameters", "_buffers"):
                tensors = getattr(module, attr)
                for tensor in list(tensors.values()):
                    if tensor is None or id(tensor) in inside or tensor.device == device:
                        continue
                    old.setdefault(id(tensor), tensor.device)
                    tensor.data = tensor.data.to(device)
    return old


def _restore_outside(model: nn.Module, old: dict[int, torch.device]) -> None:
    with torch.no_grad():
        for module in model.modules():
            for attr in ("_parameters", "_buffers"):
                for tensor in getattr(module, attr).values():
                    if tensor is not None and id(tensor) in old:
                        tensor.data = tensor.data.to(old[id(tensor)])
