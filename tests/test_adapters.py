"""Adapters: for every family, the right adapter, the right layers, the right sizes."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import prunekit.adapters as adapters_module
from prunekit.adapters import (
    GenericAdapter,
    ModelAdapter,
    get_adapter,
    grad_view,
    is_linear,
    keep_inputs,
    keep_outputs,
    make_linear_like,
    model_head,
    register_adapter,
    structured_adapter,
    weight_view,
)
from prunekit.adapters.bert import BertAdapter, DistilBertAdapter
from prunekit.adapters.gpt2 import GPT2Adapter
from prunekit.adapters.gpt_neox import GPTNeoXAdapter
from prunekit.adapters.llama import LlamaAdapter
from prunekit.adapters.opt import OPTAdapter
from prunekit.errors import PrunekitError

# family -> (adapter class, block list name in the model, linears per block,
#            num_heads, num_kv_heads, head_dim, hidden, intermediate)
EXPECTED = {
    "llama": (LlamaAdapter, "model.layers", 7, 4, 2, 8, 32, 64),
    "qwen2": (LlamaAdapter, "model.layers", 7, 4, 2, 8, 32, 64),
    "gpt2": (GPT2Adapter, "transformer.h", 4, 4, 4, 8, 32, 64),
    "opt": (OPTAdapter, "model.decoder.layers", 6, 4, 4, 8, 32, 64),
    "bert": (BertAdapter, "bert.encoder.layer", 6, 4, 4, 8, 32, 64),
    "distilbert": (DistilBertAdapter, "distilbert.transformer.layer", 6, 4, 4, 8, 32, 64),
    "gpt_neox": (GPTNeoXAdapter, "gpt_neox.layers", 4, 4, 4, 8, 32, 64),
}
FAMILIES = list(EXPECTED)


@pytest.mark.parametrize("family", FAMILIES)
def test_get_adapter_picks_the_family(make_tiny_model, family):
    model = make_tiny_model(family)
    adapter = get_adapter(model)
    assert type(adapter) is EXPECTED[family][0]
    assert adapter.blocks_prefix() == EXPECTED[family][1]
    assert adapter.num_layers() == 2
    assert adapter.blocks() is model.get_submodule(EXPECTED[family][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_prunable_layers_are_the_linear_layers_of_every_block(make_tiny_model, family):
    model = make_tiny_model(family)
    adapter = get_adapter(model)
    layers = adapter.prunable_layers()
    modules = dict(model.named_modules())
    per_block = EXPECTED[family][2]
    assert len(adapter.block_linear_names()) == per_block
    assert len(layers) == 2 * per_block
    for name, layer in layers.items():
        assert modules[name] is layer, name  # the name is the module's real name in the model
        assert is_linear(layer)
        assert isinstance(layer, Conv1D if family == "gpt2" else nn.Linear), name
        assert name.startswith(EXPECTED[family][1] + ".")
    # every linear layer inside the blocks is listed, and nothing outside them (heads, embeddings)
    prefix = EXPECTED[family][1] + "."
    in_blocks = {n for n, m in model.named_modules() if n.startswith(prefix) and is_linear(m)}
    assert set(layers) == in_blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_sizes_come_from_the_config(make_tiny_model, family):
    adapter = get_adapter(make_tiny_model(family))
    _, _, _, heads, kv_heads, head_dim, hidden, intermediate = EXPECTED[family]
    assert adapter.num_heads() == heads
    assert adapter.num_kv_heads() == kv_heads
    assert adapter.head_dim() == head_dim
    assert adapter.hidden_size() == hidden
    assert adapter.intermediate_size() == intermediate
    described = adapter.describe()
    assert json.loads(json.dumps(described)) == described  # JSON-friendly, for records
    assert described["num_blocks"] == 2


def test_llama_gqa_has_fewer_kv_heads_and_matching_projection_shapes(tiny_llama):
    adapter = get_adapter(tiny_llama)
    assert adapter.num_kv_heads() < adapter.num_heads()
    block = adapter.blocks()[0]
    linears = adapter.block_linears(block)
    kv_width = adapter.num_kv_heads() * adapter.head_dim()
    assert weight_view(linears["self_attn.q_proj"]).shape == (adapter.num_heads() * adapter.head_dim(), 32)
    assert weight_view(linears["self_attn.k_proj"]).shape == (kv_width, 32)
    assert weight_view(linears["self_attn.v_proj"]).shape == (kv_width, 32)
    assert adapter.attention_inputs() == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert adapter.attention(block) is block.self_attn


def test_gpt2_attention_is_fused(tiny_gpt2):
    adapter = get_adapter(tiny_gpt2)
    assert adapter.attention_inputs() == ("attn.c_attn",)
    assert weight_view(adapter.block_linears(adapter.blocks()[0])["attn.c_attn"]).shape == (3 * 32, 32)


def test_gpt2_without_n_inner_has_four_times_hidden(make_tiny_model):
    adapter = get_adapter(make_tiny_model("gpt2", n_inner=None))
    assert adapter.intermediate_size() == 4 * 32


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_base_models_without_head_work_too(make_tiny_model, family):
    model = make_tiny_model(family, task="base")
    adapter = get_adapter(model)
    assert adapter.blocks_prefix() == {"llama": "layers", "bert": "encoder.layer"}[family]
    assert len(adapter.prunable_layers()) == 2 * EXPECTED[family][2]


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_view_is_out_by_in_for_every_layer(make_tiny_model, family):
    """The view's rows are the layer's outputs and its columns its inputs, whatever the storage."""
    model = make_tiny_model(family)
    for name, layer in get_adapter(model).prunable_layers().items():
        view = weight_view(layer)
        n_out, n_in = view.shape
        with torch.no_grad():
            assert layer(torch.zeros(1, n_in)).shape == (1, n_out), name


def test_weight_view_of_conv1d_is_the_transpose_and_writes_through(tiny_gpt2):
    layer = tiny_gpt2.transformer.h[0].mlp.c_fc
    assert isinstance(layer, Conv1D)
    view = weight_view(layer)
    assert torch.equal(view, layer.weight.t())
    assert view.data_ptr() == layer.weight.data_ptr()  # a view, not a copy
    view[5, :] = 0.0  # output 5 reads nothing
    assert torch.all(layer.weight[:, 5] == 0)
    with torch.no_grad():
        out = layer(torch.randn(3, 32))
    assert torch.allclose(out[:, 5], layer.bias[5].expand(3))


def test_weight_view_of_linear_is_the_weight_and_writes_through(tiny_llama):
    layer = tiny_llama.model.layers[1].mlp.down_proj
    view = weight_view(layer)
    assert view.data_ptr() == layer.weight.data_ptr()
    view[:, 3] = 0.0
    assert torch.all(layer.weight[:, 3] == 0)


def test_weight_view_refuses_other_layers():
    with pytest.raises(TypeError, match="not a linear layer"):
        weight_view(nn.LayerNorm(4))
    assert not is_linear(nn.Embedding(3, 4))


def test_generic_adapter_finds_blocks_through_no_split_modules(make_tiny_model):
    model = make_tiny_model("gpt_neox")
    assert model.config.model_type == "gpt_neox"
    adapter = GenericAdapter(model)  # what a family without an adapter gets
    assert adapter.blocks() is model.gpt_neox.layers
    assert set(adapter.block_linear_names()) == {"attention.query_key_value", "attention.dense",
                                                 "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}
    # structured methods need to know which layer is which: the generic adapter says it does not
    with pytest.raises(PrunekitError, match="structured pruning needs an adapter"):
        adapter.attention_inputs()


def test_generic_adapter_falls_back_to_the_largest_list_of_blocks(make_tiny_model):
    model = make_tiny_model("gpt_neox", num_hidden_layers=3)
    model._no_split_modules = None
    adapter = GenericAdapter(model)
    assert adapter.blocks() is model.gpt_neox.layers
    assert len(adapter.prunable_layers()) == 3 * 4


class _NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", hidden_size=4)
        self.proj = nn.Linear(4, 4)


def test_model_without_blocks_raises_a_clear_error():
    with pytest.raises(PrunekitError, match="no adapter for model type 'toy' and no transformer blocks"):
        get_adapter(_NoBlocks())


def test_bare_module_without_config_gets_a_prunekit_error_not_an_attribute_error():
    with pytest.raises(PrunekitError, match="no transformer blocks"):
        get_adapter(nn.Sequential(nn.Linear(4, 4)))


def test_bare_stack_of_blocks_without_config_is_handled_generically():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(3))
    adapter = get_adapter(model)
    assert isinstance(adapter, GenericAdapter)
    assert sorted(adapter.prunable_layers()) == [f"layers.{i}.{j}" for i in range(3) for j in (0, 2)]


def test_register_adapter_wins_over_builtins(monkeypatch, make_tiny_model):
    monkeypatch.setattr(adapters_module, "ADAPTERS", list(adapters_module.ADAPTERS))

    @register_adapter
    class NeoXAdapter(ModelAdapter):
        family = "neox"
        model_types = ("gpt_neox",)
        blocks_path = "layers"
        attention_path = "attention"
        qkv_fused = "attention.query_key_value"
        o_proj = "attention.dense"
        mlp_in = ("mlp.dense_h_to_4h",)
        mlp_out = "mlp.dense_4h_to_h"

    adapter = get_adapter(make_tiny_model("gpt_neox"))
    assert isinstance(adapter, NeoXAdapter)
    assert len(adapter.prunable_layers()) == 8
    assert adapter.attention_inputs() == ("attention.query_key_value",)


def test_adapter_naming_a_non_linear_layer_is_refused(monkeypatch, tiny_llama):
    class Broken(LlamaAdapter):
        o_proj = "input_layernorm"

    with pytest.raises(PrunekitError, match="'input_layernorm' is a LlamaRMSNorm, not a linear layer"):
        Broken(tiny_llama).prunable_layers()


def test_adapter_with_a_wrong_block_path_is_refused(tiny_llama):
    class Broken(LlamaAdapter):
        blocks_path = "norm"

    with pytest.raises(PrunekitError, match="not a list of blocks"):
        Broken(tiny_llama).blocks()


# ---- which head a model carries ---------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "task", "head"), [
    ("llama", "causal-lm", "causal-lm"), ("qwen2", "causal-lm", "causal-lm"), ("gpt2", "causal-lm", "causal-lm"),
    ("opt", "causal-lm", "causal-lm"), ("gpt_neox", "causal-lm", "causal-lm"),
    ("bert", "classification", "classification"), ("distilbert", "classification", "classification"),
    ("llama", "classification", "classification"), ("gpt2", "classification", "classification"),
    ("llama", "base", "base"), ("bert", "base", "base"), ("gpt2", "base", "base"),
])
def test_model_head_comes_from_the_transformers_registry(make_tiny_model, family, task, head):
    assert model_head(make_tiny_model(family, task=task)) == head


def test_model_head_does_not_read_class_names(make_tiny_model):
    class Renamed(type(make_tiny_model("llama"))):  # a subclass with a name that says nothing
        pass

    model = make_tiny_model("llama")
    model.__class__ = Renamed
    assert model_head(model) == "causal-lm"
    assert model_head(nn.Linear(2, 2)) == "base"  # no config at all


# ---- layer kinds ------------------------------------------------------------------------------------------
def _pair() -> tuple[nn.Linear, Conv1D]:
    """An nn.Linear and a Conv1D computing the same 6 -> 4 map."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    conv = Conv1D(4, 6)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    return linear, conv


def test_grad_view_is_out_by_in_for_both_kinds():
    x = torch.randn(3, 6)
    grads = []
    for layer in _pair():
        assert grad_view(layer) is None  # before backward
        layer(x).square().sum().backward()
        grad = grad_view(layer)
        assert grad is not None and grad.shape == (4, 6)
        grads.append(grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(TypeError, match="not a linear layer"):
        grad_view(nn.LayerNorm(4))


def test_keep_outputs_and_inputs_slice_both_kinds_alike():
    x = torch.randn(3, 6)
    outputs = torch.tensor([0, 3])
    inputs = torch.tensor([1, 2, 5])
    results = []
    for layer in _pair():
        keep_outputs(layer, outputs)
        keep_inputs(layer, inputs)
        assert weight_view(layer).shape == (2, 3)
        with torch.no_grad():
            results.append(layer(x[:, inputs]))
    assert torch.allclose(results[0], results[1], atol=1e-6)
    with pytest.raises(TypeError, match="not a linear layer"):
        keep_outputs(nn.LayerNorm(4), outputs)


@pytest.mark.parametrize("with_bias", [True, False])
def test_make_linear_like_rebuilds_the_same_kind(with_bias):
    x = torch.randn(3, 6)
    for layer in _pair():
        bias = layer.bias.detach() if with_bias else None
        rebuilt = make_linear_like(weight_view(layer).clone(), bias, like=layer)
        assert type(rebuilt) is type(layer) and torch.equal(weight_view(rebuilt), weight_view(layer))
        assert make_linear_like(weight_view(layer), bias, like=type(layer)).__class__ is type(layer)
        with torch.no_grad():
            expected = layer(x) if with_bias else x @ weight_view(layer).t()
            assert torch.allclose(rebuilt(x), expected, atol=1e-6)
    with pytest.raises(TypeError, match="not a linear layer"):
        make_linear_like(torch.zeros(2, 2), None, like=nn.LayerNorm)


def test_layer_kinds_are_known_only_inside_the_adapters_package():
    """Conv1D (and any other layer kind) is special-cased in prunekit/adapters and nowhere else."""
    src = Path(adapters_module.__file__).parent.parent
    outside = []
    for path in src.rglob("*.py"):
        if "adapters" in path.relative_to(src).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else []
            if "Conv1D" in names or (isinstance(node, ast.Name) and node.id == "Conv1D") or (
                    isinstance(node, ast.Attribute) and node.attr == "Conv1D"):
                outside.append(str(path.relative_to(src)))
    assert outside == []


# ---- what a family's config can say, and refusals ---------------------------------------------------------
def test_llama_family_config_switches(make_tiny_model):
    llama, gpt2 = get_adapter(make_tiny_model("llama")), get_adapter(make_tiny_model("gpt2"))
    assert llama.config_head_dim and not gpt2.config_head_dim
    assert llama.bias_flag("attention") == "attention_bias" and llama.bias_flag("mlp") == "mlp_bias"
    assert gpt2.bias_flag("attention") is None
    qwen2 = get_adapter(make_tiny_model("qwen2"))  # a llama-family config without the switches
    assert qwen2.bias_flag("attention") is None and qwen2.bias_flag("mlp") is None


def test_structured_layouts_are_refused_by_the_adapter(make_tiny_model, tiny_llama):
    structured_adapter(tiny_llama)  # names everything: accepted
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4))  # no adapter
    with pytest.raises(PrunekitError, match="model type 'bloom' has no adapter") as info:
        structured_adapter(bloom)
    assert "\n" not in str(info.value)

    class NoMlp(LlamaAdapter):
        mlp_out = ""

    with pytest.raises(PrunekitError, match="needs an adapter that names the attention and MLP layers"):
        NoMlp(tiny_llama).require_structured()
