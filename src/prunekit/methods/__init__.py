"""Pruning methods: one-shot (layer by layer), structured, and training-aware."""
