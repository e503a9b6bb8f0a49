"""`prunekit prune` and `prunekit methods` end to end on a tiny saved llama and a tiny text file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import one_line_error, run

TEXT = " ".join(["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife. The quick brown fox jumps over the lazy dog."] * 60)


@pytest.fixture
def text_data(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return f"text:{path}"


def block_linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        weights.update(load_file(str(file)))
    return {k: v for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight")}


@pytest.mark.parametrize("args,check", [
    (["--method", "wanda", "--sparsity", "0.5"], "unstructured"),
    (["--method", "sparsegpt", "--structure", "2:4"], "2:4"),
    (["--method", "magnitude", "--sparsity", "0.5", "--compare", "row"], "unstructured"),
])
def test_prune_writes_a_model_at_the_exact_sparsity(capsys, tmp_path: Path, tiny_llama_dir: Path, text_data: str,
                                                     args: list[str], check: str) -> None:
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", str(tiny_llama_dir), *args, "--calib", text_data, "--calib-samples", "4",
                            "--seq-len", "16", "--out", str(out), "--device", "cpu")
    assert code == 0, err
    weights = block_linear_weights(out)
    assert len(weights) == 14  # 2 blocks x 7 linears
    for name, weight in weights.items():
        assert int((weight == 0).sum()) == weight.numel() // 2, name
        if check == "2:4":
            assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(dim=2) == 2).all()
    record = json.loads((out / "prunekit.json").read_text())
    assert record["method"] == args[1] and record["sparsity"]["total"] == pytest.approx(0.5)
    assert record["kind"] == "one-shot" and "structure" in record["method_settings"]
    assert len(record["sparsity"]["layers"]) == 14 and "prune_s" in record["timing"]
    if args[1] != "magnitude":
        assert record["calibration"] == {"data": text_data, "split": "calibration", "samples": 4, "seq_len": 16,
                                         "seed": 0}
    else:
        assert record["calibration"] is None  # magnitude reads no data
    assert "saved to" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def test_prune_with_eval_prints_dense_and_pruned(capsys, tmp_path: Path, tiny_llama_dir: Path,
                                                 text_data: str) -> None:
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", str(tiny_llama_dir), "--method", "wanda", "--sparsity", "0.5",
                            "--calib", text_data, "--calib-samples", "4", "--seq-len", "16", "--out", str(out),
                            "--eval", text_data, "--eval-tokens", "64", "--no-latency", "--device", "cpu")
    assert code == 0, err
    assert "(dense)" in stdout and "wanda 0.5" in stdout and "perplexity" in stdout
    record = json.loads((out / "prunekit.json").read_text())
    dense, pruned = record["evaluation"]["dense"], record["evaluation"]["pruned"]
    assert dense["size"]["prunable_sparsity"] == 0.0
    assert pruned["size"]["prunable_sparsity"] == pytest.approx(0.5)
    assert pruned["perplexity"]["n_tokens"] == dense["perplexity"]["n_tokens"]


def test_settings_precedence_and_print_config(capsys, tmp_path: Path) -> None:
    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"method": "sparsegpt", "sparsity": 0.6, "calib-samples": 32}))
    code, stdout, err = run(capsys, "prune", "m", "--config", str(config), "--sparsity", "0.7", "--print-config")
    assert code == 0, err
    settings = yaml.safe_load(stdout)
    assert settings["method"] == "sparsegpt" and settings["sparsity"] == 0.7 and settings["calib_samples"] == 32
    assert settings["seq_len"] == 512 and settings["dampening"] == 0.01


@pytest.mark.parametrize("args,fragment", [
    (["--method", "nope", "--sparsity", "0.5"], "unknown method 'nope'"),
    (["--method", "wanda", "--sparsity", "1.5"], "outside [0, 1)"),
    (["--method", "wanda", "--structure", "4:4"], "smaller than M"),
    (["--method", "wanda"], "needs a sparsity"),
    (["--method", "wanda", "--structure", "2:6"], "multiple of 6"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "nosuchset"], "unknown dataset"),
    (["--method", "wanda", "--sparsity", "0.5", "--include", "nothing.*"], "no layer matches"),  # after loading
])
def test_errors_are_one_line_and_leave_no_folder(capsys, tmp_path: Path, tiny_llama_dir: Path, text_data: str,
                                                 args: list[str], fragment: str) -> None:
    out = tmp_path / "pruned"
    calib = [] if "--calib" in args else ["--calib", text_data]
    code, _out, err = run(capsys, "prune", str(tiny_llama_dir), *args, *calib, "--calib-samples", "4",
                          "--seq-len", "16", "--out", str(out))
    one_line_error(code, err, fragment)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def test_existing_output_is_refused_before_loading(capsys, tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _out, err = run(capsys, "prune", "no-such-model-is-loaded", "--method", "magnitude", "--sparsity", "0.5",
                          "--out", str(out))
    one_line_error(code, err, "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_methods_lists_every_method(capsys) -> None:
    code, stdout, err = run(capsys, "methods")
    assert code == 0, err
    for name in ("magnitude", "random", "wanda", "sparsegpt", "heads-neurons", "blocks", "gmp", "movement", "mgpp",
                 "flop", "none"):
        assert f"{name}  (" in stdout, name
    lines = stdout.splitlines()
    assert any("block_size" in line and "128" in line for line in lines)  # setting, default
    assert any("sigma0" in line and "1e-10" in line for line in lines)
    assert any("gate_lr" in line and "--method-arg gate_lr=..." in line for line in lines)


# ---- bad input, tried as a new user would: one line, exit 2, nothing written ------------------------------------
def _nothing_written(folder: Path) -> None:
    assert not any(p.name not in ("tiny-llama", "corpus.txt", "bad.yaml", "a-file") for p in folder.iterdir())


@pytest.mark.parametrize("extra,fragment", [
    (["--method", "wanda", "--sparsity", "0.5", "--ratio", "0.3"], "method wanda does not take ratio; it takes"),
    (["--method", "magnitude", "--sparsity", "0.5", "--block-size", "64"], "method magnitude does not take block_size"),
    (["--method", "heads-neurons", "--ratio", "0.5", "--compare", "global"],
     "heads-neurons does not take compare (use allocation)"),
    (["--method", "wanda", "--sparsity", "0.5", "--method-arg", "colour=red"], "does not take colour"),
    (["--method", "gmp", "--sparsity", "0.5"], "gmp is a training method: run it with prunekit train"),
    (["--method", "wanda", "--structure", "3:4"], None),  # valid N:M, reaches the missing --out check
])
def test_settings_a_method_does_not_take_are_refused(capsys, tmp_path: Path, text_data: str, tiny_llama_dir: Path,
                                                     extra: list[str], fragment: str | None) -> None:
    code, _out, err = run(capsys, "prune", str(tiny_llama_dir), *extra, "--calib", text_data)
    one_line_error(code, err, fragment or "no output folder given")
    _nothing_written(tmp_path)


def test_malformed_values_and_yaml_types_are_one_line(capsys, tmp_path: Path, tiny_llama_dir: Path) -> None:
    code, _out, err = run(capsys, "prune", str(tiny_llama_dir), "--sparsity", "abc", "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "argument --sparsity: invalid float value: 'abc'" in err and "--help" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: wanda\nsparsity: half\n")
    code, _out, err = run(capsys, "prune", str(tiny_llama_dir), "--config", str(bad), "--out", str(tmp_path / "o"))
    one_line_error(code, err, "wanda: sparsity must be number, not 'half'")
    bad.write_text("method: wanda\nsparsity: 0.5\nmicro_batch_size: 2.5\n")
    code, _out, err = run(capsys, "prune", str(tiny_llama_dir), "--config", str(bad), "--out", str(tmp_path / "o"))
    one_line_error(code, err, "micro_batch_size must be whole number, not 2.5")
    _nothing_written(tmp_path)


def test_an_output_folder_that_cannot_be_created_is_refused_before_any_work(capsys, tmp_path: Path,
                                                                            tiny_llama_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _out, err = run(capsys, "prune", "no-such-model-is-loaded", "--method", "magnitude", "--sparsity", "0.5",
                          "--out", str(blocker / "sub" / "out"))
    one_line_error(code, err, "is a file, not a folder")
    assert blocker.read_text() == "not a folder"


def test_print_config_is_a_valid_config_file(capsys, tmp_path: Path) -> None:
    code, stdout, err = run(capsys, "prune", "m", "--method", "sparsegpt", "--structure", "2:4", "--print-config")
    assert code == 0, err
    printed = yaml.safe_load(stdout)
    assert printed["block_size"] == 128 and printed["structure"] == "2:4" and "ratio" not in printed
    again = tmp_path / "again.yaml"
    again.write_text(stdout)
    code, stdout2, err = run(capsys, "prune", "--config", str(again), "--print-config")
    assert code == 0, err
    assert yaml.safe_load(stdout2) == printed


def test_no_progress_hides_the_pruning_bars(capsys, tmp_path: Path, tiny_llama_dir: Path, text_data: str) -> None:
    common = ["prune", str(tiny_llama_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--calib", text_data,
              "--calib-samples", "2", "--seq-len", "16", "--eval", text_data, "--eval-tokens", "64", "--device", "cpu"]
    code, _, shown = run(capsys, *common, "--out", str(tmp_path / "a"))
    assert code == 0, shown
    assert "sparsegpt:" in shown and "%|" in shown  # the per-block bar
    code, _, hidden = run(capsys, *common, "--out", str(tmp_path / "b"), "--no-progress")
    assert code == 0, hidden
    assert "%|" not in hidden and "it/s" not in hidden
