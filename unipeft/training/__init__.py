"""Training unipeft models: a small seeded, checkpointed, resumable trainer, and
``unipeft train CONFIG.yaml`` for text classification (docs/training.md).

::

    from unipeft.training import Trainer, TrainerConfig

    trainer = Trainer(model, loss_fn, dataset, TrainerConfig(steps=100), output_dir="run")
    trainer.train(resume=True)
"""

from __future__ import annotations

from .checkpoint import Checkpoint, find_checkpoint, read_checkpoint, recover
from .config import DistributedConfig, TrainerConfig
from .data import BatchOrder, epoch_seed
from .graphs import GraphedStep
from .memory import PeakMemory
from .run import RunResult, run
from .spec import DataSpec, RunConfig, RunConfigError, load_run_config
from .state import CheckpointError, TrainingError
from .step_modes import StepModeReport
from .task import TextClassifier, classification_loss
from .trainer import EvalFn, LossFn, Trainer, TrainResult

__all__ = [
    "BatchOrder",
    "Checkpoint",
    "CheckpointError",
    "DataSpec",
    "DistributedConfig",
    "EvalFn",
    "GraphedStep",
    "LossFn",
    "PeakMemory",
    "RunConfig",
    "RunConfigError",
    "RunResult",
    "StepModeReport",
    "TextClassifier",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "TrainingError",
    "classification_loss",
    "epoch_seed",
    "find_checkpoint",
    "load_run_config",
    "read_checkpoint",
    "recover",
    "run",
]
