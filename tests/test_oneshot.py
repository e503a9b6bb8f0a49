"""One-shot methods: golden masks (magnitude, random, Wanda), N:M validity, SparseGPT against least squares,
OWL allocation, the registry, validation errors, and the export round trip."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.masks import Structure, is_nm_sparse, parse_structure
from prunekit.methods import available_methods, get_method, method_config, register
from prunekit.methods.base import EngineConfig
from prunekit.methods.magnitude import MagnitudeMethod
from prunekit.methods.owl import outlier_ratio, owl_sparsities
from prunekit.methods.random_method import RandomMethod
from prunekit.methods.registry import registered, setting
from prunekit.methods.sparsegpt import SparseGPTMethod
from prunekit.methods.wanda import WandaMethod
from prunekit.pruning import prune, select_layers

T, F = True, False
VOCAB = 96


def calibration(samples: int = 8, seq_len: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def linear(weight: list[list[float]]) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach() if isinstance(layer, nn.Linear) else layer.weight.detach().t()
            for block in select_layers(model, method_config("magnitude", sparsity=0.5))
            for name, layer in block.items()}


W = [[4.0, -1.0, 3.0, 2.0],
     [-0.5, 8.0, 6.0, 7.0]]


# ---- magnitude ----------------------------------------------------------------------------------------------------

def test_magnitude_golden_per_layer_and_per_row() -> None:
    mask = MagnitudeMethod(method_config("magnitude"), 4).prune(linear(W), 0.5, Structure())
    assert mask.tolist() == [[T, F, F, F], [F, T, T, T]]  # the 4 smallest |W| of the layer: .5 1 2 3
    row = MagnitudeMethod(method_config("magnitude", compare="row"), 4).prune(linear(W), 0.5, Structure())
    assert row.tolist() == [[T, F, T, F], [F, T, F, T]]


def test_magnitude_golden_global(tiny_llama: nn.Module) -> None:
    a, b = linear(W), linear([[5.0, 0.1], [-2.5, 9.0]])
    masks = MagnitudeMethod.whole_model_masks({"a": a, "b": b}, 0.5, method_config("magnitude", compare="global"))
    assert masks is not None
    assert masks["a"].tolist() == [[T, F, F, F], [F, T, T, T]]
    assert masks["b"].tolist() == [[T, F], [F, T]]
    # through prune(): exactly half of all block weights, but layers differ
    prune(tiny_llama, {"method": "magnitude", "sparsity": 0.5, "compare": "global"}, progress=False)
    weights = block_weights(tiny_llama)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == sum(w.numel() for w in weights.values()) // 2
    assert len({round(float((w == 0).float().mean()), 3) for w in weights.values()}) > 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_magnitude_without_calibration_hits_the_exact_sparsity(make_tiny_model, family: str) -> None:
    model = make_tiny_model(family)
    result = prune(model, method_config("magnitude", sparsity=0.3), progress=False)
    for name, weight in block_weights(model).items():
        assert int((weight == 0).sum()) == round(weight.numel() * 0.3), name
        assert result.layers[name]["sparsity"] == pytest.approx(float((weight == 0).float().mean()))


# ---- random -------------------------------------------------------------------------------------------------------

def test_random_is_seeded_and_exact(make_tiny_model) -> None:
    masks = []
    for seed in (0, 0, 1):
        model = make_tiny_model("llama")
        prune(model, {"method": "random", "sparsity": 0.4, "seed": seed}, progress=False)
        masks.append({name: w != 0 for name, w in block_weights(model).items()})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert not all(torch.equal(masks[0][n], masks[2][n]) for n in masks[0])
    for mask in masks[0].values():
        assert int((~mask).sum()) == round(mask.numel() * 0.4)
    row = RandomMethod(method_config("random", compare="row"), 4, key="x").prune(linear(W), 0.5, Structure())
    assert (row.sum(dim=1) == 2).all()


# ---- wanda --------------------------------------------------------------------------------------------------------

def test_wanda_golden() -> None:
    method = WandaMethod(method_config("wanda"), 4)
    # ||X_j||_2 over the tokens: [1, 5, 0.5, 2.5] (two micro-batches)
    method.add_batch(torch.tensor([[[1.0, 0.0, 0.3, 0.0], [0.0, 5.0, 0.4, 0.0]]]))
    method.add_batch(torch.tensor([[0.0, 0.0, 0.0, 2.5]]))
    assert method.n_tokens == 3
    # scores |W|*norm: row 0 [4, 5, 1.5, 5] -> drop 1.5 and 4; row 1 [.5, 40, 3, 17.5] -> drop .5 and 3
    layer = linear(W)
    scores = method.scores(layer)
    assert torch.allclose(scores, torch.tensor([[4.0, 5.0, 1.5, 5.0], [0.5, 40.0, 3.0, 17.5]]))
    mask = method.prune(layer, 0.5, Structure())
    assert mask.tolist() == [[F, T, F, T], [F, T, F, T]]  # magnitude per row keeps columns 0 and 2 of row 0
    assert method.prune(linear(W), 0.5, Structure(1, 2)).tolist() == [[F, T, F, T], [F, T, F, T]]
    per_layer = WandaMethod(method_config("wanda", compare="layer"), 4)
    per_layer.sq_norm = method.sq_norm
    assert per_layer.prune(linear(W), 0.5, Structure()).tolist() == [[F, T, F, T], [F, T, F, T]]
    layer = linear(W)
    layer_mask = per_layer.prune(layer, 0.75, Structure())  # keeps the 2 highest of the layer: 40 and 17.5
    assert layer_mask.tolist() == [[F, F, F, F], [F, T, F, T]]


# ---- N:M ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "random", "wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["2:4", "4:8", "1:4"])
def test_nm_every_group_of_every_row(make_tiny_model, method: str, structure: str) -> None:
    model = make_tiny_model("llama")
    result = prune(model, {"method": method, "structure": structure}, calibration(), progress=False)
    n, m = (int(x) for x in structure.split(":"))
    assert result.target_sparsity == pytest.approx(1 - n / m)
    for name, weight in block_weights(model).items():
        groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=2)
        assert (groups == n).all(), name
        assert is_nm_sparse(weight, Structure(n, m))


# ---- sparsegpt ----------------------------------------------------------------------------------------------------

def _correlated_inputs(tokens: int, features: int, seed: int, mixing: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) * mixing / features ** 0.5 + torch.eye(features)
    scales = torch.linspace(0.2, 3.0, features)
    return (torch.randn(tokens, features, generator=gen) @ mix) * scales


def _error(x: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor) -> float:
    return float((x @ sparse.t() - x @ dense.t()).square().sum())


def _sparsegpt(x: torch.Tensor, dense: torch.Tensor, structure: str, block_size: int) -> tuple[torch.Tensor, ...]:
    config = method_config("sparsegpt", sparsity=0.5 if structure == "unstructured" else None,
                         structure=structure, dampening=1e-8, block_size=block_size)
    layer = linear(dense.tolist())
    method = SparseGPTMethod(config, dense.shape[1])
    for chunk in x.split(100):
        method.add_batch(chunk)
    mask = method.prune(layer, 0.5, config.structure_spec())
    return layer.weight.detach().clone(), mask


def _least_squares(x: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row, the kept weights that best reproduce the dense output: argmin ||X_S w_S - X w||."""
    optimum = torch.zeros_like(dense)
    for row in range(dense.shape[0]):
        kept = mask[row]
        target = (x @ dense[row]).double().unsqueeze(1)
        optimum[row, kept] = torch.linalg.lstsq(x[:, kept].double(), target).solution.squeeze(1).float()
    return optimum


def _sequential_least_squares(x: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What SparseGPT computes, written independently: going left to right, each pruned weight is set to 0
    and the columns to its right are re-solved by least squares, the columns to its left staying fixed."""
    xd = x.double()
    out = dense.double().clone()
    for row in range(dense.shape[0]):
        w, target = out[row], xd @ dense[row].double()
        for i in range(dense.shape[1] - 1):
            if not mask[row, i]:
                w[i] = 0.0
                residual = (target - xd[:, :i + 1] @ w[:i + 1]).unsqueeze(1)
                w[i + 1:] = torch.linalg.lstsq(xd[:, i + 1:], residual).solution.squeeze(1)
        w[~mask[row]] = 0.0
    return out.float()


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_equals_its_independent_sequential_least_squares_solution(structure: str) -> None:
    x = _correlated_inputs(512, 32, seed=0)
    dense = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    pruned, mask = _sparsegpt(x, dense, structure, block_size=8)  # 4 column blocks: lazy updates between them
    assert torch.equal(pruned != 0, mask) and int(mask.sum()) == 16 * 16
    torch.testing.assert_close(pruned, _sequential_least_squares(x, dense, mask), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_close_to_least_squares_and_better_than_wanda_and_magnitude(structure: str) -> None:
    # SparseGPT is greedy (left columns freeze before right ones are pruned): near the optimum of its own
    # mask when the inputs are mildly correlated (here within 10%; strongly correlated ones give ~1.3-1.6x)
    x = _correlated_inputs(512, 32, seed=0, mixing=0.2)
    dense = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    pruned, mask = _sparsegpt(x, dense, structure, block_size=128)
    err_sgpt, err_opt = _error(x, dense, pruned), _error(x, dense, _least_squares(x, dense, mask))
    assert err_opt <= err_sgpt * (1 + 1e-4)
    assert err_sgpt <= 1.1 * err_opt + 1e-6
    spec = parse_structure(structure)
    wanda = WandaMethod(method_config("wanda"), 32)
    wanda.add_batch(x)
    for other in (wanda, MagnitudeMethod(method_config("magnitude", compare="row"), 32)):
        other_mask = other.prune(linear(dense.tolist()), 0.5, spec)
        assert err_sgpt < _error(x, dense, dense * other_mask)


def test_sparsegpt_dead_inputs_are_zeroed_and_cholesky_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _correlated_inputs(256, 16, seed=1)
    x[:, 3] = 0.0  # a dead input: H_33 = 0
    method = SparseGPTMethod(method_config("sparsegpt", dampening=0.01), 16)
    method.add_batch(x)
    real = torch.linalg.cholesky_ex
    calls = {"n": 0}

    def failing_once(matrix: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        lower, info = real(matrix, *args, **kwargs)
        return (lower, torch.ones_like(info)) if calls["n"] == 1 else (lower, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_once)
    layer = linear(torch.randn(8, 16, generator=torch.Generator().manual_seed(2)).tolist())
    mask = method.prune(layer, 0.25, Structure())
    assert method.dampening_used == pytest.approx(0.1)  # 0.01 failed, x10 worked
    assert (layer.weight[:, 3] == 0).all() and not mask[:, 3].any()
    assert int((layer.weight == 0).sum()) == 32


def test_sparsegpt_prune_on_model_is_exact_and_reduces_output_error(tiny_llama: nn.Module) -> None:
    tokens = calibration(16, 16)
    dense = copy.deepcopy(tiny_llama)
    results = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        prune(model, {"method": method, "sparsity": 0.6}, tokens, progress=False)
        for weight in block_weights(model).values():  # wanda compares per row: round(0.6 x 32) per row
            per_row = weight.shape[0] * round(weight.shape[1] * 0.6)
            assert int((weight == 0).sum()) == (per_row if method == "wanda" else round(weight.numel() * 0.6))
        with torch.no_grad():
            results[method] = float((model(tokens).logits - dense(tokens).logits).square().mean())
    assert results["sparsegpt"] < results["wanda"] < results["magnitude"]


# ---- owl ----------------------------------------------------------------------------------------------------------

def test_owl_golden() -> None:
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0]), torch.tensor([[1.0, 100.0]])], 2.0) == pytest.approx(0.2)
    # ratios normalised to [0, .5, 1], spread 2*0.08, centred on the target
    assert owl_sparsities([0.1, 0.2, 0.3], 0.5, 0.08) == pytest.approx([0.58, 0.5, 0.42])
    assert owl_sparsities([0.2, 0.2], 0.5, 0.08) == pytest.approx([0.5, 0.5])
    with pytest.raises(PrunekitError, match="owl-lambda"):
        owl_sparsities([0.0, 1.0], 0.9, 0.2)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_allocation_keeps_the_mean_and_prunes_outlier_blocks_less(make_tiny_model, method: str) -> None:
    model = make_tiny_model("llama", num_hidden_layers=3)
    result = prune(model, {"method": method, "sparsity": 0.5, "allocation": "owl"}, calibration(), progress=False)
    blocks, ratios = result.block_sparsity, result.outlier_ratios
    assert blocks is not None and ratios is not None and len(blocks) == 3
    assert sum(blocks) / 3 == pytest.approx(0.5)
    assert max(blocks) - min(blocks) == pytest.approx(0.16)
    assert blocks[ratios.index(max(ratios))] == min(blocks)
    for name, info in result.layers.items():
        index = int(name.split(".")[2])
        assert info["target"] == blocks[index]
        assert info["sparsity"] == pytest.approx(blocks[index], abs=0.01)


# ---- selection, registry, validation ------------------------------------------------------------------------------

def test_include_exclude_patterns(tiny_llama: nn.Module) -> None:
    result = prune(tiny_llama, {"method": "wanda", "sparsity": 0.5, "include": ["*.mlp.*"],
                                "exclude": "*.down_proj"}, calibration(), progress=False)
    assert sorted(n.split(".", 3)[3] for n in result.layers) == ["mlp.gate_proj", "mlp.gate_proj",
                                                                  "mlp.up_proj", "mlp.up_proj"]
    for name, weight in block_weights(tiny_llama).items():
        expected = 0.5 if name in result.layers else 0.0
        assert float((weight == 0).float().mean()) == pytest.approx(expected), name
    assert (tiny_llama.lm_head.weight != 0).all()


def test_lm_head_only_when_asked(tiny_llama: nn.Module) -> None:
    result = prune(tiny_llama, {"method": "magnitude", "sparsity": 0.5, "include_lm_head": True}, progress=False)
    assert "lm_head" in result.layers
    assert float((tiny_llama.lm_head.weight == 0).float().mean()) == pytest.approx(0.5)


@dataclasses.dataclass(frozen=True)
class ToyBlocksConfig(EngineConfig):
    ratio: float = setting(0.5, "fraction of blocks")


def test_registry_lists_methods_and_runs_structured_methods(tiny_llama: nn.Module) -> None:
    names = [m.name for m in available_methods()]
    assert names[:4] == ["magnitude", "random", "wanda", "sparsegpt"]
    assert {"heads-neurons", "blocks", "gmp", "movement", "mgpp", "flop", "none"} <= set(names)
    seen = {}

    def drop_first_block(model, config, calib, device, progress):  # type: ignore[no-untyped-def]
        seen.update(ratio=config.ratio, calib=calib is not None, device=str(device))
        return {"removed": 1}

    register("toy-blocks", kind="structured", config=ToyBlocksConfig, description="toy")(drop_first_block)
    try:
        assert get_method("toy-blocks").kind == "structured"
        result = prune(tiny_llama, {"method": "toy-blocks", "ratio": 0.25}, progress=False)
        assert seen == {"ratio": 0.25, "calib": False, "device": "cpu"}
        assert result.extra == {"removed": 1} and result.record()["method_result"] == {"removed": 1}
        with pytest.raises(PrunekitError, match="already registered"):
            register("toy-blocks", kind="structured", config=ToyBlocksConfig, description="x")(lambda *a: {})
    finally:
        registered().pop("toy-blocks")


@pytest.mark.parametrize("settings,fragment", [
    ({"method": "wanda", "sparsity": 1.0}, "outside [0, 1)"),
    ({"method": "wanda", "sparsity": -0.1}, "outside [0, 1)"),
    ({"method": "wanda", "structure": "4:2"}, "smaller than M"),
    ({"method": "wanda", "structure": "2:6"}, "multiple of 6"),
    ({"method": "wanda", "sparsity": 0.3, "structure": "2:4"}, "contradicts"),
    ({"method": "wanda"}, "needs a sparsity"),
    ({"method": "obs", "sparsity": 0.5}, "magnitude, random, wanda, sparsegpt"),
    ({"method": "magnitude", "sparsity": 0.5, "compare": "diagonal"}, "unknown compare 'diagonal'"),
    ({"method": "wanda", "sparsity": 0.5, "compare": "global"}, "unknown compare 'global': use one of row, layer"),
    ({"method": "wanda", "structure": "2:4", "allocation": "owl"}, "unstructured"),
    ({"method": "wanda", "sparsity": 0.5, "allocation": "even"}, "unknown allocation"),
    ({"method": "wanda", "sparsity": 0.5, "include": ["nothing.*"]}, "no layer matches"),
    ({"method": "wanda", "sparsity": 0.5, "dampening": 0}, "dampening"),
    ({"method": "wanda", "sparsity": 0.5, "colour": "red"}, "method wanda does not take colour"),
    ({"method": "sparsegpt", "sparsity": 0.5, "include_lm_head": True}, "sparsegpt does not take include_lm_head"),
])
def test_bad_settings_raise_one_line_errors(tiny_llama: nn.Module, settings: dict, fragment: str) -> None:
    with pytest.raises(PrunekitError) as info:
        prune(tiny_llama, settings, calibration(), progress=False)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("calib,fragment", [
    (None, "needs calibration data"),
    (torch.rand(2, 8), "LongTensor"),
    (torch.full((2, 8), 10_000), "vocabulary"),
])
def test_bad_calibration(tiny_llama: nn.Module, calib: torch.Tensor | None, fragment: str) -> None:
    with pytest.raises(PrunekitError, match=fragment):
        prune(tiny_llama, {"method": "wanda", "sparsity": 0.5}, calib, progress=False)
    with pytest.raises(PrunekitError, match=fragment):  # owl needs calibration even for magnitude
        prune(tiny_llama, {"method": "magnitude", "sparsity": 0.5, "allocation": "owl"}, calib, progress=False)


# ---- record and export --------------------------------------------------------------------------------------------

def test_pruned_model_exports_and_reloads_with_the_same_zeros_and_logits(tiny_llama: nn.Module, tiny_tokenizer,
                                                                          tmp_path: Path) -> None:
    from prunekit.export import load, save_model

    result = prune(tiny_llama, {"method": "sparsegpt", "structure": "2:4"}, calibration(), progress=False)
    record = result.record()
    json.dumps(record)
    assert record["method"] == "sparsegpt" and record["method_settings"]["structure"] == "2:4"
    assert record["sparsity"]["total"] == pytest.approx(0.5)
    out = save_model(tiny_llama, tiny_tokenizer, tmp_path / "pruned", record)
    loaded, _tokenizer, saved = load(out)
    assert saved["sparsity"]["layers"] == pytest.approx(record["sparsity"]["layers"])
    for (name, before), after in zip(block_weights(tiny_llama).items(), block_weights(loaded).values(), strict=True):
        assert torch.equal(before == 0, after == 0), name
    tokens = calibration(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, tiny_llama(tokens).logits)


@pytest.mark.parametrize("size", [5, 8, 23])
def test_upper_block_hessian_equals_full_product(size: int) -> None:
    from prunekit.methods.sparsegpt import accumulate_upper, symmetric_from_upper

    generator = torch.Generator().manual_seed(size)
    batches = [torch.randn(7, size, generator=generator) for _ in range(3)]
    hessian = torch.zeros(size, size)
    for rows in batches:
        accumulate_upper(hessian, rows, block=4)  # 5 -> one full product; 8 -> 2 blocks; 23 -> 6 blocks
    stacked = torch.cat(batches)
    assert torch.allclose(symmetric_from_upper(hessian), stacked.t() @ stacked, atol=1e-4)
