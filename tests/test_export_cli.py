"""`prunekit export`, `prune --export-format`, bytes on disk per tensor kind, and int8 dynamic CPU layers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import one_line_error, run
from prunekit.adapters import get_adapter
from prunekit.evaluate.size import disk_breakdown, disk_line, size_report, tensor_kind
from prunekit.export import ExportSettings, export_model, int8_dynamic, load, read_record, save_model

TEXT = " ".join(["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife. The quick brown fox jumps over the lazy dog."] * 60)


def half_zero(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for layer in get_adapter(model).prunable_layers().values():
            layer.weight[:, : layer.in_features // 2] = 0.0  # half the inputs: not 2:4
    return model


@pytest.fixture
def pruned_dir(tmp_path: Path, tiny_llama: nn.Module, tiny_tokenizer) -> Path:
    return save_model(half_zero(tiny_llama), tiny_tokenizer, tmp_path / "pruned", record={"method": "magnitude"})


def test_export_command_writes_a_smaller_folder_that_reloads(capsys, tmp_path, pruned_dir, tiny_llama):
    out = tmp_path / "packed"
    code, stdout, err = run(capsys, "export", str(pruned_dir), "--format", "sparse-bitmask", "--dtype", "bf16",
                            "--out", str(out))
    assert code == 0, err
    assert "exported 14 block layers as sparse-bitmask (bfloat16 values)" in stdout
    assert "reload with prunekit.load" in stdout
    model, _, record = load(out, dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[2, 5, 9]])).logits,
                           tiny_llama.to(torch.bfloat16)(torch.tensor([[2, 5, 9]])).logits)
    assert record["method"] == "magnitude" and record["export"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("args,fragment", [
    (["--format", "bitmask"], "unknown export format 'bitmask'"),
    (["--format", "sparse-24-bitmask"], "is not 2:4 sparse"),
    (["--format", "dense", "--quantize", "int4", "--group-size", "48"], "int4 group size 48 does not divide"),
    (["--quantize", "int4"], "int4 weights are stored packed"),
])
def test_export_command_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, pruned_dir, args, fragment):
    out = tmp_path / "packed"
    code, _, err = run(capsys, "export", str(pruned_dir), *args, "--out", str(out))
    one_line_error(code, err, fragment)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_export_command_refuses_an_exported_folder(capsys, tmp_path, pruned_dir):
    assert run(capsys, "export", str(pruned_dir), "--out", str(tmp_path / "a"))[0] == 0
    code, _, err = run(capsys, "export", str(tmp_path / "a"), "--format", "dense", "--quantize", "int8",
                       "--out", str(tmp_path / "b"))
    one_line_error(code, err, "is already compressed (sparse-bitmask)")
    assert not (tmp_path / "b").exists()


def test_prune_writes_its_output_compressed(capsys, tmp_path, tiny_llama_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", str(tiny_llama_dir), "--method", "wanda", "--structure", "2:4",
                            "--calib", f"text:{corpus}", "--calib-samples", "4", "--seq-len", "16", "--device", "cpu",
                            "--export-format", "sparse-24-bitmask", "--export-quantize", "int8", "--out", str(out))
    assert code == 0, err
    assert "stored as sparse-24-bitmask + naive-quantized int8 channel (int8 values, bfloat16 scales)" in stdout
    record = read_record(out)
    assert record["method"] == "wanda" and record["export"]["quantize"] == "int8"
    model, _, _ = load(out)
    for layer in get_adapter(model).prunable_layers().values():
        nonzero = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(dim=2)
        assert int(nonzero.max()) <= 2
    code, _, err = run(capsys, "prune", str(tiny_llama_dir), "--method", "wanda", "--sparsity", "0.5", "--calib",
                       f"text:{corpus}", "--export-format", "sparse-24-bitmask", "--out", str(tmp_path / "x"))
    one_line_error(code, err, "--export-format sparse-24-bitmask needs 2:4 zeros: add --structure 2:4")


def test_finetune_writes_its_output_compressed_and_refuses_a_pattern_the_zeros_do_not_follow(capsys, tmp_path,
                                                                                               pruned_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "recovered"
    code, stdout, err = run(capsys, "finetune", str(pruned_dir), "--data", f"text:{corpus}", "--max-steps", "1",
                            "--batch-size", "2", "--seq-len", "16", "--no-progress", "--export-format",
                            "sparse-bitmask", "--out", str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    model, _, record = load(out)
    assert record["export"]["format"] == "sparse-bitmask" and "recovery" in record
    for layer in get_adapter(model).prunable_layers().values():  # the zeros of half_zero survived training
        assert torch.all(layer.weight[:, : layer.in_features // 2] == 0)
    code, _, err = run(capsys, "finetune", str(pruned_dir), "--data", f"text:{corpus}", "--max-steps", "1",
                       "--batch-size", "2", "--seq-len", "16", "--no-progress", "--export-format", "sparse-42",
                       "--out", str(tmp_path / "bad"))
    one_line_error(code, err, "sparse-42")
    assert not (tmp_path / "bad").exists()


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A safetensors file written by hand (zeros as data); returns its header size (8 + JSON)."""
    sizes = {"F32": 4, "BF16": 2, "U8": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        count = sizes[dtype]
        for dim in shape:
            count *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + count]}
        offset += count
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return 8 + len(raw)


def test_bytes_on_disk_by_tensor_kind_golden(tmp_path):
    header = write_safetensors(tmp_path / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight": ("F32", [4, 8]),  # 128 bytes
        "model.layers.0.mlp.up_proj.bitmask": ("U8", [4, 1]),  # 4 bytes
        "model.embed_tokens.weight": ("BF16", [10, 4]),  # 80 bytes
        "lm_head.weight": ("BF16", [10, 4]),  # 80 bytes
        "model.norm.weight": ("F32", [4]),  # 16 bytes
    })
    by_kind, storage = disk_breakdown(tmp_path)
    assert by_kind == {"block_weights": 132, "embeddings": 160, "other": 16 + header}
    assert sum(by_kind.values()) == (tmp_path / "model.safetensors").stat().st_size
    assert storage == "dense; floats in bfloat16"  # no compressed-tensors config; bfloat16 holds most float bytes
    assert [tensor_kind(n) for n in ("transformer.h.11.attn.c_attn.weight", "transformer.wte.weight",
                                     "bert.embeddings.LayerNorm.weight", "classifier.weight")] == \
        ["block_weights", "embeddings", "embeddings", "other"]


def test_size_report_names_the_format_and_the_runtime(tmp_path, tiny_llama):
    out = export_model(half_zero(tiny_llama), None, tmp_path / "m", ExportSettings("sparse-bitmask"))
    model, _, _ = load(out)
    size = size_report(model, path=out)
    assert size.disk_format == "sparse-bitmask; floats in bfloat16"
    assert size.runtime == "PyTorch eager, dense float32 weights"
    assert size.disk_by_kind is not None and sum(size.disk_by_kind.values()) == size.bytes_on_disk
    line = disk_line({"disk_by_kind": size.disk_by_kind, "disk_format": size.disk_format, "runtime": size.runtime})
    assert line is not None and line.startswith("on disk: block weights ")
    assert "(sparse-bitmask; floats in bfloat16); runs as: PyTorch eager" in line
    assert disk_line({"disk_by_kind": None}) is None


def test_int8_dynamic_copy_quantises_every_linear_and_keeps_zeros(tiny_llama):
    model = half_zero(tiny_llama)
    quantized = int8_dynamic(model)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    kinds = {type(quantized.get_submodule(name)).__name__ for name in linears}
    assert kinds == {"Linear"} and all(isinstance(model.get_submodule(n), nn.Linear) for n in linears)
    assert size_report(quantized).runtime.endswith(f"{len(linears)} int8 dynamic linear layers")
    layer = quantized.get_submodule("model.layers.0.mlp.up_proj")
    weight = layer.weight().dequantize()
    assert bool((weight[:, :16] == 0).all())  # symmetric per-channel int8: a zero stays zero
    original = model.get_submodule("model.layers.0.mlp.up_proj").weight
    step = original.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((weight - original).abs() <= step / 2 + 1e-6).all())  # within half a step of the float weight
    partly = int8_dynamic(model, keep_float=("down_proj", "lm_head"))
    assert isinstance(partly.model.layers[1].mlp.down_proj, nn.Linear) and isinstance(partly.lm_head, nn.Linear)
    assert not isinstance(partly.model.layers[1].mlp.up_proj, nn.Linear)
    ids = torch.tensor([[2, 5, 9, 17, 33]])
    with torch.no_grad():
        assert torch.allclose(quantized(ids).logits, model(ids).logits, atol=0.05)
        assert quantized.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)
