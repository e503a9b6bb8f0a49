"""Sequential onloading of structured pruning (heads-neurons, blocks): the full load's model, few blocks in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cli_helpers import one_line_error, run, saved_tensors, text_corpus
from conftest import build_tiny_model, build_tiny_tokenizer


@pytest.fixture
def text_data(tmp_path: Path) -> str:
    return text_corpus(tmp_path)


def model_dir(tmp_path: Path, family: str = "llama", layers: int = 4, **overrides: Any) -> Path:
    folder = tmp_path / "model"
    build_tiny_model(family, num_hidden_layers=layers, **overrides).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def prune_both(capsys: pytest.CaptureFixture[str], tmp_path: Path, folder: Path, text_data: str,
               *method: str) -> dict[str, Path]:
    """The same run with --onload never and always; asserts both ran, the second onloaded (no fallback note)."""
    outs = {}
    for mode in ("never", "always"):
        outs[mode] = tmp_path / f"out-{mode}"
        code, _, err = run(capsys, "prune", str(folder), *method, "--calib", text_data, "--calib-samples", "6",
                        "--seq-len", "16", "--micro-batch-size", "4", "--out", str(outs[mode]), "--device", "cpu",
                        "--onload", mode)
        assert code == 0, err
        assert "sequential onloading" not in err, err
    return outs


def assert_same_output(outs: dict[str, Path]) -> dict[str, Any]:
    """Same tensors, config and method facts; the onloaded record says so. Returns the onloaded record."""
    full, onloaded = saved_tensors(outs["never"]), saved_tensors(outs["always"])
    assert sorted(full) == sorted(onloaded)
    for name, tensor in full.items():
        assert tensor.dtype == onloaded[name].dtype and torch.equal(tensor, onloaded[name]), name
    configs = [json.loads((outs[m] / "config.json").read_text()) for m in ("never", "always")]
    assert configs[0] == configs[1]
    records = [json.loads((outs[m] / "prunekit.json").read_text()) for m in ("never", "always")]
    assert records[0]["method_result"] == records[1]["method_result"]
    assert records[0]["sparsity"] == records[1]["sparsity"]
    assert records[0]["loader"] == records[1]["loader"] and records[0].get("structure") == records[1].get("structure")
    assert "onload" not in records[0] and records[1]["onload"]["blocks_in_memory_at_most"] <= 2
    assert "twice" in records[1]["onload"]["weights"]
    return records[1]


def assert_same_logits(outs: dict[str, Path], plain: bool) -> None:
    from transformers import AutoModelForCausalLM

    from prunekit.models import load

    def reload(folder: Path) -> Any:
        return AutoModelForCausalLM.from_pretrained(folder) if plain else load(folder)[0]

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reload(outs["always"])(ids).logits, reload(outs["never"])(ids).logits)


@pytest.mark.parametrize("method", [
    ("--method", "heads-neurons", "--ratio", "0.25", "--importance", "magnitude"),
    ("--method", "heads-neurons", "--ratio", "0.25"),  # flap, with bias compensation
    ("--method", "heads-neurons", "--ratio", "0.25", "--dtype", "bfloat16"),  # bf16 compute from float32 files
    ("--method", "heads-neurons", "--ratio", "0.5", "--importance", "wanda", "--gqa", "groups"),
    ("--method", "blocks", "--remove", "1"),
])
def test_onloaded_structured_output_equals_the_full_load(capsys, tmp_path: Path, text_data: str,
                                                         method: tuple[str, ...]) -> None:
    """Llama with grouped-query attention (4 query heads, 2 key/value heads); plain from_pretrained reloads it."""
    folder = model_dir(tmp_path, tie_word_embeddings=method[1] == "blocks")
    outs = prune_both(capsys, tmp_path, folder, text_data, *method)
    record = assert_same_output(outs)
    assert record["loader"] is None
    result = record["method_result"]
    if method[1] == "blocks":
        assert json.loads((outs["always"] / "config.json").read_text())["num_hidden_layers"] == 3
    else:
        assert result["heads_removed_fraction"] > 0 and result["neurons_removed_fraction"] > 0
        assert result["bias_compensation"] == ("on" if "--importance" not in method else "off")
    if "bfloat16" in method:
        assert all(t.dtype == torch.bfloat16 for t in saved_tensors(outs["always"]).values())
    assert_same_logits(outs, plain=True)


def test_onloaded_global_allocation_reloads_with_prunekit(capsys, tmp_path: Path, text_data: str) -> None:
    """Sizes that differ per block: the config records them and prunekit.load rebuilds the model."""
    folder = model_dir(tmp_path, intermediate_size=48)
    outs = prune_both(capsys, tmp_path, folder, text_data, "--method", "heads-neurons", "--ratio", "0.3",
                      "--allocation", "global")
    record = assert_same_output(outs)
    assert record["loader"] == "structured"
    assert len({layer["intermediate"] for layer in record["structure"]["layers"]}) > 1
    assert_same_logits(outs, plain=False)


def test_onloaded_fused_attention_family(capsys, tmp_path: Path, text_data: str) -> None:
    """GPT-2: fused q/k/v Conv1D layers, biases everywhere (flap compensates into them), heads from the config."""
    folder = model_dir(tmp_path, "gpt2", layers=3)
    outs = prune_both(capsys, tmp_path, folder, text_data, "--method", "heads-neurons", "--ratio", "0.25")
    record = assert_same_output(outs)
    assert record["loader"] == "structured"  # GPT-2's config cannot say fewer heads
    assert_same_logits(outs, plain=False)


@pytest.mark.parametrize("method", ["heads-neurons", "blocks"])
def test_only_a_bounded_number_of_blocks_is_in_memory(tmp_path: Path, text_data: str, method: str) -> None:
    from prunekit.data import calibration_batch, load_data
    from prunekit.onload import Onloader, build_skeleton
    from prunekit.onload_structured import prune_structured
    from prunekit.pruning import resolve_config

    folder = model_dir(tmp_path, layers=6)
    model = build_skeleton(folder, "causal-lm", torch.float32)
    onloader = Onloader(model, folder)
    counts: list[int] = []
    for block in onloader.blocks:  # count at every forward of any block, in capture and in both passes
        block.register_forward_pre_hook(lambda *_: counts.append(onloader.materialised_blocks()))
    calibration = calibration_batch(build_tiny_tokenizer(), load_data(text_data), 6, 16, seed=0)
    settings = {"ratio": 0.25} if method == "heads-neurons" else {"remove": 2}
    spec, config = resolve_config({"method": method, "micro_batch_size": 2, **settings})
    out = tmp_path / "out"
    out.mkdir()
    result, pruned = prune_structured(model, onloader, spec, config, calibration, out, device="cpu", progress=False)
    assert counts and max(counts) <= 2, counts
    assert 1 <= onloader.peak_blocks <= 2
    assert onloader.materialised_blocks() == 0
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(p.device.type == "meta" for p in pruned.parameters())
    assert result.kind == "structured" and result.extra["parameters_after"] < result.extra["parameters_before"]
    assert (out / "model.safetensors").exists()


def test_taylor_is_refused_with_one_note(capsys, tmp_path: Path, text_data: str) -> None:
    folder = model_dir(tmp_path, layers=2)
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", str(folder), "--method", "heads-neurons", "--ratio", "0.25", "--importance",
                    "taylor", "--calib", text_data, "--calib-samples", "4", "--seq-len", "16", "--out", str(out),
                    "--device", "cpu", "--onload", "always")
    assert code == 0, err
    notes = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("prunekit:")]
    assert len(notes) == 1 and "importance taylor" in notes[0] and notes[0].endswith("loading the whole model")
    assert "onload" not in json.loads((out / "prunekit.json").read_text())


def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, tmp_path: Path, text_data: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import prunekit.onload_structured as onload_structured

    folder = model_dir(tmp_path, layers=2)
    real = shutil.disk_usage
    monkeypatch.setattr(onload_structured.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1000))  # checked before the scores pass
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", str(folder), "--method", "heads-neurons", "--ratio", "0.25", "--calib",
                    text_data, "--calib-samples", "4", "--seq-len", "16", "--out", str(out), "--device", "cpu",
                    "--onload", "always")
    one_line_error(code, err, "not enough disk space", bars=True)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
