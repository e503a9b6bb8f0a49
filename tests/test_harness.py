"""The lm-eval bridge and prunekit's offline zero-shot tasks, on tiny models and data made here."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from prunekit.errors import PrunekitError
from prunekit.evaluate import zeroshot
from prunekit.evaluate.zeroshot import cloze_examples, nextsent_examples, paragraphs, sentences

# ---- the task builders (pure functions of the text) -------------------------------------------------------------

CLOZE_PARAGRAPH = ("Anne had never been to Bath before that winter. She read letters from her sister every morning "
                   "and answered them with care. Her father spoke of nothing but the house and the garden and the "
                   "tenants. The weather was cold and grey for many weeks together. At last the whole family went "
                   "to Bath.")


def test_sentences_keep_abbreviations_and_quotes() -> None:
    # an abbreviation ends no sentence; nor does "!" before a lower-case word (Austen's "Oh! how ...")
    words = 'Mr. Elliot spoke. "Yes," said she. Oh! how they left. And so on'.split()
    assert [" ".join(s) for s in sentences(words)] == ["Mr. Elliot spoke.", '"Yes," said she.', "Oh! how they left.",
                                                      "And so on"]
    text = "Chapter 1\n\nToo short here.\n\n" + CLOZE_PARAGRAPH.replace(". ", ".\n", 2)
    assert paragraphs(text) == [CLOZE_PARAGRAPH.split()]  # heading and short lines dropped, lines joined


def test_cloze_passage_ends_before_a_word_the_context_names() -> None:
    # worked out by hand: of the sentence ends, only "Bath." has 40+ words before it and occurs earlier
    # ("winter", "care", "tenants", "weeks" have too little context or do not occur before; "together" neither)
    expected = {"context": CLOZE_PARAGRAPH[: -len(" Bath.")], "target": "Bath"}
    assert cloze_examples([CLOZE_PARAGRAPH]) == [expected]
    stop = CLOZE_PARAGRAPH.replace("went to Bath.", "went with her.")
    assert cloze_examples([stop]) == []  # a function word is never a target
    assert cloze_examples([CLOZE_PARAGRAPH], min_context=60) == []


def novel(seed: int, n_paragraphs: int = 40) -> str:
    rng = random.Random(seed)
    names = ["Anne", "Wentworth", "Catherine", "Henry", "Isabella", "Charles", "Mary", "Louisa"]
    places = ["Bath", "Lyme", "Kellynch", "Uppercross", "Fullerton", "Northanger"]
    paras = []
    for p in range(n_paragraphs):
        sents = []
        for s in range(4):
            who, where = rng.choice(names), rng.choice(places)
            quote = '"' if rng.random() < 0.2 else ""
            sents.append(f"{quote}{who} walked to {where} in book {seed} chapter {p} part {s} and thought of "
                         f"{who}.{quote}")
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


def test_next_sentence_choices() -> None:
    books = [novel(1), novel(2)]
    examples = nextsent_examples(books, n=40, seed=3)
    assert len(examples) == 40
    assert [e["label"] for e in examples] == [i % 4 for i in range(40)]  # the truth equally often at each place
    for example in examples:
        truth = example["choices"][example["label"]]
        assert f"{example['context']} {truth}" in " ".join(" ".join(w) for b in books for w in paragraphs(b))
        assert len(set(example["choices"])) == 4
        book = next(b for b in books if truth in b)
        assert all(choice in book for choice in example["choices"])  # distractors from the same book
        assert all(c.startswith('"') == truth.startswith('"') for c in example["choices"])
    assert nextsent_examples(books, n=40, seed=3) == examples


# ---- the bridge, on a tiny model ---------------------------------------------------------------------------------

def prepare_tiny_data() -> None:
    """austen (two held-out novels) and reviews, written into this test's own prunekit cache."""
    from prunekit.data.core import ClassificationData, TextData, write_prepared

    write_prepared("austen", TextData("austen", {"calibration": novel(0), "train": novel(0), "eval": novel(1)
                                                 + "\n\n" + CLOZE_PARAGRAPH, "extra": novel(2)}), "test")
    snippets = [("a wonderful film", 1), ("boring and far too long", 0), ("great acting", 1), ("terrible plot", 0),
                ("the quick brown fox", 1), ("not good at all", 0)]
    write_prepared("reviews", ClassificationData("reviews", {"train": snippets, "validation": snippets,
                                                             "test": snippets}, ["negative", "positive"]), "test")


@pytest.fixture
def tiny_lm() -> tuple[Any, Any]:
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
    prepare_tiny_data()
    return build_tiny_model("llama", max_position_embeddings=512), build_tiny_tokenizer()


def continuation_logprob(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """log P(continuation | context): the tokens of context+continuation after those of the context."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
    return float(sum(logits[i - 1, whole[i]] for i in range(start, len(whole))))


def test_reviews_zeroshot_accuracy_is_the_argmax_of_the_continuations(tiny_lm: tuple[Any, Any]) -> None:
    from prunekit.evaluate.harness import run_tasks

    model, tokenizer = tiny_lm
    state = torch.random.get_rng_state()
    summary = run_tasks(model, tokenizer, "reviews-zeroshot")
    assert torch.equal(torch.random.get_rng_state(), state)  # lm-eval's seeding does not leak out
    entry = summary["tasks"]["reviews-zeroshot"]
    docs = zeroshot.reviews_zeroshot()["test"]
    correct = []
    for doc in docs:
        prompt = f"{doc['text']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        scores = [continuation_logprob(model, tokenizer, prompt, f" {c}") for c in ("negative", "positive")]
        correct.append(float(scores.index(max(scores)) == doc["label"]))
    n = len(correct)
    accuracy = sum(correct) / n
    assert entry["n_samples"] == n == 6 and entry["chance"] == 0.5 and entry["num_fewshot"] == 0
    assert entry["metrics"]["acc"] == pytest.approx(accuracy)
    assert entry["metrics"]["acc_stderr"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / (n - 1)))
    assert summary["lm_eval_version"] and summary["harness"] == "lm-evaluation-harness"
    json.dumps(summary)


def test_all_offline_tasks_run_with_a_limit(tiny_lm: tuple[Any, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.evaluate import evaluate, format_table
    from prunekit.evaluate.harness import task_rows

    model, tokenizer = tiny_lm
    capsys.readouterr()
    results = evaluate(model, tokenizer, tasks="austen-cloze,austen-nextsent,reviews-zeroshot", limit=3,
                       measure_latency=False, progress=False)
    assert "it/s]" not in capsys.readouterr().err  # lm-eval's own bars are hidden too
    tasks = results["tasks"]["tasks"]
    assert set(tasks) == {"austen-cloze", "austen-nextsent", "reviews-zeroshot"}
    assert tasks["austen-cloze"]["n_documents"] >= 1 and tasks["austen-nextsent"]["n_samples"] == 3
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(tasks["austen-nextsent"]["metrics"])
    assert set(tasks["austen-cloze"]["metrics"]) == {"acc", "acc_stderr"}
    assert "first 3 documents" in results["protocol"]["tasks"]
    table = format_table(task_rows({"tiny": results["tasks"]}))
    assert "austen-nextsent" in table and "±" in table and "25 %" in table


def test_bad_task_names_and_missing_lm_eval(tiny_lm: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit.evaluate.harness import run_tasks

    model, tokenizer = tiny_lm
    with pytest.raises(PrunekitError, match="unknown lm-eval task no-such-task: prunekit's offline tasks are"):
        run_tasks(model, tokenizer, "no-such-task")
    with pytest.raises(PrunekitError, match="could not download the data of arc_easy from the Hugging Face hub"):
        run_tasks(model, tokenizer, "arc_easy", limit=2)  # the hub is offline in every test
    with pytest.raises(PrunekitError, match="causal language model"):
        run_tasks(build_tiny_model("bert"), tokenizer, "reviews-zeroshot")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[eval\]'"):
        run_tasks(model, tokenizer, "reviews-zeroshot")


def test_eval_and_prune_commands_run_tasks(tiny_lm: tuple[Any, Any], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.cli.main import main

    model, tokenizer = tiny_lm
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--tasks", "reviews-zeroshot", "--limit", "4", "--no-latency", "--device", "cpu",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reviews-zeroshot" in printed and "±" in printed and "lm-evaluation-harness" in printed
    assert json.loads(out.read_text())["tasks"]["tasks"]["reviews-zeroshot"]["n_samples"] == 4

    pruned = tmp_path / "pruned"
    assert main(["prune", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--tasks", "reviews-zeroshot",
                 "--limit", "4", "--out", str(pruned), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "lm-evaluation-harness" in printed and "magnitude 0.5" in printed
    evaluation = json.loads((pruned / "prunekit.json").read_text())["evaluation"]
    assert evaluation["dense"]["tasks"]["tasks"]["reviews-zeroshot"]["n_samples"] == 4
    assert evaluation["pruned"]["tasks"]["lm_eval_version"] == evaluation["dense"]["tasks"]["lm_eval_version"]


def test_finetune_runs_tasks_before_and_after_and_train_refuses_them_for_a_classifier(
        tiny_lm: tuple[Any, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.cli.main import main

    model, tokenizer = tiny_lm
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pruned = tmp_path / "pruned"
    assert main(["prune", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--out", str(pruned),
                 "--device", "cpu"]) == 0
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"Line {i} of a small story about a house and a garden." for i in range(300)))
    out = tmp_path / "recovered"
    assert main(["finetune", str(pruned), "--data", f"text:{text}", "--max-steps", "1", "--batch-size", "2",
                 "--seq-len", "32", "--tasks", "reviews-zeroshot", "--limit", "4", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "lm-evaluation-harness" in printed and "reviews-zeroshot" in printed and "before" in printed
    assert "BOS token" in printed  # the final perplexity uses the same protocol as prunekit eval
    record = json.loads((out / "prunekit.json").read_text())
    assert "reviews-zeroshot" in json.dumps(record)

    code = main(["train", str(folder), "--task", "reviews", "--method", "gmp", "--sparsity", "0.5", "--tasks",
                 "reviews-zeroshot", "--out", str(tmp_path / "cls")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trains a classifier: drop --tasks" in err[0]
    assert not (tmp_path / "cls").exists()
