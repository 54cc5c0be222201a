"""Whole-slide images: open lazily, find tissue, plan and read tiles.

Pure Python, no Ray. A slide is a tiled, pyramidal TIFF (SVS, NDPI, OME/SubIFD
pyramids) opened with ``tiffslide`` on an fsspec file, so every tile is a
ranged read and the slide is never downloaded whole. :func:`plan_slide` finds
tissue on the lowest-resolution level (Otsu on HSV saturation) and lays a
grid of tiles at the target microns per pixel; :func:`read_tile` reads one
tile from the best pyramid level (the lowest resolution whose mpp is at most
the target) and resizes it to the tile size.

Coordinates are level-0 pixels (``tile_x``, ``tile_y``, like OpenSlide's
``read_region``); a tile's id is ``tile/<level>/<x>/<y>``.

Example:
    >>> from medray.testing.media import slide_tiff
    >>> import io, tiffslide
    >>> slide = tiffslide.TiffSlide(io.BytesIO(slide_tiff(size=512, levels=3)))
    >>> plan = plan_slide(slide, SlideOptions(target_mpp=0.5, tile_size=64))
    >>> plan.level, plan.read_size, plan.tiles_total
    (1, 64, 16)
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medray.platform.errors import ConfigError, DecodeError, LimitExceeded, RecordError
from medray.platform.storage import open_fs

__all__ = [
    "SlideOptions",
    "SlideTile",
    "SlidePlan",
    "is_tiff",
    "is_slide",
    "open_slide",
    "sniff_slide",
    "plan_slide",
    "read_tile",
    "tissue_mask",
    "otsu_threshold",
    "check_ifd_chain",
]

#: Extensions that make a tiled TIFF a slide even without a pyramid.
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".scn", ".bif", ".qptiff")
#: The low-resolution level used for tissue detection may hold at most this many pixels.
MAX_TISSUE_PIXELS = 4096 * 4096
#: Otsu never goes below this saturation (0-1): a blank slide has no tissue, not noise "tissue".
MIN_OTSU_SATURATION = 0.08
#: A TIFF whose main IFD chain is longer is refused (tifffile itself only looks for loops at the 100th IFD).
MAX_TIFF_IFDS = 65_536
#: The largest TIFF tile or strip of a level that is read, in pixels: decoding one allocates it whole.
MAX_CHUNK_PIXELS = 1 << 26
#: The largest tile grid laid over level 0 (its tissue fractions are computed as arrays of this size).
MAX_GRID_TILES = 1 << 22
_BLOCK_SIZE = 1 << 20  # ranged reads of 1 MiB: tiles and IFDs, never the whole object


@dataclass(frozen=True)
class SlideOptions:
    """How slides become tiles.

    Args:
        target_mpp: microns per pixel of the tiles (0.5 ~ 20x).
        tile_size: tile side in pixels, as given to the encoder's preprocessing.
        tissue_threshold: saturation (0-1) above which a pixel is tissue; ``None``: Otsu.
        min_tissue_fraction: tiles with less tissue are background, skipped and counted.
        max_tiles: a slide with more tissue tiles is quarantined (hostile or mis-set mpp).
        max_pixels: a slide whose level 0 holds more pixels is quarantined before any pixel is read.
        max_damaged_fraction: tissue tiles whose TIFF tiles are empty (0 bytes) or lie past the end
            of the file are dropped and counted (``damaged_tiles``); a slide with a larger share of
            them is quarantined.

    Raises:
        ConfigError: a value out of range, naming ``slide.<key>``.
    """

    target_mpp: float = 0.5
    tile_size: int = 224
    tissue_threshold: float | None = None
    min_tissue_fraction: float = 0.25
    max_tiles: int = 100_000
    max_pixels: int = 100_000_000_000
    max_damaged_fraction: float = 0.1

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"slide.{key}", f"expected {expected}, got {getattr(self, key)!r}")

        if isinstance(self.target_mpp, bool) or not isinstance(self.target_mpp, (int, float)) or self.target_mpp <= 0:
            raise bad("target_mpp", "microns per pixel > 0, e.g. 0.5")
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size < 8:
            raise bad("tile_size", "an int >= 8, e.g. 224")
        t = self.tissue_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1):
            raise bad("tissue_threshold", "null (Otsu) or a saturation in [0, 1)")
        f = self.min_tissue_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise bad("min_tissue_fraction", "a fraction in [0, 1]")
        if isinstance(self.max_tiles, bool) or not isinstance(self.max_tiles, int) or self.max_tiles < 1:
            raise bad("max_tiles", "an int >= 1")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise bad("max_pixels", "an int >= 1, e.g. 100000000000")
        d = self.max_damaged_fraction
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise bad("max_damaged_fraction", "a fraction in [0, 1]")


@dataclass(frozen=True)
class SlideTile:
    """One tile: where it is (level-0 pixels) and what is read for it."""

    index: int
    level: int
    x: int
    y: int
    read_size: int
    tile_size: int
    mpp: float | None
    tissue_fraction: float

    @property
    def tile_id(self) -> str:
        """``tile/<level>/<x>/<y>``: part of the tile's record key."""
        return f"tile/{self.level}/{self.x}/{self.y}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SlideTile:
        return cls(**json.loads(text))


@dataclass
class SlidePlan:
    """The tissue tiles of a slide plus what was skipped and why."""

    tiles: list[SlideTile]
    level: int
    read_size: int
    tiles_total: int
    metadata: dict[str, Any] = field(default_factory=dict)
    damaged: int = 0

    @property
    def background(self) -> int:
        """Grid tiles skipped as background."""
        return self.tiles_total - len(self.tiles) - self.damaged


def is_tiff(head: bytes) -> bool:
    """True when ``head`` starts with a classic or BigTIFF signature."""
    return bytes(head[:4]) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_slide(slide: Any, name: str = "") -> bool:
    """True for a whole-slide image: tiled, and a pyramid (or a slide format/extension).

    Plain (strip-based, single-level) photo TIFFs are not slides and keep going
    to the image decoder.
    """
    try:
        page = slide.ts_tifffile.pages[0]
        tiled = bool(page.is_tiled)
    except Exception:  # noqa: BLE001 - not a TIFF tiffslide can read: the image decoder reports it
        return False
    if not tiled:
        return False
    vendor = str(slide.properties.get("tiffslide.vendor") or "")
    return (
        slide.level_count > 1
        or vendor in ("aperio", "hamamatsu", "leica", "ventana")
        or name.lower().endswith(SLIDE_EXTENSIONS)
    )


# Extensions that are never TIFF: such objects skip the slide sniff (one ranged read saved).
_NOT_TIFF = (
    ".dcm",
    ".dicom",
    ".dic",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".webp",
    ".wav",
    ".flac",
    ".ogg",
    ".txt",
    ".json",
    ".xml",
)


def sniff_slide(uri: str, fs: Any, path: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The opened slide when the object is a whole-slide image, else ``None``.

    Judged by content: the TIFF magic (a 4-byte ranged read), then a tiled
    pyramid (:func:`is_slide`). Names that are never TIFF skip the read. An
    object that cannot be read, or a damaged TIFF, answers ``None``: the image
    path reads it and quarantines it with its own reason.

    Raises:
        DecodeError: a TIFF whose IFD chain loops or is longer than ``MAX_TIFF_IFDS``
            (:func:`check_ifd_chain`): no decoder may walk it.
    """
    name = path.rsplit("/", 1)[-1]
    if name.lower().endswith(_NOT_TIFF):
        return None
    try:
        with fs.open(path, "rb", block_size=1 << 16) as f:
            if not is_tiff(f.read(4)):
                return None
            check_ifd_chain(f)  # before tifffile walks it: a loop past its 100th IFD would never end
    except RecordError:
        raise
    except Exception:  # noqa: BLE001 - the read stage reports it
        return None
    try:
        slide = open_slide(uri, storage_options)
    except RecordError:
        return None
    return slide if is_slide(slide, name) else None


def check_ifd_chain(f: Any, max_ifds: int = MAX_TIFF_IFDS) -> int:
    """Walk a TIFF's main IFD chain without parsing its tags; return how many IFDs it holds.

    Reads two small fields per IFD (tag count, next offset), so a hostile
    chain costs at most ``max_ifds`` tiny ranged reads. A next offset past the
    end of the file ends the chain, as tifffile does.

    Args:
        f: a seekable binary file (an fsspec file or ``io.BytesIO``) holding a TIFF.
        max_ifds: the most IFDs accepted.

    Raises:
        DecodeError: not a TIFF, or the chain loops back to an IFD already seen.
        LimitExceeded: more than ``max_ifds`` IFDs.
    """
    f.seek(0)
    head = f.read(16)
    if not is_tiff(head):
        raise DecodeError("not a TIFF (no TIFF signature)")
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    count_fmt, entry, next_fmt = (order + "Q", 20, order + "Q") if big else (order + "H", 12, order + "I")
    offset = struct.unpack_from(next_fmt, head, 8 if big else 4)[0]
    size = f.seek(0, 2)
    seen: set[int] = set()
    while offset and offset < size:
        if offset in seen:
            raise DecodeError(f"the TIFF's IFD chain loops back after {len(seen)} IFDs (a damaged or hostile file)")
        seen.add(offset)
        if len(seen) > max_ifds:
            raise LimitExceeded(f"the TIFF has more than {max_ifds} IFDs in its chain")
        f.seek(offset)
        raw = f.read(struct.calcsize(count_fmt))
        if len(raw) < struct.calcsize(count_fmt):
            break
        f.seek(offset + len(raw) + struct.unpack(count_fmt, raw)[0] * entry)
        raw = f.read(struct.calcsize(next_fmt))
        if len(raw) < struct.calcsize(next_fmt):
            break
        offset = struct.unpack(next_fmt, raw)[0]
    f.seek(0)
    return len(seen)


def open_slide(uri: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Open a slide lazily from any fsspec URI (cached per process).

    Raises:
        DecodeError: the object is not a readable slide (no PHI in the message).
    """
    return _open_slide(uri, json.dumps(dict(storage_options or {}), sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _open_slide(uri: str, options_json: str) -> Any:
    import tiffslide

    try:
        fs, path = open_fs(uri, json.loads(options_json))
        f = fs.open(path, "rb", block_size=_BLOCK_SIZE)
        return tiffslide.TiffSlide(f)
    except Exception as err:  # noqa: BLE001 - library messages may quote paths/descriptions
        raise DecodeError(f"unreadable whole-slide image ({type(err).__name__})") from None


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of ``uint8`` values, as a fraction of 255."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 1.0
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mu0 = np.divide(m0, w0, out=np.zeros(256), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros(256), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(np.argmax(between)) / 255.0


def tissue_mask(rgb: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Tissue pixels of an RGB image: HSV saturation above ``threshold`` (``None``: Otsu).

    Returns:
        ``(mask, threshold used)``; Otsu is never below ``MIN_OTSU_SATURATION``.
    """
    rgb = np.asarray(rgb)[..., :3].astype(np.float32)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
    if threshold is None:
        threshold = max(otsu_threshold(np.round(sat * 255)), MIN_OTSU_SATURATION)
    return sat > threshold, float(threshold)


def _slide_mpp(slide: Any) -> float | None:
    props = slide.properties
    values = [props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")]
    values = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    return float(np.mean(values)) if values else None


def plan_slide(slide: Any, options: SlideOptions = SlideOptions()) -> SlidePlan:
    """Find tissue and lay out the slide's tiles at ``options.target_mpp``.

    The level read is the lowest-resolution one whose mpp is at most the
    target; a slide without mpp metadata is tiled at level 0 (``tile_size``
    pixels) and says so in ``metadata["mpp_note"]``.

    Raises:
        LimitExceeded: no low-resolution level small enough for tissue
            detection, or more tissue tiles than ``options.max_tiles``.
        DecodeError: the slide cannot be read.
    """
    try:
        width0, height0 = (int(v) for v in slide.level_dimensions[0])
        downsamples = [float(d) for d in slide.level_downsamples]
        low = slide.level_count - 1
        low_w, low_h = (int(v) for v in slide.level_dimensions[low])
    except Exception as err:  # noqa: BLE001
        raise DecodeError(f"unreadable slide structure ({type(err).__name__})") from None
    if width0 * height0 > options.max_pixels:
        raise LimitExceeded(
            f"the slide's level 0 is {width0}x{height0} pixels, over slide.max_pixels = {options.max_pixels}"
        )
    if low_w * low_h > MAX_TISSUE_PIXELS:
        raise LimitExceeded(
            f"the slide's lowest-resolution level is {low_w}x{low_h} pixels, over "
            f"{MAX_TISSUE_PIXELS} for tissue detection; the slide has no usable pyramid"
        )
    mpp0 = _slide_mpp(slide)
    target, size = float(options.target_mpp), int(options.tile_size)
    note = None
    if mpp0 is None:
        level, step0, read_size, out_mpp = 0, size, size, None
        note = "no mpp metadata: tiles of slide.tile_size pixels at level 0, not at slide.target_mpp"
    else:
        span0 = size * target / mpp0  # level-0 pixels per tile side
        fits = [k for k, d in enumerate(downsamples) if mpp0 * d <= target * (1 + 1e-3)]
        level = max(fits, key=lambda k: downsamples[k]) if fits else 0
        if not fits:
            note = f"slide mpp {mpp0:.4g} is coarser than slide.target_mpp: level 0 upsampled"
        step0 = max(1, int(round(span0)))
        read_size = max(1, int(round(span0 / downsamples[level])))
        out_mpp = target
    nx, ny = width0 // step0, height0 // step0
    if nx * ny > MAX_GRID_TILES:
        raise LimitExceeded(
            f"the slide's tile grid has {nx * ny} tiles, over {MAX_GRID_TILES}; "
            "raise slide.tile_size or slide.target_mpp"
        )
    if _level_chunks(slide, low).past_end.any():  # empty tiles there are black: background
        raise DecodeError(
            "the slide's lowest-resolution level has tiles past the end of the file (a truncated or damaged slide)"
        )
    try:
        thumb = np.asarray(slide.read_region((0, 0), low, (low_w, low_h), as_array=True))
    except Exception as err:  # noqa: BLE001
        raise DecodeError(f"cannot read the slide's lowest-resolution level ({type(err).__name__})") from None
    mask, threshold = tissue_mask(thumb, options.tissue_threshold)
    fractions = _tile_fractions(mask, width0, height0, step0, nx, ny)
    keep = np.argwhere(fractions >= options.min_tissue_fraction)  # (row, col), row-major
    if len(keep) > options.max_tiles:
        raise LimitExceeded(f"slide has {len(keep)} tissue tiles, over slide.max_tiles = {options.max_tiles}")
    damaged = _damaged_tiles(slide, level, keep * step0, read_size, downsamples[level])
    if damaged.any():
        share = float(damaged.mean())
        if share > options.max_damaged_fraction:
            raise DecodeError(
                f"{int(damaged.sum())} of {len(keep)} tissue tiles read TIFF tiles that are empty (0 bytes) or "
                f"lie past the end of the file, over slide.max_damaged_fraction = {options.max_damaged_fraction}"
            )
        keep = keep[~damaged]
    tiles = [
        SlideTile(
            index=k,
            level=level,
            x=int(c) * step0,
            y=int(r) * step0,
            read_size=read_size,
            tile_size=size,
            mpp=out_mpp,
            tissue_fraction=round(float(fractions[r, c]), 6),
        )
        for k, (r, c) in enumerate(keep)
    ]
    meta = {
        "format": "slide",
        "slide_width": width0,
        "slide_height": height0,
        "levels": slide.level_count,
        "mpp_level0": mpp0,
        "level_mpp": None if mpp0 is None else mpp0 * downsamples[level],
        "target_mpp": target,
        "tile_size": size,
        "read_size": read_size,
        "tissue_level": low,
        "tissue_threshold": round(threshold, 6),
        "min_tissue_fraction": options.min_tissue_fraction,
        "tiles_total": nx * ny,
        "tissue_tiles": len(tiles),
        "background_tiles": nx * ny - len(tiles) - int(damaged.sum()),
        "damaged_tiles": int(damaged.sum()),
        "vendor": str(slide.properties.get("tiffslide.vendor") or "generic"),
    }
    if note:
        meta["mpp_note"] = note
    return SlidePlan(
        tiles=tiles,
        level=level,
        read_size=read_size,
        tiles_total=nx * ny,
        metadata=meta,
        damaged=int(damaged.sum()),
    )


@dataclass(frozen=True)
class _Chunks:
    """A level's TIFF tiles (or strips): their size and which of them cannot be read."""

    width: int
    height: int
    past_end: np.ndarray  # (rows, cols) bool: data past the end of the file (fails to decode)
    empty: np.ndarray  # (rows, cols) bool: 0 bytes (decodes as black, without an error)


def _level_chunks(slide: Any, level: int) -> _Chunks:
    """The TIFF tiles of ``level``, from its tile tables (offsets, byte counts), never its pixels.

    Raises:
        LimitExceeded: a tile or strip over ``MAX_CHUNK_PIXELS`` (decoding it would allocate it whole).
        DecodeError: the tables do not match the level's tiling.
    """
    if not hasattr(slide, "ts_tifffile"):  # not a TIFF (a DICOM WSI): its reader checks its own frames
        width, height = (int(v) for v in slide.level_dimensions[level])
        clean = np.zeros((1, 1), dtype=bool)
        return _Chunks(width=max(1, width), height=max(1, height), past_end=clean, empty=clean)
    try:
        index = int(slide.properties.get("tiffslide.series-index") or 0)
        page = slide.ts_tifffile.series[index].levels[level].keyframe
        width, height = int(page.imagewidth), int(page.imagelength)
        if page.is_tiled:
            cw, ch = int(page.tilewidth), int(page.tilelength)
        else:
            cw, ch = width, int(page.rowsperstrip or height)
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        size = int(slide.ts_tifffile.filehandle.size)
    except Exception as err:  # noqa: BLE001 - library messages may quote descriptions
        raise DecodeError(f"unreadable slide tile tables ({type(err).__name__})") from None
    if cw * ch > MAX_CHUNK_PIXELS:
        raise LimitExceeded(
            f"the slide's level {level} is stored in {cw}x{ch}-pixel tiles, over {MAX_CHUNK_PIXELS} pixels each"
        )
    rows, cols = -(-height // max(1, ch)), -(-width // max(1, cw))
    if rows * cols == 0 or len(offsets) % (rows * cols) or len(offsets) != len(counts):
        raise DecodeError(f"the slide's level {level} has {len(offsets)} tile entries for {rows}x{cols} tiles")
    past_end = np.asarray(((offsets + counts > size) | (offsets < 0)).reshape(-1, rows, cols).any(axis=0))
    empty = np.asarray((counts == 0).reshape(-1, rows, cols).any(axis=0))
    return _Chunks(width=cw, height=ch, past_end=past_end, empty=empty)


def _damaged_tiles(slide: Any, level: int, origins: np.ndarray, read_size: int, downsample: float) -> np.ndarray:
    """For each tile (level-0 ``(y, x)`` origins), whether it reads a TIFF tile that is empty or past the file's end.

    An empty TIFF tile (0 bytes) decodes as black without an error; a tile past
    the end fails to decode: either way the tile's embedding would be wrong.
    """
    if not len(origins):
        return np.zeros(0, dtype=bool)
    chunks = _level_chunks(slide, level)
    bad = chunks.past_end | chunks.empty
    rows, cols = bad.shape
    table = np.zeros((rows + 1, cols + 1), dtype=np.int64)  # summed-area table of bad TIFF tiles
    table[1:, 1:] = np.cumsum(np.cumsum(bad, axis=0), axis=1)
    y0 = np.floor(origins[:, 0] / downsample).astype(np.int64)
    x0 = np.floor(origins[:, 1] / downsample).astype(np.int64)
    r0, c0 = np.clip(y0 // chunks.height, 0, rows - 1), np.clip(x0 // chunks.width, 0, cols - 1)
    r1 = np.clip((y0 + read_size - 1) // chunks.height + 1, 1, rows)
    c1 = np.clip((x0 + read_size - 1) // chunks.width + 1, 1, cols)
    hits = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return np.asarray(hits > 0)


def _tile_fractions(mask: np.ndarray, width0: int, height0: int, step0: int, nx: int, ny: int) -> np.ndarray:
    """Tissue fraction of every grid tile, from the low-resolution mask (summed-area table)."""
    if nx == 0 or ny == 0:
        return np.zeros((ny, nx))
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1))
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    xs = np.arange(nx + 1) * step0 * (w / width0)
    ys = np.arange(ny + 1) * step0 * (h / height0)
    x0 = np.clip(np.floor(xs[:-1]).astype(int), 0, w - 1)
    x1 = np.clip(np.maximum(np.ceil(xs[1:]).astype(int), x0 + 1), 1, w)
    y0 = np.clip(np.floor(ys[:-1]).astype(int), 0, h - 1)
    y1 = np.clip(np.maximum(np.ceil(ys[1:]).astype(int), y0 + 1), 1, h)
    total = sat[np.ix_(y1, x1)] - sat[np.ix_(y0, x1)] - sat[np.ix_(y1, x0)] + sat[np.ix_(y0, x0)]
    area = np.outer(y1 - y0, x1 - x0)
    return total / area


def read_tile(slide: Any, tile: SlideTile) -> np.ndarray:
    """Read one tile as ``uint8`` RGB ``(tile_size, tile_size, 3)``.

    The region is read at ``tile.level`` (``read_size`` pixels there) and
    resized (bilinear) to ``tile_size`` when the two differ.

    Raises:
        DecodeError: the region cannot be read.
    """
    from PIL import Image

    try:
        region = slide.read_region((tile.x, tile.y), tile.level, (tile.read_size, tile.read_size))
    except Exception as err:  # noqa: BLE001
        raise DecodeError(f"cannot read slide tile ({type(err).__name__})") from None
    region = region.convert("RGB")
    if tile.read_size != tile.tile_size:
        region = region.resize((tile.tile_size, tile.tile_size), Image.Resampling.BILINEAR)
    return np.asarray(region, dtype=np.uint8)
