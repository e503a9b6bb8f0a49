"""Datasets from the Hugging Face hub, loaded with ``datasets.load_dataset``.

Built-in hub sets (converted once and stored in the prunekit cache like the other built-ins):

* ``wikitext2`` -- Salesforce/wikitext, wikitext-2-raw-v1. Each split's ``text`` rows joined by
  ``"\\n\\n"`` (the GPTQ/SparseGPT protocol): train -> calibration/train, validation, test -> eval.
* ``ptb`` -- ptb_text_only (penn_treebank); ``sentence`` rows joined by ``" "``: train ->
  calibration/train, validation, test -> eval.
* ``c4`` -- allenai/c4, the first English validation shard; eval = the first 1100 documents
  (the GPTQ convention), calibration = train = the next 5000; documents joined by ``"\\n\\n"``.
* ``glue/<task>`` for sst2, mrpc, rte, cola, qnli, mnli (nyu-mll/glue). GLUE hides its test labels,
  so test = the GLUE validation set (validation_matched for mnli), validation = a 10% holdout of the
  GLUE train set (seed 1234) and train = the rest. Pair tasks give ``(first, second)`` texts.

Any other name with a slash (``owner/name`` or ``owner/name:config``) is loaded as a generic hub
set: a ``label`` column makes it a classification set, otherwise its ``text`` column a text set.

The conversions are small pure functions over mappings of split name -> ``datasets.Dataset``, so
they are testable on in-memory datasets. Network failures become :class:`UnreachableError`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from prunekit.data.core import SPLIT_SEED, ClassificationData, Data, Example, ExampleText, TextData, split_examples
from prunekit.errors import PrunekitError, UnreachableError

HUB_TEXT: dict[str, dict[str, Any]] = {
    "wikitext2": {"repo": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "column": "text", "sep": "\n\n",
                  "description": "WikiText-2 raw (Salesforce/wikitext, wikitext-2-raw-v1): rows joined by blank "
                                 "lines; calibration = train = train split, eval = test split, plus validation."},
    "ptb": {"repo": "ptb-text-only/ptb_text_only", "config": "penn_treebank", "column": "sentence", "sep": " ",
            "description": "Penn Treebank text (ptb_text_only, penn_treebank): sentences joined by spaces; "
                           "calibration = train = train split, eval = test split, plus validation."},
}
C4_REPO = "allenai/c4"
C4_FILES = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_EVAL_DOCS, C4_CALIB_DOCS = 1100, 5000
C4_DESCRIPTION = (f"C4 English ({C4_REPO}, validation shard 0): eval = first {C4_EVAL_DOCS} documents, calibration "
                  f"= train = the next {C4_CALIB_DOCS}, documents joined by blank lines.")
GLUE_REPO = "nyu-mll/glue"
# task -> (first text column, second text column or None, label names, GLUE split used as test)
GLUE: dict[str, tuple[str, str | None, list[str], str]] = {
    "sst2": ("sentence", None, ["negative", "positive"], "validation"),
    "mrpc": ("sentence1", "sentence2", ["not_equivalent", "equivalent"], "validation"),
    "rte": ("sentence1", "sentence2", ["entailment", "not_entailment"], "validation"),
    "cola": ("sentence", None, ["unacceptable", "acceptable"], "validation"),
    "qnli": ("question", "sentence", ["entailment", "not_entailment"], "validation"),
    "mnli": ("premise", "hypothesis", ["entailment", "neutral", "contradiction"], "validation_matched"),
}
TEXT_COLUMNS = ("text", "sentence", "content", "document")


def glue_description(task: str) -> str:
    pair = " Examples are (first, second) sentence pairs." if GLUE[task][1] else ""
    return (f"GLUE {task} ({GLUE_REPO}): train = GLUE train minus a 10% holdout (seed {SPLIT_SEED}) that is "
            f"validation; test = GLUE {GLUE[task][3]} (GLUE test labels are hidden).{pair}")


def _is_network_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "TimeoutError",
                "ConnectTimeout", "ReadTimeout", "ConnectError", "TimeoutException", "NetworkError"}:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("couldn't reach", "offline", "connection", "name or service not known",
                                   "temporary failure in name resolution", "max retries"))


def hub_load(label: str, repo: str, config: str | None = None, **kwargs: Any) -> Any:
    """``datasets.load_dataset(repo, config, **kwargs)`` with prunekit errors.

    Unreachable hub (no network, or HF_HUB_OFFLINE=1 without a local copy) -> UnreachableError;
    other failures -> PrunekitError naming the dataset. Global settings are never changed.
    """
    try:
        import datasets
    except ImportError as exc:
        raise PrunekitError(f"hub dataset '{label}' needs the 'datasets' package: pip install datasets") from exc
    try:
        try:
            return datasets.load_dataset(repo, config, **kwargs)
        except RuntimeError as exc:  # repos still holding a loading script: use the hub's parquet export
            if "scripts are no longer supported" not in str(exc) or "revision" in kwargs:
                raise
            return datasets.load_dataset(repo, config, revision="refs/convert/parquet", **kwargs)
    except Exception as exc:
        if _is_network_error(exc):
            fallback = "save it as CSV/JSONL and use csv:PATH or jsonl:PATH" if label.startswith("glue/") \
                else "save the text and use text:PATH"
            raise UnreachableError(f"cannot reach the Hugging Face hub for dataset '{label}': connect to the "
                                   f"internet, or {fallback}") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunekitError(f"cannot load hub dataset '{label}' ({first}): check the name and config, or save "
                            "the data and use text:PATH, csv:PATH or jsonl:PATH") from exc


def join_column(ds: Any, column: str, sep: str) -> str:
    """All values of ``column`` in ``ds`` joined by ``sep`` (None values count as empty strings)."""
    return sep.join("" if v is None else str(v) for v in ds[column])


def text_from_splits(name: str, dsdict: Mapping[str, Any], column: str, sep: str, description: str) -> TextData:
    """wikitext2/ptb layout: train -> calibration/train, validation -> validation, test -> eval."""
    splits: dict[str, str] = {}
    if "train" in dsdict:
        splits["calibration"] = splits["train"] = join_column(dsdict["train"], column, sep)
    if "validation" in dsdict:
        splits["validation"] = join_column(dsdict["validation"], column, sep)
    if "test" in dsdict:
        splits["eval"] = join_column(dsdict["test"], column, sep)
    if not splits:
        raise PrunekitError(f"hub dataset '{name}' has none of the splits train/validation/test "
                            f"(found {', '.join(dsdict)}): save the text and use text:PATH")
    return TextData(name, splits, description)


def c4_from_docs(docs: list[str], eval_docs: int = C4_EVAL_DOCS, calib_docs: int = C4_CALIB_DOCS) -> TextData:
    """c4 layout: eval = the first ``eval_docs`` documents, calibration = train = the next ``calib_docs``."""
    train = "\n\n".join(docs[eval_docs:eval_docs + calib_docs])
    return TextData("c4", {"calibration": train, "train": train, "eval": "\n\n".join(docs[:eval_docs])},
                    C4_DESCRIPTION)


def _examples(ds: Any, first: str, second: str | None) -> list[Example]:
    """(text, label) pairs of ``ds``; rows with a negative (hidden) label are dropped."""
    texts = ds[first]
    pairs = ds[second] if second else None
    out: list[Example] = []
    for i, label in enumerate(ds["label"]):
        if label is None or int(label) < 0:
            continue
        text: ExampleText = (str(texts[i]), str(pairs[i])) if pairs is not None else str(texts[i])
        out.append((text, int(label)))
    return out


def glue_from_hub(task: str, dsdict: Mapping[str, Any]) -> ClassificationData:
    """GLUE layout (see the module docstring): train/validation from GLUE train, test = GLUE validation."""
    first, second, label_names, test_split = GLUE[task]
    train = _examples(dsdict["train"], first, second)
    rng = random.Random(SPLIT_SEED)
    order = list(range(len(train)))
    rng.shuffle(order)
    n_val = len(train) // 10
    held = set(order[:n_val])
    splits = {"train": [ex for i, ex in enumerate(train) if i not in held],
              "validation": [train[i] for i in sorted(held)],
              "test": _examples(dsdict[test_split], first, second)}
    return ClassificationData(f"glue/{task}", splits, list(label_names), glue_description(task))


def _label_names(ds: Any) -> list[str] | None:
    feature = getattr(ds, "features", {}).get("label") if hasattr(ds, "features") else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def generic_from_hub(name: str, dsdict: Mapping[str, Any]) -> Data:
    """Any hub set: a ``label`` column -> classification, else its text column -> text."""
    if not dsdict:
        raise PrunekitError(f"hub dataset '{name}' has no splits: check the name")
    first_split = next(iter(dsdict.values()))
    columns = list(first_split.column_names)
    text_col = next((c for c in TEXT_COLUMNS if c in columns), None)
    if text_col is None:
        raise PrunekitError(f"hub dataset '{name}' has columns {', '.join(columns)} but needs one of "
                            f"{', '.join(TEXT_COLUMNS)}: save it as csv/jsonl with 'text' and 'label' and use csv:PATH")
    if "label" not in columns:
        data = text_from_splits(name, dsdict, text_col, "\n\n", f"hub text set {name} (column '{text_col}')")
        if "eval" not in data.splits and "validation" in data.splits:
            data.splits["eval"] = data.splits["validation"]
        return data
    known = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
             "test": "test"}
    splits: dict[str, list[Example]] = {}
    for split, ds in dsdict.items():
        if split in known:
            examples = _examples(ds, text_col, None)
            if examples:
                splits[known[split]] = examples
    if set(splits) == {"train"}:
        splits = split_examples(splits["train"])
    n_labels = 1 + max((y for exs in splits.values() for _, y in exs), default=0)
    label_names = _label_names(first_split) or [str(i) for i in range(n_labels)]
    return ClassificationData(name, splits, label_names, f"hub labelled set {name} (column '{text_col}')")


def load_hub_builtin(name: str) -> Data:
    """Download and convert a built-in hub set (wikitext2, ptb, c4, glue/<task>)."""
    if name in HUB_TEXT:
        spec = HUB_TEXT[name]
        dsdict = hub_load(name, spec["repo"], spec["config"])
        return text_from_splits(name, dsdict, spec["column"], spec["sep"], spec["description"])
    if name == "c4":
        ds = hub_load(name, C4_REPO, None, data_files=C4_FILES, split="validation")
        n = C4_EVAL_DOCS + C4_CALIB_DOCS
        return c4_from_docs(list(ds.select(range(min(n, len(ds))))["text"]))
    task = name.split("/", 1)[1]
    return glue_from_hub(task, hub_load(name, GLUE_REPO, task))


def load_hub_generic(spec: str) -> Data:
    """``owner/name`` or ``owner/name:config`` from the hub, converted by :func:`generic_from_hub`."""
    repo, _, config = spec.partition(":")
    return generic_from_hub(spec, hub_load(spec, repo, config or None))
