"""The embedding path as one streaming Ray Data plan: read, decode, (series, slides), encode."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from medray.pipeline.actor import EncoderActor
from medray.pipeline.fused import FusedEmbedder
from medray.pipeline.options import StageOptions
from medray.pipeline.series import plan_series_branch
from medray.pipeline.stages import SERIES_MODE_READ_BATCH, decode_batch, read_batch, slide_wanted

__all__ = ["plan_dataset", "plan_fused"]


def plan_dataset(
    ds: Any,
    opts: StageOptions,
    *,
    encoder_spec: dict,
    provenance: Mapping[str, Any],
    decode_concurrency: int | None,
    read_batch_size: int,
    decode_batch_size: int,
    encode_batch_size: int,
    actors: tuple[int, int],
    num_gpus: float,
    device: str,
    dtype: str,
    task_retries: int = 2,
    decode_num_cpus: float = 1.0,
    actor_num_cpus: float = 1.0,
    encoder_specs: Mapping[str, dict] | None = None,
    provenances: Mapping[str, Mapping[str, Any]] | None = None,
    series_source: Any = None,
    slide_branch: bool = False,
) -> Any:
    """Chain the stages on a Ray Dataset of source records.

    With ``series_source`` (the same source records, ``series.mode`` on), CT/MR
    series slices are grouped by series in a branch of their own
    (:mod:`medray.pipeline.series`) whose records join the decoded stream
    before the encoder pool. With ``slide_branch``, whole-slide images are read
    in a branch of their own whose tiles are spread over many decode tasks
    (without it they are still tiled, by the task that reads them).

    Decode/preprocess run as CPU tasks and the encoder as an actor pool, so the
    two scale independently. Retries are bounded (Ray Data retries actor tasks
    forever by default), and record-level failures never raise at all.
    """
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    tasks = TaskPoolStrategy(size=decode_concurrency) if decode_concurrency else None
    main_read_batch = read_batch_size
    if series_source is not None:
        # Series slices are header-only reads on the main branch (their series' task reads the pixels):
        # larger read tasks there, or Ray's per-task cost is most of what the series mode costs.
        main_read_batch = max(read_batch_size, SERIES_MODE_READ_BATCH)
    with warnings.catch_warnings():
        # Bounded retries have no named parameter yet; Ray warns about ``**ray_remote_args``.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        source = ds
        slides = slide_branch and slide_wanted(opts)
        ds = source.map_batches(
            read_batch,
            fn_kwargs={"opts": opts, "part": "main" if slides else "all"},
            batch_format="pyarrow",
            compute=tasks,
            batch_size=main_read_batch,
            num_cpus=decode_num_cpus,
            max_retries=task_retries,
        )
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"opts": opts},
            batch_format="pyarrow",
            compute=tasks,
            batch_size=decode_batch_size,
            num_cpus=decode_num_cpus,
            max_retries=task_retries,
        )
        if slides:
            # Whole slides in a branch of their own: a read task expands a slide into its tissue tiles,
            # which a streaming repartition cuts into decode-sized blocks, so one large slide's tiles
            # are decoded by many tasks in parallel. (Read and decode fuse into one task on the main
            # branch; a repartition there halved image throughput on 2 cores, and the branch itself
            # costs ~7 s of fixed start-up there, hence only when the inputs may hold slides.)
            tiles = source.map_batches(
                read_batch,
                fn_kwargs={"opts": opts, "part": "slides"},
                batch_format="pyarrow",
                compute=tasks,
                batch_size=read_batch_size,
                num_cpus=decode_num_cpus,
                max_retries=task_retries,
            )
            tiles = tiles.repartition(target_num_rows_per_block=decode_batch_size)
            tiles = tiles.map_batches(
                decode_batch,
                fn_kwargs={"opts": opts},
                batch_format="pyarrow",
                compute=tasks,
                batch_size=decode_batch_size,
                num_cpus=decode_num_cpus,
                max_retries=task_retries,
            )
            ds = ds.union(tiles)
        if series_source is not None:
            ds = ds.union(
                plan_series_branch(
                    series_source, opts, batch_size=read_batch_size, num_cpus=decode_num_cpus, task_retries=task_retries
                )
            )
        ds = ds.map_batches(
            EncoderActor,
            fn_constructor_kwargs={
                "spec": encoder_spec,
                "device": device,
                "dtype": dtype,
                "batch_size": encode_batch_size,
                "provenance": dict(provenance),
                "specs": dict(encoder_specs) if encoder_specs else None,
                "provenances": dict(provenances) if provenances else None,
            },
            batch_format="pyarrow",
            batch_size=encode_batch_size,
            compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
            num_gpus=num_gpus or None,
            num_cpus=actor_num_cpus,
            max_restarts=task_retries,
            max_task_retries=task_retries,
        )
    return ds


#: The share of its CPU a fused actor reserves (the rest is room for the source's light tasks).
FUSED_CPU_SHARE = 0.9


def plan_fused(
    ds: Any,
    opts: StageOptions,
    *,
    actor_kwargs: Mapping[str, Any],
    output: str,
    storage_options: Mapping[str, Any],
    version: str,
    subdirs: Mapping[str, str],
    actors: int,
    actor_num_cpus: float,
    batch_size: int,
    task_retries: int = 2,
) -> Any:
    """The CPU plan: ``actors`` :class:`~medray.pipeline.fused.FusedEmbedder` actors, one batch of source
    records per call; the dataset's rows are their write counters (a JSON ``stats`` column).
    """
    from ray.data import ActorPoolStrategy

    # The source's own tasks (reading a manifest) run first: the actors then hold every CPU without
    # starving them. Source rows are small (URIs and carried columns), so this costs little.
    ds = ds.materialize()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ds.map_batches(
            FusedEmbedder,
            fn_constructor_kwargs={
                "opts": opts,
                "output": output,
                "storage_options": dict(storage_options),
                "version": version,
                "subdirs": dict(subdirs),
                "threads": max(1, int(actor_num_cpus)),
                "actor_kwargs": dict(actor_kwargs),
            },
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ActorPoolStrategy(size=max(1, actors)),
            # a tenth of each actor's share stays free for the source's own light tasks (reading a manifest)
            num_cpus=actor_num_cpus * FUSED_CPU_SHARE,
            max_restarts=task_retries,
            max_task_retries=task_retries,
        )
