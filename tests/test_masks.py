"""Mask selection: exact counts, golden masks worked out by hand, N:M validity, orientation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prunekit.adapters import grad_view, weight_view
from prunekit.errors import PrunekitError
from prunekit.masks import (
    KeptMasks,
    Structure,
    apply_mask,
    count_to_prune,
    global_masks,
    is_nm_sparse,
    layer_mask,
    layer_report,
    nm_mask,
    parse_structure,
    prune_lowest,
    row_mask,
    select_mask,
    sparsity_of,
    total_sparsity,
)

T, F = True, False
SCORES = torch.tensor([[4.0, 1.0, 3.0, 2.0],
                       [0.5, 8.0, 6.0, 7.0]])


def test_parse_structure() -> None:
    assert parse_structure("unstructured") == Structure() and parse_structure(None) == Structure()
    assert parse_structure("2:4") == Structure(2, 4) and str(Structure(2, 4)) == "2:4"
    assert parse_structure(" 4:8 ").sparsity == 0.5
    assert parse_structure("1:3").sparsity == pytest.approx(2 / 3)


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "abc", "2:4:8", "-1:4", "2/4"])
def test_bad_structures_are_one_line_errors(text: str) -> None:
    with pytest.raises(PrunekitError, match="structure"):
        parse_structure(text)


def test_count_to_prune_rounds_to_nearest() -> None:
    assert count_to_prune(10, 0.5) == 5
    assert count_to_prune(10, 0.25) == 3  # 2.5 -> 3 (halves up)
    assert count_to_prune(576, 0.7) == 403
    assert count_to_prune(7, 0.0) == 0 and count_to_prune(7, 0.999) == 7


def test_row_mask_golden() -> None:
    # row 0 drops 1.0 and 2.0; row 1 drops 0.5 and 6.0
    assert row_mask(SCORES, 0.5).tolist() == [[T, F, T, F], [F, T, F, T]]


def test_layer_mask_golden() -> None:
    # the 4 lowest of the layer are 0.5, 1, 2, 3
    assert layer_mask(SCORES, 0.5).tolist() == [[T, F, F, F], [F, T, T, T]]


def test_global_masks_golden() -> None:
    other = torch.tensor([[5.0, 0.1], [2.5, 9.0]])
    masks = global_masks({"a": SCORES, "b": other}, 0.5)  # 12 scores, the 6 lowest: 0.1 .5 1 2 2.5 3
    assert masks["a"].tolist() == [[T, F, F, F], [F, T, T, T]]
    assert masks["b"].tolist() == [[T, F], [F, T]]


def test_ties_never_prune_more_than_asked() -> None:
    scores = torch.ones(3, 8)
    keep = prune_lowest(scores, 3)
    assert (keep.sum(dim=1) == 5).all()
    assert keep[0].tolist() == [F, F, F, T, T, T, T, T]  # ties pruned left to right
    per_row = prune_lowest(torch.zeros(3, 4), torch.tensor([0, 1, 4]))
    assert per_row.sum(dim=1).tolist() == [4, 3, 0]
    assert layer_mask(torch.zeros(5, 5), 0.4).sum() == 15


def test_nm_mask_golden_and_valid() -> None:
    keep = nm_mask(SCORES, Structure(2, 4))
    assert keep.tolist() == [[T, F, T, F], [F, T, F, T]]
    keep = nm_mask(torch.tensor([[1.0, 5.0, 2.0, 0.0, 9.0, 8.0, 7.0, 6.0]]), Structure(1, 2))
    assert keep.tolist() == [[F, T, T, F, T, F, T, F]]
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    for n, m in [(2, 4), (4, 8), (1, 4), (3, 8)]:
        keep = nm_mask(scores, Structure(n, m))
        assert (keep.reshape(16, 64 // m, m).sum(dim=2) == n).all()
        assert is_nm_sparse(scores * keep, Structure(n, m))
    assert not is_nm_sparse(scores, Structure(2, 4))


def test_nm_needs_m_to_divide_the_inputs() -> None:
    with pytest.raises(PrunekitError, match="multiple of 8"):
        nm_mask(torch.rand(4, 12), Structure(2, 8))


def test_select_mask_dispatch() -> None:
    assert torch.equal(select_mask(SCORES, 0.5, Structure(), "row"), row_mask(SCORES, 0.5))
    assert torch.equal(select_mask(SCORES, 0.5, Structure(), "layer"), layer_mask(SCORES, 0.5))
    assert torch.equal(select_mask(SCORES, 0.9, Structure(2, 4), "layer"), nm_mask(SCORES, Structure(2, 4)))
    with pytest.raises(PrunekitError, match="comparison"):
        select_mask(SCORES, 0.5, Structure(), "diagonal")


def test_apply_mask_on_linear_and_conv1d_orientation() -> None:
    linear = nn.Linear(4, 2, bias=True)
    conv = Conv1D(2, 4)  # stores (in=4, out=2)
    mask = torch.tensor([[T, F, T, F], [F, T, F, T]])
    for layer in (linear, conv):
        with torch.no_grad():
            layer.weight.fill_(1.0)
            layer.bias.fill_(1.0)
        apply_mask(layer, mask)
        bias = layer.bias
        assert bias is not None and (bias == 1).all()
    assert torch.equal(linear.weight != 0, mask)
    assert torch.equal(conv.weight.t() != 0, mask)
    with pytest.raises(ValueError, match="shape"):
        apply_mask(linear, mask.t())


def test_reports_count_from_the_weights() -> None:
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]]))
    assert sparsity_of(linear.weight) == pytest.approx(5 / 8)
    report = layer_report({"l": linear})["l"]
    assert report == {"shape": [2, 4], "params": 8, "nonzero": 3, "sparsity": pytest.approx(5 / 8)}


def test_total_sparsity_sums_the_counts_of_every_layer() -> None:
    report = {"a": {"params": 8, "nonzero": 2}, "b": {"params": 2, "nonzero": 2}}
    assert total_sparsity(report) == pytest.approx(1 - 4 / 10)
    assert total_sparsity({}) == 0.0


def _layers() -> dict[str, nn.Module]:
    """An nn.Linear and a Conv1D (stored (in, out)), both 2 outputs x 4 inputs, weights all ones."""
    layers: dict[str, nn.Module] = {"linear": nn.Linear(4, 2), "conv": Conv1D(2, 4)}
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.fill_(1.0)
    return layers


MASK = torch.tensor([[T, F, T, F], [F, T, F, T]])


def test_kept_masks_zero_pruned_weights_and_gradients_in_out_by_in_orientation() -> None:
    layers = _layers()
    kept = KeptMasks(layers, {name: MASK for name in layers})
    kept.apply()
    for layer in layers.values():
        assert torch.equal(weight_view(layer) != 0, MASK)
    kept.zero_grads()  # before backward: nothing to do
    for layer in layers.values():
        layer(torch.randn(3, 4)).sum().backward()
    kept.zero_grads()
    for name, layer in layers.items():
        grad = grad_view(layer)
        assert grad is not None and not grad[~MASK].any() and grad[MASK].all(), name


def test_kept_masks_read_from_weights_and_round_trip_through_a_state_dict() -> None:
    layers = _layers()
    for layer in layers.values():
        apply_mask(layer, MASK)
    kept = KeptMasks.from_weights(layers)
    assert all(torch.equal(mask, MASK) for mask in kept.masks.values())
    state = kept.state_dict()
    assert all(mask.device.type == "cpu" for mask in state.values())
    fresh = KeptMasks.all_kept(layers)
    assert all(mask.all() for mask in fresh.masks.values())
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.masks[name], MASK) for name in layers)
    with pytest.raises(PrunekitError, match="lacks"):
        fresh.load_state_dict({"other": MASK})
    with pytest.raises(PrunekitError, match="not one of the layers"):
        KeptMasks(layers, {"other": MASK})


def test_kept_masks_follow_the_layer_to_its_device() -> None:
    layers = {"linear": nn.Linear(4, 2).to("meta")}
    kept = KeptMasks(layers, {"linear": MASK})
    assert kept.on("linear", torch.device("meta")).device.type == "meta"
    assert kept.masks["linear"].device.type == "meta"  # moved once, kept there
