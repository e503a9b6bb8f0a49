"""The contract between prunekit's trainer and training-aware pruning methods.

It is declared with the other method contracts in :mod:`prunekit.methods.base` (methods come before
fine-tuning in the flow); this name stays for code that imported it from here.
"""

from __future__ import annotations

from prunekit.methods.base import TrainingMethod

__all__ = ["TrainingMethod"]
