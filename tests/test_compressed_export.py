"""Compressed exports (compressed-tensors formats): exact reloads, every zero kept, golden layouts, bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from prunekit.adapters import get_adapter
from prunekit.compressed_load import compression_config, unpack_bitmasks
from prunekit.errors import PrunekitError
from prunekit.export import ExportSettings, export_folder, export_model, load, read_record, save_model
from prunekit.export.quantize import bitmask
from prunekit.masks import Structure, nm_mask

IDS = torch.tensor([[2, 5, 9, 17, 33, 60, 4, 8]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def pruned(make_tiny_model: Callable[..., nn.Module], structure: str = "unstructured", **config: object) -> nn.Module:
    """A tiny llama whose block linears are half zeros: at random, or 2:4 by magnitude."""
    model = make_tiny_model("llama", **config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in get_adapter(model).prunable_layers().values():
            if structure == "2:4":
                layer.weight.mul_(nm_mask(layer.weight.abs(), Structure(2, 4)))
            else:
                layer.weight.mul_(torch.rand(layer.weight.shape, generator=generator) >= 0.5)
    return model


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach() for name, layer in get_adapter(model).prunable_layers().items()}


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("fmt,structure,dtype", [
    ("sparse-bitmask", "unstructured", "bfloat16"),
    ("sparse-bitmask", "unstructured", "float16"),
    ("sparse-24-bitmask", "2:4", "bfloat16"),
    ("sparse-bitmask", "2:4", "bfloat16"),
    ("dense", "unstructured", "bfloat16"),
])
def test_sparse_export_reloads_the_same_model_cast_to_its_dtype(tmp_path, make_tiny_model, tiny_tokenizer, fmt,
                                                               structure, dtype):
    model = pruned(make_tiny_model, structure, tie_word_embeddings=True)
    out = export_model(model, tiny_tokenizer, tmp_path / "m", ExportSettings(format=fmt, dtype=dtype),
                       record={"method": "test", "task": "causal-lm"})
    torch_dtype = getattr(torch, dtype)
    reloaded, tokenizer, record = load(out, dtype=dtype)
    cast = pruned(make_tiny_model, structure, tie_word_embeddings=True).to(torch_dtype)
    assert torch.equal(logits(reloaded), logits(cast))  # same values, same dtype: the same logits, exactly
    for name, weight in block_weights(reloaded).items():
        assert torch.equal(weight, block_weights(cast)[name])
        assert torch.equal(weight == 0, block_weights(model)[name] == 0)  # every zero kept, no new ones
    assert tokenizer is not None and record["method"] == "test"
    assert record["export"]["format"] == fmt and record["export"]["plain_transformers"] == (fmt == "dense")
    # the default float32 reload holds the stored values exactly
    float_model, _, _ = load(out)
    assert torch.equal(block_weights(float_model)["model.layers.1.mlp.down_proj"],
                       block_weights(model)["model.layers.1.mlp.down_proj"].to(torch_dtype).float())
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in stored  # tied to the embeddings: stored once
    assert ("model.layers.0.mlp.up_proj.bitmask" in stored) == (fmt != "dense")


def test_the_bitmask_layouts_golden():
    weight = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [0, 0, 0, 0, 4, 0, 0, 0]])
    parts = bitmask(weight, "sparse-bitmask")
    assert parts["compressed"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert parts["bitmask"].tolist() == [[0b10000101], [0b00010000]]  # bit i of a byte = input i, low bit first
    assert parts["row_offsets"].tolist() == [0, 3]
    assert parts["shape"].tolist() == [2, 8]
    two_four = torch.tensor([[0.0, 5, -7, 0, 1, 0, 0, 2], [3, 0, 0, -1, 0, 0, 6, 0.5]])
    parts = bitmask(two_four, "sparse-24-bitmask")
    assert parts["compressed"].tolist() == [[5.0, -7.0, 1.0, 2.0], [3.0, -1.0, 6.0, 0.5]]
    assert parts["bitmask"].tolist() == [[0b10010110], [0b11001001]]
    assert parts["shape"].tolist() == [[2], [8]]
    # a group with fewer than two nonzeros keeps a zero; -128 is kept although its int8 abs overflows
    ints = torch.tensor([[-128, 0, 0, 1, 0, 0, 0, 0]], dtype=torch.int8)
    parts = bitmask(ints, "sparse-24-bitmask")
    assert parts["compressed"][0, :2].tolist() == [-128, 1] and parts["compressed"][0, 2:].tolist() == [0, 0]
    back = unpack_bitmasks({f"x.{k}": v for k, v in parts.items()}, "sparse-24-bitmask")
    assert torch.equal(back["x.weight"], ints)


def test_the_config_names_the_format_and_each_layer(tmp_path, make_tiny_model):
    model = pruned(make_tiny_model)
    out = export_model(model, None, tmp_path / "m", ExportSettings("sparse-bitmask"))
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert config["dtype"] == "bfloat16" and compression_config(out) == quantization
    assert quantization["quant_method"] == "compressed-tensors"
    sparsity = quantization["sparsity_config"]
    assert sparsity["format"] == "sparse-bitmask" and sparsity["sparsity_structure"] == "unstructured"
    assert sorted(sparsity["targets"]) == sorted(get_adapter(model).prunable_layers())
    zeros = sum(int((w == 0).sum()) for w in block_weights(model).values())
    assert sparsity["global_sparsity"] == pytest.approx(zeros / sum(w.numel() for w in block_weights(model).values()))


def expected_int8(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric int8 per output channel, worked out by hand: scale = max |w| / 127.5 stored in ``dtype``,
    q = round(w / scale) in [-128, 127] from the float32 weight, value = q * scale in ``dtype``."""
    scale = (weight.float().abs().amax(dim=1, keepdim=True) / 127.5).to(dtype)
    q = torch.clamp(torch.round(weight.float() / scale.float()), -128, 127)
    return (q * scale.float()).to(dtype)


@pytest.mark.parametrize("fmt", ["dense", "sparse-bitmask"])
def test_int8_weights_are_the_hand_quantised_ones_with_every_zero_kept(tmp_path, make_tiny_model, fmt):
    model = pruned(make_tiny_model)
    out = export_model(model, None, tmp_path / "m", ExportSettings(format=fmt, quantize="int8"))
    reloaded, _, record = load(out, dtype="bfloat16")
    for name, weight in block_weights(reloaded).items():
        original = block_weights(model)[name]
        assert torch.allclose(weight.float(), expected_int8(original, torch.bfloat16).float(), rtol=0, atol=1e-6)
        assert bool((weight[original == 0] == 0).all())
    assert record["export"]["storage"] == ("pack-quantized int8 channel" if fmt == "dense"
                                           else "sparse-bitmask + naive-quantized int8 channel")


def test_int4_groups_quantise_each_group_on_its_own_range(tmp_path, make_tiny_model):
    model = pruned(make_tiny_model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :16] *= 100  # group 1 of row 0 is far larger than group 2
    out = export_model(model, None, tmp_path / "m", ExportSettings(format="dense", quantize="int4", group_size=16,
                                                                   dtype="float32"))
    reloaded, _, _ = load(out)
    original = model.model.layers[0].mlp.up_proj.weight.detach()
    got = reloaded.model.layers[0].mlp.up_proj.weight.detach()
    for start in (0, 16):
        group = original[0, start:start + 16]
        scale = group.abs().max() / 7.5
        assert torch.allclose(got[0, start:start + 16], torch.clamp(torch.round(group / scale), -8, 7) * scale,
                              atol=1e-6)
    assert bool((got[original == 0] == 0).all())


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantised_dense_export_reloads_with_plain_transformers(tmp_path, make_tiny_model, tiny_tokenizer, quantize):
    model = pruned(make_tiny_model)
    out = export_model(model, tiny_tokenizer, tmp_path / "m",
                       ExportSettings(format="dense", quantize=quantize, group_size=32))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    logits(plain)  # compressed-tensors decompresses on the first forward
    ours, _, _ = load(out, dtype="bfloat16")
    for name, weight in block_weights(ours).items():
        assert torch.equal(plain.get_submodule(name).weight, weight)
    assert torch.isfinite(logits(plain)).all()


def test_structured_models_export_and_reload(tmp_path, make_tiny_model):
    from prunekit.methods import method_config
    from prunekit.pruning import prune

    model = make_tiny_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                            num_hidden_layers=3)
    tokens = torch.randint(4, 100, (8, 12), generator=torch.Generator().manual_seed(2))
    facts = prune(model, method_config("heads-neurons", ratio=0.4, importance="magnitude", allocation="global"),
                  tokens, progress=False).extra
    out = export_model(model, None, tmp_path / "m", ExportSettings(format="dense", quantize="int8"),
                       record={"task": "causal-lm", "loader": facts["loader"]})
    reloaded, _, record = load(out)
    assert record["loader"] == "structured"
    for name, weight in block_weights(reloaded).items():
        assert torch.allclose(weight, expected_int8(block_weights(model)[name], torch.bfloat16).float(), atol=1e-6)


def test_a_classifier_exports_and_reloads_with_its_head(tmp_path, make_tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = make_tiny_model("bert", num_labels=3)
    with torch.no_grad():
        for layer in get_adapter(model).prunable_layers().values():
            layer.weight[:, ::3] = 0.0
    out = export_model(model, None, tmp_path / "m", ExportSettings("sparse-bitmask", dtype="float32"),
                       record={"task": "classification"})
    reloaded, _, _ = load(out)
    assert reloaded.config.num_labels == 3 and isinstance(reloaded, AutoModelForSequenceClassification._model_mapping[
        type(model.config)])
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_export_folder_keeps_the_record_and_refuses_a_compressed_folder(tmp_path, make_tiny_model, tiny_tokenizer):
    model = pruned(make_tiny_model, "2:4")
    source = save_model(model, tiny_tokenizer, tmp_path / "pruned", record={"method": "wanda", "task": "causal-lm"})
    out = export_folder(source, tmp_path / "packed", ExportSettings("sparse-24-bitmask"))
    record = read_record(out)
    assert record["method"] == "wanda" and record["exported_from"] == str(source)
    with pytest.raises(PrunekitError, match="is already compressed \\(sparse-24-bitmask\\): export the dense folder"):
        export_folder(out, tmp_path / "again", ExportSettings("sparse-bitmask"))
    assert_nothing_written(tmp_path, tmp_path / "again")


@pytest.mark.parametrize("settings,message", [
    ({"format": "sparse-48"}, "unknown export format 'sparse-48': use one of dense, sparse-bitmask"),
    ({"quantize": "int3"}, "unknown quantisation 'int3': use one of none, int8, int4"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"format": "sparse-bitmask", "quantize": "int4"}, "int4 weights are stored packed"),
    ({"format": "dense", "quantize": "int4", "group_size": 0}, "--group-size 0 must be at least 1"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(PrunekitError, match=message.replace("(", "\\(")):
        ExportSettings(**settings)


@pytest.mark.parametrize("settings,message", [
    (ExportSettings("sparse-24-bitmask"), "layer model.layers.0.self_attn.q_proj is not 2:4 sparse"),
    (ExportSettings("dense", quantize="int4", group_size=24), "int4 group size 24 does not divide the 32 inputs"),
])
def test_bad_models_are_refused_and_nothing_is_written(tmp_path, make_tiny_model, settings, message):
    with pytest.raises(PrunekitError, match=message):
        export_model(pruned(make_tiny_model), None, tmp_path / "m", settings)
    assert_nothing_written(tmp_path, tmp_path / "m")


def test_conv1d_layers_are_refused(tmp_path, tiny_gpt2):
    with pytest.raises(PrunekitError, match="is a Conv1D; compressed-tensors stores nn.Linear layers only"):
        export_model(tiny_gpt2, None, tmp_path / "m", ExportSettings("sparse-bitmask"))
    assert_nothing_written(tmp_path, tmp_path / "m")
