"""prunekit: prune transformer models, recover their quality, measure what was gained and lost."""

from __future__ import annotations

__version__ = "0.1.0"
