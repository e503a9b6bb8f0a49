"""``sequential``: a block's layers pruned group by group, each group's statistics taken after the earlier
groups were pruned. The golden answer is worked out here independently of the engine: hooks on full-model
forward passes of a copy, pruned one group at a time with Wanda's rule written out in the test."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.methods import method_config
from prunekit.pruning import prune

GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def input_norms(model: nn.Module, names: list[str], calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over calibration tokens of x_j^2 for each named linear layer's inputs (full forward passes)."""
    sums: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    with torch.no_grad():
        model(calib)
    for handle in handles:
        handle.remove()
    return sums


def wanda_row_mask(weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where pruned: in every row, the int(sparsity * columns) smallest |W_ij| * ||X_j||."""
    score = weight.double().abs() * sq_norm.sqrt()
    count = int(weight.shape[1] * sparsity)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask.scatter_(1, torch.argsort(score, dim=1)[:, :count], True)
    return mask


def golden_sequential_wanda(model: nn.Module, calib: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    for index in range(len(model.model.layers)):
        for group in GROUPS:
            part = "self_attn" if group[0] in ("q_proj", "o_proj") else "mlp"
            names = [f"model.layers.{index}.{part}.{g}" for g in group]
            norms = input_norms(model, names, calib)
            modules = dict(model.named_modules())
            with torch.no_grad():
                for name in names:
                    layer = modules[name]
                    layer.weight[wanda_row_mask(layer.weight, norms[name], sparsity)] = 0
    return {name: (m.weight == 0) for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and ".layers." in name}


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (m.weight == 0) for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and ".layers." in name}


def test_sequential_wanda_equals_hand_worked_group_by_group_pruning(tiny_llama: nn.Module) -> None:
    calib = torch.randint(4, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    expected = golden_sequential_wanda(tiny_llama, calib, 0.5)
    together = copy.deepcopy(tiny_llama)
    prune(together, {"method": "wanda", "sparsity": 0.5, "micro_batch_size": 2}, calib, progress=False)
    sequential = copy.deepcopy(tiny_llama)
    prune(sequential, {"method": "wanda", "sparsity": 0.5, "sequential": True, "micro_batch_size": 2}, calib,
          progress=False)

    got = zero_masks(sequential)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # the first group reads the dense block either way; later groups see pruned inputs and choose differently
    before = zero_masks(together)
    assert all(torch.equal(before[n], got[n]) for n in got if n.endswith(("q_proj", "k_proj", "v_proj"))
               and n.startswith("model.layers.0."))
    assert any(not torch.equal(before[n], got[n]) for n in got if n.endswith("down_proj"))


def test_sequential_sparsegpt_keeps_sparsity_and_structure(tiny_llama: nn.Module) -> None:
    calib = torch.randint(4, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    result = prune(copy.deepcopy(tiny_llama), {"method": "sparsegpt", "structure": "2:4", "sequential": True},
                   calib, progress=False)
    assert result.sparsity == pytest.approx(0.5)


def test_sequential_refusals() -> None:
    with pytest.raises(PrunekitError, match="magnitude reads no activations"):
        method_config("magnitude", sparsity=0.5, sequential=True).check()
    with pytest.raises(PrunekitError, match="compare=global"):
        method_config("magnitude", sparsity=0.5, sequential=True, compare="global", refine="swaps").check()
