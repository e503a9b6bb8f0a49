"""The report of a study: numbers worked out by hand on a results database written here, and the page as a
real browser shows it (headless Chromium, skipped when absent)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from prunekit.report import write_report
from prunekit.report.answers import answers
from prunekit.report.data import load, pareto
from prunekit.report.plots import quality_vs_bytes
from prunekit.study import build_study
from prunekit.study.database import open_existing, open_for_study
from prunekit.study.spec import Run

SETS = ("text:a/eval", "text:a/extra")
MACHINE = {"cpu": "test cpu", "cores": 2, "threads": 2, "memory_gib": 8.0, "gpu": None, "system": "Linux"}
VERSIONS = {"prunekit": "0.1.0", "torch": "2.13.0", "transformers": "5.0"}


def _run(label: str, method: str, kind: str, parent: Run | None = None, **settings: Any) -> Run:
    resolved = {"label": label, "method": method, "kind": kind, **settings}
    if parent is not None:
        resolved["recovery"] = {"mode": "full", "tokens": 1000, "data": "text:a", "lr": None, "batch_size": 2,
                                "seq_len": 16}
    return Run(f"key-{label}", label, "m", "causal-lm", method, kind, resolved,
               parent=parent.key if parent else None)


def _results(ppl: tuple[float, float], block: tuple[int, int], saved: int, stored: int,
             layers: dict[str, list[int]] | None = None) -> dict[str, Any]:
    return {"quality": {name: {"metric": "perplexity", "value": value, "n": 100, "protocol": f"windows of {name}"}
                        for name, value in zip(SETS, ppl, strict=True)},
            "size": {"total_params": block[0] + 20, "nonzero_params": block[1] + 20, "prunable_params": block[0],
                     "prunable_nonzero": block[1], "prunable_sparsity": 1 - block[1] / block[0]},
            "bytes": {"saved": saved, "sparse-bitmask bfloat16": {"bytes": stored}},
            "layers": layers or {"model.layers.0.mlp": [block[0] // 2, block[1] // 2],
                                 "model.layers.1.mlp": [block[0] // 2, block[1] // 2]},
            "protocol": {"size": "counted once per tensor"}}


def write_study(folder: Path, tasks: dict[str, dict[str, Any]] | None = None) -> Path:
    """A study database with hand-made rows: dense ppl 10, four pruned runs, recovery and its control
    (``tasks``: run label -> lm-eval task scores, as prunekit.evaluate.harness.summarize writes them)."""
    study = build_study({"name": "hand", "models": ["m"], "evaluation": {"data": ["text:a", {"data": "text:a",
                                                                                               "split": "extra"}],
                                                                          "formats": ["sparse-bitmask"]},
                         "methods": [{"method": "magnitude", "sparsity": 0.5}]}, "hand.yaml", check_sources=False)
    database = open_for_study(folder, study)
    dense = _run("dense", "dense", "dense")
    wanda = _run("wanda 50%", "wanda", "one-shot", config={"sparsity": 0.5, "allocation": "owl"})
    rows = [
        (dense, _results((10, 8), (80, 80), 1000, 600), (1.0, 1.0)),
        (_run("magnitude 50%", "magnitude", "one-shot"), _results((20, 16), (80, 40), 1000, 400), (1.01, 1.0)),
        (wanda, _results((13, 11), (80, 40), 1000, 400, {"model.layers.0.mlp": [40, 30],
                                                         "model.layers.1.mlp": [40, 10]}), (0.99, 1.0)),
        (_run("wanda 2:4", "wanda", "one-shot"), _results((18, 15), (80, 40), 1000, 420), (1.0, 1.0)),
        (_run("heads-neurons 25%", "heads-neurons", "structured"), _results((14, 12), (60, 60), 800, 500),
         (0.8, 0.9)),
        (_run("wanda 50% + full 1k", "wanda", "recovery", parent=wanda), _results((11, 9), (80, 40), 1000, 400),
         (1.0, 1.0)),
        (_run("dense + full 1k", "dense", "recovery", parent=dense), _results((9.5, 9.5), (80, 80), 1000, 600),
         (1.0, 1.0)),
    ]
    for run, results, (forward, decode) in rows:
        if tasks and run.label in tasks:
            results["tasks"] = {"harness": "lm-evaluation-harness", "lm_eval_version": "0.4.13", "limit": 200,
                                "tasks": tasks[run.label]}
        assert database.add_run(run, results, 12.0, MACHINE, VERSIONS)
        database.add_latency(run.key, {"forward_ratio": forward, "decode_ratio": decode, "forward_ms": 100 * forward,
                                       "decode_ms_per_token": 20 * decode, "protocol": "interleaved"}, MACHINE)
    assert not database.add_run(rows[1][0], rows[1][1], 1.0, MACHINE, VERSIONS)  # a run is kept once
    database.set_meta({"study_keys": json.dumps([run.key for run, _, _ in rows])})  # the hand-made runs are the study
    database.close()
    return folder


def test_pareto_frontier_worked_by_hand() -> None:
    points = [(1.0, 10.0, "a"), (2.0, 8.0, "b"), (2.5, 9.0, "c"), (3.0, 8.0, "d"), (4.0, 5.0, "e")]
    assert pareto(points, higher_is_better=False) == ["a", "b", "e"]  # c is beaten by b, d ties b but is larger
    assert pareto([(1.0, 0.7, "x"), (2.0, 0.9, "y"), (3.0, 0.8, "z")], higher_is_better=True) == ["x", "y"]


def test_answers_are_computed_from_the_rows(tmp_path: Path) -> None:
    data = load(write_study(tmp_path / "study"))
    wanda = next(e for e in data.entries if e.label == "wanda 50%")
    heads = next(e for e in data.entries if e.label == "heads-neurons 25%")
    assert wanda.removed == pytest.approx(0.5) and heads.removed == pytest.approx(0.25)
    found = dict(answers(data))
    smallest = found["at <= 1.5x dense perplexity on text:a/eval, what is the smallest and the fastest model?"]
    assert smallest.startswith("The smallest on disk (sparse-bitmask bfloat16) is wanda 50% + full 1k: 11.00 "
                               "(1.10x dense), 67 % of dense bytes, 1.00x as fast in a forward pass")
    assert "the fastest is heads-neurons 25%: 14.00, 1.25x as fast in a forward pass, 1.11x in decoding, 83 %" in \
        smallest
    ranking = found["Which method keeps quality best on text:a/eval at each sparsity?"]
    assert ranking == ("At 50 % of block weights removed: wanda 13.00 (1.30x dense), then wanda 2:4 18.00 (1.80x "
                       "dense), then magnitude 20.00 (2.00x dense).")
    zeros = found["Do the zeros make the model smaller or faster?"]
    assert zeros.startswith("Zeros (3 one-shot runs) keep the saved files at 100 % of dense bytes, 67-70 % as "
                            "sparse-bitmask bfloat16")
    assert "0.99-1.01x dense" in zeros and "heads-neurons 25% is 80 % of dense bytes as saved" in zeros
    recovery = found["Does fine-tuning after pruning restore quality on text:a/eval?"]
    assert recovery == "wanda 50% + full 1k: 13.00 -> 11.00 (67 % of the gap to dense closed)."
    control = found["Does pruning then fine-tuning generalise better than the dense model fine-tuned on the same "
                    "tokens?"]
    assert control == ("wanda 50% + full 1k beats it on text:a/extra but not on text:a/eval (text:a/eval 11.00 vs "
                       "9.50, text:a/extra 9.00 vs 9.50; dense + full 1k).")


def _scores(cloze: tuple[float, float], nextsent: tuple[float, float]) -> dict[str, Any]:
    """Two tasks as lm-eval reports them: t-cloze with acc only, t-next with acc and acc_norm (shown)."""
    return {"t-cloze": {"metrics": {"acc": cloze[0], "acc_stderr": cloze[1]}, "n_samples": 200},
            "t-next": {"metrics": {"acc": 0.25, "acc_stderr": 0.03, "acc_norm": nextsent[0],
                                   "acc_norm_stderr": nextsent[1]}, "n_samples": 200}}


def test_zero_shot_task_accuracies_are_columns_and_a_difference_within_noise_is_no_win(tmp_path: Path) -> None:
    folder = write_study(tmp_path / "study", tasks={
        "dense": _scores((0.35, 0.03), (0.40, 0.035)),
        "wanda 50%": _scores((0.20, 0.03), (0.30, 0.032)),
        "wanda 50% + full 1k": _scores((0.40, 0.03), (0.36, 0.034)),
        "dense + full 1k": _scores((0.30, 0.04), (0.35, 0.034))})
    data = load(folder)
    assert data.eval_sets("m") == [*SETS, "t-cloze (acc)", "t-next (acc_norm)"]  # perplexity stays the primary
    found = dict(answers(data))
    control = found["Does pruning then fine-tuning generalise better than the dense model fine-tuned on the same "
                    "tokens?"]
    # t-cloze: 0.40 - 0.30 = 0.10 > sqrt(0.03^2 + 0.04^2) = 0.05: a win; t-next: 0.36 - 0.35 = 0.01 < sqrt(2) x
    # 0.034 = 0.048: within noise; perplexity 11 vs 9.5 worse, 9 vs 9.5 better (no standard error: as they are)
    assert control == ("wanda 50% + full 1k beats it on text:a/extra, t-cloze (acc), is worse on text:a/eval and "
                       "within one standard error of it on t-next (acc_norm) (text:a/eval 11.00 vs 9.50, "
                       "text:a/extra 9.00 vs 9.50, t-cloze (acc) 40.00 % vs 30.00 %, t-next (acc_norm) 36.00 % vs "
                       "35.00 %; dense + full 1k).")
    assert "Which method keeps quality best on text:a/eval at each sparsity?" in found
    write_report(folder)
    rows = list(csv.DictReader(io.StringIO((folder / "results.csv").read_text())))
    assert {r["label"]: r["t-cloze (acc) accuracy"] for r in rows}["wanda 50%"] == "0.2"
    assert {r["label"]: r["t-next (acc_norm) accuracy"] for r in rows}["dense"] == "0.4"
    page = (folder / "report.html").read_text()
    assert "<th class=\"\">t-next (acc_norm)</th>" in page and "<td class=\"\">36.00 %</td>" in page
    assert "Zero-shot tasks: t-cloze, t-next with lm-evaluation-harness 0.4.13, 200 samples per task" in page


def test_the_dense_control_is_never_the_smallest_pruned_model(tmp_path: Path) -> None:
    data = load(write_study(tmp_path / "study"))
    # left: dense (10), magnitude 50% (20: 2x dense) and the dense model fine-tuned as a control (9.5, as big)
    data.entries = [e for e in data.entries if e.label in ("dense", "magnitude 50%", "dense + full 1k")]
    found = dict(answers(data))
    smallest = found["at <= 1.5x dense perplexity on text:a/eval, what is the smallest and the fastest model?"]
    assert smallest == ("None: every pruned model is outside the tolerance; the closest is magnitude 50% (20.00, "
                        "2.00x dense).")


def test_report_is_one_self_contained_page_and_a_csv(tmp_path: Path) -> None:
    folder = write_study(tmp_path / "study")
    html_path, csv_path = write_report(folder)
    page = html_path.read_text()
    for title in ("Answers", "Quality vs sparsity", "Quality vs bytes on disk", "Quality vs measured latency",
                  "Recovery: before and after fine-tuning", "Per-layer sparsity", "Every run", "Protocol"):
        assert f">{title}</h2>" in page
    assert page.count('src="data:image/png;base64,') == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "test cpu, 2 threads" in page and "torch 2.13.0" in page and "windows of text:a/eval" in page
    table = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [row["label"] for row in table][:2] == ["dense", "magnitude 50%"] and len(table) == 7
    assert table[2]["text:a/eval perplexity"] == "13" and table[4]["forward_ratio"] == "0.8"


def test_report_cli_refuses_a_folder_without_a_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.cli.main import main

    assert main(["report", str(tmp_path)]) == 2
    assert "holds no study.sqlite" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install chromium;"
                                                " .ci/run installs it)")
def test_the_report_shows_its_plots_and_tables_in_a_real_browser(tmp_path: Path) -> None:
    from PIL import Image

    folder = write_study(tmp_path / "study")
    html_path, _ = write_report(folder)
    browser = str(_chromium())
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'p'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", html_path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run([browser, *flags, "--dump-dom", html_path.as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert "Quality vs sparsity" in dom and 'id="runs"' in dom and dom.count("<img") == 5
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    pixels = list(image.getdata())
    ink = sum(1 for r, g, b in pixels if min(r, g, b) < 200) / len(pixels)
    colour = sum(1 for r, g, b in pixels if max(r, g, b) - min(r, g, b) > 80)
    assert ink > 0.02, "the page looks blank"
    assert colour > 2000, "no coloured plot marks visible: the embedded figures did not render"


def test_per_block_profile_maps_removed_blocks_back() -> None:
    from prunekit.report.data import _entry, block_profile

    def row(key: str, layers: dict[str, list[int]], removed: list[int] | None = None) -> dict[str, Any]:
        record = {"method_result": {"blocks_removed": removed}} if removed else {}
        return {"key": key, "label": key, "model": "m", "method": "blocks", "kind": "structured", "parent": None,
                "settings": {}, "results": {"layers": layers, "record": record}, "seconds": 1.0}

    dense = _entry(row("dense", {f"model.layers.{i}.mlp": [10, 10] for i in range(3)}), None)
    # block 1 of 3 removed: the blocks left are 0 and 1 (the old 2); the old 2 has half its weights zero
    pruned = _entry(row("blocks", {"model.layers.0.mlp": [10, 10], "model.layers.1.mlp": [10, 5]}, [1]), None)
    assert block_profile(pruned, dense) == {0: 0.0, 1: 1.0, 2: 0.5}


def test_ranking_groups_runs_by_the_sparsity_they_were_asked_for(tmp_path: Path) -> None:
    """A run that removed 47.5 % when asked for 50 % (FLOP's gates land near their target) is ranked at 50 %."""
    study = build_study({"name": "asked", "models": ["m"], "evaluation": {"data": ["text:a"],
                                                                          "formats": ["sparse-bitmask"]},
                         "methods": [{"method": "magnitude", "sparsity": 0.5}]}, "asked.yaml", check_sources=False)
    database = open_for_study(tmp_path / "s", study)
    rows = [(_run("dense", "dense", "dense"), _results((10, 8), (80, 80), 1000, 600)),
            (_run("magnitude 50%", "magnitude", "one-shot", config={"sparsity": 0.5}),
             _results((20, 16), (80, 40), 1000, 400)),
            (_run("heads-neurons 50%", "heads-neurons", "structured", config={"ratio": 0.5}),
             _results((15, 12), (42, 42), 600, 350)),
            (_run("flop 70%", "flop", "training", config={"sparsity": 0.7}), _results((17, 14), (25, 25), 560, 330))]
    rows[-1][1]["bytes"]["sparse-bitmask bfloat16"] = {"bytes": None, "error": "'q' is a LowRankLinear"}
    for run, results in rows:
        assert database.add_run(run, results, 1.0, MACHINE, VERSIONS)
    database.set_meta({"study_keys": json.dumps([run.key for run, _ in rows])})
    database.close()
    found = dict(answers(load(tmp_path / "s")))
    assert found["Which method keeps quality best on text:a/eval at each sparsity?"] == (
        "At 50 % of block weights removed: heads-neurons [47.5 % removed] 15.00 (1.50x dense), then magnitude "
        "20.00 (2.00x dense).")  # flop 70% is alone at its level: not ranked
    zeros = found["Do the zeros make the model smaller or faster?"]
    assert "flop 70% is 56 % of dense bytes as saved" in zeros  # trained smaller: counted with the shrunk models
    data = load(tmp_path / "s")
    flop = next(e for e in data.entries if e.label == "flop 70%")
    assert flop.bytes is None and flop.format_error() == "'q' is a LowRankLinear"  # not its float32 files instead
    assert next(e for e in data.entries if e.label == "magnitude 50%").bytes == 400
    caption = quality_vs_bytes(data)[0].caption
    assert "Not shown, as sparse-bitmask bfloat16 could not hold them: flop 70% ('q' is a LowRankLinear)." in caption


def test_rows_of_earlier_settings_are_kept_but_not_reported(tmp_path: Path) -> None:
    """After a default changed, a run gets a new key: its old row stays in the database, out of the report."""
    folder = write_study(tmp_path / "study")
    database = open_existing(folder, read_only=False)
    keys = json.loads(database.meta["study_keys"])
    database.set_meta({"study_keys": json.dumps([k for k in keys if k != "key-wanda 2:4"])})
    database.close()
    data = load(folder)
    assert data.hidden == 1 and "wanda 2:4" not in {e.label for e in data.entries}
    write_report(folder)
    page = (folder / "report.html").read_text()
    assert "1 row(s) made with earlier settings of this study" in page and ">wanda 2:4<" not in page


def test_a_few_percent_faster_is_not_called_faster(tmp_path: Path) -> None:
    data = load(write_study(tmp_path / "study"))
    heads = next(e for e in data.entries if e.label == "heads-neurons 25%")
    heads.forward_ratio = 0.97  # 1.03x: within the timing noise (the within-tolerance runs are 1.00x-1.03x)
    smallest = dict(answers(data))["at <= 1.5x dense perplexity on text:a/eval, what is the smallest and the "
                                   "fastest model?"]
    assert smallest.endswith("; none of them is measurably faster than dense (1.00-1.03x as fast in a forward pass; "
                             "differences under 5 % are taken as noise).")
