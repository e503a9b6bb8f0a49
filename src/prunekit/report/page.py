"""The report as one self-contained HTML page: figures embedded as base64 PNG, no external file or script."""

from __future__ import annotations

import base64
import datetime
import html
import json
from typing import Any

from prunekit.report.data import Entry, StudyData

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 34px; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 14px; }
dl.answers dt { font-weight: 600; margin-top: 10px; } dl.answers dd { margin: 2px 0 0 18px; }
figure { margin: 12px 0 24px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
pre { background: #f7f7f7; padding: 10px; font-size: 12px; overflow-x: auto; }
.failed { color: #a00; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _mb(value: int | None) -> str:
    return "" if not value else f"{value / 1e6:,.1f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _quality(entry: Entry, name: str) -> str:
    value = entry.quality.get(name)
    if value is None:
        return ""
    return f"{100 * value:.2f} %" if entry.metrics.get(name) == "accuracy" else f"{value:,.2f}"


def settings_text(entry: Entry) -> str:
    """The settings that make the run what it is: the method's given settings, calibration, training, recovery."""
    settings = entry.row.get("settings") or {}
    if entry.kind == "recovery":
        recovery = settings.get("recovery") or {}
        return f"{recovery.get('mode')} fine-tuning, {recovery.get('tokens'):,} tokens of {recovery.get('data')}, " \
               f"lr {recovery.get('lr') or 'default'}, batch {recovery.get('batch_size')} x {recovery.get('seq_len')}"
    parts: list[str] = []
    config = settings.get("config") or {}
    defaults = _defaults(entry.method)
    parts.extend(f"{k}={v}" for k, v in config.items() if k not in defaults or defaults[k] != v)
    calibration = settings.get("calibration")
    if calibration:
        parts.append(f"calibration {calibration.get('samples')} x {calibration.get('seq_len')} of "
                     f"{calibration.get('data')} (seed {calibration.get('seed')})")
    training = settings.get("training")
    if training:
        steps = training.get("max_steps")
        budget = f"{steps} steps" if steps else f"{training.get('epochs')} epochs"
        parts.append(f"trained on {training.get('data')}, {budget}, lr {training.get('lr')}, batch "
                     f"{training.get('batch_size')}")
    return ", ".join(parts)


def _defaults(method: str) -> dict[str, Any]:
    from prunekit.errors import PrunekitError
    from prunekit.methods import get_method

    try:
        return {info.name: info.default for info in get_method(method).config.settings()}
    except PrunekitError:
        return {}


def _machine(entry: Entry) -> str:
    machine = entry.row.get("machine") or {}
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    return f"{machine.get('cpu', '?')}, {machine.get('threads', '?')} threads{gpu}"


def _versions(entry: Entry) -> str:
    versions = entry.row.get("versions") or {}
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def runs_table(data: StudyData) -> str:
    sets: list[str] = []
    for model in data.models():
        sets.extend(name for name in data.eval_sets(model) if name not in sets)
    fmt = f"bytes MB ({data.format_name})" if data.format_name else None
    head = ["run", "model", "kind", "settings", "removed %", "params M", "nonzero M", "bytes MB (saved)",
            *([fmt] if fmt else []), *sets, "forward x dense", "decode x dense", "run s", "machine", "software",
            "finished"]
    text_columns = {"run", "model", "kind", "settings", "machine", "software", "finished"}
    rows = ["<tr>" + "".join(f'<th class="{"text" if h in text_columns else ""}">{_e(h)}</th>' for h in head) +
            "</tr>"]
    for e in data.entries:
        cells = [e.label, e.model, e.kind, settings_text(e), "" if e.removed is None else f"{100 * e.removed:.1f}",
                 "" if e.params is None else f"{e.params / 1e6:.2f}",
                 "" if e.nonzero is None else f"{e.nonzero / 1e6:.2f}", _mb(e.bytes_saved),
                 *([_mb(e.bytes_format)] if fmt else []), *(_quality(e, name) for name in sets),
                 "contended" if e.contended else _ratio(e.forward_ratio),
                 "contended" if e.contended else _ratio(e.decode_ratio), f"{e.seconds:.0f}", _machine(e), _versions(e),
                 str(e.row.get("finished", ""))]
        rows.append("<tr>" + "".join(f'<td class="{"text" if h in text_columns else ""}">{_e(c)}</td>'
                                     for h, c in zip(head, cells, strict=True)) + "</tr>")
    return '<div class="scroll"><table id="runs">' + "\n".join(rows) + "</table></div>"


def protocol_section(data: StudyData) -> str:
    """How everything was measured: evaluation settings, protocols as the measurements stated them, machines."""
    items = []
    evaluation = data.settings.get("evaluation") or {}
    items.append(f"<li>Evaluation settings: <code>{_e(json.dumps(evaluation, sort_keys=True))}</code></li>")
    protocols = list(dict.fromkeys(q.get("protocol") for e in data.entries
                                   for q in (e.row["results"].get("quality") or {}).values() if q.get("protocol")))
    items.extend(f"<li>Quality: {_e(p)}</li>" for p in protocols[:6])
    harness = next(((e.row["results"].get("tasks") or {}) for e in data.entries if e.row["results"].get("tasks")),
                   None)
    if harness:
        names = ", ".join(harness.get("tasks") or {})
        items.append(f"<li>Zero-shot tasks: {_e(names)} with {_e(harness.get('harness', 'lm-evaluation-harness'))} "
                     f"{_e(harness.get('lm_eval_version', ''))}, {_e(harness.get('limit') or 'all')} samples per task "
                     f"(the same samples for every run), accuracy as acc_norm (log-likelihood per byte of each "
                     f"choice) where the harness reports it, else acc; the table and the answers use one per task"
                     "</li>")
    size = next((e.row["results"].get("protocol", {}).get("size") for e in data.entries
                 if (e.row["results"].get("protocol") or {}).get("size")), None)
    if size:
        items.append(f"<li>Size: {_e(size)}</li>")
    latency = list(dict.fromkeys((e.row.get("latency") or {}).get("protocol") for e in data.entries
                                 if (e.row.get("latency") or {}).get("protocol")))
    items.extend(f"<li>Latency: {_e(p)}</li>" for p in latency[:3])
    machines = list(dict.fromkeys(_machine(e) + f" ({(e.row.get('machine') or {}).get('system', '')})"
                                  for e in data.entries))
    items.append("<li>Machines: " + "; ".join(_e(m) for m in machines) + "</li>")
    versions = list(dict.fromkeys(_versions(e) for e in data.entries))
    items.append("<li>Software: " + "; ".join(_e(v) for v in versions) + "</li>")
    return "<ul>" + "\n".join(items) + "</ul>"


def render(data: StudyData, figures: list[Any], answers: list[tuple[str, str]], study_yaml: str) -> str:
    """The whole page."""
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>prunekit study {_e(data.name)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Study {_e(data.name)}</h1>"]
    if data.description:
        parts.append(f"<p>{_e(data.description)}</p>")
    failed = f", {len(data.failures)} failed (listed below)" if data.failures else ""
    if data.hidden:
        failed += (f"; {data.hidden} row(s) made with earlier settings of this study (e.g. a default changed in a "
                   "newer prunekit) are kept in the database and not shown")
    parts.append(f'<p class="meta">{len(data.entries)} runs finished{failed}; report written {_e(when)} from '
                 f"{_e(data.folder / 'study.sqlite')}. Every run was evaluated the same way (protocol below).</p>")
    parts.append('<h2 id="answers">Answers</h2><dl class="answers">')
    parts.extend(f"<dt>{_e(q)}</dt><dd>{_e(a)}</dd>" for q, a in answers)
    parts.append("</dl>")
    for figure in figures:
        encoded = base64.b64encode(figure.png).decode("ascii")
        parts.append(f"<h2>{_e(figure.title)}</h2><figure><img alt=\"{_e(figure.title)}\" "
                     f"src=\"data:image/png;base64,{encoded}\"><figcaption>{_e(figure.caption)}</figcaption></figure>")
    parts.append('<h2 id="runs-title">Every run</h2>')
    parts.append(runs_table(data))
    if data.failures:
        parts.append('<h2>Failed runs</h2><ul class="failed">')
        parts.extend(f"<li>{_e(f['label'])} ({_e(f['at'])}): {_e(f['error'])}</li>" for f in data.failures)
        parts.append("</ul>")
    parts.append("<h2>Protocol</h2>")
    parts.append(protocol_section(data))
    if study_yaml:
        parts.append(f"<h2>Study file</h2><pre>{_e(study_yaml)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
