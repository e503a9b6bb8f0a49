"""RIA (relative importance and activations) and the N:M channel permutation: golden cases worked out by hand,
a brute-force optimum on small matrices, the same function after a permutation on every adapter family,
and the refusals."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from families import FAMILIES, build, outputs, task_of, tokens
from prunekit.adapters import get_adapter, weight_view
from prunekit.errors import PrunekitError
from prunekit.masks import Structure, is_nm_sparse
from prunekit.methods import method_config
from prunekit.methods.permutation import balanced_greedy, channel_permutation, kept_score
from prunekit.methods.ria import RIAMethod
from prunekit.methods.wanda import WandaMethod
from prunekit.models import auto_class

T, F = True, False
TWO_FOUR = Structure(2, 4)


def linear(weight: list[list[float]]) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def test_ria_golden() -> None:
    method = RIAMethod(method_config("ria"), 4)
    # squared input norms [1, 16, 1, 81]: ||X_j|| = [1, 4, 1, 9], ** 0.5 = [1, 2, 1, 3]
    method.add_batch(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 9.0]]))
    layer = linear([[1.0, -2.0, 3.0, 0.0], [4.0, 0.0, -1.0, 1.0]])
    # |W| row sums 6, 6; column sums 5, 2, 4, 1
    # row 0: (1/6 + 1/5, 2/6 + 2/2, 3/6 + 3/4, 0) * (1, 2, 1, 3) = (11/30, 8/3, 5/4, 0)
    # row 1: (4/6 + 4/5, 0, 1/6 + 1/4, 1/6 + 1/1) * (1, 2, 1, 3) = (22/15, 0, 5/12, 7/2)
    want = torch.tensor([[11 / 30, 8 / 3, 5 / 4, 0.0], [22 / 15, 0.0, 5 / 12, 7 / 2]])
    torch.testing.assert_close(method.scores(layer), want)
    assert method.prune(layer, 0.5, Structure()).tolist() == [[F, T, T, F], [T, F, F, T]]
    assert method.prune(layer, 0.5, Structure(1, 2)).tolist() == [[F, T, T, F], [T, F, F, T]]
    # alpha 0: relative importance alone; row 1 then keeps 22/15 and 7/6 (columns 0 and 3) too, row 0 keeps 4/3, 5/4
    plain = RIAMethod(method_config("ria", alpha=0), 4)
    plain.sq_norm = method.sq_norm
    torch.testing.assert_close(plain.scores(layer), torch.tensor([[11 / 30, 4 / 3, 5 / 4, 0.0],
                                                                  [22 / 15, 0.0, 5 / 12, 7 / 6]]))


def test_ria_differs_from_wanda_where_a_column_is_heavy() -> None:
    # row 0: Wanda (|W| * 1) keeps column 0 (1.2 > 1); column 0 also holds a weight of 10 in row 1, so its
    # relative importance is lower: RIA scores row 0 (1.2/2.2 + 1.2/11.2, 1/2.2 + 1/2) = (0.652, 0.955) -> column 1
    ria = RIAMethod(method_config("ria"), 2)
    ria.add_batch(torch.ones(1, 2))
    layer = linear([[1.2, 1.0], [10.0, 1.0]])
    torch.testing.assert_close(ria.scores(layer)[0], torch.tensor([1.2 / 2.2 + 1.2 / 11.2, 1 / 2.2 + 1 / 2]))
    assert ria.prune(layer, 0.5, Structure())[0].tolist() == [F, T]
    wanda = WandaMethod(method_config("wanda"), 2)
    wanda.add_batch(torch.ones(1, 2))
    assert wanda.prune(layer, 0.5, Structure())[0].tolist() == [T, F]


def brute_force_best(scores: np.ndarray, n: int, m: int) -> float:
    """The highest kept score over every way of splitting the channels into groups of m."""
    channels = scores.shape[1]
    best = -np.inf

    def splits(rest: list[int]) -> list[list[tuple[int, ...]]]:
        if not rest:
            return [[]]
        first, others = rest[0], rest[1:]
        out = []
        for partners in itertools.combinations(others, m - 1):
            group = (first, *partners)
            remaining = [c for c in others if c not in partners]
            out += [[group, *tail] for tail in splits(remaining)]
        return out

    for split in splits(list(range(channels))):
        kept = sum(np.sort(scores[:, list(group)], axis=1)[:, -n:].sum() for group in split)
        best = max(best, kept)
    return float(best)


def test_permutation_golden_by_hand() -> None:
    scores = torch.tensor([[8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    # as it is: groups (8 7 6 5) (4 3 2 1) keep 8 + 7 + 4 + 3 = 22; best: two of the four largest per group, 26
    assert kept_score(scores, TWO_FOUR) == 22.0
    # balanced greedy: tiers (8 7), (6 5) reversed, (4 3), (2 1) reversed -> groups (8 5 4 1) and (7 6 3 2)
    assert balanced_greedy(scores, 4).tolist() == [[0, 3, 4, 7], [1, 2, 5, 6]]
    order, facts = channel_permutation(scores, TWO_FOUR)
    assert sorted(order.tolist()) == list(range(8))
    assert facts["kept_score_before"] == 22.0 and facts["kept_score_after"] == 26.0
    assert kept_score(scores[:, order], TWO_FOUR) == 26.0


def test_permutation_refinement_beats_the_greedy_start() -> None:
    # channel totals tie, so the greedy start puts 0 and 1 (both large in row 0) in one group: row 0 keeps 10 + 10,
    # the other rows their 1s. Optimum (hand): 0 and 1 apart, with 2 and 3 (large in rows 1, 2) apart too.
    scores = torch.tensor([[10.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]) + torch.eye(3, 8)
    best = brute_force_best(scores.numpy(), 2, 4)
    order, facts = channel_permutation(scores, TWO_FOUR)
    assert facts["kept_score_after"] == pytest.approx(best)
    assert kept_score(scores[:, order], TWO_FOUR) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(4))
def test_permutation_never_loses_and_is_near_the_brute_force_optimum(seed: int) -> None:
    scores = torch.rand(5, 8, generator=torch.Generator().manual_seed(seed)) ** 3
    best = brute_force_best(scores.numpy(), 2, 4)
    order, facts = channel_permutation(scores, TWO_FOUR)
    assert facts["kept_score_before"] - 1e-6 <= facts["kept_score_after"] <= best + 1e-6
    assert facts["kept_score_after"] >= 0.95 * best  # a heuristic: near, not always at, the optimum
    assert kept_score(scores[:, order], TWO_FOUR) == pytest.approx(facts["kept_score_after"])


PERMUTABLE = [f for f in FAMILIES if f not in ("t5", "bart")]


@pytest.mark.parametrize("family", PERMUTABLE)
def test_ffn_permutation_keeps_the_function(family: str) -> None:
    model = build(family)
    ids = tokens(2)
    want = outputs(model, ids)
    adapter = get_adapter(model)
    block = adapter.blocks()[0]
    down = block.get_submodule(adapter.mlp_out)
    before = weight_view(down).clone()
    channels = before.shape[1]
    order = torch.randperm(channels, generator=torch.Generator().manual_seed(0))
    changed = adapter.permute_ffn_channels(block, order)
    assert changed == [*adapter.mlp_in, adapter.mlp_out]
    got = outputs(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_view(down), before[:, order])


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_ria_two_four_with_permutation_is_exact_and_reloads_plainly(family: str, tmp_path: Path) -> None:
    model = build(family)
    result = prunekit.prune(model, {"method": "ria", "structure": "2:4", "permute": True}, tokens(4),
                            progress=False)
    adapter = get_adapter(model)
    for name, layer in adapter.prunable_layers().items():
        assert is_nm_sparse(weight_view(layer), TWO_FOUR), name
        assert float((weight_view(layer) == 0).float().mean()) == 0.5, name
    facts = result.record()["method_result"]["permutation"]
    downs = [f"{name}.{adapter.mlp_out}" for name, _ in adapter.all_blocks()]
    assert sorted(facts["layers"] + facts["unchanged"]) == sorted(downs)
    assert facts["layers"]  # random weights: the permutation changes something
    for name in downs:
        kept = facts["kept_score"][name]
        assert kept["after"] >= kept["before"]
    ids = tokens(2, seed=7)
    want = outputs(model, ids)
    prunekit.save_model(model, None, tmp_path / "out", {"pruning": result, "task": task_of(family)})
    plain = auto_class(task_of(family)).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(outputs(plain, ids), want, rtol=1e-5, atol=1e-5)


def test_permutation_raises_the_kept_score_over_the_same_method_without_it() -> None:
    plain, permuted = build("llama"), build("llama")
    prunekit.prune(plain, {"method": "wanda", "structure": "2:4"}, tokens(4), progress=False)
    result = prunekit.prune(permuted, {"method": "wanda", "structure": "2:4", "permute": True}, tokens(4),
                            progress=False)
    for kept in result.record()["method_result"]["permutation"]["kept_score"].values():
        assert kept["after"] > kept["before"]


@pytest.mark.parametrize(("family", "settings", "fragment"), [
    ("llama", {"method": "ria", "sparsity": 0.5, "permute": True}, "add --structure 2:4 or drop permute"),
    ("t5", {"method": "ria", "structure": "2:4", "permute": True}, "cannot be permuted: drop permute"),
    ("llama", {"method": "ria", "structure": "2:4", "permute": True, "exclude": ["*down_proj"]},
     "none is pruned"),
    ("llama", {"method": "ria", "sparsity": 0.5, "alpha": -1}, "alpha -1 must be at least 0"),
    ("llama", {"method": "sparsegpt", "structure": "2:4", "permute": True}, "does not take permute"),
])
def test_bad_permutation_settings_are_refused_in_one_line_and_nothing_changes(family: str, settings: dict,
                                                                              fragment: str) -> None:
    model = build(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=fragment) as error:
        prunekit.prune(model, settings, tokens(4), progress=False)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ria_runs_through_the_cli_and_shows_its_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from prunekit.cli.main import main

    assert main(["methods", "ria"]) == 0
    shown = capsys.readouterr().out
    assert "alpha" in shown and "permute" in shown
