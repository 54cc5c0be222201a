"""DICOM whole-slide images (VL Whole Slide Microscopy): one slide from its level files, read lazily.

Pure Python, no Ray. A DICOM WSI is one Part-10 instance per pyramid level
(plus label, overview and thumbnail images), all in one series. medray reads
it with wsidicom over fsspec files, so every tile is a ranged read, local or
``s3://``, or over DICOMweb:

* **One record per slide.** The level files of a series that sit in one
  folder (or prefix) are one slide. Its record is the *base level*: the
  largest ``VOLUME`` instance (ties: the smallest name). Every other file of
  the series is skipped with its reason (``WsiLevel``, ``WsiLabel``...), so
  each input still ends in exactly one place. From DICOMweb the series is
  the slide (:func:`sniff_dicomweb_wsi`): one QIDO-RS search, the metadata
  of its instances, then tiles by WADO-RS frame retrieval.
* **Tiled like a TIFF slide.** :class:`DicomWsiSlide` answers the small
  slide interface that :func:`~medray.platform.decoders.slide.plan_slide` and
  :func:`~medray.platform.decoders.slide.read_tile` use (``level_dimensions``,
  ``level_downsamples``, ``properties``, ``read_region`` in level-0
  coordinates), so tiles, tissue filtering, ``slide.*`` options and the
  provenance columns are the TIFF path's own. The same pixels as a TIFF and
  as a DICOM WSI give the same tiles.
* **Colour.** An ICC profile in the optical path is applied: regions are
  converted to sRGB (Pillow's LittleCMS), as a viewer shows them.
* **Hostile input.** Headers are checked before any pixel is read: a level
  whose tile grid is over :data:`MAX_LEVEL_TILES`, a frame over
  ``limits.max_pixels``, a TILED_FULL level whose frame count does not fill
  its matrix, a TILED_SPARSE level with more frames than its grid or without
  a position for each, or uncompressed pixel data shorter than its frames is
  quarantined with the reason. Gaps in a TILED_SPARSE level are not damage:
  they are unscanned glass, read as white background (never tissue).

Example:
    >>> import os, tempfile
    >>> from medray.testing.dicom_wsi import dicom_wsi_files
    >>> folder = tempfile.mkdtemp()
    >>> for name, data in dicom_wsi_files(size=256, levels=2).items():
    ...     _ = open(os.path.join(folder, name), "wb").write(data)
    >>> slide = open_dicom_wsi(os.path.join(folder, "level0.dcm"))
    >>> slide.level_count, slide.level_dimensions
    (2, ((256, 256), (128, 128)))
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medray.platform.decoders.base import DecodeLimits
from medray.platform.decoders.image import srgb_transform
from medray.platform.dicomweb import SCHEME_PREFIX, dicomweb_client, is_dicomweb, parse_location
from medray.platform.errors import DecodeError, LimitExceeded, ReadError, RecordError, SkipRecord
from medray.platform.storage import open_fs, unstrip

__all__ = [
    "WSI_SOP_CLASS",
    "MAX_LEVEL_TILES",
    "WsiFile",
    "DicomWsiSlide",
    "is_dicom_wsi_bytes",
    "read_wsi_header",
    "check_wsi_header",
    "sniff_dicom_wsi",
    "open_dicom_wsi",
    "sniff_dicomweb_wsi",
    "is_dicomweb_wsi",
    "read_dicomweb_wsi_patches",
]

#: VL Whole Slide Microscopy Image Storage.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Most tiles one level's grid may claim (columns x rows x focal planes x optical paths):
#: 4 Mi tiles of 256 px is a 520k x 520k pixel level, far above any scanner's.
MAX_LEVEL_TILES = 1 << 22
#: Sibling objects one folder may hold for their headers to be read (one slide's files are a few).
MAX_FOLDER_OBJECTS = 20_000
_META_BLOCK = 4096  # the first read of any object: preamble, file meta, SOP class
_HEADER_BLOCK = 1 << 16  # ranged reads of a WSI instance's header
_TILE_BLOCK = 1 << 20  # ranged reads of tiles
_CACHE_BYTES = 16 << 20  # wsidicom's decoded and encoded frame caches, per open slide
# Extensions that are never DICOM Part-10: such siblings are not read.
_NOT_DICOM = (
    ".tif",
    ".tiff",
    ".svs",
    ".ndpi",
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
    ".csv",
    ".zip",
    ".tar",
    ".gz",
    ".tgz",
    ".nii",
    ".parquet",
)
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def is_dicom_wsi_bytes(data: bytes) -> bool:
    """True when Part-10 bytes are a VL Whole Slide Microscopy instance (from the file meta only)."""
    head = bytes(data[:132])
    if len(head) < 132 or head[128:132] != b"DICM":
        return False
    try:
        import pydicom

        # the file meta and no more: stop at the first dataset element past SOP Class UID
        ds = pydicom.filereader.read_partial(io.BytesIO(bytes(data[:_HEADER_BLOCK])), stop_when=_past_sop_class)
    except Exception:  # noqa: BLE001 - not a readable file meta: the DICOM decoder reports it
        return False
    return str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == WSI_SOP_CLASS


def _past_sop_class(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) > 0x00080016


@dataclass(frozen=True)
class WsiFile:
    """What a level file's header says, as far as grouping and the limits need (no PHI).

    Attributes:
        uri: the object's URI.
        series_uid: its Series Instance UID (the slide's key; never written out).
        image_type: ``VOLUME``, ``LABEL``, ``OVERVIEW`` or ``THUMBNAIL``.
        width, height: the total pixel matrix.
        icc_profile: the optical path's ICC profile, or ``None``.
    """

    uri: str
    series_uid: str
    image_type: str
    width: int
    height: int
    icc_profile: bytes | None = None


def read_wsi_header(f: Any) -> Any:
    """The header (no pixel data) of an open Part-10 stream when it is a DICOM WSI instance, else ``None``.

    The stream is read from its start; only the header's bytes are fetched.
    """
    import pydicom

    f.seek(0)
    if not is_dicom_wsi_bytes(f.read(_HEADER_BLOCK)):  # the file meta first: other DICOM stop here
        return None
    f.seek(0)
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - unreadable header: the DICOM decoder reports it
        return None
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) != WSI_SOP_CLASS:
        return None
    return ds


def check_wsi_header(ds: Any, limits: DecodeLimits = DecodeLimits(), file_size: int | None = None) -> WsiFile:
    """Check a WSI instance's header against the limits and itself; return its summary.

    Args:
        ds: the header (:func:`read_wsi_header`).
        limits: ``max_pixels`` bounds one frame.
        file_size: the object's size in bytes, to find uncompressed pixel data
            shorter than its frames (``None``: not checked).

    Raises:
        LimitExceeded: the tile grid or a frame is over the limits.
        DecodeError: the header contradicts itself (frames that do not fill a
            TILED_FULL matrix, sparse frames without positions, pixel data
            shorter than its frames).
    """
    try:
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        kind = image_type[2] if len(image_type) > 2 else "VOLUME"
        rows, cols = int(ds.Rows), int(ds.Columns)
        width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 8)
        frames = int(ds.get("NumberOfFrames") or 1)
        planes = int(ds.get("TotalPixelMatrixFocalPlanes") or 1)
        paths = max(1, int(ds.get("NumberOfOpticalPaths") or 1))
        organisation = str(ds.get("DimensionOrganizationType") or "").upper()
        series_uid = str(ds.SeriesInstanceUID)
    except Exception as err:  # noqa: BLE001 - header values are never quoted (PHI)
        raise DecodeError(f"DICOM whole-slide image header is incomplete or invalid ({type(err).__name__})") from None
    if min(rows, cols, width, height, spp, frames, planes) < 1:
        raise DecodeError("DICOM whole-slide image header has a zero or negative size")
    if rows * cols * spp > limits.max_pixels:
        raise LimitExceeded(
            f"a DICOM whole-slide image frame of {cols}x{rows}x{spp} is over limits.max_pixels = {limits.max_pixels}"
        )
    grid = math.ceil(width / cols) * math.ceil(height / rows) * planes * paths
    if grid > MAX_LEVEL_TILES:
        raise LimitExceeded(
            f"a DICOM whole-slide image level claims a {width}x{height} pixel matrix ({grid} tiles of {cols}x{rows}), "
            f"over {MAX_LEVEL_TILES} tiles; the header is damaged or hostile"
        )
    sparse = organisation == "TILED_SPARSE" or (
        organisation != "TILED_FULL" and "PerFrameFunctionalGroupsSequence" in ds
    )
    if kind in ("VOLUME", "THUMBNAIL"):
        if not sparse and frames != grid:
            raise DecodeError(
                f"a TILED_FULL DICOM whole-slide image level holds {frames} frames but its {width}x{height} matrix "
                f"needs {grid} tiles of {cols}x{rows}: tiles are missing (damaged or hostile)"
            )
        if sparse:
            per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
            if frames > grid or len(per_frame) != frames:
                raise DecodeError(
                    f"a TILED_SPARSE DICOM whole-slide image level holds {frames} frames with {len(per_frame)} "
                    f"positions for a grid of {grid} tiles: damaged or hostile"
                )
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if file_size is not None and syntax in _NATIVE and file_size < frames * rows * cols * spp * bits // 8:
        raise DecodeError(
            f"a DICOM whole-slide image level's pixel data is shorter than its {frames} frames: tiles are missing "
            "(a truncated or damaged file)"
        )
    icc = None
    optical = ds.get("OpticalPathSequence") or []
    if optical and "ICCProfile" in optical[0]:
        icc = bytes(optical[0].ICCProfile)
    return WsiFile(uri="", series_uid=series_uid, image_type=kind, width=width, height=height, icc_profile=icc)


def sniff_dicom_wsi(
    uri: str,
    fs: Any,
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> DicomWsiSlide | None:
    """The slide when the object is the base level of a DICOM WSI, else ``None``.

    Judged by content: the ``DICM`` magic and the SOP class from the header (a
    ranged read). The object's folder is listed and the headers of its
    siblings read (once per process) to find the slide's other level files.
    The slide is opened lazily: nothing but headers is read here.

    Raises:
        SkipRecord: the object is another file of a slide (a smaller level, a
            label, an overview, a thumbnail): embedded with the slide's base level.
        RecordError: the slide's headers are damaged or over the limits (quarantined).
    """
    name = path.rsplit("/", 1)[-1]
    if name.lower().endswith(_NOT_DICOM):
        return None
    try:
        own = _header_summary(uri, json.dumps(dict(storage_options or {}), sort_keys=True, default=str), limits)
    except RecordError:
        raise
    except Exception:  # noqa: BLE001 - unreadable: the read stage reports it
        return None
    if own is None:
        return None
    files = _slide_files(uri, fs, path, own, storage_options, limits)
    base = files[0]
    if base.uri != uri:
        what = {"VOLUME": "a smaller pyramid level", "THUMBNAIL": "the thumbnail"}.get(own.image_type)
        if what is not None:
            raise SkipRecord(
                "WsiLevel",
                f"{what} of a DICOM whole-slide image: embedded with the slide's base level (its largest level file)",
                stage="read",
            )
        raise SkipRecord(
            f"Wsi{own.image_type.title()}",
            f"the {own.image_type.lower()} image of a DICOM whole-slide image: not embedded (slide labels and "
            "overviews carry burned-in identifiers); the slide is embedded from its base level",
            stage="read",
        )
    return DicomWsiSlide(files, storage_options)


def open_dicom_wsi(
    uri: str, storage_options: Mapping[str, Any] | None = None, limits: DecodeLimits = DecodeLimits()
) -> DicomWsiSlide:
    """Open the DICOM WSI whose base level is ``uri`` (cached per process).

    Raises:
        DecodeError: ``uri`` is not the base level of a readable DICOM WSI.
        LimitExceeded: its headers are over the limits.
    """
    if is_dicomweb(uri):
        return _open_dicomweb_wsi(uri, limits)
    options_json = json.dumps(dict(storage_options or {}), sort_keys=True, default=str)
    return _open_dicom_wsi(uri, options_json, limits)


@functools.lru_cache(maxsize=8)
def _open_dicomweb_wsi(uri: str, limits: DecodeLimits) -> DicomWsiSlide:
    try:
        slide = sniff_dicomweb_wsi(uri, limits)
    except SkipRecord:
        slide = None
    if slide is None:
        raise DecodeError("not the base level of a DICOM whole-slide image")
    return slide


@functools.lru_cache(maxsize=8)
def _open_dicom_wsi(uri: str, options_json: str, limits: DecodeLimits) -> DicomWsiSlide:
    options = json.loads(options_json)
    fs, path = open_fs(uri, options)
    try:
        slide = sniff_dicom_wsi(uri, fs, path, options, limits)
    except SkipRecord:
        slide = None
    if slide is None:
        raise DecodeError("not the base level of a DICOM whole-slide image")
    return slide


@functools.lru_cache(maxsize=4096)
def _header_summary(uri: str, options_json: str, limits: DecodeLimits) -> WsiFile | None:
    """The checked summary of one object's header, or ``None`` when it is not a DICOM WSI instance."""
    import dataclasses

    fs, path = open_fs(uri, json.loads(options_json))
    # every object the read stage meets is asked: a small first read, and the rest of the header
    # (one larger ranged read) only for a WSI instance
    with fs.open(path, "rb", block_size=_META_BLOCK) as f:
        if not is_dicom_wsi_bytes(f.read(_META_BLOCK)):
            return None
    with fs.open(path, "rb", block_size=_HEADER_BLOCK) as f:
        ds = read_wsi_header(f)
        if ds is None:
            return None
        size = fs.size(path)
    return dataclasses.replace(check_wsi_header(ds, limits, size), uri=uri)


def _slide_files(
    uri: str,
    fs: Any,
    path: str,
    own: WsiFile,
    storage_options: Mapping[str, Any] | None,
    limits: DecodeLimits,
) -> list[WsiFile]:
    """The files of ``own``'s series in its folder, base level first."""
    folder = posixpath.dirname(path)
    options_json = json.dumps(dict(storage_options or {}), sort_keys=True, default=str)
    try:
        names = sorted(fs.ls(folder, detail=False))
    except Exception as err:  # noqa: BLE001
        raise DecodeError(f"cannot list the folder of a DICOM whole-slide image ({type(err).__name__})") from None
    names = [n for n in names if not n.rsplit("/", 1)[-1].lower().endswith(_NOT_DICOM)]
    if len(names) > MAX_FOLDER_OBJECTS:
        raise LimitExceeded(
            f"a DICOM whole-slide image's folder holds {len(names)} objects, over {MAX_FOLDER_OBJECTS}: "
            "keep each slide's level files in a folder (or prefix) of their own"
        )
    files = [own]
    for name in names:
        sibling = unstrip(fs, name) if "://" in uri else name
        if sibling == uri or name == path:
            continue
        try:
            summary = _header_summary(sibling, options_json, limits)
        except RecordError:
            continue  # a damaged sibling is quarantined on its own; this slide is judged by its own files
        except Exception:  # noqa: BLE001 - unreadable sibling: reported on its own row
            continue
        if summary is not None and summary.series_uid == own.series_uid:
            files.append(summary)
    volumes = [f for f in files if f.image_type == "VOLUME"] or files

    def rank(f: WsiFile) -> tuple[int, str]:
        return (-f.width * f.height, f.uri)

    base = min(volumes, key=rank)
    return [base, *sorted((f for f in files if f is not base), key=rank)]


class DicomWsiSlide:
    """A DICOM WSI seen through the slide interface of :mod:`medray.platform.decoders.slide`.

    Levels are the selected pyramid's, largest first; coordinates given to
    :meth:`read_region` are level-0 pixels, like OpenSlide and tiffslide.
    wsidicom is opened on first use.

    Args:
        files: the slide's files, base level first (:func:`sniff_dicom_wsi`).
        storage_options: fsspec options for the files.
    """

    #: What the slide stages record as the slide's reader (``tiff`` for tiffslide slides).
    reader = "dicom_wsi"

    def __init__(
        self,
        files: list[WsiFile],
        storage_options: Mapping[str, Any] | None = None,
        opener: Callable[[Any], Any] | None = None,
    ) -> None:
        self.files = files
        self._options = dict(storage_options or {})
        self._opener = opener
        self._wsi: Any = None
        self._levels: list[Any] = []
        self._transform: Any = None

    @property
    def uri(self) -> str:
        """The base level's URI (the slide's record)."""
        return self.files[0].uri

    def _open(self) -> Any:
        if self._wsi is not None:
            return self._wsi
        from upath import UPath
        from wsidicom import WsiDicom
        from wsidicom.config import Settings
        from wsidicom.file import WsiDicomFileSource
        from wsidicom.file.io import WsiDicomReadIO

        # wsidicom logs the file paths of files it rejects; paths may carry names (PHI)
        logging.getLogger("wsidicom").setLevel(logging.CRITICAL)
        streams = []
        settings = Settings(decoded_frame_cache_size=_CACHE_BYTES, encoded_frame_cache_size=_CACHE_BYTES)
        try:
            if self._opener is not None:  # DICOMweb: wsidicom reads frames by WADO-RS
                wsi = self._opener(settings)
            else:
                for f in self.files:
                    fs, path = open_fs(f.uri, self._options)
                    stream = fs.open(path, "rb", block_size=_TILE_BLOCK)
                    target = UPath(f.uri, **getattr(fs, "storage_options", {})) if "://" in f.uri else UPath(path)
                    streams.append(WsiDicomReadIO(stream, filepath=target))
                wsi = WsiDicom(WsiDicomFileSource(streams), source_owned=True, settings=settings)
            levels = sorted(wsi.levels, key=lambda lv: -lv.size.width * lv.size.height)
        except Exception as err:  # noqa: BLE001 - library messages may quote paths and header values
            for s in streams:
                s.close()
            raise DecodeError(f"unreadable DICOM whole-slide image ({type(err).__name__})") from None
        self._levels = levels
        self._wsi = wsi
        icc = self.files[0].icc_profile
        if icc:
            self._transform = _icc_transform(icc)
        return wsi

    @property
    def level_count(self) -> int:
        """Pyramid levels."""
        self._open()
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of each level, largest first."""
        self._open()
        return tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Each level's downsample from level 0 (mean of the two axes, as tiffslide)."""
        w0, h0 = self.dimensions
        return tuple(((w0 / w) + (h0 / h)) / 2.0 for w, h in self.level_dimensions)

    @property
    def properties(self) -> dict[str, Any]:
        """Slide properties under the keys the slide planner reads (``tiffslide.mpp-x``...)."""
        self._open()
        mpp = self._levels[0].mpp  # micrometres per pixel
        return {
            "tiffslide.mpp-x": float(mpp.width),
            "tiffslide.mpp-y": float(mpp.height),
            "tiffslide.vendor": "dicom",
            "dicom.icc_profile": self._transform is not None,
        }

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int], *, as_array: bool = False
    ) -> Any:
        """Read a region (``location`` in level-0 pixels, ``size`` in ``level``'s) as RGB.

        Parts outside the level are black, as tiffslide pads them; gaps in a
        TILED_SPARSE level are white (wsidicom's background).

        Returns:
            a Pillow ``RGB`` image, or a ``uint8`` array ``(h, w, 3)`` when ``as_array``.

        Raises:
            DecodeError: the region cannot be read.
        """
        from PIL import Image

        wsi = self._open()
        lv = self._levels[level]
        ds = self.level_downsamples[level]
        rx0, ry0 = int(location[0] / ds), int(location[1] / ds)
        w, h = int(size[0]), int(size[1])
        lw, lh = int(lv.size.width), int(lv.size.height)
        out = np.zeros((h, w, 3), np.uint8)
        x0, y0, x1, y1 = max(rx0, 0), max(ry0, 0), min(rx0 + w, lw), min(ry0 + h, lh)
        if x1 > x0 and y1 > y0:
            try:
                part = wsi.read_region((x0, y0), lv.level, (x1 - x0, y1 - y0), as_array=True)
            except Exception as err:  # noqa: BLE001 - library messages may quote paths
                raise DecodeError(f"cannot read a DICOM whole-slide image region ({type(err).__name__})") from None
            part = np.asarray(part)
            if part.ndim == 2:
                part = np.repeat(part[..., None], 3, axis=2)
            out[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = part[..., :3]
        image = Image.fromarray(out, "RGB")
        if self._transform is not None:
            from PIL import ImageCms

            image = ImageCms.applyTransform(image, self._transform) or image
        return np.asarray(image) if as_array else image

    def close(self) -> None:
        """Close the slide's files."""
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None


def _icc_transform(icc: bytes) -> Any:
    """A Pillow transform from the slide's ICC profile to sRGB (``None`` when the profile is unusable)."""
    return srgb_transform(icc)


# --------------------------------------------------------------------------- DICOMweb
#: Transfer syntaxes asked of the server for tiles, in order: lossless first, so a server that
#: transcodes (Orthanc) sends the stored pixels; one that does not answers 406 and the next is tried.
_WEB_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)


@dataclass(frozen=True)
class _WebInstance:
    sop: str
    sop_class: str
    image_type: str
    width: int
    height: int


@functools.lru_cache(maxsize=256)
def _series_instances(base: str, study: str, series: str) -> tuple[_WebInstance, ...]:
    """Every instance of a series with its SOP class, image type and matrix size (one QIDO-RS search)."""
    return _search_series(dicomweb_client(base), study, series)


def _search_series(client: Any, study: str, series: str) -> tuple[_WebInstance, ...]:
    """:func:`_series_instances` with a given client (a caller's credential: never cached)."""
    fields = ["00080016", "00080008", "00480006", "00480007"]
    out = []
    for entry in client.search_for_instances(study, series, fields=fields):

        def first(tag: str, entry: Mapping[str, Any] = entry) -> Any:
            values = (entry.get(tag) or {}).get("Value") or [None]
            return values[0]

        kinds = (entry.get("00080008") or {}).get("Value") or []
        out.append(
            _WebInstance(
                sop=str(first("00080018")),
                sop_class=str(first("00080016") or ""),
                image_type=str(kinds[2]).upper() if len(kinds) > 2 else "VOLUME",
                width=int(first("00480006") or 0),
                height=int(first("00480007") or 0),
            )
        )
    return tuple(out)


def _base_level(series: list[_WebInstance]) -> _WebInstance:
    """A DICOMweb slide's base level: its largest ``VOLUME`` instance (ties: the smallest UID)."""
    volumes = [x for x in series if x.image_type == "VOLUME"] or series
    return min(volumes, key=lambda x: (-x.width * x.height, x.sop))


def is_dicomweb_wsi(uri: str) -> bool:
    """True when a DICOMweb instance URI is a whole-slide image instance (its series is searched once per process).

    Such an instance is not fetched whole: :func:`sniff_dicomweb_wsi` tiles its slide.
    """
    loc = parse_location(uri)
    if not (loc.study and loc.series and loc.sop):
        return False
    try:
        series = _series_instances(loc.base, loc.study, loc.series)
    except Exception:  # noqa: BLE001 - the instance's own fetch reports the server's answer
        return False
    return any(x.sop == loc.sop and x.sop_class == WSI_SOP_CLASS for x in series)


def sniff_dicomweb_wsi(uri: str, limits: DecodeLimits = DecodeLimits()) -> DicomWsiSlide | None:
    """The slide when a DICOMweb instance URI is the base level of a whole-slide image, else ``None``.

    The instances of its series are one slide; the base level is the largest
    ``VOLUME`` instance. Each instance's metadata (WADO-RS) is checked against
    the limits, as the headers of files are. Tiles are then read by WADO-RS
    frame retrieval (wsidicom), lossless when the server can send it.

    Raises:
        SkipRecord: another instance of a slide (a smaller level, label, overview, thumbnail).
        RecordError: the slide's metadata is damaged or over the limits (quarantined).
    """
    loc = parse_location(uri)
    if not (loc.study and loc.series and loc.sop):
        return None
    series = [x for x in _series_instances(loc.base, loc.study, loc.series) if x.sop_class == WSI_SOP_CLASS]
    own = next((x for x in series if x.sop == loc.sop), None)
    if own is None:
        return None
    base = _base_level(series)
    if base.sop != own.sop:
        if own.image_type in ("VOLUME", "THUMBNAIL"):
            raise SkipRecord(
                "WsiLevel",
                "a smaller pyramid level of a DICOM whole-slide image: embedded with the slide's base level",
                stage="read",
            )
        raise SkipRecord(
            f"Wsi{own.image_type.title()}",
            f"the {own.image_type.lower()} image of a DICOM whole-slide image: not embedded (slide labels and "
            "overviews carry burned-in identifiers); the slide is embedded from its base level",
            stage="read",
        )
    return _web_slide(uri, dicomweb_client(loc.base), series, base, limits)


def _web_slide(
    uri: str, client: Any, series: list[_WebInstance], base: _WebInstance, limits: DecodeLimits
) -> DicomWsiSlide:
    """The slide of a DICOMweb series whose base level is ``base``, read through ``client``."""
    from pydicom import Dataset
    from pydicom.uid import UID

    loc = parse_location(uri)
    files = []
    for x in sorted(series, key=lambda x: (x.sop != base.sop, -x.width * x.height, x.sop)):
        try:
            meta = client.retrieve_instance_metadata(loc.study, loc.series, x.sop)
            ds = Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"")
            ds.ensure_file_meta()
            ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")  # frames come per request, not in a file
        except Exception as err:  # noqa: BLE001 - server messages may quote UIDs
            raise DecodeError(f"cannot read a DICOM whole-slide image's metadata ({type(err).__name__})") from None
        summary = check_wsi_header(ds, limits)
        files.append(
            WsiFile(
                uri=f"{uri.rsplit('/instances/', 1)[0]}/instances/{x.sop}",
                series_uid=summary.series_uid,
                image_type=summary.image_type,
                width=summary.width,
                height=summary.height,
                icc_profile=summary.icc_profile or None,
            )
        )

    def opener(settings: Any) -> Any:
        from wsidicom import WsiDicom

        return WsiDicom.open_web(
            _WebClient(client), loc.study, loc.series, requested_transfer_syntax=_WEB_SYNTAXES, settings=settings
        )

    return DicomWsiSlide(files, opener=opener)


def read_dicomweb_wsi_patches(
    uri: str,
    patches: list[tuple[int, int, int, int]],
    *,
    credential: str | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> list[np.ndarray] | None:
    """Rectangles of a DICOMweb whole-slide instance, read tile by tile; ``None`` when it is no WSI instance.

    HAI-DEF's ``patch_coordinates_list`` on a slide: each ``(x, y, width,
    height)`` is in the pixel matrix of the instance the URI names (one
    pyramid level); only the frames under each patch are fetched (WADO-RS
    frame retrieval through wsidicom), never the level whole. ICC profiles are
    applied as for embedding.

    Args:
        uri: ``[dicomweb+]http(s)://<service>/studies/<uid>/series/<uid>/instances/<uid>``.
        patches: rectangles in that instance's pixels.
        credential: a caller's bearer token for these requests only (never
            cached, never logged); ``None``/``application_default``: the
            process's credentials (``MEDRAY_DICOMWEB_*``).
        limits: a patch over ``limits.max_pixels`` is refused before it is read.

    Returns:
        One ``uint8`` RGB array ``(height, width, 3)`` per patch, or ``None``
        when the instance is not a whole-slide image (the caller fetches it whole).

    Raises:
        DecodeError: a patch outside the instance's matrix, the slide unreadable.
        LimitExceeded: a patch over ``limits.max_pixels``.
    """
    uri = uri if is_dicomweb(uri) else SCHEME_PREFIX + uri  # HAI-DEF sends http(s):// URIs
    loc = parse_location(uri)
    if not (loc.study and loc.series and loc.sop):
        return None
    own_client = credential not in (None, "", "application_default")
    client = _caller_client(loc.base, str(credential)) if own_client else dicomweb_client(loc.base)
    try:
        series_all = (
            _search_series(client, loc.study, loc.series)
            if own_client
            else _series_instances(loc.base, loc.study, loc.series)
        )
    except Exception as err:  # noqa: BLE001 - server messages may quote UIDs: the class and status only
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise ReadError(
            f"cannot search the instance's series on the DICOMweb service ({type(err).__name__}"
            f"{f' {status}' if status else ''})"
        ) from None
    series = [x for x in series_all if x.sop_class == WSI_SOP_CLASS]
    own = next((x for x in series if x.sop == loc.sop), None)
    if own is None:
        return None
    for x, y, w, h in patches:
        if w * h * 3 > limits.max_pixels:
            raise LimitExceeded(f"a {w}x{h} patch is over max_pixels = {limits.max_pixels:.3g}")
        if x < 0 or y < 0 or x + w > own.width or y + h > own.height:
            raise DecodeError(f"patch ({x}, {y}, {w}, {h}) lies outside the {own.width}x{own.height} image")
    base = _base_level(series)
    slide = _web_slide(uri, client, series, base, limits)
    try:
        dims = slide.level_dimensions
        level = next((i for i, d in enumerate(dims) if tuple(d) == (own.width, own.height)), None)
        if level is None:
            raise DecodeError("the instance is not one of its slide's pyramid levels (a label or overview image)")
        down = slide.level_downsamples[level]
        return [
            np.asarray(slide.read_region((round(x * down), round(y * down)), level, (w, h), as_array=True))
            for x, y, w, h in patches
        ]
    finally:
        slide.close()


def _caller_client(base: str, credential: str) -> Any:
    """A DICOMweb client with a caller's bearer token, for one request (not cached)."""
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {credential}"
    return DICOMwebClient(url=base, session=session, timeout=(10, 120))


def _web_client_class() -> type:
    from wsidicom.web import WsiDicomWebClient

    class WebClient(WsiDicomWebClient):
        """wsidicom's client, with frames as ``bytes``.

        dicomweb-client yields ``bytearray`` frames; pydicom takes a bytearray
        assigned to Pixel Data for a list of values, and wsidicom's native
        decoder then fails, so frames are turned into ``bytes``.
        """

        def get_frames(self, *args: Any, **kwargs: Any) -> Any:
            return (bytes(f) for f in super().get_frames(*args, **kwargs))

    return WebClient


def _WebClient(client: Any) -> Any:  # noqa: N802 - builds the class lazily (wsidicom imported on use)
    return _web_client_class()(client)
