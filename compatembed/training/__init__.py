"""The one training loop shared by every method, its schedules and metric loggers."""

from compatembed.training.loggers import CSVLogger, MetricLogger, NullLogger, WandbLogger
from compatembed.training.loop import TrainerConfig, fit
from compatembed.training.schedules import constant, one_cycle, warmup_cosine

__all__ = [
    "CSVLogger",
    "MetricLogger",
    "NullLogger",
    "TrainerConfig",
    "WandbLogger",
    "constant",
    "fit",
    "one_cycle",
    "warmup_cosine",
]
