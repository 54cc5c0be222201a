"""``medray finetune``: adapt an encoder to labelled records with Ray Train + DeepSpeed.

The package reads top to bottom: :mod:`~medray.jobs.finetune.config` (the
schema), :mod:`~medray.jobs.finetune.recipe` (the job: checks, splits, train,
export), :mod:`~medray.jobs.finetune.data` (labelled examples and splits),
:mod:`~medray.jobs.finetune.features` (frozen-encoder record embeddings),
:mod:`~medray.jobs.finetune.model`, :mod:`~medray.jobs.finetune.loop` (the
Ray Train worker loop) and :mod:`~medray.jobs.finetune.export` (the artifact).
"""

from medray.jobs.finetune.config import (
    DeepSpeedConf,
    EvalConf,
    FinetuneConf,
    FinetuneDataConf,
    LoraConf,
    ScalingConf,
    TaskConf,
    TrainConf,
    register,
)
from medray.jobs.finetune.recipe import JOB, FinetuneFailed, FinetuneJob, FinetuneResult, main

__all__ = [
    "JOB",
    "DeepSpeedConf",
    "EvalConf",
    "FinetuneConf",
    "FinetuneDataConf",
    "FinetuneFailed",
    "FinetuneJob",
    "FinetuneResult",
    "LoraConf",
    "ScalingConf",
    "TaskConf",
    "TrainConf",
    "main",
    "register",
]
