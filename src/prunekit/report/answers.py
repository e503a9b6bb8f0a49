"""Short written answers to the study's questions, computed from its rows (never written by hand).

* the smallest and the fastest model within a quality tolerance of the dense model (``questions:``
  ``max_perplexity_ratio`` 1.5, ``max_accuracy_drop`` 0.02), with its bytes and speed against dense;
* which method keeps quality best at each sparsity (mean over seeds, with the seeds' spread);
* whether zeros make a model smaller or faster (as saved, in the compressed format, measured time);
* whether fine-tuning after pruning restores quality (share of the gap to dense closed), and whether it
  generalises better than the dense model fine-tuned on the same tokens, on every evaluation set and zero-shot
  task (a task accuracy within one standard error of the difference is reported as such, not as a win).
"""

from __future__ import annotations

from statistics import mean

from prunekit.report.data import Entry, StudyData


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric == "accuracy" else a < b


def _show(metric: str, value: float) -> str:
    return f"{100 * value:.2f} %" if metric == "accuracy" else f"{value:.2f}"


def _versus(metric: str, value: float, dense: float) -> str:
    """'1.46x dense' for perplexity, '-1.2 points' for accuracy."""
    if metric == "accuracy":
        return f"{100 * (value - dense):+.2f} points vs dense"
    return f"{value / dense:.2f}x dense"


def _within(metric: str, value: float, dense: float, data: StudyData) -> bool:
    questions = data.settings.get("questions") or {}
    if metric == "accuracy":
        return value >= dense - float(questions.get("max_accuracy_drop", 0.02))
    return value <= dense * float(questions.get("max_perplexity_ratio", 1.5))


def _tolerance(metric: str, data: StudyData) -> str:
    questions = data.settings.get("questions") or {}
    if metric == "accuracy":
        return f"at most {100 * float(questions.get('max_accuracy_drop', 0.02)):g} points below dense accuracy"
    return f"at <= {float(questions.get('max_perplexity_ratio', 1.5)):g}x dense perplexity"


def _speed(entry: Entry) -> str:
    if entry.forward_ratio is None:
        return "latency not timed"
    text = f"{1 / entry.forward_ratio:.2f}x as fast in a forward pass"
    if entry.decode_ratio:
        text += f", {1 / entry.decode_ratio:.2f}x in decoding"
    return text


def answers(data: StudyData) -> list[tuple[str, str]]:
    """(question, answer) pairs for every model of the study."""
    out: list[tuple[str, str]] = []
    for model in data.models():
        dense = data.dense(model)
        sets = data.eval_sets(model)
        if dense is None or not sets:
            out.append((f"{model}: how do pruned models compare with the dense one?",
                        "No dense run in this study to compare with (add dense: true, or a training run of method "
                        "none)."))
            continue
        primary = sets[0]
        metric = data.metric(model, primary)
        prefix = f"{model}: " if len(data.models()) > 1 else ""
        out.append(_smallest(data, model, dense, primary, metric, prefix))
        ranking = _ranking(data, model, dense, primary, metric, prefix)
        if ranking:
            out.append(ranking)
        zeros = _zeros(data, model, dense, prefix)
        if zeros:
            out.append(zeros)
        out.extend(_recovery(data, model, dense, sets, prefix))
    return out


def _ratio_span(values: list[float]) -> str:
    """'0.99-1.01', or '1.00' where both ends print alike."""
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return low if low == high else f"{low}-{high}"


TIMING_NOISE = 0.05  # a forward pass less than 5 % faster than dense's is not called faster


def _smallest(data: StudyData, model: str, dense: Entry, primary: str, metric: str, prefix: str
              ) -> tuple[str, str]:
    base = dense.quality.get(primary)
    question = f"{prefix}{_tolerance(metric, data)} on {primary}, what is the smallest and the fastest model?"
    by_key = {e.key: e for e in data.entries}
    pruned = [e for e in data.entries if e.model == model and primary in e.quality and not _unpruned(e, by_key)]
    if base is None or not pruned:
        return question, "No pruned run has been measured yet."
    good = [e for e in pruned if _within(metric, e.quality[primary], base, data)]
    if not good:
        best = min(pruned, key=lambda e: -e.quality[primary] if metric == "accuracy" else e.quality[primary])
        return question, (f"None: every pruned model is outside the tolerance; the closest is {best.label} "
                          f"({_show(metric, best.quality[primary])}, {_versus(metric, best.quality[primary], base)}).")
    sized = [e for e in good if e.bytes is not None and dense.bytes]
    parts = []
    if sized:
        small = min(sized, key=lambda e: (e.bytes or 0, e.quality[primary] if metric != "accuracy" else 0))
        where = f" ({data.format_name})" if data.format_name else " (as saved)"
        share = 100 * (small.bytes or 0) / (dense.bytes or 1)
        unsized = [e.label for e in good if e.bytes is None]
        parts.append(f"the smallest on disk{where} is {small.label}: {_show(metric, small.quality[primary])} "
                     f"({_versus(metric, small.quality[primary], base)}), {share:.0f} % of dense bytes, "
                     f"{_speed(small)}" + (f" ({', '.join(unsized)}: no bytes in that format)" if unsized else ""))
    timed = [e for e in good if e.forward_ratio is not None]
    fast = min(timed, key=lambda e: e.forward_ratio or 1.0) if timed else None
    if fast is not None and (fast.forward_ratio or 1.0) > 1 - TIMING_NOISE:
        ratios = [1 / (e.forward_ratio or 1.0) for e in timed]
        parts.append(f"none of them is measurably faster than dense ({_ratio_span(ratios)}x as fast in a forward pass; "
                     f"differences under {100 * TIMING_NOISE:.0f} % are taken as noise)")
    elif fast is not None:
        parts.append(f"the fastest is {fast.label}: {_show(metric, fast.quality[primary])}, {_speed(fast)}"
                     + (f", {100 * (fast.bytes or 0) / (dense.bytes or 1):.0f} % of dense bytes" if fast.bytes and
                        dense.bytes else ""))
    text = "; ".join(parts) if parts else f"{len(good)} run(s) are within it (bytes and latency not measured)"
    return question, text[0].upper() + text[1:] + "."


def _unpruned(entry: Entry, by_key: dict[str, Entry]) -> bool:
    """The dense model, the dense model trained (method none), or the dense model fine-tuned as a control."""
    while entry.kind == "recovery" and entry.parent in by_key:
        entry = by_key[entry.parent or ""]
    return entry.kind == "dense" or (entry.kind == "training" and entry.method == "none")


def _ranking(data: StudyData, model: str, dense: Entry, primary: str, metric: str, prefix: str
             ) -> tuple[str, str] | None:
    """At each sparsity where two or more methods ran: the methods from best to worst.

    Runs are grouped by the sparsity they were asked for (their setting, to a percent), else by the
    fraction they removed; where a run removed another fraction than it was asked for (FLOP's gates land
    near their target), the fraction removed is given beside it.
    """
    base = dense.quality.get(primary)
    levels: dict[int, dict[str, list[float]]] = {}
    removed: dict[tuple[int, str], list[float]] = {}
    for e in data.entries:
        if e.model != model or e.kind not in ("one-shot", "structured", "training") or e.removed is None:
            continue
        if primary not in e.quality or (e.kind == "training" and e.method == "none"):
            continue
        level = _asked_level(e)
        levels.setdefault(level, {}).setdefault(e.series, []).append(e.quality[primary])
        removed.setdefault((level, e.series), []).append(e.removed)
    parts = []
    for level in sorted(levels):
        group = levels[level]
        if len(group) < 2:
            continue
        ranked = sorted(group.items(), key=lambda item: -mean(item[1]) if metric == "accuracy" else mean(item[1]))
        shown = []
        for series, values in ranked:
            spread = f" ± {_half_spread(metric, values)} over {len(values)} seeds" if len(values) > 1 else ""
            versus = f" ({_versus(metric, mean(values), base)})" if base else ""
            actual = 100 * mean(removed[(level, series)])
            off = f" [{actual:.1f} % removed]" if abs(actual - level) >= 0.5 else ""
            shown.append(f"{series}{off} {_show(metric, mean(values))}{spread}{versus}")
        note = ""
        (first, a), (second, b) = ranked[0], ranked[1]
        if len(a) > 1 and len(b) > 1 and abs(mean(a) - mean(b)) <= max(_range(a), _range(b)) / 2:
            note = f" — {first} and {second} differ by less than one seed's noise"
        parts.append(f"at {level} % of block weights removed: " + ", then ".join(shown) + note)
    if not parts:
        return None
    return (f"{prefix}Which method keeps quality best on {primary} at each sparsity?",
            "; ".join(parts)[0].upper() + "; ".join(parts)[1:] + ".")


def _asked_level(entry: Entry) -> int:
    """The sparsity the run was asked for, in whole percent (its method setting), else the fraction it removed."""
    config = (entry.row.get("settings") or {}).get("config") or {}
    for name in ("sparsity", "ratio"):  # one-shot and training methods; heads-neurons
        asked = config.get(name)
        if isinstance(asked, int | float) and not isinstance(asked, bool) and 0 < asked < 1:
            return round(100 * asked)
    return round(100 * (entry.removed or 0.0))


def _range(values: list[float]) -> float:
    return max(values) - min(values)


def _half_spread(metric: str, values: list[float]) -> str:
    half = _range(values) / 2
    return f"{100 * half:.2f}" if metric == "accuracy" else f"{half:.2f}"


def _zeros(data: StudyData, model: str, dense: Entry, prefix: str) -> tuple[str, str] | None:
    """Unstructured and N:M runs (zeros, same shapes) against structured ones (smaller shapes)."""
    zeros = [e for e in data.entries if e.model == model and e.kind == "one-shot"]
    shrunk = [e for e in data.entries if e.model == model and (e.kind == "structured" or (  # or trained smaller (FLOP)
        e.kind == "training" and e.params and dense.params and e.params < dense.params))]
    if not zeros and not shrunk:
        return None
    parts = []
    if zeros and dense.bytes_saved:
        saved = sorted({round(100 * (e.bytes_saved or 0) / dense.bytes_saved) for e in zeros if e.bytes_saved})
        text = f"zeros ({len(zeros)} one-shot runs) keep the saved files at {_span(saved)} % of dense bytes"
        if data.format_name and dense.bytes_format:
            stored = [round(100 * (e.bytes_format or 0) / dense.bytes_format) for e in zeros if e.bytes_format]
            if stored:
                text += f", {_span(sorted(stored))} % as {data.format_name} (dense in that format = 100 %)"
        timed = [e.forward_ratio for e in zeros if e.forward_ratio is not None]
        if timed:
            text += f"; their forward time is {_ratio_span(timed)}x dense (same shapes, dense kernels)"
        parts.append(text)
    if shrunk and dense.bytes_saved:
        for e in shrunk:
            if e.bytes_saved:
                parts.append(f"{e.label} is {100 * e.bytes_saved / dense.bytes_saved:.0f} % of dense bytes as saved, "
                             f"{_speed(e)}")
    if not parts:
        return None
    text = "; ".join(parts)
    return f"{prefix}Do the zeros make the model smaller or faster?", text[0].upper() + text[1:] + "."


def _span(values: list[int]) -> str:
    return f"{values[0]}" if len(set(values)) == 1 else f"{values[0]}-{values[-1]}"


def _recovery(data: StudyData, model: str, dense: Entry, sets: list[str], prefix: str) -> list[tuple[str, str]]:
    """Gap closed by recovery fine-tuning, and the recovered runs against the dense model fine-tuned alike."""
    by_key = {e.key: e for e in data.entries}
    recovered = [e for e in data.entries if e.model == model and e.kind == "recovery" and e.parent in by_key]
    if not recovered:
        return []
    primary = sets[0]
    metric = data.metric(model, primary)
    base = dense.quality.get(primary)
    closed = []
    for e in recovered:
        parent = by_key[e.parent or ""]
        if parent.kind == "dense" or base is None or primary not in e.quality or primary not in parent.quality:
            continue
        gap = parent.quality[primary] - base
        if abs(gap) > 1e-12:
            share = (parent.quality[primary] - e.quality[primary]) / gap
            closed.append(f"{e.label}: {_show(metric, parent.quality[primary])} -> {_show(metric, e.quality[primary])} "
                          f"({100 * share:.0f} % of the gap to dense closed)")
    out = []
    if closed:
        out.append((f"{prefix}Does fine-tuning after pruning restore quality on {primary}?", "; ".join(closed) + "."))
    controls = {(_budget(e)): e for e in recovered if by_key[e.parent or ""].kind == "dense"}
    compared = []
    for e in recovered:
        control = controls.get(_budget(e))
        if control is None or e is control:
            continue
        scored = [name for name in sets if name in e.quality and name in control.quality]
        wins: list[str] = []
        ties: list[str] = []
        losses: list[str] = []
        for name in scored:
            a, b = e.quality[name], control.quality[name]
            noise = _noise(e, control, name)
            if noise > 0 and abs(a - b) <= noise:
                ties.append(name)
            else:
                (wins if _better(data.metric(model, name), a, b) else losses).append(name)
        detail = ", ".join(f"{name} {_show(data.metric(model, name), e.quality[name])} vs "
                           f"{_show(data.metric(model, name), control.quality[name])}" for name in scored)
        compared.append(f"{e.label} {_verdict(wins, ties, losses)} ({detail}; {control.label})")
    if compared:
        out.append((f"{prefix}Does pruning then fine-tuning generalise better than the dense model fine-tuned on the "
                    "same tokens?", "; ".join(compared) + "."))
    return out


def _noise(a: Entry, b: Entry, name: str) -> float:
    """One standard error of the difference a - b where both scores state theirs (zero-shot task accuracy on a
    few hundred samples), else 0: a perplexity over every window is compared as it is."""
    if name in a.stderr and name in b.stderr:
        return float((a.stderr[name] ** 2 + b.stderr[name] ** 2) ** 0.5)
    return 0.0


def _verdict(wins: list[str], ties: list[str], losses: list[str]) -> str:
    if not ties:
        if not losses:
            return "beats it on every set"
        if not wins:
            return "does not beat it on any set"
        return f"beats it on {', '.join(wins)} but not on {', '.join(losses)}"
    parts = [f"beats it on {', '.join(wins)}"] if wins else []
    parts += [f"is worse on {', '.join(losses)}"] if losses else []
    parts.append(f"{'is ' if not parts else ''}within one standard error of it on {', '.join(ties)}")
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def _budget(entry: Entry) -> tuple[str, int]:
    recovery = entry.row.get("settings", {}).get("recovery") or {}
    return str(recovery.get("mode")), int(recovery.get("tokens") or 0)
