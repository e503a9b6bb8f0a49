"""Mask refinement by one-for-one swaps (refine=swaps): golden cases worked by hand, the output error against a
numpy reference, exact sparsity and N:M after any method, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prunekit
from families import build, tokens
from prunekit.adapters import get_adapter, weight_view
from prunekit.errors import PrunekitError
from prunekit.masks import Structure, is_nm_sparse
from prunekit.methods.refine import swap_refine


def test_swap_golden_uncorrelated_inputs() -> None:
    # w0 = (1, 1), G = diag(4, 1): the mask kept input 1 (error d G d with d = (1, 0): 4). Swapping (prune 1,
    # regrow 0 at r_0 / G_00 = 4 / 4 = 1) changes it by 1 - 16/4 = -3: error 1. Swapping back would add 3: stop.
    weight = torch.tensor([[0.0, 1.0]])
    facts = swap_refine(weight, torch.tensor([[1.0, 1.0]]), torch.tensor([[4.0, 0.0], [0.0, 1.0]]), Structure(), 10)
    assert weight.tolist() == [[1.0, 0.0]]
    assert facts["swaps"] == 1 and facts["error_before"] == 4.0 and facts["error_after"] == 1.0


def test_swap_golden_correlated_inputs_regrow_at_the_least_squares_value() -> None:
    # w0 = (1, 1), G = [[2, 1], [1, 2]], input 0 pruned: d = (1, 0), r = G d = (2, 1), error 2.
    # prune 1: cost 2*1*1 + 1*2 = 4; then r'_0 = 2 + 1*G_01 = 3, regrow 0 at t = 3/2 = 1.5: change 4 - 9/2 = -0.5.
    # new d = (-0.5, 1): error 0.5 - 1 + 2 = 1.5
    weight = torch.tensor([[0.0, 1.0]])
    facts = swap_refine(weight, torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 1.0], [1.0, 2.0]]), Structure(), 10)
    torch.testing.assert_close(weight, torch.tensor([[1.5, 0.0]]))
    assert facts["error_before"] == pytest.approx(2.0) and facts["error_after"] == pytest.approx(1.5)


def test_swap_golden_two_four_stays_in_its_groups() -> None:
    # w0 = (1, 1, 1, 1), G = diag(1, 4, 9, 1), kept inputs 0 and 3: error 4 + 9 = 13.
    # 1st swap: prune 0 (cost 1), regrow 2 (gain 81/9 = 9): error 5. 2nd: prune 3 (cost 1), regrow 1 (gain 16/4 = 4):
    # error 2, kept inputs 1 and 2. 3rd: the cheapest prune costs 4 > the best gain 1: stop.
    weight = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    facts = swap_refine(weight, torch.ones(1, 4), torch.diag(torch.tensor([1.0, 4.0, 9.0, 1.0])), Structure(2, 4), 10)
    assert weight.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert facts["swaps"] == 2 and facts["error_before"] == 13.0 and facts["error_after"] == 2.0


@pytest.mark.parametrize("structure", [Structure(), Structure(2, 4)])
def test_swaps_lower_the_output_error_as_numpy_computes_it(structure: Structure) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator) * torch.linspace(0.2, 3.0, 16)
    x[:, 1] += x[:, 0]  # correlated inputs
    dense = torch.randn(6, 16, generator=generator)
    keep = torch.zeros(6, 16, dtype=torch.bool)
    keep.reshape(6, 4, 4)[:, :, :2] = True  # the first two of every group: a valid 2:4 and 50 % mask
    weight = dense * keep
    facts = swap_refine(weight, dense, x.t() @ x, structure, 50)
    xs, w0, w = x.double().numpy(), dense.double().numpy(), weight.double().numpy()
    numpy_error = float(np.square(xs @ (w0 - w).T).sum())
    numpy_before = float(np.square(xs @ (w0 - dense.numpy() * keep.numpy()).T).sum())
    assert facts["error_before"] == pytest.approx(numpy_before, rel=1e-4)
    assert facts["error_after"] == pytest.approx(numpy_error, rel=1e-4)
    assert numpy_error < 0.8 * numpy_before and facts["swaps"] > 0
    assert ((weight != 0).sum(dim=1) == 8).all()  # same count per row
    if structure.is_nm:
        assert is_nm_sparse(weight, structure)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "ria"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_refine_after_any_method_is_exact_and_lowers_every_layer_error(method: str, structure: str) -> None:
    model = build("llama")
    settings = {"method": method, "structure": structure, "refine": "swaps", "refine_iterations": 20}
    if structure == "unstructured":
        settings["sparsity"] = 0.6
    result = prunekit.prune(model, settings, tokens(4), progress=False)
    plain = build("llama")  # the same method without refinement: as many zeros per layer (block 0: per row)
    prunekit.prune(plain, {**settings, "refine": "none"}, tokens(4), progress=False)
    plain_layers = get_adapter(plain).prunable_layers()
    for name, layer in get_adapter(model).prunable_layers().items():
        zero = weight_view(layer) == 0
        plain_zero = weight_view(plain_layers[name]) == 0
        assert int(zero.sum()) == int(plain_zero.sum()), name
        if ".layers.0." in name:  # later blocks see inputs that the refinement changed
            assert torch.equal(zero.sum(dim=1), plain_zero.sum(dim=1)), name
        if structure == "2:4":
            assert is_nm_sparse(weight_view(layer), Structure(2, 4)), name
            assert int(zero.sum()) == zero.numel() // 2, name
        else:
            assert abs(int(zero.sum()) - 0.6 * zero.numel()) <= zero.shape[0] / 2, name
    facts = result.record()["method_result"]["refine"]
    assert facts["method"] == "swaps" and facts["swaps"] > 0
    for name, layer_facts in facts["layers"].items():
        assert layer_facts["error_after"] <= layer_facts["error_before"] * (1 + 1e-5), name
    assert facts["output_error_after"] < facts["output_error_before"]


def test_refine_with_permutation_follows_the_new_channel_order() -> None:
    model = build("llama")
    result = prunekit.prune(model, {"method": "ria", "structure": "2:4", "permute": True, "refine": "swaps"},
                            tokens(4), progress=False)
    record = result.record()["method_result"]
    assert record["permutation"]["layers"]
    for layer_facts in record["refine"]["layers"].values():
        assert layer_facts["error_after"] <= layer_facts["error_before"] * (1 + 1e-5)


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"method": "wanda", "sparsity": 0.5, "refine": "swaps", "refine_iterations": 0}, "must be at least 1"),
    ({"method": "magnitude", "sparsity": 0.5, "refine": "swaps", "compare": "global"}, "use compare row or layer"),
    ({"method": "magnitude", "sparsity": 0.5, "refine": "swaps", "include_lm_head": True}, "drop include_lm_head"),
    ({"method": "wanda", "sparsity": 0.5, "refine": "dsnot"}, "unknown refine 'dsnot'"),
    ({"method": "heads-neurons", "ratio": 0.5, "refine": "swaps"}, "does not take refine"),
])
def test_bad_refinement_settings_are_refused_in_one_line_and_nothing_changes(settings: dict, fragment: str) -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=fragment) as error:
        prunekit.prune(model, settings, tokens(4), progress=False)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
