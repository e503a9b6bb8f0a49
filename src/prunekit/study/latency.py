"""The latency phase of a study: every finished run timed against its dense model, with no other run active.

Runs are made and evaluated first (possibly several at once); timing them then would measure the
other runs' load as much as the model. So latency is measured afterwards, in the main process, one
model at a time, each interleaved with the dense model it came from (:func:`prunekit.evaluate.speed.
compare_latency`: same token ids, order rotated every round, ratios as medians of per-round ratios).
Each run's timing is one row of the ``latency`` table, committed when measured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunekit.study.database import ResultsDatabase
from prunekit.study.execute import RunContext, machine_info

PROTOCOL = ("interleaved with the dense model (prunekit.evaluate.speed.compare_latency): seeded random token ids, "
            "batch {batch_size} x {seq_len}; {warmup} untimed then {repeats} timed rounds, order rotated each round; "
            "forward = one pass (last position's logits only for causal LMs); decode = greedy generation of "
            "{gen_tokens} tokens, time per token after the first; ratio = median over rounds of run / dense; "
            "measured in a phase of its own, no other run active, {threads} threads on {device}")


def time_runs(database: ResultsDatabase, context: RunContext, say: Callable[[str], None]) -> int:
    """Time every finished run that has no latency row yet and whose model is at hand; returns how many."""
    import torch

    from prunekit.evaluate.speed import compare_latency
    from prunekit.models import load_model

    settings = context.evaluation["latency"]
    if not isinstance(settings, dict):
        return 0
    timed = database.timed_keys()
    pending = [row for row in database.runs() if row["key"] not in timed and
               (row["folder"] is None or (Path(context.out) / row["folder"]).is_dir())]
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
            measured = compare_latency(models, seq_len=int(settings["seq_len"]),
                                       batch_size=int(settings["batch_size"]), repeats=int(settings["repeats"]),
                                       warmup=int(settings["warmup"]), gen_tokens=int(settings["gen_tokens"]),
                                       device=context.device)
            mine = measured.get("run", measured["dense"])
            base = measured["dense"]
            entry = {"forward_ms": mine.forward_ms_median, "forward_ratio": mine.forward_ratio,
                     "decode_ms_per_token": mine.decode_ms_per_token, "decode_ratio": mine.decode_ratio,
                     "dense_forward_ms": base.forward_ms_median, "dense_decode_ms_per_token": base.decode_ms_per_token,
                     "rounds": mine.rounds, "threads": torch.get_num_threads(), "device": mine.device,
                     "protocol": PROTOCOL.format(**settings, threads=torch.get_num_threads(), device=mine.device)}
            database.add_latency(row["key"], entry, machine_info())
            models.pop("run", None)
            count += 1
        del dense
    return count
