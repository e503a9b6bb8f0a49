"""Evaluation: perplexity, accuracy, size and speed, each with the protocol it was measured under."""

from __future__ import annotations

from prunekit.evaluate.accuracy import AccuracyResult, accuracy
from prunekit.evaluate.perplexity import PerplexityResult, perplexity
from prunekit.evaluate.report import evaluate, format_table, summary_row
from prunekit.evaluate.size import LayerSparsity, SizeReport, size_report
from prunekit.evaluate.speed import LatencyResult, latency

__all__ = ["AccuracyResult", "LatencyResult", "LayerSparsity", "PerplexityResult", "SizeReport", "accuracy",
           "evaluate", "format_table", "latency", "perplexity", "size_report", "summary_row"]
