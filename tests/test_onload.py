"""Sequential onloading (`prunekit prune --onload`): the same model as a full load, with few blocks in memory."""

from __future__ import annotations

import errno
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


def model_dir(tmp_path: Path, name: str = "model", layers: int = 4, **overrides: Any) -> Path:
    folder = tmp_path / name
    build_tiny_model("llama", num_hidden_layers=layers, **overrides).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def prune_args(folder: Path, out: Path, text_data: str, *method: str) -> list[str]:
    return ["prune", str(folder), *method, "--calib", text_data, "--calib-samples", "6", "--seq-len", "16",
            "--out", str(out), "--device", "cpu"]


@pytest.mark.parametrize("method", [
    ("--method", "wanda", "--sparsity", "0.5"),
    ("--method", "sparsegpt", "--sparsity", "0.5"),
    ("--method", "sparsegpt", "--structure", "2:4"),
    ("--method", "magnitude", "--sparsity", "0.5", "--compare", "row"),
    ("--method", "wanda", "--sparsity", "0.5", "--allocation", "owl"),
])
@pytest.mark.parametrize("tied", [False, True])
def test_onloaded_output_equals_the_full_load(capsys, tmp_path: Path, text_data: str, method: tuple[str, ...],
                                              tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    folder = model_dir(tmp_path, tie_word_embeddings=tied)
    outs = {}
    for mode in ("never", "always"):
        outs[mode] = tmp_path / f"out-{mode}"
        code, stdout, err = run(capsys, *prune_args(folder, outs[mode], text_data, *method), "--onload", mode)
        assert code == 0, err
        assert "sequential onloading" not in err, err  # onloaded when asked, no fallback note
    full, onloaded = saved_tensors(outs["never"]), saved_tensors(outs["always"])
    assert sorted(full) == sorted(onloaded)
    for name, tensor in full.items():
        assert tensor.dtype == onloaded[name].dtype and torch.equal(tensor, onloaded[name]), name
    assert json.loads((outs["never"] / "config.json").read_text()) == \
        json.loads((outs["always"] / "config.json").read_text())
    records = [json.loads((outs[m] / "prunekit.json").read_text()) for m in ("never", "always")]
    assert records[0]["sparsity"] == records[1]["sparsity"]
    assert records[1]["onload"]["blocks_in_memory_at_most"] <= 2 and "onload" not in records[0]
    reloaded = AutoModelForCausalLM.from_pretrained(outs["always"])  # plain transformers
    reference = AutoModelForCausalLM.from_pretrained(outs["never"])
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("case", ["bfloat16", "sharded"])
def test_onloaded_output_equals_the_full_load_in_bf16_and_across_shards(capsys, tmp_path: Path, text_data: str,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         case: str) -> None:
    """bf16 compute from a float32 folder; a sharded source folder and a sharded output (index written)."""
    from transformers import AutoModelForCausalLM

    import prunekit.onload as onload

    folder = model_dir(tmp_path)
    extra: list[str] = []
    if case == "bfloat16":
        extra = ["--dtype", "bfloat16"]
    else:
        build_tiny_model("llama", num_hidden_layers=4).save_pretrained(folder, max_shard_size="50KB")
        (folder / "model.safetensors").unlink(missing_ok=True)
        assert (folder / "model.safetensors.index.json").exists()
        monkeypatch.setattr(onload, "SHARD_BYTES", 40_000)
    outs = {}
    for mode in ("never", "always"):
        outs[mode] = tmp_path / f"out-{mode}"
        code, _, err = run(capsys, *prune_args(folder, outs[mode], text_data, "--method", "sparsegpt",
                                               "--sparsity", "0.5"), "--onload", mode, *extra)
        assert code == 0, err
    full, onloaded = saved_tensors(outs["never"]), saved_tensors(outs["always"])
    assert sorted(full) == sorted(onloaded)
    for name, tensor in full.items():
        assert tensor.dtype == onloaded[name].dtype and torch.equal(tensor, onloaded[name]), name
    if case == "sharded":
        shards = sorted(outs["always"].glob("model-*.safetensors"))
        index = json.loads((outs["always"] / "model.safetensors.index.json").read_text())
        assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
        assert sorted(index["weight_map"]) == sorted(full)
    else:
        assert all(t.dtype == torch.bfloat16 for t in onloaded.values())
    reloaded = AutoModelForCausalLM.from_pretrained(outs["always"])
    assert sorted(reloaded.state_dict()) == sorted(AutoModelForCausalLM.from_pretrained(outs["never"]).state_dict())


def test_only_a_bounded_number_of_blocks_is_in_memory(tmp_path: Path, text_data: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit.data import calibration_batch, load_data
    from prunekit.onload import Onloader, build_skeleton
    from prunekit.pruning import prune

    folder = model_dir(tmp_path, layers=8)
    model = build_skeleton(folder, "causal-lm", torch.float32)
    assert all(p.device.type == "meta" for p in model.parameters())
    onloader = Onloader(model, folder)
    counts: list[int] = []
    for block in onloader.blocks:  # count at every forward of any block, in capture and in the engine
        block.register_forward_pre_hook(lambda *_: counts.append(onloader.materialised_blocks()))
    calibration = calibration_batch(build_tiny_tokenizer(), load_data(text_data), 6, 16, seed=0)
    (tmp_path / "out-tmp").mkdir()
    onloader.open_output(tmp_path / "out-tmp")
    prune(model, {"method": "wanda", "sparsity": 0.5, "micro_batch_size": 2}, calibration, device="cpu",
          progress=False, placement=onloader)
    onloader.finish()
    assert counts and max(counts) <= 2, counts
    assert onloader.materialised_blocks() == 0
    assert all(p.device.type == "meta" for p in model.parameters())  # embeddings and head freed too


def test_auto_onloads_only_when_the_model_would_not_fit(capsys, tmp_path: Path, text_data: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import prunekit.onload as onload

    folder = model_dir(tmp_path)
    args = ("--method", "wanda", "--sparsity", "0.5")
    monkeypatch.setattr(onload, "available_memory", lambda: 10**12)
    code, _, err = run(capsys, *prune_args(folder, tmp_path / "big", text_data, *args))
    assert code == 0, err
    assert "onload" not in json.loads((tmp_path / "big" / "prunekit.json").read_text())
    monkeypatch.setattr(onload, "available_memory", lambda: 1000)
    code, _, err = run(capsys, *prune_args(folder, tmp_path / "small", text_data, *args))
    assert code == 0, err
    assert json.loads((tmp_path / "small" / "prunekit.json").read_text())["onload"]["mode"] == "auto"


@pytest.mark.parametrize("method,reason", [
    (("--method", "magnitude", "--sparsity", "0.5", "--compare", "global"), "compare=global"),
    (("--method", "heads-neurons", "--ratio", "0.5", "--importance", "taylor"), "heads-neurons with importance taylor"),
])  # --eval on text is onloaded too, --tasks is not: tests/test_onload_eval.py
def test_a_run_that_cannot_be_onloaded_says_so_and_loads_the_whole_model(capsys, tmp_path: Path, text_data: str,
                                                                          method: tuple[str, ...],
                                                                          reason: str) -> None:
    folder = model_dir(tmp_path)
    out = tmp_path / "out"
    method = tuple(text_data if arg == "CALIB" else arg for arg in method)
    code, _, err = run(capsys, *prune_args(folder, out, text_data, *method), "--onload", "always")
    assert code == 0, err
    notes = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("prunekit:")]
    assert len(notes) == 1 and "sequential onloading (--onload always) is not used" in notes[0], err
    assert reason in notes[0] and notes[0].endswith("loading the whole model")
    assert "onload" not in json.loads((out / "prunekit.json").read_text())


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_shard_is_one_line(capsys, tmp_path: Path, text_data: str, damage: str) -> None:
    folder = model_dir(tmp_path)
    model = build_tiny_model("llama", num_hidden_layers=4)
    model.save_pretrained(folder, max_shard_size="100KB")  # several shards and an index
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    (folder / "model.safetensors").unlink(missing_ok=True)
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    if damage == "missing":
        shards[1].unlink()
        before.pop(shards[1].name)
    else:
        shards[1].write_bytes(shards[1].read_bytes()[:40])
        before[shards[1].name] = 40
    out = tmp_path / "out"
    code, _, err = run(capsys, *prune_args(folder, out, text_data, "--method", "wanda", "--sparsity", "0.5"),
                       "--onload", "always")
    one_line_error(code, err, shards[1].name, bars=True)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == before  # the source untouched


@pytest.mark.parametrize("when", ["allocate", "write", "full load"])
def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, tmp_path: Path, text_data: str,
                                                    monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    import transformers.modeling_utils

    import prunekit.onload as onload

    folder = model_dir(tmp_path)

    def full(*_: Any, **__: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    mode = "never" if when == "full load" else "always"
    if when == "full load":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    elif when == "allocate":
        monkeypatch.setattr(onload.os, "posix_fallocate", full)
    else:
        real = onload.os.pwrite
        calls = iter(range(1000))

        def pwrite(fd: int, data: Any, offset: int) -> int:
            if next(calls) == 3:  # the header and a few tensors in, as a disk filled by someone else would
                full()
            return real(fd, data, offset)

        monkeypatch.setattr(onload.os, "pwrite", pwrite)
    out = tmp_path / "out"
    code, _, err = run(capsys, *prune_args(folder, out, text_data, "--method", "sparsegpt", "--sparsity", "0.5"),
                       "--onload", mode)
    one_line_error(code, err, "not enough disk space", bars=True)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_mmap_threshold_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit.errors import PrunekitError
    from prunekit.onload import return_freed_memory

    monkeypatch.setenv("PRUNEKIT_MMAP_THRESHOLD", "0")
    assert return_freed_memory() is False  # 0: glibc's own threshold kept, nothing set
    monkeypatch.setenv("PRUNEKIT_MMAP_THRESHOLD", "lots")
    with pytest.raises(PrunekitError, match="PRUNEKIT_MMAP_THRESHOLD='lots' is not a number of bytes"):
        return_freed_memory()


def test_freed_memory_goes_back_to_the_system() -> None:
    """With the allocator set up, free heap pages are returned: RSS falls after a block's buffers are freed."""
    import subprocess
    import sys

    code = """
import ctypes, sys
from prunekit.onload import release_freed_memory, return_freed_memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
if not return_freed_memory():
    print('unsupported'); sys.exit(0)
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks, pins = [], []
for _ in range(400):  # 400 x 1 MiB: below the 4 MiB threshold, so from the heap
    p = libc.malloc(1 << 20); ctypes.memset(p, 1, 1 << 20); blocks.append(p)
    q = libc.malloc(8192); ctypes.memset(q, 1, 8192); pins.append(q)  # kept: the freed MiBs cannot merge to the top
before = rss()
for p in blocks:
    libc.free(p)
freed = rss()
release_freed_memory()
after = rss()
print(before, freed, after)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "unsupported" or not Path("/proc/self/statm").exists():
        pytest.skip("no glibc mallopt here")
    before, freed, after = (int(x) for x in done.stdout.split())
    assert freed > before - (100 << 20)  # free() alone keeps the fragmented pages resident
    assert after < freed - (300 << 20)   # malloc_trim hands them back
