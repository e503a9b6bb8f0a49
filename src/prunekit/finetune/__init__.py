"""Fine-tuning on the transformers Trainer, with hooks for training-aware pruning methods."""
