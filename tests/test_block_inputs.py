"""Golden test: the engine feeds every block what that block receives in the model's own forward pass.

For every family (tiny random models, sequences longer than the sliding window of those that have one),
hooks record each block's arguments in a normal whole-model forward; a no-op visitor then runs the
engine over the same micro-batches with hooks on the same blocks. Hidden states must agree to float
precision, every other argument (masks, position ids, rotary embeddings, encoder states) exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from families import FAMILIES, MIXED_LAYER_TYPES, build, model_inputs, tokens
from prunekit.adapters import get_adapter
from prunekit.calibration import CACHE_KWARGS, BlockVisitor, capture_block_inputs, run_blockwise
from prunekit.calibration.capture import same

MICRO_BATCH = 2  # 3 samples: micro-batches of 2 and 1


class Calls:
    """Forward pre-hooks on every block of every stack: (hidden states, other arguments) of each call."""

    def __init__(self, model: nn.Module, active: set[int] | None = None) -> None:
        self.blocks = [block for _, block in get_adapter(model).all_blocks()]
        self.active = active  # None: record every call; else only calls of these blocks
        self.calls: list[list[tuple[torch.Tensor, dict[str, Any]]]] = [[] for _ in self.blocks]
        self.handles = [block.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, block in enumerate(self.blocks)]

    def _hook(self, index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.active is not None and index not in self.active:
                return
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            rest = {f"arg{i}": a for i, a in enumerate(args[1:])}
            rest.update({k: v for k, v in kwargs.items() if k not in CACHE_KWARGS and k != "use_cache"})
            self.calls[index].append((hidden.detach().clone(), rest))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Replay(BlockVisitor):
    """Changes nothing, but looks at every block's outputs, so every block (the last too) is replayed once.

    ``active`` holds the block being replayed: the hooks record the engine's calls, not the capture's.
    """

    def __init__(self) -> None:
        self.active: set[int] = set()

    def layers(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        self.active.add(index)
        return {}

    def outputs(self, index: int, hidden: list[torch.Tensor]) -> None:
        self.active.discard(index)


def reference_calls(model: nn.Module, ids: torch.Tensor) -> Calls:
    calls = Calls(model)
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], MICRO_BATCH):
                model(**model_inputs(model, ids[start:start + MICRO_BATCH]), use_cache=False)
    finally:
        calls.remove()
    return calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_feeds_each_block_what_the_model_gives_it(family: str) -> None:
    model = build(family)
    ids = tokens()
    expected = reference_calls(model, ids)
    visitor = Replay()
    got = Calls(model, visitor.active)
    try:
        run_blockwise(model, ids, visitor, device="cpu", micro_batch_size=MICRO_BATCH, progress=False)
    finally:
        got.remove()
    assert len(got.blocks) == (4 if family in ("t5", "bart") else 2)
    for index, (mine, theirs) in enumerate(zip(got.calls, expected.calls, strict=True)):
        assert len(mine) == len(theirs) == 2, f"block {index}"
        for (hidden, rest), (want_hidden, want_rest) in zip(mine, theirs, strict=True):
            torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-6)
            assert rest.keys() == want_rest.keys(), f"block {index}"
            for key in rest:
                assert same(rest[key], want_rest[key]), f"block {index} argument {key}"


@pytest.mark.parametrize("family", MIXED_LAYER_TYPES)
def test_mixed_layer_types_really_receive_different_arguments(family: str) -> None:
    """Control: replaying block 0's arguments for block 1 (the engine's old way) would be wrong here."""
    model = build(family)
    expected = reference_calls(model, tokens())
    (_, sliding), (_, full) = expected.calls[0][0], expected.calls[1][0]
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert not all(same(sliding[key], full[key]) for key in sliding)
    if family == "gemma3":  # local and global layers rotate with different bases
        assert not same(sliding["position_embeddings"], full["position_embeddings"])


def test_blocks_of_one_type_share_their_arguments_and_stand_ins_skip_the_blocks() -> None:
    """Gemma 3: blocks read the very same objects the model made; the blocks compute only to check the stand-ins."""
    model = build("gemma3", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    computed: list[int] = []
    blocks = get_adapter(model).blocks()
    handles = [block.mlp.register_forward_hook(lambda *_, i=i: computed.append(i)) for i, block in enumerate(blocks)]
    try:
        captured = capture_block_inputs(model, tokens(4), device=torch.device("cpu"), micro_batch_size=2)
    finally:
        for handle in handles:
            handle.remove()
    # the first micro-batch through the real blocks (up to the last one's input), then stand-ins only
    assert computed == [0, 1, 2]
    assert len(captured) == 2
    for inputs in captured:
        own = inputs.blocks
        assert own[0].kwargs["position_embeddings"] is own[2].kwargs["position_embeddings"]
        assert own[1].kwargs["position_embeddings"] is own[3].kwargs["position_embeddings"]
        assert own[0].kwargs["position_embeddings"] is not own[1].kwargs["position_embeddings"]


def test_blocks_passing_values_to_the_next_run_for_real() -> None:
    """T5 hands its position bias from block to block: the capture runs the real blocks, and still agrees."""
    model = build("t5")
    ids = tokens()
    captured = capture_block_inputs(model, ids, device=torch.device("cpu"), micro_batch_size=MICRO_BATCH)
    bias = [own.args[1] for own in captured[0].blocks]  # T5Block(hidden, mask, position_bias, ...)
    assert bias[0] is None and isinstance(bias[1], torch.Tensor)  # block 0 computes it, block 1 receives it
    assert bias[1].shape[1:] == (4, ids.shape[1], ids.shape[1])  # one bias per head
