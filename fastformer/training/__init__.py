"""Training: run configs and presets, optimizers and schedules, tasks (what a step trains on),
gradient accumulation over micro-batches, the trainer, checkpoints, evaluation, BLEU, and export
to Hugging Face."""
