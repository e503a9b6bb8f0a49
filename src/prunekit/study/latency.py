"""The latency phase of a study: every finished run timed against its dense model, with no other run active.

Runs are made and evaluated first (possibly several at once); timing them then would measure the
other runs' load as much as the model. So latency is measured afterwards, in the main process, one
model at a time, each interleaved with the dense model it came from (:func:`prunekit.evaluate.speed.
compare_latency`: same token ids, order rotated every round, ratios as medians of per-round ratios).
Each run's timing is one row of the ``latency`` table, committed when measured.

"No other run active" covers the study's own runs; other processes on the machine (a test suite, a
benchmark) spoil a timing just as much. So each timing waits for the machine to be quiet
(:func:`prunekit.evaluate.cpuload.wait_until_quiet`), measures the other processes' share of the CPUs
while it runs, and is taken again (up to ``ATTEMPTS`` times) when they used more than
``cpuload.CONTENDED``; a figure still contended is stored with ``contended: true`` and left out of the
report's plots and answers. ``prunekit study ... --retime-latency`` times every run again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunekit.evaluate import cpuload
from prunekit.study.database import ResultsDatabase
from prunekit.study.execute import RunContext, machine_info

ATTEMPTS = 3
MAX_WAIT_S = 600.0  # the longest a timing waits for other processes to finish

PROTOCOL = ("interleaved with the dense model (prunekit.evaluate.speed.compare_latency): seeded random token ids, "
            "batch {batch_size} x {seq_len}; {warmup} untimed then {repeats} timed rounds, order rotated each round; "
            "forward = one pass (last position's logits only for causal LMs); decode = greedy generation of "
            "{gen_tokens} tokens, time per token after the first; ratio = median over rounds of run / dense; "
            "measured in a phase of its own, no other run active, {threads} threads on {device}")


def at_hand(row: dict[str, Any], context: RunContext) -> bool:
    """Whether the run's model can be loaded for timing (the dense model from its source; others from DIR)."""
    return row["folder"] is None or (Path(context.out) / row["folder"]).is_dir()


def _current(database: ResultsDatabase) -> list[dict[str, Any]]:
    """The database's rows of the study as last invoked (rows of earlier settings are not timed)."""
    keys = database.study_keys()
    return [row for row in database.runs() if keys is None or row["key"] in keys]


def forget_timings(database: ResultsDatabase, context: RunContext) -> int:
    """Drop the latency rows of the runs whose model is at hand (so the latency phase times them again)."""
    keys = [row["key"] for row in _current(database) if at_hand(row, context)]
    return database.drop_latency(keys)


def time_runs(database: ResultsDatabase, context: RunContext, say: Callable[[str], None], *,
              probe: Callable[[], cpuload.LoadProbe] = cpuload.other_load) -> int:
    """Time every finished run that has no latency row yet and whose model is at hand; returns how many."""
    import torch

    from prunekit.evaluate.speed import compare_latency
    from prunekit.models import load_model

    settings = context.evaluation["latency"]
    if not isinstance(settings, dict):
        return 0
    timed = database.timed_keys()
    pending = [row for row in _current(database) if row["key"] not in timed and at_hand(row, context)]
    if not pending:
        return 0
    say(f"latency phase: timing {len(pending)} run(s) against their dense model, one at a time")
    count = 0
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in pending:
        by_model.setdefault((row["model"], row["settings"].get("task") or "causal-lm"), []).append(row)
    for (model_name, task), rows in by_model.items():
        dense, _ = load_model(model_name, task=task, device="cpu", dtype=context.dtype)
        for row in rows:
            say(f"timing {row['label']}")
            models: dict[str, Any] = {"dense": dense}
            if row["folder"] is not None:
                models["run"], _ = load_model(str(Path(context.out) / row["folder"]), task=task, device="cpu",
                                              dtype=context.dtype)
            for attempt in range(1, ATTEMPTS + 1):
                cpuload.wait_until_quiet(MAX_WAIT_S, say, probe=probe)
                sample = probe()
                measured = compare_latency(models, seq_len=int(settings["seq_len"]),
                                           batch_size=int(settings["batch_size"]), repeats=int(settings["repeats"]),
                                           warmup=int(settings["warmup"]), gen_tokens=int(settings["gen_tokens"]),
                                           device=context.device)
                others = sample.stop()
                contended = others is not None and others > cpuload.CONTENDED
                if not contended:
                    break
                say(f"timing {row['label']}: other processes used {others:.0%} of the CPUs meanwhile"
                    + (": timing again" if attempt < ATTEMPTS else f": stored as contended after {ATTEMPTS} tries"))
            mine = measured.get("run", measured["dense"])
            base = measured["dense"]
            entry = {"forward_ms": mine.forward_ms_median, "forward_ratio": mine.forward_ratio,
                     "decode_ms_per_token": mine.decode_ms_per_token, "decode_ratio": mine.decode_ratio,
                     "dense_forward_ms": base.forward_ms_median, "dense_decode_ms_per_token": base.decode_ms_per_token,
                     "rounds": mine.rounds, "threads": torch.get_num_threads(), "device": mine.device,
                     "other_cpu_share": others, "contended": contended, "attempts": attempt,
                     "protocol": PROTOCOL.format(**settings, threads=torch.get_num_threads(), device=mine.device)}
            database.add_latency(row["key"], entry, machine_info())
            models.pop("run", None)
            count += 1
        del dense
    return count
