"""Fine-tuning on the Trainer with tiny random models: training, resume, recovery (masks, LoRA, distillation), CLI.

The helpers at the top (tiny BERT/Llama with word-level tokenizers, toy data) are shared by
test_gradual.py and test_accelerate.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from prunekit.adapters import get_adapter, weight_view
from prunekit.cli.main import main
from prunekit.data import ClassificationData, TextData
from prunekit.errors import PrunekitError
from prunekit.finetune import KeepMasks, LoraSettings, TrainConfig, distillation_loss, recover, train_model
from prunekit.finetune.recovery import masks_from_weights, merge_lora
from prunekit.masks import global_masks
from prunekit.methods.gradual import GMP, build_training_method

POSITIVE = ["good", "great", "fine", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
NEUTRAL = ["movie", "plot", "actor", "the", "a", "is", "was", "very", "scene", "film", "story", "it"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer() -> Any:
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={word: i for i, word in enumerate(SPECIAL + WORDS)})


def llama_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS, ".", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
                        initializer_range=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS) + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def toy_examples(n: int, seed: int, labels: int = 2) -> list[tuple[str, int]]:
    """Two neutral words and one sentiment word; label 1 when it is positive (2 = 'very' present, for 3 labels)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = rng.sample(NEUTRAL, 2) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        label = int(positive) if labels == 2 else rng.randrange(labels)
        out.append((" ".join(words), label))
    return out


def toy_classification(n_train: int = 64, labels: int = 2) -> ClassificationData:
    splits = {"train": toy_examples(n_train, 1, labels), "validation": toy_examples(32, 2, labels),
              "test": toy_examples(32, 3, labels)}
    return ClassificationData("toy", splits, [str(i) for i in range(labels)])


def toy_text(n_words: int = 3000) -> TextData:
    rng = random.Random(5)
    text = " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(n_words))
    return TextData("toy-text", {"train": text, "eval": text[: len(text) // 4], "calibration": text})


def write_csv(path: Path, examples: list[tuple[str, int]]) -> Path:
    lines = ["text,label"] + [f"{text},{label}" for text, label in examples]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_bert(folder: Path, num_labels: int = 2) -> Path:
    model, tokenizer = tiny_bert(num_labels), bert_tokenizer()
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quick(**overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {"epochs": 1.0, "batch_size": 16, "lr": 5e-3, "progress": False, "eval_steps": 0,
                                "save_steps": 0, "seq_len": 32, "max_length": 16}
    settings.update(overrides)
    return TrainConfig(**settings)


def magnitude_prune(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    layers = get_adapter(model).prunable_layers()
    masks = global_masks({name: weight_view(layer).abs() for name, layer in layers.items()}, sparsity)
    with torch.no_grad():
        for name, layer in layers.items():
            weight_view(layer).mul_(masks[name])
    return masks


# ---------------------------------------------------------------------------------------------------------
# training


def test_classification_training_learns_and_logs_metrics(tmp_path: Path) -> None:
    data = toy_classification(128)
    result = train_model(tiny_bert(), bert_tokenizer(), data, config=quick(epochs=4, eval_steps=16, lr=1e-2),
                         checkpoint_dir=tmp_path / "ckpt")
    evals = [entry for entry in result.history if "eval_accuracy" in entry]
    assert result.steps == result.total_steps == 32 and len(evals) == 2
    assert evals[-1]["eval_accuracy"] >= 0.9


def test_causal_lm_training_chunks_text_and_reports_perplexity(tmp_path: Path) -> None:
    model = tiny_llama()
    method = build_training_method("gmp", {"sparsity": 0.5, "update_every": 2})
    result = train_model(model, llama_tokenizer(), toy_text(), method=method, config=quick(eval_steps=5),
                         checkpoint_dir=tmp_path / "ckpt")
    n_blocks = result.n_train
    assert result.total_steps == -(-n_blocks // 16)
    assert any("eval_perplexity" in entry for entry in result.history)
    assert result.facts["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_resume_gives_the_same_final_mask(tmp_path: Path) -> None:
    data = toy_classification(96)

    def run(folder: Path, stop_after: int | None, resume: bool) -> Any:
        method = build_training_method("movement", {"sparsity": 0.7, "update_every": 2, "warmup_steps": 2})
        config = quick(epochs=2, stop_after=stop_after, weight_decay=0.01)
        return train_model(tiny_bert(), bert_tokenizer(), data, method=method, config=config, checkpoint_dir=folder,
                           resume=resume), method

    whole, whole_method = run(tmp_path / "a", None, False)
    first, _ = run(tmp_path / "b", 5, False)
    assert first.stopped_early and first.steps == 5
    with pytest.raises(PrunekitError, match="--resume"):
        run(tmp_path / "b", None, False)
    with pytest.raises(PrunekitError, match="other settings"):
        train_model(tiny_bert(), bert_tokenizer(), data, method=build_training_method("movement", {"sparsity": 0.5}),
                    config=quick(epochs=2, weight_decay=0.01), checkpoint_dir=tmp_path / "b", resume=True)
    second, second_method = run(tmp_path / "b", None, True)
    assert not second.stopped_early and second.steps == whole.steps == 12
    for name, mask in whole_method.masks.items():
        assert torch.equal(mask, second_method.masks[name]), name
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_without_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PrunekitError, match="no complete checkpoint"):
        train_model(tiny_bert(), bert_tokenizer(), toy_classification(), config=quick(), checkpoint_dir=tmp_path / "x",
                    resume=True)


def test_text_data_for_a_classifier_and_labels_beyond_the_head(tmp_path: Path) -> None:
    with pytest.raises(PrunekitError, match="no labels"):
        train_model(tiny_bert(), bert_tokenizer(), toy_text(), config=quick(), checkpoint_dir=tmp_path / "a")
    with pytest.raises(PrunekitError, match="head has 2 classes"):
        train_model(tiny_bert(2), bert_tokenizer(), toy_classification(labels=3), config=quick(),
                    checkpoint_dir=tmp_path / "b")
    empty = ClassificationData("none", {"train": toy_examples(8, 1)}, [])
    with pytest.raises(PrunekitError, match="no labels"):
        train_model(tiny_bert(), bert_tokenizer(), empty, config=quick(), checkpoint_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------------------------------
# recovery


def test_full_recovery_keeps_every_zero_under_adamw_weight_decay(tmp_path: Path) -> None:
    model = tiny_llama()
    masks = magnitude_prune(model, 0.6)
    before = {name: weight_view(layer).clone() for name, layer in get_adapter(model).prunable_layers().items()}
    result = recover(model, llama_tokenizer(), toy_text(), config=quick(weight_decay=0.1, lr=1e-2),
                     checkpoint_dir=tmp_path / "ckpt")
    after = get_adapter(result.model).prunable_layers()
    for name, mask in masks.items():
        weight = weight_view(after[name])
        assert torch.equal(weight != 0, mask), name
        assert not torch.equal(weight, before[name])  # the kept weights did train
    assert result.facts["sparsity"] == pytest.approx(result.extra["sparsity_before"])


def test_lora_merge_keeps_every_zero(tmp_path: Path) -> None:
    model = tiny_llama()
    masks = magnitude_prune(model, 0.5)
    result = recover(model, llama_tokenizer(), toy_text(), config=quick(lr=1e-2), lora=LoraSettings(rank=4),
                     checkpoint_dir=tmp_path / "ckpt")
    merged = result.model
    assert type(merged).__name__ == "LlamaForCausalLM"  # plain model, no peft wrapper left
    layers = get_adapter(merged).prunable_layers()
    changed = 0
    for name, mask in masks.items():
        weight = weight_view(layers[name])
        assert torch.equal(weight != 0, mask), name
        changed += int(weight.abs().sum() > 0)
    assert result.facts["lora_trainable_params"] > 0 and changed == len(masks)


def test_merge_lora_re_masks_a_dense_update() -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    masks = magnitude_prune(model, 0.5)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=list(masks), init_lora_weights=False))
    merged = merge_lora(wrapped, masks)
    for name, layer in get_adapter(merged).prunable_layers().items():
        assert torch.equal(weight_view(layer) != 0, masks[name])


def test_lora_rank_larger_than_a_layer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PrunekitError, match="larger than layer"):
        recover(tiny_llama(), llama_tokenizer(), toy_text(), config=quick(), lora=LoraSettings(rank=33),
                checkpoint_dir=tmp_path / "ckpt")


def test_distillation_loss_matches_kl() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (torch.log(p) - torch.log_softmax(student / t, -1))).sum() * t * t
    assert distillation_loss(student, teacher, t) == pytest.approx(float(expected), rel=1e-6)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-7)


def test_distillation_from_a_dense_teacher_keeps_masks(tmp_path: Path) -> None:
    teacher = tiny_llama()
    student = tiny_llama()
    masks = magnitude_prune(student, 0.5)
    result = recover(student, llama_tokenizer(), toy_text(), config=quick(distill_alpha=1.0), teacher=teacher,
                     checkpoint_dir=tmp_path / "ckpt")
    for name, layer in get_adapter(result.model).prunable_layers().items():
        assert torch.equal(weight_view(layer) != 0, masks[name])
    assert isinstance(KeepMasks(), KeepMasks)


def test_masks_from_weights_reads_zeros() -> None:
    model = tiny_bert()
    masks = magnitude_prune(model, 0.3)
    read = masks_from_weights(model)
    assert all(torch.equal(read[name], masks[name]) for name in masks)


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_cli_train_exports_a_record(tmp_path: Path) -> None:
    model_dir = save_tiny_bert(tmp_path / "bert")
    csv = write_csv(tmp_path / "toy.csv", toy_examples(160, 7))
    out = tmp_path / "out"
    code = main(["train", str(model_dir), "--task", f"csv:{csv}", "--method", "gmp", "--sparsity", "0.8",
                 "--epochs", "1", "--batch-size", "16", "--lr", "5e-3", "--max-length", "16", "--update-every", "2",
                 "--no-progress", "--device", "cpu", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "prunekit.json").read_text())
    assert record["method"] == "gmp" and record["task"] == "classification"
    assert record["sparsity"]["total"] == pytest.approx(0.8, abs=1e-3)
    assert 0.0 <= record["results"]["accuracy"] <= 1.0 and record["results"]["split"] == "test"
    assert record["schedule"]["total_steps"] == 8 and record["training"]["world_size"] == 1
    assert len(record["sparsity"]["layers"]) == 12
    assert not (tmp_path / "out.checkpoints").exists()
    from prunekit.export import load

    reloaded, _, _ = load(out)
    assert type(reloaded).__name__ == "BertForSequenceClassification"


def test_cli_finetune_lora_keeps_sparsity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.export import save_model

    model = tiny_llama()
    magnitude_prune(model, 0.5)
    model.config.architectures = ["LlamaForCausalLM"]
    pruned = save_model(model, llama_tokenizer(), tmp_path / "pruned",
                        {"task": "causal-lm", "source_model": "dense", "sparsity": {"target": 0.5}})
    text = tmp_path / "text.txt"
    text.write_text(toy_text().splits["train"])
    out = tmp_path / "rec"
    code = main(["finetune", str(pruned), "--data", f"text:{text}", "--lora", "--lora-rank", "4", "--max-tokens",
                 "2k", "--seq-len", "32", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "prunekit.json").read_text())
    assert record["recovery"]["mode"] == "lora"
    assert record["recovery"]["sparsity_after"] == pytest.approx(record["recovery"]["sparsity_before"])
    assert record["recovery"]["training"]["total_steps"] == 8  # 2000 tokens / (8 x 32) per step, rounded up
    assert record["results"]["perplexity"] > 1.0
    # the pruned model's held-out perplexity is measured the same way and shown beside the result
    before = record["results_before"]
    assert before["protocol"] == record["results"]["protocol"] and before["perplexity"] > 1.0
    printed = capsys.readouterr().out
    assert "(before)" in printed and f"{before['perplexity']:.2f}"[:4] in printed


@pytest.mark.parametrize("extra, words", [
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--warmup-steps", "50"], "do not fit"),
    (["--method", "nope"], "unknown method"),
])
def test_cli_train_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                              words: str) -> None:
    model_dir = save_tiny_bert(tmp_path / "bert")
    csv = write_csv(tmp_path / "toy.csv", toy_examples(40, 7))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["train", str(model_dir), "--task", f"csv:{csv}", "--batch-size", "16", "--no-progress",
                 "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.checkpoints").exists()


def test_cli_train_refuses_text_for_an_encoder_and_existing_output(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_tiny_bert(tmp_path / "bert")
    text = tmp_path / "t.txt"
    text.write_text("good movie. bad plot.\n" * 20)
    assert main(["train", str(model_dir), "--task", f"text:{text}", "--out", str(tmp_path / "o")]) == 2
    assert "has no labels" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    csv = write_csv(tmp_path / "toy.csv", toy_examples(40, 7))
    assert main(["train", str(model_dir), "--task", f"csv:{csv}", "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "mine"


def test_cli_train_refuses_labels_that_do_not_match_the_head(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.export import save_model

    trained = save_model(tiny_bert(2), bert_tokenizer(), tmp_path / "two", {"task": "classification"})
    csv = write_csv(tmp_path / "three.csv", toy_examples(40, 7, labels=3))
    assert main(["train", str(trained), "--task", f"csv:{csv}", "--out", str(tmp_path / "o")]) == 2
    assert "head has 2 classes" in capsys.readouterr().err


def test_cli_finetune_needs_the_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_tiny_bert(tmp_path / "plain")
    assert main(["finetune", str(folder), "--data", "austen", "--out", str(tmp_path / "o")]) == 2
    assert "prunekit.json" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_parse_count() -> None:
    from prunekit.jobs import parse_count

    assert parse_count("1M") == 1_000_000 and parse_count("250k") == 250_000 and parse_count(1e6) == 1_000_000
    assert parse_count(None) is None
    with pytest.raises(PrunekitError):
        parse_count("lots")


def test_gmp_class_is_registered_and_refuses_settings_it_does_not_take() -> None:
    assert isinstance(build_training_method("gmp", {"sparsity": 0.5}), GMP)
    with pytest.raises(PrunekitError, match="method gmp does not take unrelated; it takes sparsity"):
        build_training_method("gmp", {"sparsity": 0.5, "unrelated": 1})


def test_sentence_pairs_are_tokenised_as_pairs() -> None:
    from prunekit.finetune.data import classification_dataset

    dataset = classification_dataset(bert_tokenizer(), [(("good movie", "bad plot"), 1)], max_length=16)
    item = dataset[0]
    assert item["labels"] == 1 and item["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(PrunekitError, match="mix"):
        classification_dataset(bert_tokenizer(), [(("a", "b"), 1), ("c", 0)], max_length=16)
