"""`prunekit prune --onload`: the one-shot job with sequential onloading (see :mod:`prunekit.onload`).

The model is a skeleton without weights; each block is read from the source files when the engine
reaches it, pruned, written into the output folder's shards and freed. :func:`onload_plan` decides
whether a run is onloaded (``--onload auto|always|never``) and says in one line why a run that asked
for it, or needed it, loads the whole model instead.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.methods.registry import MethodConfig, MethodSpec
from prunekit.record import RunRecord
from prunekit.utils import wants_progress


@dataclass
class OnloadPlan:
    """A run that will be onloaded: the source folder and the task."""

    folder: Path
    task: str


def note(message: str) -> None:
    """A one-line statement on stderr (the run goes on)."""
    print(f"prunekit: {message}", file=sys.stderr, flush=True)


def onload_wanted(settings: dict[str, Any]) -> tuple[str, Path, str | None, str | None] | None:
    """(choice, folder, built-in name, reason not to) when ``settings['onload']`` asks for onloading; else None.

    Shared by ``prunekit prune`` and ``prunekit eval``: ``never`` -> None; ``auto`` -> None unless twice the
    weights' bytes exceed the memory available; a hub id gives a reason (the caller notes it). A local
    folder's shards are checked first, whatever the mode (one-line errors for a missing or damaged shard).
    """
    from prunekit.models import check_weight_files, resolve_model_source
    from prunekit.onload import ONLOAD_CHOICES, should_onload
    from prunekit.utils import resolve_dtype

    choice = str(settings.get("onload") or "auto")
    if choice not in ONLOAD_CHOICES:
        raise PrunekitError(f"onload '{choice}': use one of {', '.join(ONLOAD_CHOICES)}")
    if choice == "never":
        return None
    source, builtin = resolve_model_source(settings["model"], progress=True)
    folder = Path(source)
    reason = None
    if not folder.is_dir():
        reason = "the model is a hub id, not a local folder (download it first)"
    else:
        check_weight_files(folder)  # one-line errors for a missing or damaged shard, whatever the mode
    wanted = choice == "always" or (reason is None and should_onload(choice, folder, resolve_dtype(settings["dtype"])))
    if not wanted:
        return None
    return choice, folder, builtin, reason


def onload_plan(settings: dict[str, Any], spec: MethodSpec, config: MethodConfig, *, measure: bool,
                export: Any) -> OnloadPlan | None:
    """The plan when this run is onloaded, None when the whole model is loaded (with a note if onloading was wanted)."""
    from prunekit.models import BUILTIN_MODELS, RECORD_NAME, infer_task
    from prunekit.pruning import onload_refusal

    wanted = onload_wanted(settings)
    if wanted is None:
        return None
    choice, folder, builtin, reason = wanted
    if reason is None and (folder / RECORD_NAME).exists():
        from prunekit.models import read_record

        if read_record(folder).get("loader"):
            reason = "the folder needs prunekit's own loader (its shapes differ from its config)"
    if reason is None and measure:  # --eval on text is measured onloaded too (prunekit.onload_eval)
        reason = "--tasks (lm-eval) and --eval on labelled data measure the whole model"
    if reason is None and export is not None:
        reason = "--export-format writes compressed formats from the whole model"
    if reason is None:
        refusal = onload_refusal(spec, config)
        reason = f"it cannot run {refusal}" if refusal else None
    if reason is not None:
        note(f"sequential onloading (--onload {choice}) is not used: {reason}; loading the whole model")
        return None
    from transformers import AutoConfig

    task = settings["task"] or (BUILTIN_MODELS[builtin].task if builtin else
                                infer_task(AutoConfig.from_pretrained(str(folder))))
    return OnloadPlan(folder, task)


def prune_onloaded(settings: dict[str, Any], spec: MethodSpec, config: MethodConfig, plan: OnloadPlan,
                   calib_data: Any, started: float) -> tuple[dict[str, Any], Any, Path, dict[str, float]] | None:
    """Prune block by block from the files into ``settings['out']``; (record, result, out, timing).

    None when the model's parameters cannot be matched to the files' tensors (a note says so; the
    caller loads the whole model).
    """
    from transformers import AutoTokenizer

    from prunekit.data import calibration_with_record
    from prunekit.export import full_record, write_record
    from prunekit.onload import Onloader, OnloadUnsupported, build_skeleton, return_freed_memory
    from prunekit.pruning import prune
    from prunekit.utils import atomic_dir, resolve_dtype

    return_freed_memory()  # activations freed go back to the OS (see its docstring)
    model = build_skeleton(plan.folder, plan.task, resolve_dtype(settings["dtype"]))
    try:
        onloader = Onloader(model, plan.folder)
    except OnloadUnsupported as exc:
        note(f"sequential onloading is not used: {exc}; loading the whole model")
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(plan.folder))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    seed = int(settings["seed"])
    loaded = time.perf_counter()
    calibration, calib_record = calibration_with_record(tokenizer, calib_data, settings["calib"],
                                                        int(settings["calib_samples"]), int(settings["seq_len"]), seed)
    with atomic_dir(settings["out"], overwrite=bool(settings["overwrite"])) as tmp:
        saved = model
        if spec.kind == "structured":  # shapes change: scores, then surgery, each reading the files block by block
            from prunekit.onload_structured import prune_structured

            prepared = time.perf_counter()
            result, saved = prune_structured(model, onloader, spec, config, calibration, tmp,
                                             device=settings["device"], progress=wants_progress(settings))
            timing = {**result.timing, "load_s": loaded - started, "prune_wall_s": time.perf_counter() - prepared}
            weights = "read block by block from the source files, twice (scores, then surgery)"
        else:
            onloader.open_output(tmp)  # every shard at full size: a disk too small fails here
            prepared = time.perf_counter()
            try:
                result = prune(model, config, calibration, device=settings["device"],
                               progress=wants_progress(settings), placement=onloader)
                pruned_at = time.perf_counter()
                onloader.finish()
            except BaseException:
                onloader.abort()
                raise
            timing = {**result.timing, "load_s": loaded - started, "prune_wall_s": pruned_at - prepared,
                      "write_s": time.perf_counter() - pruned_at}
            weights = "read block by block from the source files"
        record = RunRecord.from_prune(result, task=plan.task, source_model=settings["model"],
                                      calibration=calib_record, seed=seed)
        record.timing = timing
        record.extra["onload"] = {"mode": settings.get("onload") or "auto", "blocks_in_memory_at_most":
                                  onloader.peak_blocks, "weights": weights}
        data = full_record(saved, record)
        _save_config(saved, tmp)
        tokenizer.save_pretrained(tmp)
        write_record(tmp, data)
    if not Path(settings["out"]).is_dir():  # pragma: no cover - atomic_dir renames or raises
        raise PrunekitError(f"the output folder '{settings['out']}' was not written")
    return data, result, Path(settings["out"]), timing


def _save_config(model: Any, folder: Path) -> None:
    """config.json (and generation_config.json) as save_pretrained writes them: dtype and architectures set."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
