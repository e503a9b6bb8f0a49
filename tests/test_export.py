"""Export: saved folders reload anywhere with the same outputs; saving is atomic; records and loaders."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import prunekit
from prunekit.adapters import get_adapter, weight_view
from prunekit.errors import PrunekitError
from prunekit.export import RECORD_NAME, load, read_record, save_model, to_jsonable, update_record
from prunekit.models import load_model

IDS = torch.tensor([[2, 5, 9, 17, 33, 60, 4, 8]])
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def leftovers(parent: Path) -> list[str]:
    """Temporary or backup folders that an atomic save may have left beside its output."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_causal_lm_reloads_with_plain_transformers(tmp_path, make_tiny_model, tiny_tokenizer, family):
    model = make_tiny_model(family)
    out = save_model(model, tiny_tokenizer, tmp_path / family, record={"method": "none"})
    assert out == tmp_path / family

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(outputs(reloaded), outputs(model))
    if family != "qwen2":  # transformers reads any tokenizer beside a qwen2 config as a Qwen2Tokenizer
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer("The quick brown fox")["input_ids"] == tiny_tokenizer("The quick brown fox")["input_ids"]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_classifier_reloads_with_plain_transformers(tmp_path, make_tiny_model, tiny_tokenizer, family):
    model = make_tiny_model(family, num_labels=3)
    out = save_model(model, tiny_tokenizer, tmp_path / family)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.num_labels == 3
    # same weights bit for bit; transformers 5.2x's reloaded DistilBERT sums in another order (~1e-9 apart)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    assert torch.allclose(outputs(reloaded), outputs(model), atol=1e-6)
    # prunekit's own loader keeps the saved head (3 labels), whatever its num_labels default says
    again, _, _ = load(out)
    assert again.config.num_labels == 3
    assert torch.allclose(outputs(again), outputs(model), atol=1e-6)


def test_prunekit_load_returns_model_tokenizer_and_record(tmp_path, tiny_llama, tiny_tokenizer):
    record = {"method": "magnitude", "sparsity": 0.5, "task": "causal-lm", "layers": {"a": 0.5}}
    out = save_model(tiny_llama, tiny_tokenizer, tmp_path / "m", record=record)
    model, tokenizer, loaded = load(out)
    assert loaded["prunekit_version"] == prunekit.__version__
    assert loaded["loader"] is None
    assert loaded["created"].endswith("+00:00")
    assert {k: loaded[k] for k in record} == record
    assert loaded == read_record(out)
    assert not model.training
    assert torch.equal(outputs(model), outputs(tiny_llama))
    assert tokenizer.pad_token == "<pad>"
    # load_model recognises a prunekit folder and goes through the same path
    model2, tokenizer2 = load_model(str(out))
    assert torch.equal(outputs(model2), outputs(tiny_llama))


def test_load_without_tokenizer_and_with_a_dtype(tmp_path, tiny_opt):
    out = save_model(tiny_opt, None, tmp_path / "m")
    model, tokenizer, _ = load(out, dtype="bfloat16")
    assert tokenizer is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_only_safetensors_no_pickles(tmp_path, tiny_gpt2, tiny_tokenizer):
    out = save_model(tiny_gpt2, tiny_tokenizer, tmp_path / "m")
    names = files_in(out)
    assert "model.safetensors" in names and RECORD_NAME in names and "config.json" in names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    assert not leftovers(tmp_path)


def test_saved_folder_is_not_private(tmp_path, tiny_llama):
    """The folder gets the usual permissions (umask), not the 0700 of a temporary folder."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = save_model(tiny_llama, None, tmp_path / "m")
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hand_zeroed_weights_survive(tmp_path, make_tiny_model, family):
    model = make_tiny_model(family)
    layers = get_adapter(model).prunable_layers()
    for layer in layers.values():
        view = weight_view(layer)
        view[:, ::2] = 0.0  # half of every layer's inputs, through the (out, in) view (Conv1D included)
    zeros = {name: int((weight_view(layer) == 0).sum()) for name, layer in layers.items()}

    out = save_model(model, None, tmp_path / "zeroed")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded_layers = get_adapter(reloaded).prunable_layers()
    for name, layer in reloaded_layers.items():
        view = weight_view(layer)
        assert int((view == 0).sum()) == zeros[name] >= view.numel() // 2
        assert torch.all(view[:, ::2] == 0)
    assert torch.equal(outputs(reloaded), outputs(model))


def test_existing_folder_is_refused_and_untouched(tmp_path, tiny_llama):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrunekitError, match="already exists: choose another --out or pass --overwrite"):
        save_model(tiny_llama, None, out)
    assert files_in(out) == {"keep.txt"}
    assert (out / "keep.txt").read_text() == "mine"
    assert not leftovers(tmp_path)


def test_a_file_in_the_way_is_refused_even_with_overwrite(tmp_path, tiny_llama):
    out = tmp_path / "m"
    out.write_text("a file")
    with pytest.raises(PrunekitError, match="is not a folder"):
        save_model(tiny_llama, None, out, overwrite=True)
    assert out.read_text() == "a file"


def test_save_refuses_a_plain_torch_module(tmp_path):
    with pytest.raises(PrunekitError, match="cannot save a Linear: save_model needs a transformers model"):
        save_model(torch.nn.Linear(2, 2), None, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


class Boom(RuntimeError):
    pass


def _failing_save(model):
    """Make model.save_pretrained write part of its files, then fail."""
    real = model.save_pretrained

    def save_pretrained(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        (Path(folder) / "half-written.safetensors").write_bytes(b"\0" * 10)
        raise Boom("disk full")

    return save_pretrained


def test_failure_in_the_middle_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(tiny_llama, "save_pretrained", _failing_save(tiny_llama))
    with pytest.raises(Boom):
        save_model(tiny_llama, None, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_failure_with_overwrite_keeps_the_old_folder(tmp_path, tiny_llama, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    monkeypatch.setattr(tiny_llama, "save_pretrained", _failing_save(tiny_llama))
    with pytest.raises(Boom):
        save_model(tiny_llama, None, out, overwrite=True)
    assert files_in(out) == {"keep.txt"}
    assert not leftovers(tmp_path)


def test_overwrite_replaces_only_after_completion(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = tiny_llama.save_pretrained
    seen_during_save: list[set[str]] = []

    def save_pretrained(folder, *args, **kwargs):
        seen_during_save.append(files_in(out))  # the old folder is still whole while the new one is written
        assert Path(folder) != out
        real(folder, *args, **kwargs)

    monkeypatch.setattr(tiny_llama, "save_pretrained", save_pretrained)
    save_model(tiny_llama, tiny_tokenizer, out, overwrite=True)
    assert seen_during_save == [{"old.txt"}]
    assert "old.txt" not in files_in(out)
    assert "model.safetensors" in files_in(out)
    assert not leftovers(tmp_path)
    model, _, _ = load(out)
    assert torch.equal(outputs(model), outputs(tiny_llama))


def test_read_record_of_a_folder_without_record(tmp_path, tiny_llama_dir):
    with pytest.raises(PrunekitError, match="has no prunekit.json: it was not written by prunekit"):
        read_record(tiny_llama_dir)
    with pytest.raises(PrunekitError, match="has no prunekit.json"):
        load(tiny_llama_dir)


def test_damaged_records_are_clear_errors(tmp_path, tiny_llama):
    out = save_model(tiny_llama, None, tmp_path / "m")
    (out / RECORD_NAME).write_text("{not json")
    with pytest.raises(PrunekitError, match="is not valid JSON"):
        read_record(out)
    (out / RECORD_NAME).write_text("[1, 2]")
    with pytest.raises(PrunekitError, match="does not hold a prunekit record"):
        read_record(out)


def test_load_of_a_folder_without_config(tmp_path):
    (tmp_path / RECORD_NAME).write_text("{}")
    with pytest.raises(PrunekitError, match="is not a model folder \\(no config.json\\)"):
        load(tmp_path)


def test_record_naming_an_unknown_loader(tmp_path, tiny_llama):
    out = save_model(tiny_llama, None, tmp_path / "m", record={"loader": "no-such-loader"})
    with pytest.raises(PrunekitError, match="needs the prunekit loader 'no-such-loader'.*upgrade prunekit"):
        load(out)
    with pytest.raises(PrunekitError, match="needs the prunekit loader 'no-such-loader'"):
        load_model(str(out))


def test_update_record_adds_fields(tmp_path, tiny_llama):
    out = save_model(tiny_llama, None, tmp_path / "m", record={"method": "wanda"})
    updated = update_record(out, eval={"perplexity": np.float32(12.5), "tokens": np.int64(1024)})
    assert updated["eval"] == {"perplexity": 12.5, "tokens": 1024}
    assert read_record(out)["eval"] == {"perplexity": 12.5, "tokens": 1024}
    assert read_record(out)["method"] == "wanda"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_to_jsonable():
    @dataclasses.dataclass
    class Settings:
        path: Path
        dtype: torch.dtype
        ratios: tuple[float, ...]

    value = {"s": Settings(Path("/x/y"), torch.bfloat16, (0.5, 0.25)), 3: torch.tensor([1, 2]),
             "n": np.float32(0.5), "i": np.int64(7), "b": True, "none": None, "t": torch.tensor(2.5)}
    assert to_jsonable(value) == {"s": {"path": "/x/y", "dtype": "torch.bfloat16", "ratios": [0.5, 0.25]},
                                  "3": [1, 2], "n": 0.5, "i": 7, "b": True, "none": None, "t": 2.5}
    json.dumps(to_jsonable(value))
