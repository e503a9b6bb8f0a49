"""The run record: what was done to a model, written as ``prunekit.json`` beside its weights.

The library builds it (the CLI only prints it): :class:`RunRecord` holds the method and its resolved
settings, the data, per-layer results, the loader a reload needs and the software versions.
``RunRecord.from_prune(result, ...)`` turns a :class:`prunekit.pruning.PruneResult` into one; a
plain dict works wherever a record is taken, and ``{"pruning": result}`` is expanded the same way.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

STRUCTURE_ATTR = "prunekit_structure"  # config attribute: per-block shapes a config cannot say otherwise
FACTORISED_ATTR = "prunekit_factorised"  # config attribute: layers stored as two factors (FLOP)
LOADER = "structured"  # the prunekit loader that rebuilds such models (prunekit.structured_load)


def versions() -> dict[str, str]:
    """Versions of the software that produced a record."""
    import torch
    import transformers

    from prunekit import __version__

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def loader_for(model: nn.Module) -> str | None:
    """The loader a saved copy of ``model`` needs, read from the model itself (None: plain from_pretrained)."""
    config = getattr(model, "config", None)
    if getattr(config, STRUCTURE_ATTR, None) or getattr(config, FACTORISED_ATTR, None):
        return LOADER
    return None


@dataclass
class RunRecord:
    """One run's record; :meth:`to_dict` gives the JSON written beside the model."""

    method: str | None = None
    kind: str | None = None  # one-shot, structured, training, recovery
    method_settings: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    source_model: str | None = None
    data: str | None = None
    calibration: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None  # target, total, layers (and blocks, outlier_ratios)
    method_result: dict[str, Any] | None = None  # facts the method reported (shapes, removed heads, ...)
    loader: str | None = None
    timing: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=versions)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else, written at the top level

    @classmethod
    def from_prune(cls, result: Any, **facts: Any) -> RunRecord:
        """A record from a PruneResult; ``facts`` fill the other fields (task, source_model, calibration...)."""
        summary = result.record()
        record = cls(method=summary["method"], kind=summary["kind"], method_settings=summary["method_settings"],
                     sparsity=summary["sparsity"], method_result=summary.get("method_result"),
                     timing=summary["timing"])
        return record.update(facts)

    def update(self, facts: dict[str, Any]) -> RunRecord:
        """Set fields by name; unknown names go to ``extra``."""
        names = {f.name for f in fields(self)}
        for key, value in facts.items():
            if key in names:
                setattr(self, key, value)
            else:
                self.extra[key] = value
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name != "extra":
                out[item.name] = value
        if self.method_result:  # how to rebuild changed shapes also sits at the top level, as readers expect
            for key in ("structure", "factorised"):
                if key in self.method_result:
                    out.setdefault(key, self.method_result[key])
        out.update(self.extra)
        return out


def as_record(record: Any) -> dict[str, Any]:
    """A record as a dict: a RunRecord, a PruneResult, a dict (``{"pruning": result}`` is expanded), or None."""
    if record is None:
        return {}
    if isinstance(record, RunRecord):
        return record.to_dict()
    if hasattr(record, "record") and callable(record.record):  # a PruneResult
        return RunRecord.from_prune(record).to_dict()
    if not isinstance(record, dict):
        raise TypeError(f"a record is a RunRecord, a PruneResult or a dict, not {type(record).__name__}")
    out = dict(record)
    pruning = out.pop("pruning", None)
    if pruning is not None:
        out = {**as_record(pruning), **out}
    return out
