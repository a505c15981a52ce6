"""Training: config, the training loop (accelerate), checkpoints, training data and the model card.

- :mod:`.config`: :class:`TrainConfig` (every option, parsed from YAML and flags) and the CLI glue.
- :mod:`.loss_factory`: :func:`build_loss` (loss and wrapper names -> a loss module), default dims.
- :mod:`.trainer`: :class:`Trainer`, the training loop; :class:`TrainResult`.
- :mod:`.checkpoints`: writing, listing and reading checkpoints; random states; the run fingerprint.
- :mod:`.run_guard`: the output-folder rule and the lock that keeps one live run per checkpoint folder.
- :mod:`.model_card`: the README.md of a trained model.
- :mod:`.data`: training data sources, columns and the seeded batch stream.

The losses are in :mod:`matryoshka2d.losses` (plain functions of pooled embeddings).
"""

from matryoshka2d.training.checkpoints import CheckpointError, CorruptCheckpointError, list_checkpoints
from matryoshka2d.training.config import TrainConfig
from matryoshka2d.training.loss_factory import build_loss
from matryoshka2d.training.run_guard import RunLockedError
from matryoshka2d.training.trainer import Trainer, TrainResult

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "RunLockedError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_loss",
    "list_checkpoints",
]
