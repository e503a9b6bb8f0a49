"""The block-by-block engine that every calibrated method shares.

:mod:`~prunekit.calibration.capture` records what every block receives (its own arguments, per block);
:mod:`~prunekit.calibration.engine` observes, changes and replays the blocks one at a time.
"""

from __future__ import annotations

from prunekit.calibration.capture import (
    CACHE_KWARGS,
    BlockArgs,
    BlockInputs,
    block_output,
    capture_block_inputs,
)
from prunekit.calibration.engine import (
    BlockVisitor,
    EngineReport,
    Observer,
    all_threads,
    run_blockwise,
    single_thread,
)
from prunekit.calibration.placement import BlockPlacement, MovePlacement

__all__ = ["CACHE_KWARGS", "BlockArgs", "BlockInputs", "BlockPlacement", "BlockVisitor", "EngineReport",
           "MovePlacement", "Observer", "all_threads",
           "block_output", "capture_block_inputs", "run_blockwise", "single_thread"]
