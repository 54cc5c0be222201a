"""The embedding data path as Ray Data stages, shared by the jobs.

One floor above :mod:`medray.encoders` and :mod:`medray.platform`, one below
:mod:`medray.jobs` and :mod:`medray.serve`: the read and decode stages
(:mod:`~medray.pipeline.stages`), series grouping (:mod:`~medray.pipeline.series`),
the encoder actor and the plan, and the sink (:mod:`~medray.pipeline.sink`).
"""

from medray.pipeline.actor import EncoderActor
from medray.pipeline.options import StageOptions, decode_options, encoder_routes, preprocessors
from medray.pipeline.plan import plan_dataset, plan_fused
from medray.pipeline.stages import decode_batch, read_batch

__all__ = [
    "StageOptions",
    "read_batch",
    "decode_batch",
    "EncoderActor",
    "plan_dataset",
    "plan_fused",
    "decode_options",
    "encoder_routes",
    "preprocessors",
]
