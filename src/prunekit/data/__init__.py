"""Datasets for calibration, perplexity and classification fine-tuning.

Public API::

    load_data(name) -> TextData | ClassificationData
    list_datasets() -> list[dict]
    prepare_dataset(name, source=None, force=False) -> Path
    calibration_batch(tokenizer, data, n_samples, seq_len, seed=0, split="calibration") -> LongTensor
    eval_tokens(tokenizer, data, split="eval", max_tokens=None) -> LongTensor

Text splits are tokenised as one string with ``tokenizer(text, add_special_tokens=False)``; token
ids are never written to disk. Prepared built-in sets live in ``cache_dir()/data/<name>/``.
"""

from prunekit.data.austen import read_r_lazyload
from prunekit.data.core import (
    ClassificationData,
    Data,
    Example,
    ExampleText,
    TextData,
    calibration_batch,
    calibration_with_record,
    eval_tokens,
    tokenize_text,
)
from prunekit.data.registry import BUILTINS, list_datasets, load_data, prepare_dataset

__all__ = [
    "BUILTINS",
    "ClassificationData",
    "Data",
    "Example",
    "ExampleText",
    "TextData",
    "calibration_batch",
    "calibration_with_record",
    "eval_tokens",
    "list_datasets",
    "load_data",
    "prepare_dataset",
    "read_r_lazyload",
    "tokenize_text",
]
