"""Studies: the study file checked before anything runs, the grid, the results database and resuming.

Every study here runs on the tiny random Llama of conftest (a saved folder) and a small text file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from prunekit.errors import PrunekitError
from prunekit.study import build_study, load_study, open_existing, preset_names, run_study
from prunekit.study.database import DB_NAME
from prunekit.study.runner import remove_leftovers

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. The quick brown fox jumps over the lazy dog. Pruning removes weights from a model.\n")


def tiny_study(model_dir: Path, text: Path, **changes: Any) -> dict[str, Any]:
    """A small study mapping: dense, magnitude 50 %, wanda 2:4, heads-neurons 25 % on the tiny Llama."""
    study: dict[str, Any] = {
        "name": "tiny",
        "models": [str(model_dir)],
        "calibration": {"data": f"text:{text}", "samples": 2, "seq_len": 16},
        "evaluation": {"data": [f"text:{text}"], "tokens": 256, "seq_len": 16,
                       "latency": {"seq_len": 8, "repeats": 1, "warmup": 0, "gen_tokens": 2}},
        "methods": [{"method": "magnitude", "sparsity": 0.5}, {"method": "wanda", "structure": "2:4"},
                    {"method": "heads-neurons", "ratio": 0.25}],
    }
    study.update(changes)
    return study


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 60)
    return path


def write_study(folder: Path, study: dict[str, Any]) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def rows(folder: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(folder / DB_NAME) as connection:
        return list(connection.execute("SELECT key, label FROM runs"))


# ---- the study file --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "blue"}, "unknown key colour"),
    ({"methods": [{"method": "wandaa", "sparsity": 0.5}]}, "methods[0] (wandaa): unknown method 'wandaa'"),
    ({"methods": [{"method": "wanda", "sparsity": [0.5, 1.5]}]}, "methods[0] (wanda) with sparsity=1.5: sparsity 1.5 "
                                                                   "is outside [0, 1)"),
    ({"methods": [{"method": "magnitude", "sparsty": 0.5}]}, "methods[0] (magnitude): method magnitude does not take "
                                                              "sparsty"),
    ({"methods": [{"method": "wanda", "sparsity": 0.3, "structure": "2:4"}]}, "contradicts structure 2:4"),
    ({"methods": [{"method": "gmp", "sparsity": 0.5}]}, "methods[0] (gmp): gmp prunes while training: add a training"),
    ({"models": ["/no/such/model"]}, "models[0]: no model folder at '/no/such/model'"),
    ({"evaluation": {"data": ["text:/no/such.txt"]}}, "evaluation.data[0]: text file '/no/such.txt' does not exist"),
    ({"evaluation": {"data": ["austen"], "tokns": 5}}, "evaluation has unknown key tokns"),
    ({"calibration": {"data": "text:/no/such.txt"}}, "calibration.data: text file '/no/such.txt' does not exist"),
    ({"recovery": {"data": "austen"}}, "recovery needs budgets"),
    ({"name": "two words"}, "name must be a short word"),
    ({"evaluation": {"data": ["austen", "reviews"]}}, "evaluation.data reviews/test fits no model of the study"),
])
def test_a_bad_study_file_is_one_line_naming_the_entry(tiny_llama_dir: Path, text_file: Path,
                                                       change: dict[str, Any], message: str) -> None:
    study = tiny_study(tiny_llama_dir, text_file, **change)
    with pytest.raises(PrunekitError) as caught:
        build_study(study, "s.yaml")
    text = str(caught.value)
    assert message in text and "\n" not in text and text.startswith("study s.yaml")


def test_the_cli_refuses_a_bad_study_with_exit_2_and_writes_nothing(tmp_path: Path, tiny_llama_dir: Path,
                                                                    text_file: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.cli.main import main

    path = write_study(tmp_path, tiny_study(tiny_llama_dir, text_file, methods=[{"method": "wanda",
                                                                                 "sparsity": 1.0}]))
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sparsity 1.0 is outside [0, 1)" in err
    assert not (tmp_path / "out").exists()


def test_the_grid_keys_runs_by_their_resolved_settings(tiny_llama_dir: Path, text_file: Path) -> None:
    methods = [{"method": "magnitude", "sparsity": [0.3, 0.6]}, {"method": "wanda", "sparsity": 0.5,
                                                                  "allocation": ["uniform", "owl"]}]
    recovery = {"data": f"text:{text_file}", "budgets": ["1k", 2000], "methods": ["wanda"], "batch_size": 2,
                "seq_len": 16}
    study = build_study(tiny_study(tiny_llama_dir, text_file, methods=methods, seeds=[0, 1], recovery=recovery), "s")
    labels = [run.label for run in study.runs]
    # magnitude reads no calibration and has no seed: one run per sparsity, not one per seed
    assert labels[:3] == ["dense", "magnitude 30%", "magnitude 60%"]
    assert "wanda 50% owl seed 1" in labels and "wanda 50% uniform seed 0 + full 1k" in labels
    assert "dense + full 2k" in labels  # the control: the dense model fine-tuned on the same tokens
    assert len(labels) == len(set(labels)) == len({run.key for run in study.runs})
    by_key = {run.key: run for run in study.runs}
    for run in study.runs:
        if run.kind == "recovery":
            assert run.parent in by_key and run.parent_folder == by_key[run.parent].folder
    again = build_study(tiny_study(tiny_llama_dir, text_file, methods=methods, seeds=[0, 1], recovery=recovery), "s")
    assert [r.key for r in again.runs] == [r.key for r in study.runs]
    dense = study.runs[0]
    assert dense.kind == "dense" and dense.folder is not None  # saved: it is fine-tuned as the control


def test_every_preset_is_valid_and_the_quick_one_is_small() -> None:
    assert {"quick", "efficiency", "mgpp", "flop"} <= set(preset_names())
    for name in preset_names():
        study = load_study(preset=name, check_sources=False)
        assert study.name == name and study.runs
    assert len(load_study(preset="quick", check_sources=False).runs) <= 6
    with pytest.raises(PrunekitError, match="unknown preset 'nope': use one of"):
        load_study(preset="nope")


def test_presets_are_shipped_as_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["prunekit"]
    assert any(Path("study/presets/quick.yaml").match(p) or p in ("**/*.yaml", "study/presets/*.yaml")
               for p in patterns)


# ---- running, resuming, refusing --------------------------------------------------------------------------------
def test_a_study_runs_once_resumes_and_refuses_what_would_lose_results(tmp_path: Path, tiny_llama_dir: Path,
                                                                       text_file: Path) -> None:
    recovery = {"data": f"text:{text_file}", "budgets": [64], "methods": ["magnitude"], "dense": False,
                "batch_size": 2, "seq_len": 16}
    study = build_study(tiny_study(tiny_llama_dir, text_file, recovery=recovery), "s")
    out = tmp_path / "out"
    outcome = run_study(study, out, progress=False, echo=lambda line: None)
    assert not outcome.failed and len(outcome.finished) == len(study.runs) == 5 and outcome.timed == 5
    database = open_existing(out)
    found = database.runs()
    database.close()
    assert sorted(r["key"] for r in found) == sorted(r.key for r in study.runs)
    by_label = {r["label"]: r for r in found}
    assert by_label["magnitude 50%"]["results"]["size"]["prunable_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by_label["heads-neurons 25%"]["results"]["size"]["total_params"] < by_label["dense"]["results"]["size"][
        "total_params"]
    assert by_label["magnitude 50% + full 64"]["parent"] == by_label["magnitude 50%"]["key"]
    assert all("latency" in r and r["latency"]["forward_ms"] > 0 for r in found)
    for row in found:
        assert row["folder"] is None or (out / row["folder"] / "prunekit.json").is_file()
    # the same command again: nothing to do, every row still there exactly once
    again = run_study(study, out, progress=False, echo=lambda line: None)
    assert again.done_before == 5 and not again.finished and len(rows(out)) == 5
    # a different study, a damaged database, a newer one: one-line errors, nothing changed
    other = build_study({**tiny_study(tiny_llama_dir, text_file), "name": "other"}, "o")
    before = (out / DB_NAME).read_bytes()
    with pytest.raises(PrunekitError, match="holds the results of study 'tiny', not 'other'"):
        run_study(other, out, echo=lambda line: None)
    evaluation = {**tiny_study(tiny_llama_dir, text_file)["evaluation"], "tokens": 128}
    changed = build_study(tiny_study(tiny_llama_dir, text_file, evaluation=evaluation), "s")
    with pytest.raises(PrunekitError, match="evaluated another way .*evaluation.tokens: 256 in the folder, 128"):
        run_study(changed, out, echo=lambda line: None)
    assert (out / DB_NAME).read_bytes() == before


def test_a_damaged_or_newer_database_or_a_foreign_folder_is_refused(tmp_path: Path, tiny_llama_dir: Path,
                                                                    text_file: Path) -> None:
    study = build_study(tiny_study(tiny_llama_dir, text_file), "s")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PrunekitError, match="is not empty and holds no study"):
        run_study(study, foreign, echo=lambda line: None)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(PrunekitError, match="is damaged or not a prunekit study database") as caught:
        run_study(study, damaged, echo=lambda line: None)
    assert "\n" not in str(caught.value)
    assert (damaged / DB_NAME).read_bytes() == b"this is not a database" * 100
    newer = tmp_path / "newer"
    from prunekit.study.database import open_for_study

    open_for_study(newer, study).close()
    with sqlite3.connect(newer / DB_NAME) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(PrunekitError, match="written by a newer prunekit .*schema 99"):
        run_study(study, newer, echo=lambda line: None)
    with pytest.raises(PrunekitError, match="holds no study.sqlite"):
        open_existing(foreign)


def test_leftovers_of_an_interrupted_run_are_removed_but_never_a_complete_model(tmp_path: Path) -> None:
    for name in ("models/.wanda-50-abc.tmp-123456", "models/wanda-50-abc", "work/x.checkpoints",
                 "work/wanda-50-abc.sparse-bitmask-bfloat16"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / f".{DB_NAME}.tmp-77").write_text("")
    removed = remove_leftovers(tmp_path)
    assert sorted(removed) == sorted([f".{DB_NAME}.tmp-77", "models/.wanda-50-abc.tmp-123456",
                                      "work/wanda-50-abc.sparse-bitmask-bfloat16"])
    assert (tmp_path / "models/wanda-50-abc").is_dir() and (tmp_path / "work/x.checkpoints").is_dir()


def test_a_failing_run_is_logged_and_its_recovery_waits(tmp_path: Path, tiny_llama_dir: Path, text_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import prunekit.study.execute as execute

    recovery = {"data": f"text:{text_file}", "budgets": [64], "dense": False, "batch_size": 2, "seq_len": 16}
    study = build_study(tiny_study(tiny_llama_dir, text_file, methods=[{"method": "magnitude", "sparsity": 0.5}],
                                   recovery=recovery, evaluation={"data": [f"text:{text_file}"], "tokens": 128,
                                                                  "seq_len": 16, "latency": False}), "s")

    def broken(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(execute, "_prune", broken)
    outcome = run_study(study, tmp_path / "out", progress=False, echo=lambda line: None)
    assert outcome.failed == [("magnitude 50%", "RuntimeError: disk on fire")]
    assert outcome.blocked == ["magnitude 50% + full 64"] and [label for _, label in rows(tmp_path / "out")] == [
        "dense"]
    database = open_existing(tmp_path / "out")
    assert [f["label"] for f in database.failures()] == ["magnitude 50%"]
    database.close()


def test_a_classification_study_trains_prunes_recovers_and_reports(tmp_path: Path, make_tiny_model: Any,
                                                                   tiny_tokenizer: Any) -> None:
    """The mgpp and flop presets' path at toy scale: training-aware runs, the dense fine-tuned baseline (method
    none), a structured run fine-tuned on the labelled set, accuracy everywhere."""
    from prunekit.report import write_report
    from prunekit.report.answers import answers
    from prunekit.report.data import load

    model_dir = tmp_path / "bert"
    make_tiny_model("bert").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    table = tmp_path / "labelled.csv"
    words = ["great fun", "boring and long", "wonderful acting", "terrible plot"]
    table.write_text("text,label\n" + "".join(f"{words[i % 4]} {i},{int(i % 2 == 0)}\n" for i in range(80)))
    data = f"csv:{table}"
    study = build_study({
        "name": "labels", "models": [{"name": str(model_dir), "task": "classification"}], "dense": False,
        "evaluation": {"data": [data], "max_length": 16,
                       "latency": {"seq_len": 8, "repeats": 1, "warmup": 0, "gen_tokens": 0}},
        "training": {"data": data, "max_steps": 3, "batch_size": 8, "max_length": 16, "lr": 1e-3},
        "methods": [{"method": "none"}, {"method": "gmp", "sparsity": 0.5},
                    {"method": "heads-neurons", "ratio": 0.5, "importance": "magnitude",
                     "bias_compensation": False}],
        "recovery": {"data": data, "budgets": [256], "methods": ["heads-neurons"], "dense": False, "batch_size": 8,
                     "seq_len": 16},
    }, "labels.yaml")
    assert [run.label for run in study.runs] == ["dense fine-tuned", "gmp 50%", "heads-neurons 50%",
                                                 "heads-neurons 50% + full 256"]
    outcome = run_study(study, tmp_path / "out", progress=False, echo=lambda line: None)
    assert not outcome.failed, outcome.failed
    found = load(tmp_path / "out")
    assert all(entry.metrics == {f"{data}/test": "accuracy"} for entry in found.entries)
    gmp = next(entry for entry in found.entries if entry.label == "gmp 50%")
    assert gmp.removed == pytest.approx(0.5, abs=0.01)
    questions = [question for question, _ in answers(found)]
    assert questions[0].startswith("at most 2 points below dense accuracy on")
    html_path, _ = write_report(tmp_path / "out")
    assert "dense fine-tuned" in html_path.read_text()
