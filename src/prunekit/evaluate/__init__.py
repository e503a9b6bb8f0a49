"""Evaluation: perplexity, accuracy, size and speed."""
