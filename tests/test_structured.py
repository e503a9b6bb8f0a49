"""One-shot structured methods: golden scores and allocations, FLAP bias compensation, block influence, API."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from prunekit import surgery
from prunekit.adapters import get_adapter, weight_view
from prunekit.adapters.base import get_submodule
from prunekit.errors import PrunekitError
from prunekit.export import load, save_model
from prunekit.methods import method_config, structured
from prunekit.methods.structured import block_scores, collect_stats, plan_heads, plan_neurons
from prunekit.pruning import prune
from prunekit.utils import count_parameters

GQA = {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 3}


def calib(n: int = 8, length: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randint(4, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def shapes(heads: int, kv: int, inter: int, blocks: int = 1) -> list[surgery.LayerShape]:
    return [surgery.LayerShape(heads, kv, inter)] * blocks


def test_plan_heads_gqa_rules() -> None:
    """SmolLM2's layout (9 query heads, 3 groups of 3): what each rule removes at 25 % and 50 %."""
    q = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 4.0, 7.0, 8.0, 0.5], dtype=torch.float64)
    kv = torch.tensor([1.0, 100.0, 2.0], dtype=torch.float64)
    scores = {0: (q, kv, torch.zeros(4, dtype=torch.float64))}
    layout = shapes(9, 3, 4)
    assert plan_heads(layout, scores, 0.25, "uniform", "query") == {0: [1, 3, 8]}  # the lowest of each group
    assert plan_heads(layout, scores, 0.5, "uniform", "query") == {0: [1, 2, 3, 5, 6, 8]}  # 1.5 rounds up to 2
    # groups: score = |sum of its query heads + its K/V| = 10, 115, 17.5 -> group 0 first, then group 2
    assert plan_heads(layout, scores, 0.25, "uniform", "groups") == {0: [0, 1, 2]}
    assert plan_heads(layout, scores, 0.5, "uniform", "groups") == {0: [0, 1, 2, 6, 7, 8]}
    with pytest.raises(PrunekitError, match="would remove all 3"):
        plan_heads(layout, scores, 0.9, "uniform", "query")
    with pytest.raises(PrunekitError, match="outside"):
        plan_heads(layout, scores, 1.0, "uniform", "query")


def test_plan_global_compares_normalised_scores() -> None:
    """Block 1's neurons are all 10x block 0's, but normalised by their block mean they tie: ranks decide."""
    n0 = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    n1 = torch.tensor([1.0, 1.0, 1.0, 37.0], dtype=torch.float64) * 10
    empty = torch.zeros(2, dtype=torch.float64)
    scores = {0: (empty, empty, n0), 1: (empty, empty, n1)}
    plan = plan_neurons(shapes(2, 2, 4, 2), scores, 0.5, "global")
    assert plan == {0: [0, 1], 1: [0, 1]} or plan == {0: [0], 1: [0, 1, 2]}
    assert sum(len(v) for v in plan.values()) == 4
    uneven = {0: (empty, empty, torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)),
              1: (empty, empty, torch.tensor([0.01, 0.02, 1.0, 3.0], dtype=torch.float64))}
    assert plan_neurons(shapes(2, 2, 4, 2), uneven, 0.25, "global") == {0: [], 1: [0, 1]}
    assert plan_neurons(shapes(2, 2, 4, 2), uneven, 0.25, "uniform") == {0: [0], 1: [0]}


def test_magnitude_golden(make_tiny_model: Callable[..., nn.Module]) -> None:
    """Hand-set weights: head h and neuron n weigh h+1 and n+1; magnitude removes the lightest."""
    model = make_tiny_model("opt", num_hidden_layers=1)
    adapter = get_adapter(model)
    block = adapter.blocks()[0]
    with torch.no_grad():
        for name in adapter.block_linear_names():
            weight_view(get_submodule(block, name)).fill_(0.0)
        weight_view(get_submodule(block, adapter.q_proj)).copy_(
            torch.arange(4).repeat_interleave(8)[:, None].float().expand(32, 32) + 1)
        weight_view(get_submodule(block, adapter.mlp_in[0]))[:] = torch.tensor([3.0, 1.0, 2.0]).repeat(22)[:64, None]
    q, kv, neurons = block_scores(adapter, block, "magnitude", None, None)
    assert torch.allclose(q, torch.tensor([1.0, 2, 3, 4], dtype=torch.float64) * 8 * 32)
    assert torch.equal(kv, torch.zeros(4, dtype=torch.float64))
    result = prune(model, method_config("heads-neurons", ratio=0.5, importance="magnitude"), calib(),
                   progress=False)
    assert result.extra["heads_removed"] == {"0": [0, 1]}
    kept_rows = weight_view(get_submodule(block, adapter.mlp_in[0]))[:, 0]
    assert torch.all(kept_rows >= 2.0)  # every neuron of weight 1 went (and half the 2s)


def test_wanda_and_taylor_scores_by_hand(make_tiny_model: Callable[..., nn.Module]) -> None:
    """Score of neuron n and head h against direct computations with hooks and autograd."""
    model = make_tiny_model("llama", **GQA)
    adapter = get_adapter(model)
    block = adapter.blocks()[1]
    tokens = calib()
    seen: dict[str, list[torch.Tensor]] = {"gate": [], "down": [], "o": []}
    hooks = [block.mlp.gate_proj.register_forward_pre_hook(lambda m, a: seen["gate"].append(a[0])),
             block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0])),
             block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["o"].append(a[0]))]
    logits(model, tokens)
    for h in hooks:
        h.remove()
    norm = {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]).double().norm(dim=0) for k, v in seen.items()}
    stats = collect_stats(model, tokens, torch.device("cpu"), progress=False)[1]
    _, _, neurons = block_scores(adapter, block, "wanda", stats, None)
    n = 5
    gate, up, down = (layer.weight.double() for layer in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj))
    by_hand = ((gate[n].abs() + up[n].abs()) * norm["gate"]).sum() + down[:, n].abs().sum() * norm["down"][n]
    assert torch.allclose(neurons[n], by_hand, rtol=1e-5)

    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = {name: layer.weight.grad.double().clone() for name, layer in adapter.block_linears(block).items()}
    model.zero_grad()
    taylor = structured.taylor_gradients(model, adapter, tokens, torch.device("cpu"), batch_size=len(tokens))[1]
    assert all(torch.allclose(taylor[k], grads[k], atol=1e-8) for k in grads)
    q, _, _ = block_scores(adapter, block, "taylor", None, taylor)
    h, d = 4, adapter.head_dim()
    qw, ow = block.self_attn.q_proj.weight.double(), block.self_attn.o_proj.weight.double()
    by_hand = (qw[h * d:(h + 1) * d] * grads["self_attn.q_proj"][h * d:(h + 1) * d]).sum() + \
        (ow[:, h * d:(h + 1) * d] * grads["self_attn.o_proj"][:, h * d:(h + 1) * d]).sum()
    assert torch.allclose(q[h], by_hand, rtol=1e-6)


def test_flap_bias_compensation_equals_mean_replacement(make_tiny_model: Callable[..., nn.Module]) -> None:
    """Removing channels and adding W[:, removed]·mean to the bias = feeding the removed channels their mean."""
    model = make_tiny_model("gpt2", n_layer=2)
    adapter = get_adapter(model)
    tokens = calib()
    stats = collect_stats(model, tokens, torch.device("cpu"), progress=False)
    heads, neurons = {0: [1], 1: [0, 2]}, {0: [3, 4, 9], 1: [0, 63]}
    reference = copy.deepcopy(model)
    d = adapter.head_dim()
    for b, block in enumerate(get_adapter(reference).blocks()):
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads[b]])

        def replace(channels: torch.Tensor, means: torch.Tensor) -> Any:
            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
                x = args[0].clone()
                x[..., channels] = means[channels].to(x.dtype)
                return (x,)
            return hook
        block.attn.c_proj.register_forward_pre_hook(replace(cols, stats[b]["o"].mean()))
        block.mlp.c_proj.register_forward_pre_hook(replace(torch.tensor(neurons[b]), stats[b]["mlp_out"].mean()))
    attention, mlp = structured._bias_deltas(adapter, stats, heads, neurons)
    surgery.prune_heads(model, heads)
    surgery.prune_neurons(model, neurons)
    assert structured._apply_bias(model, adapter, "attention", attention)
    assert structured._apply_bias(model, adapter, "mlp", mlp)
    assert torch.allclose(logits(model, tokens), logits(reference, tokens), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "bert"])
def test_prune_api_every_family(make_tiny_model: Callable[..., nn.Module], family: str) -> None:
    model = make_tiny_model(family, **(GQA if family == "llama" else {}))
    config = method_config("heads-neurons", ratio=0.5, importance="wanda")
    result = prune(model, config, calib(), progress=False)
    facts = result.extra
    assert facts["parameters_after"] == count_parameters(model) < facts["parameters_before"]
    assert facts["neurons_removed_fraction"] == 0.5
    assert facts["heads_removed_fraction"] == (2 / 3 if family == "llama" else 0.5)
    assert facts["plain_reload"] == (family in ("llama", "qwen2"))
    assert logits(model, calib()).isfinite().all()


@pytest.mark.parametrize("importance", ["flap", "taylor", "magnitude"])
def test_global_allocation_reloads_with_prunekit(make_tiny_model: Callable[..., nn.Module], tmp_path: Path,
                                                 importance: str) -> None:
    model = make_tiny_model("llama", **GQA)
    with torch.no_grad():  # most of block 2's neurons matter little next to a few: a global comparison of
        mlp = model.model.layers[2].mlp  # scores normalised by their block's mean takes more from it
        for layer in (mlp.gate_proj, mlp.up_proj):
            layer.weight[:56].mul_(0.02)
        mlp.down_proj.weight[:, :56].mul_(0.02)
    config = method_config("heads-neurons", ratio=0.4, importance=importance, allocation="global")
    facts = prune(model, config, calib(), progress=False).extra
    layers = facts["structure"]["layers"]
    assert facts["allocation"] == "global"
    if importance != "taylor":
        assert layers[2]["intermediate"] < min(layers[0]["intermediate"], layers[1]["intermediate"])
        assert not facts["uniform"] and facts["loader"] == "structured"
    if importance == "flap":
        assert facts["bias_compensation"] == "on" and model.config.mlp_bias
    out = save_model(model, None, tmp_path / "global", {"task": "causal-lm", "loader": facts["loader"]})
    loaded, _, _ = load(out)
    tokens = calib(2, 8, seed=5)
    assert torch.allclose(logits(loaded, tokens), logits(model, tokens), atol=1e-6)


def test_uniform_flap_llama_reloads_plainly(make_tiny_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    model = make_tiny_model("llama", **GQA)
    facts = prune(model, method_config("heads-neurons", ratio=0.25, importance="flap"), calib(),
                  progress=False).extra
    assert facts["plain_reload"] and facts["bias_compensation"] == "on"
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 48
    out = save_model(model, None, tmp_path / "flap", {"task": "causal-lm"})
    tokens = calib(2, 8, seed=5)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out), tokens), logits(model, tokens), atol=1e-6)


def test_blocks_removes_the_least_influential(make_tiny_model: Callable[..., nn.Module]) -> None:
    """A block whose outputs add nothing (zeroed output projections) has influence 0 and goes first."""
    model = make_tiny_model("llama", **{**GQA, "num_hidden_layers": 4})
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    reference = copy.deepcopy(model)
    facts = prune(model, method_config("blocks", remove=1), calib(), progress=False).extra
    assert facts["blocks_removed"] == [2] and abs(facts["block_influence"][2]) < 1e-6
    assert min(facts["block_influence"][i] for i in (0, 1, 3)) > 1e-4
    assert model.config.num_hidden_layers == 3 and facts["plain_reload"]
    tokens = calib(2, 8, seed=5)
    assert torch.allclose(logits(model, tokens), logits(reference, tokens), atol=1e-5)


def test_magnitude_importance_needs_no_calibration(make_tiny_model: Callable[..., nn.Module]) -> None:
    model = make_tiny_model("llama", **GQA)
    reference = copy.deepcopy(model)
    without = prune(model, method_config("heads-neurons", ratio=0.5, importance="magnitude"), None,
                    progress=False)
    with_calib = prune(reference, method_config("heads-neurons", ratio=0.5, importance="magnitude"), calib(),
                       progress=False)
    assert without.extra["heads_removed"] == with_calib.extra["heads_removed"]  # calibration plays no part
    assert count_parameters(model) == count_parameters(reference)
    for settings in ({"ratio": 0.5}, {"ratio": 0.5, "importance": "magnitude", "bias_compensation": True}):
        with pytest.raises(PrunekitError, match="needs calibration data"):
            prune(make_tiny_model("llama", **GQA), method_config("heads-neurons", **settings), None,
                  progress=False)


def test_bad_input_is_one_line_error(make_tiny_model: Callable[..., nn.Module]) -> None:
    model = make_tiny_model("llama", **GQA)
    before = count_parameters(model)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"method": "blocks", "remove": 3}, "remove at most 2"),
        ({"method": "blocks", "remove": 0}, "--remove N"),
        ({"method": "heads-neurons", "ratio": 1.0}, "outside"),
        ({"method": "heads-neurons", "ratio": 0.9}, "would remove all 3 query heads of each group"),
        ({"method": "heads-neurons"}, "needs --ratio"),
        ({"method": "heads-neurons", "ratio": 0.5, "importance": "fisher"}, "unknown importance"),
    ]
    for settings, message in cases:
        with pytest.raises(PrunekitError, match=message) as info:
            prune(model, dict(settings), calib(), progress=False)
        assert "\n" not in str(info.value)
    assert count_parameters(model) == before


def _tiny_folder(tmp_path: Path, model: nn.Module, tokenizer: Any, name: str) -> Path:
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_prune_heads_neurons_and_blocks(make_tiny_model: Callable[..., nn.Module], tiny_tokenizer: Any,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from conftest import TOKENIZER_TEXT
    from prunekit.cli.main import main

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(TOKENIZER_TEXT * 40))
    folder = _tiny_folder(tmp_path, make_tiny_model("llama", **GQA), tiny_tokenizer, "dense")
    common = ["--calib", f"text:{text}", "--calib-samples", "4", "--seq-len", "16", "--device", "cpu"]
    out = tmp_path / "hn"
    assert main(["prune", str(folder), "--method", "heads-neurons", "--ratio", "0.5", *common, "--out", str(out)]) == 0
    record = json.loads((out / "prunekit.json").read_text())
    before, after = (record["method_result"][k] / 1e6 for k in ("parameters_before", "parameters_after"))
    assert (f"heads-neurons: removed 67% of heads and 50% of FFN neurons; parameters {before:.2f} M -> {after:.2f} M"
            in capsys.readouterr().out)
    assert record["loader"] is None and record["method_result"]["plain_reload"]
    assert record["method_result"]["parameters_after"] < record["method_result"]["parameters_before"]
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 2
    AutoModelForCausalLM.from_pretrained(out)
    out_global = tmp_path / "global"
    assert main(["prune", str(folder), "--method", "heads-neurons", "--ratio", "0.3", "--allocation", "global",
                 "--importance", "wanda", *common, "--out", str(out_global)]) == 0
    assert load(out_global)[0] is not None
    out_groups = tmp_path / "groups"
    assert main(["prune", str(folder), "--method", "heads-neurons", "--heads-ratio", "0.5", "--neurons-ratio", "0.25",
                 "--gqa", "groups", "--no-bias-compensation", *common, "--out", str(out_groups)]) == 0
    config = json.loads((out_groups / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (3, 1, 48)
    result = json.loads((out_groups / "prunekit.json").read_text())["method_result"]
    assert result["bias_compensation"] == "off" and result["gqa_rule"].startswith("groups")
    assert not config.get("attention_bias") and not config.get("mlp_bias")
    capsys.readouterr()
    assert main(["prune", str(folder), "--method", "heads-neurons", "--ratio", "0.5", "--gqa", "kv", *common,
                 "--out", str(tmp_path / "bad-gqa")]) == 2
    assert "heads-neurons: unknown gqa 'kv': use one of query, groups" in capsys.readouterr().err
    out_blocks = tmp_path / "blocks"
    assert main(["prune", str(folder), "--method", "blocks", "--remove", "1", *common, "--out", str(out_blocks)]) == 0
    assert json.loads((out_blocks / "config.json").read_text())["num_hidden_layers"] == 2
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["prune", str(folder), "--method", "blocks", "--remove", "3", *common, "--out", str(refused)]) == 2
    err = capsys.readouterr().err.strip()
    assert "remove at most 2" in err and len(err.splitlines()) == 1
    assert not refused.exists() and not list(tmp_path.glob(".refused*"))


def test_python_api_record_reloads_global_allocation_without_naming_a_loader(
        make_tiny_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    """The README's API path: save_model(..., record={"pruning": result}); the loader comes from the model."""
    model = make_tiny_model("llama", **GQA)
    with torch.no_grad():
        mlp = model.model.layers[2].mlp
        for layer in (mlp.gate_proj, mlp.up_proj):
            layer.weight[:56].mul_(0.02)
        mlp.down_proj.weight[:, :56].mul_(0.02)
    result = prune(model, {"method": "heads-neurons", "ratio": 0.4, "importance": "wanda", "allocation": "global"},
                   calib(), progress=False)
    assert not result.extra["uniform"]
    out = save_model(model, None, tmp_path / "api", record={"pruning": result})
    loaded, _, record = load(out)
    assert record["loader"] == "structured" and record["method"] == "heads-neurons"
    assert record["kind"] == "structured" and record["method_settings"]["allocation"] == "global"
    tokens = calib(2, 8, seed=5)
    assert torch.allclose(logits(loaded, tokens), logits(model, tokens), atol=1e-6)
