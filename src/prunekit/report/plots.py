"""The report's figures, drawn with matplotlib (object API: no pyplot, no global backend change) as PNG bytes.

Each function returns a list of :class:`Figure` (title, caption, PNG) — empty when the study has nothing
to show for it (e.g. no recovery runs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from statistics import mean
from typing import Any

from prunekit.evaluate.cpuload import CONTENDED
from prunekit.report.data import Entry, StudyData, block_profile, pareto

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
          "#7f7f7f")
DPI = 100


@dataclass
class Figure:
    title: str
    caption: str
    png: bytes


def _new(rows: int, columns: int, height: float = 4.2) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(11, height * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _colors(data: StudyData) -> dict[str, str]:
    names = list(dict.fromkeys(e.series for e in data.entries if e.kind not in ("dense", "recovery")))
    return {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}


def _quality_axis(ax: Any, metric: str, values: list[float]) -> None:
    """Perplexity on a log scale when it spans more than 3x (plain numbers on the ticks), accuracy in percent."""
    from matplotlib.ticker import FuncFormatter

    positive = [v for v in values if v > 0]
    if metric == "perplexity" and positive and max(positive) / min(positive) > 3:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if str(f"{value:g}")[0] in "1235"
                                                   else ""))
        ax.set_ylabel("perplexity (log scale, lower is better)")
    elif metric == "perplexity":
        ax.set_ylabel("perplexity (lower is better)")
    else:
        ax.set_ylabel("accuracy, % (higher is better)")
    ax.grid(True, which="both", alpha=0.3)


def _values(data: StudyData, model: str, eval_set: str, metric: str) -> list[float]:
    return [_value(metric, e.quality[eval_set]) for e in data.entries if e.model == model and eval_set in e.quality]


def _value(metric: str, value: float) -> float:
    return 100 * value if metric == "accuracy" else value


def _dense_line(ax: Any, data: StudyData, model: str, eval_set: str, metric: str) -> None:
    dense = data.dense(model)
    if dense is not None and eval_set in dense.quality:
        name = "dense" if dense.kind == "dense" else "dense fine-tuned"
        ax.axhline(_value(metric, dense.quality[eval_set]), color="black", linestyle="--", linewidth=1,
                   label=f"{name} {_value(metric, dense.quality[eval_set]):.2f}")


def quality_vs_sparsity(data: StudyData) -> list[Figure]:
    """Per model and evaluation set: quality against the fraction of block weights removed, one line per method."""
    colors = _colors(data)
    panels = [(model, name) for model in data.models() for name in data.eval_sets(model)]
    pruned = [e for e in data.entries if e.kind in ("one-shot", "structured", "training") and e.removed is not None
              and not (e.kind == "training" and e.method == "none")]
    if not pruned or not panels:
        return []
    figure, axes = _new(len(panels), 1)
    for ax, (model, eval_set) in zip(axes, panels, strict=True):
        metric = data.metric(model, eval_set)
        groups: dict[str, dict[float, list[float]]] = {}
        for e in pruned:
            if e.model == model and eval_set in e.quality:
                groups.setdefault(e.series, {}).setdefault(round(100 * (e.removed or 0), 1), []).append(
                    _value(metric, e.quality[eval_set]))
        for series, points in groups.items():
            xs = sorted(points)
            ys = [mean(points[x]) for x in xs]
            low = [y - min(points[x]) for x, y in zip(xs, ys, strict=True)]
            high = [max(points[x]) - y for x, y in zip(xs, ys, strict=True)]
            ax.errorbar(xs, ys, yerr=[low, high] if any(low) or any(high) else None, marker="o", capsize=3,
                        color=colors.get(series), label=series)
        _dense_line(ax, data, model, eval_set, metric)
        _quality_axis(ax, metric, _values(data, model, eval_set, metric))
        ax.set_xlabel("block weights removed (zero or gone), % of the dense model's")
        ax.set_title(f"{model}: {eval_set} vs sparsity")
        ax.legend(fontsize=8)
    return [Figure("Quality vs sparsity", "One line per method (and structure/allocation); points are means over "
                   "seeds, bars their range. The dashed line is the dense model.", _png(figure))]


def _frontier_plot(ax: Any, points: list[tuple[float, float, Entry]], metric: str, colors: dict[str, str],
                   xlabel: str) -> None:
    higher = metric == "accuracy"
    frontier = pareto(points, higher)
    on = {id(e) for e in frontier}
    for x, y, e in points:
        color = "black" if e.kind == "dense" else colors.get(e.series, "#7f7f7f")
        marker = "s" if e.kind == "recovery" else ("*" if e.kind == "dense" else "o")
        ax.scatter([x], [y], color=color, marker=marker, s=90 if id(e) in on else 40,
                   edgecolors="black" if id(e) in on else "none", zorder=3)
    line = sorted(((x, y) for x, y, e in points if id(e) in on))
    if line:
        xs, ys = zip(*line, strict=True)
        ax.step(xs, ys, where="post", color="black", alpha=0.5, linewidth=1.2, label="Pareto frontier")
    for x, y, e in points:
        if id(e) in on or e.kind == "dense":
            ax.annotate(e.label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8, loc="best")


def quality_vs_bytes(data: StudyData) -> list[Figure]:
    """Quality on the first evaluation set against bytes on disk, the Pareto frontier marked."""
    colors = _colors(data)
    panels = []
    for model in data.models():
        sets = data.eval_sets(model)
        if not sets:
            continue
        points = [(e.bytes / 1e6, _value(data.metric(model, sets[0]), e.quality[sets[0]]), e)
                  for e in data.entries if e.model == model and e.bytes and sets[0] in e.quality]
        if len(points) >= 2:
            panels.append((model, sets[0], points))
    if not panels:
        return []
    figure, axes = _new(len(panels), 1)
    where = data.format_name or "safetensors as saved"
    for ax, (model, eval_set, points) in zip(axes, panels, strict=True):
        metric = data.metric(model, eval_set)
        _frontier_plot(ax, points, metric, colors, f"weight files on disk, MB ({where})")
        _quality_axis(ax, metric, [y for _, y, _ in points])
        ax.set_title(f"{model}: {eval_set} vs bytes on disk")
    unsized = [f"{e.label} ({e.format_error()})" for e in data.entries if e.format_error()]
    left_out = (f" Not shown, as {where} could not hold them: {'; '.join(unsized)}." if unsized else "")
    return [Figure("Quality vs bytes on disk", f"Bytes of the weight files stored as {where}. Circles: pruned, "
                   "squares: pruned and fine-tuned, star: dense; larger outlined markers and the step line form the "
                   "Pareto frontier (no other run is both smaller and better)." + left_out, _png(figure))]


def quality_vs_latency(data: StudyData) -> list[Figure]:
    """Quality against measured forward (and decode) time relative to dense, the Pareto frontier marked."""
    colors = _colors(data)
    panels = []
    for model in data.models():
        sets = data.eval_sets(model)
        if not sets:
            continue
        metric = data.metric(model, sets[0])
        for attribute, name in (("forward_ratio", "forward pass"), ("decode_ratio", "decoding, per token")):
            points = [(float(getattr(e, attribute)), _value(metric, e.quality[sets[0]]), e) for e in data.entries
                      if e.model == model and getattr(e, attribute) is not None and sets[0] in e.quality]
            if len(points) >= 2:
                panels.append((model, sets[0], name, points))
    if not panels:
        return []
    figure, axes = _new((len(panels) + 1) // 2, 2 if len(panels) > 1 else 1)
    for ax, (model, eval_set, name, points) in zip(axes, panels, strict=False):
        metric = data.metric(model, eval_set)
        _frontier_plot(ax, points, metric, colors, f"{name} time, x dense (measured, interleaved)")
        _quality_axis(ax, metric, [y for _, y, _ in points])
        ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
        ax.set_title(f"{model}: {eval_set} vs {name} time", fontsize=10)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return [Figure("Quality vs measured latency", "Time relative to the dense model, timed interleaved with it in a "
                   "phase with no other run active (below 1 = faster). The frontier marks the runs no other run "
                   "beats on both speed and quality. Timings during which other processes used more than "
                   f"{CONTENDED:.0%} of "
                   "the CPUs are marked contended in the table of runs and left out.", _png(figure))]


def recovery(data: StudyData) -> list[Figure]:
    """Before and after recovery fine-tuning, per pruned run and budget, on every evaluation set."""
    by_key = {e.key: e for e in data.entries}
    recovered = [e for e in data.entries if e.kind == "recovery" and e.parent in by_key]
    if not recovered:
        return []
    panels = [(model, name) for model in data.models() for name in data.eval_sets(model)
              if any(r.model == model for r in recovered)]
    figure, axes = _new(len(panels), 1)
    for ax, (model, eval_set) in zip(axes, panels, strict=True):
        metric = data.metric(model, eval_set)
        parents = [by_key[key] for key in dict.fromkeys(r.parent or "" for r in recovered if r.model == model)]
        budgets = list(dict.fromkeys(r.label[len(by_key[r.parent or ""].label) + 3:] for r in recovered
                                     if r.model == model))
        shown: list[float] = []
        for i, parent in enumerate(parents):
            chain = [("before", parent)] + [(b, r) for b in budgets for r in recovered
                                             if r.parent == parent.key and r.label == f"{parent.label} + {b}"]
            points = [(i + 0.12 * j, _value(metric, e.quality[eval_set]), name)
                      for j, (name, e) in enumerate(chain) if eval_set in e.quality]
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], color="#999999", linewidth=1, zorder=1)
            for x, y, name in points:
                k = 0 if name == "before" else 1 + budgets.index(name)
                ax.scatter([x], [y], color=COLORS[k % len(COLORS)], marker="o" if k == 0 else "D", s=45, zorder=3,
                           label="before fine-tuning" if k == 0 else f"after {name}")
                shown.append(y)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        _dense_line(ax, data, model, eval_set, metric)
        _quality_axis(ax, metric, shown)
        ax.set_xticks(range(len(parents)), [p.label for p in parents], rotation=12, fontsize=8)
        ax.set_title(f"{model}: {eval_set} before and after recovery fine-tuning")
        dense_handles, dense_labels = ax.get_legend_handles_labels()
        extra = {label: handle for handle, label in zip(dense_handles, dense_labels, strict=True)
                 if label not in unique}
        ax.legend(list({**unique, **extra}.values()), list({**unique, **extra}), fontsize=8)
    return [Figure("Recovery: before and after fine-tuning", "Each pruned run (and the dense model, the control) "
                   "before fine-tuning and after each budget of training tokens, every zero kept; the dashed line is "
                   "the dense model before any fine-tuning.", _png(figure))]


def layer_sparsity(data: StudyData) -> list[Figure]:
    """Per-block fraction removed, for the runs whose allocation varies between blocks."""
    curves = []
    for e in data.entries:
        if e.kind not in ("one-shot", "structured", "training"):
            continue
        profile = block_profile(e, data.dense(e.model))
        values = list(profile.values())
        if len(values) >= 2 and max(values) - min(values) > 0.01:
            curves.append((e, profile))
    if not curves:
        return []
    colors = _colors(data)
    figure, axes = _new(1, 1)
    ax = axes[0]
    for i, (e, profile) in enumerate(curves):
        ax.plot(list(profile), [100 * v for v in profile.values()], marker=".", label=e.label,
                color=colors.get(e.series, COLORS[i % len(COLORS)]), linestyle="-" if i % 2 == 0 else "--")
    ax.set_xlabel("block (0 = nearest the input)")
    ax.set_ylabel("block weights removed, %")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("per-block sparsity where the allocation varies")
    return [Figure("Per-layer sparsity", "Fraction of each block's weights that are zero or gone, for the runs whose "
                   "allocation differs between blocks (OWL, global comparisons, structured global).", _png(figure))]


def all_figures(data: StudyData) -> list[Figure]:
    return [*quality_vs_sparsity(data), *quality_vs_bytes(data), *quality_vs_latency(data), *recovery(data),
            *layer_sparsity(data)]
