"""prunekit: prune transformer models, recover their quality, measure what was gained and lost.

The public API, in about two lines::

    model, tokenizer = prunekit.load_model("smollm2-135m")
    result = prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, calibration)

Names are imported lazily so that `import prunekit` (and `prunekit --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "prunekit.models",
    "load": "prunekit.models",
    "save_model": "prunekit.export",
    "prune": "prunekit.pruning",
    "method_config": "prunekit.methods",
    "RunRecord": "prunekit.record",
    "load_data": "prunekit.data",
    "calibration_batch": "prunekit.data",
    "get_adapter": "prunekit.adapters",
    "PrunekitError": "prunekit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunekit' has no attribute '{name}'")
