"""The block-by-block engine replays blocks exactly, for every adapter family, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.calibration import BlockVisitor, Observer, capture_block_inputs, run_blockwise
from prunekit.methods import method_config
from prunekit.pruning import prune

VOCAB = 96


def tiny_model(family: str, layers: int = 3) -> nn.Module:
    """A tiny seeded random model (conftest's builder; llama has grouped-query attention, gpt2 Conv1D)."""
    from conftest import build_tiny_model

    if family == "gpt2":
        return build_tiny_model(family, n_layer=layers)
    return build_tiny_model(family, num_hidden_layers=layers)


FAMILIES = ["llama", "gpt2", "opt", "bert"]


def calibration(samples: int = 5, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def reference_block_outputs(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output in a normal whole-model forward (forward hooks), checked against hidden_states."""
    blocks = get_adapter(model).blocks()
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, out: object) -> None:
        outputs.append((out if isinstance(out, torch.Tensor) else out[0]).detach().clone())  # type: ignore[index]

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        with torch.no_grad():
            result = model(input_ids=tokens, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden = result.hidden_states
    for index in range(len(blocks) - 1):  # the last entry may be after a final norm
        torch.testing.assert_close(hidden[index + 1], outputs[index])
    return outputs


class Counter:
    def __init__(self) -> None:
        self.batches = 0
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.batches += 1
        self.tokens += inputs.numel() // inputs.shape[-1]


class Recorder(BlockVisitor):
    """No-op visitor that records each block's outputs (and observes its layers when asked)."""

    def __init__(self, model: nn.Module, observe: bool, modifies: bool) -> None:
        self.adapter = get_adapter(model)
        self.observe = observe
        self.modifies = modifies
        self.recorded: list[torch.Tensor] = []
        self.groups: list[dict[str, Observer]] = []

    def layers(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        if not self.observe:
            return {}
        return {f"b{index}.{name}": layer for name, layer in self.adapter.block_linears(block).items()}

    def observer(self, name: str, layer: nn.Module, in_features: int) -> Observer:
        return Counter()

    def finish(self, index: int, block: nn.Module, layers: dict[str, nn.Module],
               observers: dict[str, Observer]) -> None:
        self.groups.append(dict(observers))

    def outputs(self, index: int, hidden: list[torch.Tensor]) -> None:
        self.recorded.append(torch.cat(hidden))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("observe,modifies", [(False, True), (True, False), (True, True)])
def test_replay_matches_whole_model_forward(family: str, observe: bool, modifies: bool) -> None:
    model = tiny_model(family)
    tokens = calibration()
    expected = reference_block_outputs(model, tokens)
    visitor = Recorder(model, observe, modifies)
    report = run_blockwise(model, tokens, visitor, device="cpu", micro_batch_size=2, progress=False)
    assert report.blocks == len(expected) and report.tokens == tokens.numel()
    assert len(visitor.recorded) == len(expected)
    for got, want in zip(visitor.recorded, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if observe:  # every layer saw every micro-batch, even when the stats pass stops early
        for observers in visitor.groups:
            for counter in observers.values():
                assert isinstance(counter, Counter)
                assert counter.batches == 3 and counter.tokens == tokens.numel()


def test_capture_keeps_every_block_argument_and_disables_the_cache() -> None:
    model = tiny_model("llama")
    captured = capture_block_inputs(model, calibration(), device=torch.device("cpu"), micro_batch_size=2)
    assert [inp.hidden.shape[0] for inp in captured] == [2, 2, 1]
    kwargs = captured[0].kwargs
    cos, sin = kwargs["position_embeddings"]  # rotary embeddings computed once per batch by the model
    assert cos.shape[-2] == 12 and sin.shape == cos.shape
    assert "position_ids" in kwargs
    assert kwargs.get("past_key_values") is None and kwargs.get("use_cache") in (None, False)


def test_layers_reading_the_same_input_share_one_observer() -> None:
    model = tiny_model("llama")
    visitor = Recorder(model, observe=True, modifies=True)
    run_blockwise(model, calibration(), visitor, micro_batch_size=2, progress=False)
    groups = visitor.groups[0]
    assert groups["b0.self_attn.q_proj"] is groups["b0.self_attn.k_proj"] is groups["b0.self_attn.v_proj"]
    assert groups["b0.mlp.gate_proj"] is groups["b0.mlp.up_proj"]
    assert groups["b0.self_attn.o_proj"] is not groups["b0.mlp.down_proj"]
    assert len({id(o) for o in groups.values()}) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_is_still_trainable_and_on_its_device(family: str) -> None:
    model = tiny_model(family, layers=2)
    prune(model, method_config("sparsegpt", sparsity=0.5), calibration(), device="cpu", progress=False)
    assert not any(p.is_inference() for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    model.train()
    out = model(input_ids=calibration(2, 8))
    out.logits.float().mean().backward()
    assert any(p.grad is not None for p in model.parameters())


def test_engine_prunes_sequentially_from_the_pruned_outputs() -> None:
    """Block 2's statistics come from pruned blocks 0 and 1: a dense pass would give other masks."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    tokens = calibration()
    prune(model, {"method": "wanda", "sparsity": 0.6}, tokens, progress=False)
    # the same layer pruned alone (earlier blocks dense) ends up with a different mask
    prune(dense, {"method": "wanda", "sparsity": 0.6, "include": ["*.2.mlp.down_proj"]}, tokens, progress=False)
    name = "model.layers.2.mlp.down_proj"
    got = dict(model.named_modules())[name].weight != 0
    alone = dict(dense.named_modules())[name].weight != 0
    assert not torch.equal(got, alone)
    assert abs(got.float().mean().item() - 0.4) < 0.02


class ToyBlock(nn.Module):
    """A block in an older style: hidden states by keyword, a per-sample tensor kwarg, a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, hidden_states: torch.Tensor, scale: torch.Tensor | None = None,
                layer_past: object = None) -> tuple[torch.Tensor, None]:
        return hidden_states + self.fc2(torch.relu(self.fc1(hidden_states))) * scale, None


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(model_type="toy")
        self.embed = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList([ToyBlock() for _ in range(3)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        scale = (input_ids[:, :1].float() / VOCAB + 0.5).reshape(-1, 1, 1)  # one value per sample
        for block in self.layers:
            hidden = block(hidden_states=hidden, scale=scale, layer_past=object())[0]
        return hidden


def test_generic_blocks_with_keyword_hidden_states_tuple_outputs_and_per_sample_kwargs() -> None:
    torch.manual_seed(0)
    model = ToyModel()
    tokens = calibration(4, 6)
    expected = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: expected.append(out[0].detach())) for b in model.layers]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    captured = capture_block_inputs(model, tokens, device=torch.device("cpu"), micro_batch_size=3)
    assert captured[0].hidden_key == "hidden_states" and captured[0].kwargs["layer_past"] is None
    assert [inp.kwargs["scale"].shape[0] for inp in captured] == [3, 1]  # per-sample kwargs per micro-batch
    visitor = Recorder(model, observe=True, modifies=True)
    run_blockwise(model, tokens, visitor, micro_batch_size=3, progress=False)
    assert len(visitor.groups[0]) == 2
    for got, want in zip(visitor.recorded, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_single_thread_hands_the_outer_count_to_all_threads_and_restores_it() -> None:
    import prunekit.calibration as calibration
    from prunekit.calibration import all_threads, single_thread

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with single_thread("cpu") as threads:
            assert threads == 2 and torch.get_num_threads() == 1
            with all_threads(threads):
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
            with single_thread("cpu") as inner:  # nested: the count it saw, restored on exit
                assert inner == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with single_thread("meta") as threads:  # another device: nothing changes
            assert threads == 2 and torch.get_num_threads() == 2
        with all_threads(1):  # never fewer than now
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    state = [name for name, value in vars(calibration).items() if "THREAD" in name.upper() and not callable(value)]
    assert state == []  # no module-level thread state


def test_automatic_micro_batch() -> None:
    from prunekit.calibration.engine import auto_micro_batch

    # CPU: as many windows as make 512 tokens, at least one; a GPU: 8; a positive request is kept
    assert [auto_micro_batch(0, "cpu", n) for n in (512, 128, 100, 16, 2048)] == [1, 4, 5, 32, 1]
    assert auto_micro_batch(0, "cuda", 512) == 8
    assert auto_micro_batch(3, "cpu", 512) == 3


def test_engine_reports_the_micro_batch_it_ran() -> None:
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (6, 128), generator=torch.Generator().manual_seed(0))

    class Nothing(BlockVisitor):
        modifies = False

    report = run_blockwise(model, tokens, Nothing(), device="cpu", progress=False)
    assert report.micro_batch_size == 4  # 512 // 128 windows per forward
    captured = capture_block_inputs(model, tokens, device=torch.device("cpu"), micro_batch_size=4)
    assert [inp.hidden.shape[0] for inp in captured] == [4, 2]
