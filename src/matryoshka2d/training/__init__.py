"""Training: config, the training loop (accelerate), checkpoints, training data and the model card.

The losses are in :mod:`matryoshka2d.losses` (plain functions of pooled embeddings).
"""

from matryoshka2d.training.trainer import TrainConfig, Trainer, TrainResult, build_loss, list_checkpoints

__all__ = ["TrainConfig", "TrainResult", "Trainer", "build_loss", "list_checkpoints"]
