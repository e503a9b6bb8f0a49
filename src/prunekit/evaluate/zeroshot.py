"""prunekit's offline zero-shot tasks: examples built from its own prepared data, for lm-evaluation-harness.

The task definitions are lm-eval YAML files in ``prunekit/evaluate/tasks/`` (pass that folder to lm-eval
as ``--include_path``); each names one function of this module as its ``custom_dataset``, which builds
the examples from prunekit's prepared data (``prunekit data prepare austen reviews``; prepared on first
use when the source can be reached). Every build is deterministic: fixed seeds, no network.

* ``austen-cloze`` (LAMBADA-style): passages from the two novels prunekit never calibrates or trains
  on (Persuasion, Northanger Abbey). A passage ends with the last word of a sentence; that word is
  the target (the punctuation after it is dropped). Kept only when the target is not a function word,
  has at least 3 letters and occurs earlier in the passage (so the context can tell it, as in LAMBADA),
  with 40 to 100 words of context (whole sentences, earlier paragraphs joined by a newline): 367
  passages, in a seeded random order. Metric: accuracy = the greedy continuation is exactly the target
  word (lm-eval's ``is_greedy``). Chance: about 0 (an open vocabulary).
* ``austen-nextsent``: the same two novels; context = the 1 or 2 sentences before, in the same paragraph
  (at least 20 words); choices = the true next sentence and 3 distractors drawn from the same book at
  least 50 sentences away, each of 6 to 40 words, within 0.67x-1.5x the true sentence's length and
  opening with a quotation mark exactly when the true one does. 200 examples drawn by seed; the true
  sentence is at each of the 4 places equally often. Metrics: acc and acc_norm (log-likelihood per
  byte). Chance: 25 %.
* ``reviews-zeroshot``: the 1,056 test snippets of prunekit's ``reviews`` set (rated movie-review
  snippets, label = rating > 0), prompt and choices as lm-eval's SST-2 task: "{snippet}\\nQuestion: Is this
  sentence positive or negative?\\nAnswer:" then " negative" / " positive". Chance: 50 %; always
  answering the majority class scores the majority share of the test split (52.84 %).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prunekit.errors import PrunekitError

HELD_OUT_SPLITS = ("eval", "extra")  # austen splits holding Persuasion and Northanger Abbey
SEED = 1234
CLOZE_EXAMPLES = 500
NEXTSENT_EXAMPLES = 200

ABBREVIATIONS = frozenset({"mr", "mrs", "dr", "st", "esq", "col", "capt", "messrs", "rev", "sir", "no", "vol"})
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me might more most must my myself no nor not now
of off on once only or other ought our ours ourselves out over own same shall she should so some such than that
the their theirs them themselves then there these they this those through to too under until up upon very was we
were what when where which while who whom why will with would yet you your yours yourself yourselves one said
""".split())
_END = re.compile(r"""^(.*?[A-Za-z])[.!?]["')]*$""")  # a word that ends a sentence (closing quotes allowed)
_TARGET = re.compile(r"""^([A-Za-z]+)[.!?]["')]*$""")  # ... whose word is plain letters
_HEADING = re.compile(r"^(chapter|volume|book)\b", re.IGNORECASE)


@dataclass(frozen=True)
class TaskInfo:
    """What a built-in task measures and the score of guessing."""

    name: str
    description: str
    chance: float  # expected accuracy of a uniform random guess
    metric: str  # the headline metric


TASKS = {
    "austen-cloze": TaskInfo("austen-cloze", "last word of a passage from Persuasion / Northanger Abbey "
                             "(LAMBADA-style, greedy exact match)", 0.0, "acc"),
    "austen-nextsent": TaskInfo("austen-nextsent", "true next sentence vs 3 distractors from the same book "
                                "(Persuasion / Northanger Abbey)", 0.25, "acc"),
    "reviews-zeroshot": TaskInfo("reviews-zeroshot", "sentiment of 1,056 rated movie-review snippets, "
                                 "SST-2 prompt, ' negative' / ' positive'", 0.5, "acc"),
}


# ---------------------------------------------------------------------------------------------
# text into paragraphs and sentences


def paragraphs(text: str) -> list[list[str]]:
    """The paragraphs of a novel as lists of words (blank-line separated; headings and short lines dropped)."""
    out: list[list[str]] = []
    for block in re.split(r"\n\s*\n", text):
        words = block.split()
        if len(words) < 8 or _HEADING.match(block.strip()):
            continue
        out.append(words)
    return out


def ends_sentence(words: Sequence[str], index: int) -> bool:
    """True when ``words[index]`` closes a sentence: .!? (then closing quotes), not an abbreviation, and the
    next word (if any) opens with a capital letter or a quotation mark."""
    match = _END.match(words[index])
    if not match or match.group(1).split("'")[-1].lower() in ABBREVIATIONS:
        return False
    if index + 1 >= len(words):
        return True
    first = words[index + 1][:1]
    return first.isupper() or first in "\"'("


def sentences(words: Sequence[str]) -> list[list[str]]:
    """A paragraph's words cut into sentences."""
    out: list[list[str]] = []
    current: list[str] = []
    for index, word in enumerate(words):
        current.append(word)
        if ends_sentence(words, index):
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def _bare(word: str) -> str:
    return re.sub(r"[^A-Za-z]", "", word).lower()


# ---------------------------------------------------------------------------------------------
# builders (pure functions of the texts)


def cloze_examples(books: Iterable[str], n: int = CLOZE_EXAMPLES, seed: int = SEED, min_context: int = 40,
                   max_context: int = 100) -> list[dict[str, Any]]:
    """LAMBADA-style passages (``context``, ``target``) from the books' texts; see the module docstring."""
    candidates: list[dict[str, Any]] = []
    for text in books:
        paras = paragraphs(text)
        for p, words in enumerate(paras):
            for j in range(len(words) - 1, 0, -1):
                match = _TARGET.match(words[j])
                if not match or not ends_sentence(words, j):
                    continue
                target = match.group(1)
                if len(target) < 3 or target.lower() in STOPWORDS:
                    continue
                context = _cloze_context(paras, p, j, min_context, max_context)
                if context is None or target.lower() not in {_bare(w) for w in context.split()}:
                    continue
                candidates.append({"context": context, "target": target})
    random.Random(seed).shuffle(candidates)
    return candidates[:n]


def _cloze_context(paras: list[list[str]], p: int, j: int, min_words: int, max_words: int) -> str | None:
    """Whole sentences before word ``j`` of paragraph ``p`` (earlier paragraphs added while short), or None."""
    parts: list[list[str]] = [paras[p][:j]]
    q = p
    while sum(len(part) for part in parts) < min_words and q > 0:
        q -= 1
        parts.insert(0, paras[q])
    total = sum(len(part) for part in parts)
    if total < min_words:
        return None
    while total > max_words:  # drop whole sentences from the front
        first = parts[0]
        cut = next((i + 1 for i in range(len(first) - 1) if ends_sentence(first, i)), len(first))
        if cut == len(first) and len(parts) == 1:
            return None
        total -= cut
        parts[0] = first[cut:]
        if not parts[0]:
            parts.pop(0)
    if total < min_words:
        return None
    return "\n".join(" ".join(part) for part in parts)


def nextsent_examples(books: Iterable[str], n: int = NEXTSENT_EXAMPLES, seed: int = SEED, n_choices: int = 4,
                      min_words: int = 6, max_words: int = 40, min_context: int = 20, max_sentences: int = 2,
                      min_distance: int = 50) -> list[dict[str, Any]]:
    """Next-sentence multiple choice (``context``, ``choices``, ``label``); see the module docstring."""
    rng = random.Random(seed)
    candidates: list[tuple[list[str], list[int], int, str]] = []  # (sentences of the book, lengths, index, context)
    for text in books:
        flat: list[tuple[int, str]] = []  # (paragraph index, sentence) in book order
        for p, words in enumerate(paragraphs(text)):
            flat.extend((p, " ".join(sentence)) for sentence in sentences(words))
        book = [sentence for _, sentence in flat]
        lengths = [len(sentence.split()) for sentence in book]
        for k in range(1, len(flat)):
            if not min_words <= lengths[k] <= max_words:
                continue
            before = [i for i in range(max(0, k - max_sentences), k) if flat[i][0] == flat[k][0]]
            if before and sum(lengths[i] for i in before) >= min_context:
                candidates.append((book, lengths, k, " ".join(book[i] for i in before)))
    rng.shuffle(candidates)
    out: list[dict[str, Any]] = []
    for book, lengths, k, context in candidates:
        if len(out) == n:
            break
        truth, quoted = book[k], book[k].startswith('"')
        pool = [i for i in range(len(book)) if abs(i - k) >= min_distance and min_words <= lengths[i] <= max_words
                and 0.67 * lengths[k] <= lengths[i] <= 1.5 * lengths[k] and book[i].startswith('"') == quoted
                and book[i] != truth]
        if len(pool) < n_choices - 1:
            continue
        distractors = [book[i] for i in rng.sample(pool, n_choices - 1)]
        label = len(out) % n_choices  # the true sentence sits equally often at every position
        out.append({"context": context, "choices": distractors[:label] + [truth] + distractors[label:],
                    "label": label})
    return out


def sentiment_examples(examples: Sequence[tuple[Any, int]]) -> list[dict[str, Any]]:
    """``(text, label)`` pairs as lm-eval documents (``text``, ``label``), in their order."""
    return [{"text": str(text), "label": int(label)} for text, label in examples]


# ---------------------------------------------------------------------------------------------
# lm-eval entry points (`custom_dataset` of the task YAML files): prunekit's prepared data -> documents


def _dataset(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    import datasets

    if not rows:
        raise PrunekitError(f"task {name} found no examples in its data: run `prunekit data prepare "
                            f"{'reviews' if name.startswith('reviews') else 'austen'} --force`")
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def _held_out_books() -> list[str]:
    from prunekit.data import TextData, load_data

    data = load_data("austen")
    missing = [split for split in HELD_OUT_SPLITS if split not in data.splits]
    if not isinstance(data, TextData) or missing:
        raise PrunekitError(f"prepared austen lacks the split(s) {', '.join(missing)}: run "
                            "`prunekit data prepare austen --force`")
    return [data.splits[split] for split in HELD_OUT_SPLITS]


def austen_cloze(n: int = CLOZE_EXAMPLES, seed: int = SEED, **_: Any) -> dict[str, Any]:
    """The ``austen-cloze`` documents (lm-eval passes the task's metadata and dataset_kwargs as keywords)."""
    return _dataset(cloze_examples(_held_out_books(), n=int(n), seed=int(seed)), "austen-cloze")


def austen_nextsent(n: int = NEXTSENT_EXAMPLES, seed: int = SEED, **_: Any) -> dict[str, Any]:
    """The ``austen-nextsent`` documents."""
    return _dataset(nextsent_examples(_held_out_books(), n=int(n), seed=int(seed)), "austen-nextsent")


def reviews_zeroshot(split: str = "test", **_: Any) -> dict[str, Any]:
    """The ``reviews-zeroshot`` documents: one split of prunekit's ``reviews`` set."""
    from prunekit.data import ClassificationData, load_data

    data = load_data("reviews")
    if not isinstance(data, ClassificationData) or split not in data.splits:
        raise PrunekitError(f"prepared reviews has no '{split}' split: run `prunekit data prepare reviews --force`")
    return _dataset(sentiment_examples(data.splits[split]), "reviews-zeroshot")
