"""The family matrix: every common family x every kind of pruning, on tiny random models.

Each cell is one parametrised test: one-shot unstructured (wanda 50 %) and N:M (2:4) pruning of every
block (both stacks of an encoder-decoder); structured heads-neurons and block removal where the layout
allows. The pruned model is saved and must reload — with ``prunekit.load``, and with plain
``from_pretrained`` where its config can say its shapes — and compute what it computed in memory.
A layout prunekit cannot handle is refused with one line naming the family and what is supported.
README.md's family matrix is this file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import prunekit
from families import FAMILIES, build, outputs, task_of, tokens
from prunekit import surgery
from prunekit.adapters import get_adapter, weight_view
from prunekit.adapters.base import get_submodule
from prunekit.errors import PrunekitError
from prunekit.models import auto_class

ALL = list(FAMILIES) + ["falcon-alibi"]
ENCODER_DECODER = ("t5", "bart")
STRUCTURED = [f for f in FAMILIES if f not in ENCODER_DECODER]
# their configs say the new head count and head_dim, so plain from_pretrained reloads uniform heads-neurons
CONFIG_SAYS_HEADS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo", "olmo2",
                     "granite")


def model_of(family: str) -> nn.Module:
    if family == "falcon-alibi":  # Falcon-RW as released: q/k/v head by head, ALiBi positions
        return build("falcon-rw", alibi=True)
    return build(family)


def task(family: str) -> str:
    return task_of("falcon" if family == "falcon-alibi" else family)


def reload_and_compare(model: nn.Module, family: str, result: Any, folder: Path, plain: bool) -> None:
    """Save; prunekit.load (and plain from_pretrained when ``plain``) must compute what ``model`` computes."""
    ids = tokens(2, seed=7)
    want = outputs(model, ids)
    assert torch.isfinite(want).all()
    prunekit.save_model(model, None, folder, {"pruning": result, "task": task(family)})
    again, _tokenizer, record = prunekit.load(folder)
    assert record["task"] == task(family)
    torch.testing.assert_close(outputs(again, ids), want, rtol=1e-5, atol=1e-5)
    if plain:
        plainly = auto_class(task(family)).from_pretrained(folder)
        torch.testing.assert_close(outputs(plainly.eval(), ids), want, rtol=1e-5, atol=1e-5)


# ---- one-shot: unstructured and N:M ---------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("family", ALL)
def test_one_shot(family: str, structure: str, tmp_path: Path) -> None:
    model = model_of(family)
    result = prunekit.prune(model, {"method": "wanda", "sparsity": 0.5, "structure": structure}, tokens(),
                            progress=False)
    layers = get_adapter(model).prunable_layers()
    assert set(result.layers) == set(layers)
    if family in ENCODER_DECODER:  # both stacks, not only the encoder
        assert any(".decoder." in name or name.startswith("decoder.") for name in layers)
        assert any(".encoder." in name or name.startswith("encoder.") for name in layers)
    for name, layer in layers.items():
        zero = weight_view(layer) == 0
        if structure == "2:4":  # exactly 2 of every 4 consecutive inputs of every row
            assert (zero.reshape(zero.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:  # wanda: half of every row
            assert (zero.sum(1) == zero.shape[1] // 2).all(), name
    reload_and_compare(model, family, result, tmp_path / "pruned", plain=True)


# ---- structured: heads and FFN neurons; whole blocks ---------------------------------------------------------
@pytest.mark.parametrize("family", STRUCTURED)
def test_heads_neurons_uniform(family: str, tmp_path: Path) -> None:
    model = model_of(family)
    adapter = get_adapter(model)
    heads, kv_heads = adapter.num_heads(), adapter.num_kv_heads()
    result = prunekit.prune(model, {"method": "heads-neurons", "ratio": 0.5}, tokens(), progress=False)
    shapes = surgery.structure(model)
    # grouped-query (4 query / 2 key-value heads): one query head per group goes; otherwise half the heads
    want = (2, kv_heads) if kv_heads < heads else (2, 2)
    assert [(s.heads, s.kv_heads, s.intermediate) for s in shapes] == [(*want, 32)] * 2
    assert result.extra["plain_reload"] == (family in CONFIG_SAYS_HEADS)
    reload_and_compare(model, family, result, tmp_path / "pruned", plain=result.extra["plain_reload"])


@pytest.mark.parametrize("family", [f for f in STRUCTURED if f != "phi3"])
def test_heads_neurons_global(family: str, tmp_path: Path) -> None:
    model = model_of(family)
    result = prunekit.prune(model, {"method": "heads-neurons", "ratio": 0.4, "allocation": "global",
                                    "importance": "magnitude"}, tokens(), progress=False)
    reload_and_compare(model, family, result, tmp_path / "pruned", plain=result.extra["plain_reload"])


@pytest.mark.parametrize("family", STRUCTURED)
def test_blocks(family: str, tmp_path: Path) -> None:
    model = model_of(family)
    result = prunekit.prune(model, {"method": "blocks", "remove": 1}, tokens(), progress=False)
    assert len(get_adapter(model).blocks()) == 1
    reload_and_compare(model, family, result, tmp_path / "pruned", plain=True)


# ---- golden: removing heads and neurons computes what masking them does ------------------------------------
HEADS = {0: [0, 2], 1: [1, 3]}  # one query head of each key/value group of 2 (4 heads), or 2 of 4 heads
NEURONS = {0: [0, 5, 7, 30], 1: [1, 2, 63]}


def mask(model: nn.Module, heads: dict[int, list[int]], neurons: dict[int, list[int]]) -> None:
    """Zero the output projection's input columns of each head and the MLP output's columns of each neuron."""
    adapter = get_adapter(model)
    head_dim = adapter.head_dim()
    with torch.no_grad():
        for index, removed in heads.items():
            o = weight_view(get_submodule(adapter.blocks()[index], adapter.o_proj))
            for h in removed:
                o[:, h * head_dim:(h + 1) * head_dim] = 0
        for index, removed in neurons.items():
            weight_view(get_submodule(adapter.blocks()[index], adapter.mlp_out))[:, removed] = 0


@pytest.mark.parametrize("family", [f for f in STRUCTURED if f != "olmo2"])
def test_removal_computes_what_masking_computes(family: str) -> None:
    """Fused q/k/v layouts (head by head, per group, all q then k then v), fused gate/up, parallel blocks."""
    model = model_of(family)
    masked = copy.deepcopy(model)
    mask(masked, HEADS, NEURONS)
    surgery.prune_heads(model, HEADS)
    surgery.prune_neurons(model, NEURONS)
    ids = tokens(2, seed=5)
    torch.testing.assert_close(outputs(model, ids), outputs(masked, ids), rtol=1e-5, atol=1e-5)


def test_olmo2_norms_over_all_heads_lose_the_removed_heads_rows() -> None:
    """OLMo 2 normalises the whole query (4 heads x 8) and key (2 heads x 8) vectors: kept rows, in order."""
    model = model_of("olmo2")
    attention = model.model.layers[0].self_attn
    q_norm, k_norm = attention.q_norm.weight.detach().clone(), attention.k_norm.weight.detach().clone()
    assert q_norm.shape == (32,) and k_norm.shape == (16,)
    surgery.prune_heads(model, {0: [0, 1, 2, 3][0:4:2]})  # heads 0 and 2: one of each group, both groups kept
    torch.testing.assert_close(attention.q_norm.weight.detach(), torch.cat([q_norm[8:16], q_norm[24:32]]))
    torch.testing.assert_close(attention.k_norm.weight.detach(), k_norm)
    surgery.prune_heads(model, {0: [1]}, sync=False)  # now 2 heads in 2 groups: group 1 goes with its key head
    torch.testing.assert_close(attention.k_norm.weight.detach(), k_norm[:8])
    torch.testing.assert_close(attention.q_norm.weight.detach(), q_norm[8:16])
    assert torch.isfinite(outputs(model, tokens(1))).all()


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_per_head_norms_are_shared_by_all_heads_and_stay(family: str) -> None:
    model = model_of(family)
    q_norm = model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    surgery.prune_heads(model, HEADS)
    assert torch.equal(model.model.layers[0].self_attn.q_norm.weight.detach(), q_norm)  # one weight of head_dim


# ---- refusals ----------------------------------------------------------------------------------------------
REFUSALS = [
    ("t5", {"method": "heads-neurons", "ratio": 0.5},
     "encoder-decoder models \\(model type 't5'\\).*unstructured or N:M"),
    ("bart", {"method": "heads-neurons", "ratio": 0.5}, "encoder-decoder models \\(model type 'bart'\\)"),
    ("t5", {"method": "blocks", "remove": 1}, "encoder-decoder models \\(model type 't5'\\)"),
    ("falcon-alibi", {"method": "heads-neurons", "ratio": 0.5}, "Falcon model uses ALiBi.*--heads-ratio 0"),
]


@pytest.mark.parametrize("family,config,message", REFUSALS, ids=[f"{r[0]}-{r[1]['method']}" for r in REFUSALS])
def test_unsupported_layouts_are_refused_in_one_line_and_nothing_changes(family: str, config: dict[str, Any],
                                                                         message: str) -> None:
    model = model_of(family)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=message) as info:
        prunekit.prune(model, config, tokens(), progress=False)
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_with_several_stacks_and_no_adapter_is_refused_not_half_pruned() -> None:
    """Gemma 3 with its vision tower: the generic fallback would otherwise prune the vision blocks alone."""
    import transformers as tf

    text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 28, "patch_size": 14}
    model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=text, vision_config=vision,
                                                              mm_tokens_per_image=4))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with pytest.raises(PrunekitError, match="model type 'gemma3' holds 2 stacks of blocks .*vision_tower.*"
                                            "language_model.*save the part to prune") as info:
        prunekit.prune(model, {"method": "magnitude", "sparsity": 0.5}, progress=False)
    assert "\n" not in str(info.value)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())  # nothing pruned


def test_phi3_blocks_keep_the_same_number_of_heads() -> None:
    """Phi-3 splits q/k/v by the config's head count at run time: blocks with different counts are refused."""
    model = model_of("phi3")
    with pytest.raises(PrunekitError, match="phi3 reads its head count from the config.*--allocation uniform"):
        surgery.prune_heads(model, {0: [0, 2]})
    assert surgery.structure(model)[0].heads == 4  # nothing removed


def test_alibi_falcon_still_loses_ffn_neurons(tmp_path: Path) -> None:
    model = model_of("falcon-alibi")
    result = prunekit.prune(model, {"method": "heads-neurons", "heads_ratio": 0.0, "neurons_ratio": 0.5},
                            tokens(), progress=False)
    assert [s.intermediate for s in surgery.structure(model)] == [32, 32]
    reload_and_compare(model, "falcon-alibi", result, tmp_path / "pruned", plain=True)
