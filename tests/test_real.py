"""End-to-end checks on the real built-in model and data; skipped unless both are already prepared.

`make demo` prepares them into the user cache (~/.cache/prunekit, or $PRUNEKIT_CACHE when the
test session starts). These tests read that cache and never download anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

# conftest points PRUNEKIT_CACHE at an empty folder per test: remember the real one at import time
USER_CACHE = Path(os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit")
HAVE_REAL = (USER_CACHE / "models" / "smollm2-135m" / "config.json").is_file() and (
    USER_CACHE / "data" / "austen" / "manifest.json").is_file()

pytestmark = [pytest.mark.real_model, pytest.mark.real_data,
              pytest.mark.skipif(not HAVE_REAL, reason="run `make demo` first: needs smollm2-135m and austen prepared")]


@pytest.mark.parametrize("bos", [True, False])
def test_eval_perplexity_matches_plain_transformers(tmp_path, monkeypatch, bos):
    """`prunekit eval --json` reports the perplexity that plain transformers gives on the same tokens: windows
    of the BOS token and 255 text tokens (the default), or of 256 text tokens with --no-bos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunekit.cli.main import main

    monkeypatch.setenv("PRUNEKIT_CACHE", str(USER_CACHE))
    out = tmp_path / "eval.json"
    seq_len, max_tokens = 256, 1024
    code = main(["eval", "smollm2-135m", "--data", "austen", "--seq-len", str(seq_len), "--max-tokens",
                 str(max_tokens), "--no-latency", "--json", str(out), *([] if bos else ["--no-bos"])])
    assert code == 0
    reported = json.loads(out.read_text())["perplexity"]

    # independent computation: the model folder, the Persuasion text file, the tokenizer, HF's own loss
    folder = USER_CACHE / "models" / "smollm2-135m"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (USER_CACHE / "data" / "austen" / "eval.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    prefix = [tokenizer.bos_token_id] if bos else []
    span = seq_len - len(prefix)
    total_nll, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - span + 1, span):
            window = torch.tensor([prefix + ids[start:start + span]])
            loss = model(input_ids=window, labels=window).loss.item()  # mean over seq_len - 1 predictions
            total_nll += loss * (seq_len - 1)
            scored += seq_len - 1
    expected = math.exp(total_nll / scored)
    assert reported["n_tokens"] == scored
    assert reported["bos_token_id"] == (tokenizer.bos_token_id if bos else None)
    assert reported["perplexity"] == pytest.approx(expected, rel=1e-4)

REVIEWS_READY = (USER_CACHE / "data" / "reviews" / "manifest.json").is_file()


@pytest.mark.skipif(not REVIEWS_READY, reason="run `prunekit data prepare reviews` first")
def test_offline_tasks_give_lm_eval_cli_numbers(tmp_path, monkeypatch):
    """prunekit's lm-eval bridge (model in memory) and lm-eval's own command line (model folder, --include_path)
    give the same accuracies on prunekit's offline tasks (first 8 documents of each)."""
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    from prunekit.evaluate.harness import TASK_DIR, run_tasks
    from prunekit.models import load_model

    monkeypatch.setenv("PRUNEKIT_CACHE", str(USER_CACHE))
    tasks = "austen-cloze,austen-nextsent,reviews-zeroshot"
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    ours = run_tasks(model, tokenizer, tasks, limit=8, batch_size=8)["tasks"]
    folder = USER_CACHE / "models" / "smollm2-135m"
    command = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
               f"pretrained={folder}", "--tasks", tasks, "--include_path", str(TASK_DIR), "--device", "cpu",
               "--batch_size", "8", "--limit", "8", "--output_path", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PRUNEKIT_CACHE": str(USER_CACHE)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    for task in tasks.split(","):
        for key, value in theirs[task].items():
            if "," in key and isinstance(value, float):
                assert ours[task]["metrics"][key.split(",")[0]] == pytest.approx(value, abs=1e-9), (task, key)
