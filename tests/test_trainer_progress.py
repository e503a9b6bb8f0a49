"""The trainer says how much work a run is and, after its first step, how long it will take; classifier check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers as tf
from torch import nn

from prunekit.finetune.trainer import TrainConfig, describe_work, format_duration, is_classifier, train_model

SENTENCES = ["This movie was wonderful and the acting was great!",
             "This film was terrible; the plot was boring and far too long.",
             "The quick brown fox jumps over the lazy dog.",
             "Pruning removes weights from a model; fine-tuning recovers what was lost."]


def test_is_classifier_asks_the_registry_not_the_class_name(make_tiny_model: Callable[..., nn.Module]) -> None:
    bert = make_tiny_model("bert")  # BertForSequenceClassification
    llama = make_tiny_model("llama")  # LlamaForCausalLM
    assert is_classifier(bert) and not is_classifier(llama)
    assert is_classifier(make_tiny_model("llama", task="classification"))  # LlamaForSequenceClassification
    assert not is_classifier(make_tiny_model("bert", task="base"))  # BertModel: no head

    class Scorer(tf.BertForSequenceClassification):  # a renamed subclass is still a classifier
        pass

    class FakeForSequenceClassification(tf.LlamaForCausalLM):  # a misleading name is still a causal LM
        pass

    assert is_classifier(Scorer(bert.config))
    assert not is_classifier(FakeForSequenceClassification(llama.config))


def test_is_classifier_looks_through_a_peft_wrapper(make_tiny_model: Callable[..., nn.Module]) -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    assert is_classifier(peft.get_peft_model(make_tiny_model("bert"), config))
    causal = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    assert not is_classifier(peft.get_peft_model(make_tiny_model("llama"), causal))


def test_describe_work_states_steps_examples_and_tokens() -> None:
    causal = describe_work(74, TrainConfig(batch_size=8, seq_len=256), 1, 592, causal_lm=True)
    assert causal == ("prunekit: training 74 optimiser steps of 8 blocks x 256 tokens = 2,048 tokens each, "
                      "151,552 tokens in all (1.0 passes over 592 blocks)")
    labelled = describe_work(265, TrainConfig(batch_size=32), 1, 8456, causal_lm=False)
    assert labelled == ("prunekit: training 265 optimiser steps of 32 examples each, 8,480 examples in all "
                        "(1.0 passes over 8,456 examples)")
    resumed = describe_work(795, TrainConfig(batch_size=16, grad_accum=2), 2, 8456, causal_lm=False, start_step=200)
    assert "595 optimiser steps (resuming at step 200)" in resumed
    assert "16 x 2 accumulated x 2 processes = 64 examples each, 38,080 examples in all" in resumed


def test_format_duration() -> None:
    assert [format_duration(s) for s in (3.2, 89, 600, 5400)] == ["3 s", "89 s", "10 min", "1.5 h"]


def run_training(tmp_path: Path, model: nn.Module, tokenizer: Any, data: Any, progress: bool) -> Any:
    config = TrainConfig(max_steps=3, batch_size=4, lr=1e-3, progress=progress, eval_steps=0, save_steps=0,
                         seq_len=16, max_length=16, device="cpu")
    return train_model(model, tokenizer, data, config=config, checkpoint_dir=tmp_path / f"ckpt-{progress}")


def announcements(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("prunekit: ")]


def test_a_run_announces_its_work_and_its_time(tmp_path: Path, make_tiny_model: Callable[..., nn.Module],
                                               tiny_tokenizer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.data import ClassificationData, TextData

    labelled = ClassificationData("toy", {"train": [(text, i % 2) for i, text in enumerate(SENTENCES * 5)]},
                                  ["negative", "positive"])
    run_training(tmp_path, make_tiny_model("bert"), tiny_tokenizer, labelled, progress=True)
    lines = announcements(capsys.readouterr().out)
    assert len(lines) == 2, lines
    assert lines[0] == ("prunekit: training 3 optimiser steps of 4 examples each, 12 examples in all "
                        "(0.6 passes over 20 examples)")
    assert lines[1].startswith("prunekit: first step ") and lines[1].endswith(
        " for 3 steps on this machine (plus evaluations)")

    text = TextData("toy", {"train": " ".join(SENTENCES * 30), "eval": " ".join(SENTENCES)})
    run_training(tmp_path, make_tiny_model("llama"), tiny_tokenizer, text, progress=True)
    lines = announcements(capsys.readouterr().out)
    assert len(lines) == 2 and "4 blocks x 16 tokens = 64 tokens each, 192 tokens in all" in lines[0], lines
    assert " for 3 steps on this machine" in lines[1]

    run_training(tmp_path, make_tiny_model("bert"), tiny_tokenizer, labelled, progress=False)
    assert announcements(capsys.readouterr().out) == []
