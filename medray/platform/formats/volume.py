"""A volume (CT/MR series or NIfTI image) as model input: one 3D item, or slices plus a pooled row.

Shared by the DICOM series assembly (:mod:`medray.pipeline.series`) and the
NIfTI format, so that the same voxels give the same embeddings whichever file
they came in.
"""

from __future__ import annotations

import numpy as np

from medray.platform.decoders.series import SeriesOptions, Volume
from medray.platform.errors import PreprocessError, RecordError
from medray.platform.formats.registry import PrepareContext, Prepared, run_preprocess

__all__ = ["prepare_volume", "slice_images"]


def slice_images(channels: np.ndarray) -> list[np.ndarray]:
    """``(C, D, H, W)`` in ``[0, 1]`` -> D uint8 RGB images, the windows as the colour channels."""
    c = channels.shape[0]
    if c == 1:
        channels = np.repeat(channels, 3, axis=0)
    elif c != 3:
        raise PreprocessError(f"slicewise series need 1 or 3 windows (a 2D encoder takes RGB), got {c}")
    rgb = np.round(np.transpose(channels, (1, 2, 3, 0)) * 255.0).astype(np.uint8)
    return [np.ascontiguousarray(s) for s in rgb]


def prepare_volume(volume: Volume, options: SeriesOptions, ctx: PrepareContext, *, mode: str) -> Prepared:
    """Windows as channels, then the 3D encoder's input (``mode=volume``) or every slice as RGB (``slicewise``).

    Raises:
        RecordError: no encoder for the mode (stage ``route``) or preprocessing failed.
    """
    channels = volume.channels(options.windows)
    spacing = [round(float(v), 6) for v in volume.spacing]
    base = {"series_key": volume.series_key, "spacing_mm": spacing}
    n_src = volume.source_shape[0]
    if mode == "volume":
        pre = ctx.preprocessors.get("volume")
        if pre is None:
            raise RecordError("no volume encoder configured (series.mode=volume)", stage="route")
        volume_pre = pre
        pixels = run_preprocess(lambda: volume_pre.preprocess_volume(channels))
        segments = [dict(base, segment="volume", slice_start=0, slice_end=n_src - 1, n_items=n_src)]
        pool, route = "none", "volume"
    else:
        pre = ctx.preprocessors.get("image")
        if pre is None:
            raise RecordError("no image encoder configured for slicewise series", stage="route")
        images = slice_images(channels)
        pixels = run_preprocess(lambda: pre.preprocess(images))
        segments = []
        for z in range(pixels.shape[0]):
            lo, hi = volume.source_range(z)
            segments.append(dict(base, segment="slice", slice_start=lo, slice_end=hi))
        pool, route = options.pool, "image"
    meta = dict(volume.metadata)
    meta.update(series=volume.provenance(), series_mode=mode, windows=list(options.windows))
    return Prepared(
        inputs=np.ascontiguousarray(pixels, dtype=np.float32),
        segments=segments,
        pool=pool,
        modality=volume.modality,
        metadata=meta,
        patient_key=volume.patient_key,
        route=route,
    )
