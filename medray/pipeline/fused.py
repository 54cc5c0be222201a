"""One actor per core that reads, decodes, embeds and writes: the CPU plan of the embedding path.

On a node without GPUs the model shares the CPUs with decoding. Separate decode
tasks and encoder actors then split the cores between two stages whose costs
differ per workload (a cheap model leaves its actor's core idle while decoding
queues behind one task), and every decoded record crosses the object store
twice. A fused actor does the whole record on one core: read, decode and
preprocess (the same stage functions), the model with one torch thread, and
the Parquet parts (the same sink function); only a few counters leave it. One
actor per CPU keeps every core busy whatever the split between decoding and
the model, and the model loads once per actor.

GPU nodes keep the staged plan (:func:`medray.pipeline.plan.plan_dataset`):
there the model leaves the CPUs, and the decode tasks feed it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from medray.pipeline.actor import EncoderActor
from medray.pipeline.options import StageOptions
from medray.pipeline.sink import write_tables
from medray.pipeline.stages import decode_batch, read_batch

__all__ = ["FusedEmbedder", "STATS_COLUMN"]

#: The one column a fused actor returns: its write counters as JSON.
STATS_COLUMN = "stats"


class FusedEmbedder:
    """Ray Data actor: ``read_batch`` → ``decode_batch`` → :class:`EncoderActor` → ``write_tables``.

    Args:
        opts: the stage options (as the staged plan's tasks get them).
        output / storage_options / version / subdirs: where and how rows are written
            (:func:`medray.pipeline.sink.write_tables`).
        threads: torch threads (the CPUs the actor holds).
        actor_kwargs: :class:`EncoderActor` arguments.
    """

    def __init__(
        self,
        opts: StageOptions,
        output: str,
        storage_options: Mapping[str, Any],
        version: str,
        subdirs: Mapping[str, str],
        threads: int,
        actor_kwargs: Mapping[str, Any],
    ) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.opts = opts
        self.sink = (output, dict(storage_options), version, dict(subdirs))
        self.encoder = EncoderActor(**dict(actor_kwargs))

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = self.encoder(decode_batch(read_batch(table, self.opts), self.opts))
        output, options, version, subdirs = self.sink
        stats = write_tables([rows], output, options, version, subdirs)
        return pa.table({STATS_COLUMN: [json.dumps(stats)]})
