"""Training data for the Trainer: tokenised classification examples and fixed-length causal-LM blocks.

Nothing here is written to disk: examples are tokenised in memory once per run. Classification
batches are padded per batch (``DataCollatorWithPadding``); causal-LM blocks all have ``seq_len``
tokens, so they need no padding and ``labels`` are the ``input_ids`` (the model shifts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from prunekit.errors import PrunekitError

ExampleText = str | tuple[str, str]


class ListDataset(Dataset):
    """A list of feature dicts as a torch Dataset (what the Trainer's dataloader reads)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def check_labels(examples: Sequence[tuple[ExampleText, int]], num_labels: int, split: str, data_name: str) -> None:
    """Refuse labels outside 0..num_labels-1 (a head that does not match the dataset)."""
    if not examples:
        return
    labels = [int(label) for _, label in examples]
    low, high = min(labels), max(labels)
    if low < 0 or high >= num_labels:
        raise PrunekitError(f"the {split} labels of '{data_name}' run from {low} to {high} but the model's head has "
                            f"{num_labels} classes: use a model with a matching head, or a fresh model")


def classification_dataset(tokenizer: Any, examples: Sequence[tuple[ExampleText, int]],
                           max_length: int) -> ListDataset:
    """Tokenise (text, label) examples (text may be a (first, second) pair), truncated to ``max_length``."""
    if not examples:
        return ListDataset([])
    texts = [text for text, _ in examples]
    pairs = [isinstance(text, tuple | list) for text in texts]
    if any(pairs) and not all(pairs):
        raise PrunekitError("the examples mix single texts and (first, second) pairs: give one kind per dataset")
    if all(pairs):
        encoded = tokenizer([str(t[0]) for t in texts], [str(t[1]) for t in texts], truncation=True,
                            max_length=max_length)
    else:
        encoded = tokenizer([str(t) for t in texts], truncation=True, max_length=max_length)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
    items = []
    for i, (_, label) in enumerate(examples):
        item: dict[str, Any] = {key: encoded[key][i] for key in keys}
        item["labels"] = int(label)
        items.append(item)
    return ListDataset(items)


def causal_lm_blocks(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> ListDataset:
    """Cut a 1-D token stream into consecutive blocks of ``seq_len`` tokens (the partial tail is dropped)."""
    if seq_len < 2:
        raise PrunekitError(f"--seq-len {seq_len} is too short: use at least 2 tokens per block")
    stream = ids.reshape(-1)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n_blocks = stream.numel() // seq_len
    if n_blocks == 0:
        raise PrunekitError(f"the text has {stream.numel()} tokens, fewer than one block of {seq_len}: "
                            "lower --seq-len or give more text")
    blocks = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    return ListDataset([{"input_ids": block.clone(), "labels": block.clone()} for block in blocks])


def text_dataset(tokenizer: Any, text: str, seq_len: int, max_tokens: int | None = None) -> ListDataset:
    """Tokenise a text split as one stream (no special tokens) and cut it into ``seq_len`` blocks."""
    from prunekit.data import tokenize_text

    if max_tokens is not None:
        # tokenising a huge split only to keep its head wastes time: ~12 characters per token is generous
        text = text[: max(4096, max_tokens * 12)]
    return causal_lm_blocks(tokenize_text(tokenizer, text), seq_len, max_tokens)


def collator(task: str, tokenizer: Any) -> Any:
    """The batch builder: padding per batch for classification, stacking for causal-LM blocks."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if task == "classification":
        if tokenizer is None:
            raise PrunekitError("the model folder has no tokenizer: save the tokenizer with the model")
        return DataCollatorWithPadding(tokenizer)
    return default_data_collator
