"""Accuracy of a sequence-classification model: argmax of the logits against the label."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.evaluate.perplexity import eval_mode, output_logits, place_model

ExampleText = str | tuple[str, str]


@dataclass
class AccuracyResult:
    """Share of examples whose predicted class (argmax of the logits) equals the label."""

    accuracy: float
    n_examples: int
    correct: int
    split: str


def _encode(tokenizer: Any, texts: Sequence[ExampleText], max_length: int) -> Any:
    """Tokenise one batch: single texts, or (first, second) pairs; all of a batch must be the same kind."""
    pairs = [isinstance(t, (tuple, list)) for t in texts]
    common = {"padding": True, "truncation": True, "max_length": max_length, "return_tensors": "pt"}
    if all(pairs):
        firsts = [str(t[0]) for t in texts]
        seconds = [str(t[1]) for t in texts]
        return tokenizer(firsts, seconds, **common)
    if any(pairs):
        raise PrunekitError("the examples mix single texts and (first, second) pairs: "
                            "give one kind of example per dataset")
    return tokenizer([str(t) for t in texts], **common)


def accuracy(model: nn.Module, tokenizer: Any, examples: Sequence[tuple[ExampleText, int]], batch_size: int = 32,
             max_length: int = 128, device: str | torch.device | None = None, progress: bool = True,
             split: str = "eval") -> AccuracyResult:
    """Classification accuracy of ``model`` on ``(text, label)`` examples (text may be a pair).

    Texts are truncated to ``max_length`` tokens; ``device`` None runs where the model is.
    """
    if not examples:
        raise PrunekitError(f"no examples in split '{split}': give a labelled set with {split} examples")
    if batch_size < 1:
        raise PrunekitError(f"batch size {batch_size} must be at least 1: use --batch-size 1 or more")
    run_device = place_model(model, device)
    correct = 0
    with eval_mode(model), torch.inference_mode():
        bar = tqdm(total=len(examples), desc="accuracy", unit="example", disable=not progress, leave=False)
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            encoded = _encode(tokenizer, [text for text, _ in chunk], max_length)
            inputs = {key: value.to(run_device) for key, value in dict(encoded).items()
                      if isinstance(value, torch.Tensor)}
            logits = output_logits(model(**inputs))
            if logits.dim() != 2:
                raise PrunekitError("the model's logits are not one score per class: accuracy needs a "
                                    "sequence-classification model; measure a language model's perplexity instead")
            labels = torch.tensor([int(label) for _, label in chunk])
            if int(labels.max()) >= logits.shape[-1] or int(labels.min()) < 0:
                raise PrunekitError(f"labels run from {int(labels.min())} to {int(labels.max())} but the model "
                                    f"has {logits.shape[-1]} classes: use a model fine-tuned for this dataset")
            predicted = logits.argmax(dim=-1).cpu()
            correct += int((predicted == labels).sum().item())
            bar.update(len(chunk))
        bar.close()
    return AccuracyResult(accuracy=correct / len(examples), n_examples=len(examples), correct=correct, split=split)
