"""Block-output reconstruction (reconstruct_steps): a golden least-squares case worked by hand, masks kept, the
whole recipe (any method x refinement x reconstruction) on every adapter family with a plain reload, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from families import FAMILIES, build, outputs, task_of, tokens
from prunekit.adapters import get_adapter, weight_view
from prunekit.calibration import BlockArgs, BlockInputs
from prunekit.errors import PrunekitError
from prunekit.masks import Structure, is_nm_sparse
from prunekit.methods.reconstruct import reconstruct_block
from prunekit.models import auto_class


def test_reconstruction_golden_correlated_inputs() -> None:
    # dense y = x0 + x1 with x1 = x0 on every token; the mask keeps input 0 only. The kept weight that reproduces
    # the dense output exactly is 2 (by hand: 2 x0 = x0 + x1); the pruned weight must stay exactly 0.
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0]]))
    x0 = torch.linspace(-1.0, 1.0, 16).reshape(2, 8, 1)
    batches = [BlockInputs(torch.cat([x0[i], x0[i]], dim=1), [BlockArgs()]) for i in range(2)]
    dense = [2.0 * x0[i] for i in range(2)]
    facts = reconstruct_block(layer, {"layer": layer}, batches, dense, 0, steps=400, lr=0.02)
    assert weight_view(layer)[0, 1].item() == 0.0
    assert weight_view(layer)[0, 0].item() == pytest.approx(2.0, abs=1e-2)
    assert facts["kept"] and facts["loss_after"] < 1e-4 < facts["loss_before"]


def test_a_fit_that_makes_the_block_worse_is_undone() -> None:
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.9, 0.0]]))  # nearly exact: Adam's first steps of size 10 overshoot
    x0 = torch.linspace(-1.0, 1.0, 8).reshape(1, 8, 1)
    batches = [BlockInputs(torch.cat([x0[0], x0[0]], dim=1), [BlockArgs()])]
    facts = reconstruct_block(layer, {"layer": layer}, batches, [2.0 * x0[0]], 0, steps=3, lr=10.0)
    assert not facts["kept"]
    assert torch.equal(weight_view(layer), torch.tensor([[1.9, 0.0]]))


def _output_error(model: nn.Module, dense: torch.Tensor, ids: torch.Tensor) -> float:
    return float((outputs(model, ids) - dense).square().mean())


def test_reconstruction_keeps_masks_and_lowers_each_blocks_loss() -> None:
    ids = tokens(8, seed=3)
    dense = outputs(build("llama"), ids)
    plain, fitted = build("llama"), build("llama")
    settings = {"method": "wanda", "structure": "2:4", "micro_batch_size": 2}
    prunekit.prune(plain, settings, ids, progress=False)
    result = prunekit.prune(fitted, {**settings, "reconstruct_steps": 40, "reconstruct_lr": 1e-3}, ids,
                            progress=False)
    for name, layer in get_adapter(fitted).prunable_layers().items():
        assert is_nm_sparse(weight_view(layer), Structure(2, 4)), name
        assert int((weight_view(layer) == 0).sum()) == weight_view(layer).numel() // 2, name
    facts = result.record()["method_result"]["reconstruct"]
    assert facts["steps"] == 40 and len(facts["blocks"]) == 2
    for block in facts["blocks"]:
        assert block["loss_after"] < block["loss_before"]
    assert _output_error(fitted, dense, ids) < _output_error(plain, dense, ids)


def test_reconstruction_with_zero_steps_changes_nothing() -> None:
    a, b = build("llama"), build("llama")
    prunekit.prune(a, {"method": "wanda", "sparsity": 0.5}, tokens(4), progress=False)
    result = prunekit.prune(b, {"method": "wanda", "sparsity": 0.5, "reconstruct_steps": 0}, tokens(4), progress=False)
    assert "reconstruct" not in result.record().get("method_result", {})
    for name, layer in get_adapter(a).prunable_layers().items():
        assert torch.equal(weight_view(layer), weight_view(get_adapter(b).prunable_layers()[name])), name


RECIPE = {"method": "sparsegpt", "structure": "2:4", "refine": "swaps", "refine_iterations": 5,
          "reconstruct_steps": 4, "reconstruct_lr": 1e-3}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_whole_recipe_on_every_family_is_exact_and_reloads_plainly(family: str, tmp_path: Path) -> None:
    model = build(family)
    result = prunekit.prune(model, RECIPE, tokens(4), progress=False)
    for name, layer in get_adapter(model).prunable_layers().items():
        assert is_nm_sparse(weight_view(layer), Structure(2, 4)), name
        assert int((weight_view(layer) == 0).sum()) == weight_view(layer).numel() // 2, name
    record = result.record()
    assert record["method_result"]["refine"]["swaps"] >= 0
    assert len(record["method_result"]["reconstruct"]["blocks"]) == len(get_adapter(model).all_blocks())
    assert record["sparsity"]["total"] == pytest.approx(0.5)
    ids = tokens(2, seed=7)
    want = outputs(model, ids)
    prunekit.save_model(model, None, tmp_path / "out", {"pruning": result, "task": task_of(family)})
    plain = auto_class(task_of(family)).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(outputs(plain, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"method": "wanda", "sparsity": 0.5, "reconstruct_steps": -1}, "reconstruct_steps -1 must be 0"),
    ({"method": "wanda", "sparsity": 0.5, "reconstruct_steps": 5, "reconstruct_lr": 0}, "must be positive"),
    ({"method": "magnitude", "sparsity": 0.5, "reconstruct_steps": 5, "compare": "global"}, "compare row or layer"),
    ({"method": "blocks", "remove": 1, "reconstruct_steps": 5}, "does not take reconstruct_steps"),
])
def test_bad_reconstruction_settings_are_refused_in_one_line(settings: dict, fragment: str) -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=fragment) as error:
        prunekit.prune(model, settings, tokens(4), progress=False)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_recipe_runs_through_the_cli(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from prunekit.cli.main import main

    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    code = main(["prune", str(tiny_llama_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--refine", "swaps",
                 "--reconstruct-steps", "3", "--calib", f"text:{text}", "--calib-samples", "4", "--seq-len", "16",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    again = auto_class("causal-lm").from_pretrained(tmp_path / "out")
    zeros = [float((weight_view(layer) == 0).float().mean()) for layer in get_adapter(again).prunable_layers().values()]
    assert all(z == pytest.approx(0.5, abs=1e-3) for z in zeros)
