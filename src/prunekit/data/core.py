"""Data types, tokenisation helpers and the on-disk cache format shared by all dataset sources.

Cache layout: every prepared set lives in ``cache_dir()/data/<folder>/`` with a ``manifest.json``
(kind, splits -> file, description, source, counts) and one plain file per split: ``.txt`` for
text sets, ``.jsonl`` (``{"text": ..., "label": ...}`` per line) for classification sets. Nothing
model-specific (token ids) is ever written to disk.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.utils import atomic_dir, atomic_write_bytes, cache_dir

# A classification example's text: one string, or a (first, second) pair for sentence-pair tasks
# (GLUE mrpc/rte/qnli/mnli, or a local file with a ``text_pair`` column). Trainers pass a pair to
# the tokenizer as ``tokenizer(first, second)``.
ExampleText = str | tuple[str, str]
Example = tuple[ExampleText, int]

SPLIT_SEED = 1234  # seed of every "shuffle then 80/10/10" split in prunekit


@dataclass
class TextData:
    """A language-modelling text set: raw text per split (``calibration``, ``train``, ``eval``, ...)."""

    name: str
    splits: dict[str, str]
    description: str = ""


@dataclass
class ClassificationData:
    """A labelled text set: ``(text, label_id)`` examples per split (``train``, ``validation``, ``test``).

    ``text`` is a ``str`` or, for sentence-pair tasks, a ``(first, second)`` tuple.
    """

    name: str
    splits: dict[str, list[Example]]
    label_names: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def num_labels(self) -> int:
        """Number of classes (length of ``label_names``)."""
        return len(self.label_names)


Data = TextData | ClassificationData


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _split_text(data: TextData, split: str) -> str:
    if not isinstance(data, TextData):
        raise PrunekitError(f"dataset '{data.name}' is a classification set, not text: "
                            "use a text set (austen, wikitext2, text:PATH) for calibration and perplexity")
    if split not in data.splits:
        raise PrunekitError(f"dataset '{data.name}' has no split '{split}': use one of {', '.join(data.splits)}")
    return data.splits[split]


TOKEN_CACHE_MIN_CHARS = 200_000  # shorter texts tokenise in well under a second: not worth a cache file


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D LongTensor.

    The whole text is tokenised in one call with ``add_special_tokens=False``: no BOS/EOS is added,
    so windows cut from it start mid-stream. ``verbose=False`` silences the "sequence longer than
    model_max_length" warning, which does not apply because the ids are cut into windows afterwards.
    Long texts (a novel split) are cached in ``cache_dir()/tokens/``, keyed by a hash of the text and
    of the tokenizer's full definition, so the next command skips the tokenisation.
    """
    cached = _token_cache_path(tokenizer, text) if len(text) >= TOKEN_CACHE_MIN_CHARS else None
    if cached is not None and cached.is_file():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:  # a damaged cache file: tokenise again and rewrite it
            pass
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    tokens = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if cached is not None:
        _save_tokens(cached, tokens)
    return tokens


def _token_cache_path(tokenizer: Any, text: str) -> Path | None:
    """The cache file for (tokenizer, text), or None when the tokenizer cannot be fingerprinted."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None  # slow tokenizers: no exact fingerprint, no cache
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(backend.to_str().encode())
    digest.update(b"\0")
    digest.update(text.encode("utf-8", "surrogatepass"))
    return cache_dir() / "tokens" / f"{digest.hexdigest()[:32]}.pt"


def _save_tokens(path: Path, tokens: torch.Tensor) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(tokens, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:  # a read-only cache only costs the time to tokenise again
        pass


def calibration_batch(tokenizer: Any, data: TextData, n_samples: int, seq_len: int, seed: int = 0,
                      split: str = "calibration") -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from ``split``, as a ``[n_samples, seq_len]`` LongTensor.

    The split is tokenised as one text (see :func:`tokenize_text`); window starts are drawn
    uniformly, with replacement, by a ``torch.Generator`` seeded with ``seed``, so the same seed
    gives the same batch and different seeds give different windows. The split must hold at least
    ``max(seq_len + 1, n_samples * seq_len)`` tokens.
    """
    if n_samples < 1 or seq_len < 1:
        raise PrunekitError(f"calibration needs at least one sample of at least one token (got {n_samples} "
                            f"samples of {seq_len}): use positive --calib-samples and --seq-len")
    text = _split_text(data, split)
    ids = tokenize_text(tokenizer, text)
    needed = max(seq_len + 1, n_samples * seq_len)
    if ids.numel() < needed:
        raise PrunekitError(f"{split} split of '{data.name}' has {ids.numel()} tokens, fewer than the {needed} "
                            "requested: lower --calib-samples/--seq-len or give more text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    offsets = torch.arange(seq_len)
    return ids[starts[:, None] + offsets[None, :]]


def calibration_with_record(tokenizer: Any, data: TextData | None, name: str, n_samples: int, seq_len: int,
                            seed: int) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """:func:`calibration_batch` and the record entry a prune run keeps of it; (None, None) without data."""
    if data is None:
        return None, None
    batch = calibration_batch(tokenizer, data, n_samples, seq_len, seed=seed)
    return batch, {"data": name, "split": "calibration", "samples": int(batch.shape[0]),
                   "seq_len": int(batch.shape[1]), "seed": seed}


def eval_tokens(tokenizer: Any, data: TextData, split: str = "eval", max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of the token ids of ``split`` (tokenised as one text), cut to the first ``max_tokens``."""
    ids = tokenize_text(tokenizer, _split_text(data, split))
    if ids.numel() == 0:
        raise PrunekitError(f"{split} split of '{data.name}' has no tokens: give a dataset with some {split} text")
    return ids if max_tokens is None else ids[:max_tokens]


# ---------------------------------------------------------------------------------------------
# Splitting helpers


def split_examples(examples: Sequence[Example], seed: int = SPLIT_SEED) -> dict[str, list[Example]]:
    """Shuffle with ``random.Random(seed)`` and cut 80/10/10 into train/validation/test.

    validation and test each get ``n // 10`` examples, train the rest.
    """
    items = list(examples)
    random.Random(seed).shuffle(items)
    n_small = len(items) // 10
    n_train = len(items) - 2 * n_small
    return {"train": items[:n_train], "validation": items[n_train:n_train + n_small],
            "test": items[n_train + n_small:]}


def split_text_tail(text: str, fraction: float = 0.1) -> tuple[str, str]:
    """Split ``text`` into (head, tail) where the tail is about the last ``fraction`` of characters.

    The cut falls at the line boundary just before the ``1 - fraction`` point (at a space, or at the
    exact character, when the text has no earlier newline).
    """
    point = int(len(text) * (1 - fraction))
    cut = text.rfind("\n", 0, point)
    if cut <= 0:
        cut = text.rfind(" ", 0, point)
    if cut <= 0:
        cut = point
    return text[:cut], text[cut:].lstrip("\n ")


WHOLE_SPLIT = "all"  # a local file's whole text: what `prunekit eval` scores when no split is named


def text_splits(text: str) -> dict[str, str]:
    """calibration/train = first ~90% of the text, eval = last ~10% (cut at a line boundary), all = the whole text."""
    head, tail = split_text_tail(text)
    return {"calibration": head, "train": head, "eval": tail, WHOLE_SPLIT: text}


# ---------------------------------------------------------------------------------------------
# Prepared-data cache


def data_root() -> Path:
    """``cache_dir()/data``: where prepared datasets are stored."""
    return cache_dir() / "data"


def folder_for(name: str) -> Path:
    """Cache folder of a built-in dataset (``glue/sst2`` -> ``data/glue-sst2``)."""
    return data_root() / name.replace("/", "-")


def is_prepared(name: str) -> bool:
    """True when the built-in dataset ``name`` has a complete prepared copy in the cache."""
    return (folder_for(name) / "manifest.json").is_file()


def _line_count(text: str) -> int:
    return text.count("\n") + (0 if text.endswith("\n") or not text else 1)


def write_prepared(name: str, data: Data, source: str, extra: dict[str, Any] | None = None,
                   overwrite: bool = False, aliases: dict[str, str] | None = None,
                   files: dict[str, str] | None = None) -> Path:
    """Store ``data`` in its cache folder (written to a temporary folder, then renamed into place).

    ``aliases`` maps a split name to another split whose file it shares (e.g. calibration -> train);
    ``files`` are extra text files (name -> text) stored beside the splits and listed in the manifest.
    """
    final = folder_for(name)
    overwrite = overwrite or (final.exists() and not is_prepared(name))  # replace a half-deleted folder
    aliases = aliases or {}
    manifest: dict[str, Any] = {"name": name, "kind": "text" if isinstance(data, TextData) else "classification",
                                "source": source, "description": data.description, "splits": {}, "counts": {}}
    if isinstance(data, ClassificationData):
        manifest["label_names"] = data.label_names
    try:
        with atomic_dir(final, overwrite=overwrite) as tmp:
            written: dict[str, str] = {}
            for split, content in data.splits.items():
                if split in aliases:
                    continue
                if isinstance(content, str):
                    written[split] = f"{split}.txt"
                    (tmp / written[split]).write_text(content, encoding="utf-8")
                    manifest["counts"][split] = {"characters": len(content), "lines": _line_count(content)}
                else:
                    written[split] = f"{split}.jsonl"
                    lines = [json.dumps({"text": list(t) if isinstance(t, tuple) else t, "label": y},
                                        ensure_ascii=False) for t, y in content]
                    (tmp / written[split]).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
                    manifest["counts"][split] = {"examples": len(content)}
            manifest["splits"] = {split: written[aliases.get(split, split)] for split in data.splits}
            for fname, text in (files or {}).items():
                (tmp / fname).write_text(text, encoding="utf-8")
                manifest.setdefault("files", {})[fname] = {"characters": len(text), "lines": _line_count(text)}
            manifest.update(extra or {})
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    except OSError:
        if is_prepared(name):  # another process finished the same preparation first
            return final
        raise
    return final


def read_manifest(folder: Path, name: str) -> dict[str, Any]:
    """The manifest of a prepared folder; a PrunekitError when it is missing or damaged."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or "splits" not in manifest:
            raise ValueError("no 'splits' entry")
        return manifest
    except (OSError, ValueError) as exc:
        raise PrunekitError(f"prepared data in '{folder}' is damaged ({exc}): run `prunekit data "
                            f"prepare {name} --force` or delete that folder") from exc


def read_prepared(name: str) -> Data:
    """Load a prepared dataset from its cache folder."""
    folder = folder_for(name)
    manifest = read_manifest(folder, name)
    try:
        if manifest.get("kind") == "classification":
            splits: dict[str, list[Example]] = {}
            for split, fname in manifest["splits"].items():
                splits[split] = []
                for line in (folder / fname).read_text(encoding="utf-8").split("\n"):
                    if line.strip():
                        rec = json.loads(line)
                        text = tuple(rec["text"]) if isinstance(rec["text"], list) else rec["text"]
                        splits[split].append((text, int(rec["label"])))
            return ClassificationData(name, splits, list(manifest.get("label_names", [])),
                                      manifest.get("description", ""))
        files: dict[str, str] = {}
        for fname in set(manifest["splits"].values()):
            files[fname] = (folder / fname).read_text(encoding="utf-8")
        texts = {split: files[fname] for split, fname in manifest["splits"].items()}
        return TextData(name, texts, manifest.get("description", ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrunekitError(f"prepared data in '{folder}' is damaged ({exc}): run `prunekit data "
                            f"prepare {name} --force` or delete that folder") from exc
