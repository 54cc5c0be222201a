"""CT and MR series as volumes: group, order along the normal, HU, resample, windows.

Pure functions, no Ray: the embed pipeline calls them from a Ray Data
group-by (:mod:`medray.pipeline.series`), tests and benchmarks call
them directly.

* :func:`read_slice_header` parses one instance's header (pydicom
  ``stop_before_pixels``) into a :class:`SliceHeader`: the series key (a
  salted hash of SeriesInstanceUID, never the UID), position, orientation,
  spacing and size. Instances that are not single-frame CT/MR Part-10 files
  with a SeriesInstanceUID give ``None`` and stay on the per-instance path.
* :func:`plan_series` checks a series' headers and orders its slices along
  the slice normal (ImagePositionPatient · (row × column direction), not
  InstanceNumber). A series with a missing slice, mixed orientations,
  inconsistent slice or pixel spacing, inconsistent rows/columns, or more
  slices than ``max_slices`` raises :class:`SeriesError` /
  :class:`~medray.platform.errors.LimitExceeded` with a PHI-free reason;
  :func:`validate_series` returns that reason instead.
* :func:`assemble_series` decodes the ordered slices, converts each with its
  own modality LUT (RescaleSlope/Intercept: HU for CT), stacks them and
  resamples to the configured spacing with ``torch.nn.functional.interpolate``.
* :func:`window_channels` turns a volume into windows-as-channels, as CT
  Foundation does (lung, mediastinum, bone), values in ``[0, 1]``.

Example:
    >>> import numpy as np
    >>> from medray.testing.samples import ct_series
    >>> phantom = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8) - 100
    >>> files = ct_series(phantom, seed=1)
    >>> vol = assemble_series(files[::-1])            # any file order
    >>> bool(np.array_equal(vol.values, phantom)), vol.spacing
    (True, (2.5, 0.8, 0.8))
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from io import BytesIO
from typing import Any, BinaryIO

import numpy as np

from medray.platform.decoders import DecodeLimits
from medray.platform.decoders.dicom import check_header, frame_view, guarded, quiet, read_dataset
from medray.platform.deid import extract_metadata, patient_key
from medray.platform.errors import ConfigError, DecodeError, LimitExceeded

__all__ = [
    "SERIES_MODES",
    "SeriesError",
    "SeriesOptions",
    "SliceHeader",
    "SeriesPlan",
    "Volume",
    "read_slice_header",
    "series_key",
    "plan_series",
    "validate_series",
    "decode_slice",
    "resample_volume",
    "window_channels",
    "assemble_series",
    "LPS_AXES",
    "PatientGrid",
    "stack_affine",
    "to_patient_axes",
    "patient_axes_geometry",
    "ENHANCED_SOP_CLASSES",
    "is_enhanced_volume",
    "enhanced_frame_headers",
    "assemble_enhanced",
    "assemble_enhanced_stacks",
    "EnhancedStack",
    "enhanced_stack_groups",
]

SERIES_MODES = ("off", "slicewise", "volume")
#: CT Foundation-style windows, (center, width) in HU; their order is the channel order.
DEFAULT_WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "bone": (400.0, 1800.0)}
#: Axis codes of DICOM's patient axes in voxel order (i: columns, j: rows, k: slices): every
#: volume reaches an encoder on these axes (columns to the patient's left, rows to posterior,
#: slices inferior to superior), whatever its acquisition plane or file format.
LPS_AXES = ("L", "P", "S")
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
#: Enhanced (and legacy-converted enhanced) CT and MR: one object, a stack of frames.
ENHANCED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}
_IOP_TOL = 1e-3  # direction cosines that differ by more are another orientation
_PIXEL_SPACING_TOL = 1e-3  # relative


class SeriesError(DecodeError):
    """A series cannot become one volume (geometry); its message is the reason, PHI-free."""


@dataclass(frozen=True)
class SeriesOptions:
    """How CT/MR series become volumes (``series:`` in the embed config).

    Args:
        mode: ``off`` (one record per instance, as before), ``slicewise``
            (a 2D encoder on each multi-window slice plus a pooled series row)
            or ``volume`` (the whole volume through a 3D encoder).
        spacing: target voxel spacing ``(z, y, x)`` in mm; ``None`` keeps the
            series' own spacing. A ``None`` component keeps that axis.
        windows: name -> ``(center, width)`` in HU; one channel each, in order.
            MR has no HU: its channels are a 0.5-99.5 percentile normalisation.
        max_slices: a series with more slices is quarantined before any pixel
            is read.
        min_slices: a series with fewer slices is quarantined.
        max_voxels: limit on the resampled volume (a lying spacing cannot
            blow up memory).
        pool: ``mean`` adds one pooled row per series in slicewise mode;
            ``none`` does not.
        modalities: DICOM Modality values assembled into series.
        channels: names of ``windows`` to use as channels, in order; ``None``:
            all of them in their order. (Config overrides merge into the
            ``windows`` mapping, so pick with this list.)
        spacing_tolerance: relative spread of slice gaps accepted as one
            spacing; a gap over ``1.5`` times the median is a missing slice.

    Raises:
        ConfigError: a value is out of range (the key names ``series.<field>``).
    """

    mode: str = "off"
    spacing: tuple[float | None, float | None, float | None] | None = None
    windows: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_WINDOWS))
    max_slices: int = 2000
    min_slices: int = 1
    max_voxels: int = 256 * 1024 * 1024
    pool: str = "mean"
    modalities: tuple[str, ...] = ("CT", "MR")
    spacing_tolerance: float = 0.1
    channels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in SERIES_MODES:
            raise ConfigError("series.mode", f"expected one of {', '.join(SERIES_MODES)}, got {self.mode!r}")
        if self.spacing is not None:
            sp = tuple(None if v is None else float(v) for v in self.spacing)
            if len(sp) != 3 or any(v is not None and not v > 0 for v in sp):
                raise ConfigError(
                    "series.spacing", "expected [z, y, x] in mm (each > 0 or null), e.g. series.spacing=[1.5,0.75,0.75]"
                )
            object.__setattr__(self, "spacing", sp)
        windows: dict[str, tuple[float, float]] = {}
        for name, win in dict(self.windows or {}).items():
            try:
                center, width = (float(v) for v in win)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"series.windows.{name}", "expected [center, width] in HU, e.g. [-600, 1500]"
                ) from None
            if not width > 0:
                raise ConfigError(f"series.windows.{name}", f"width must be > 0, got {width}")
            windows[str(name)] = (center, width)
        if self.channels is not None:
            unknown = [c for c in self.channels if str(c) not in windows]
            if unknown or not self.channels:
                raise ConfigError(
                    "series.channels",
                    f"expected names from series.windows ({', '.join(windows)}), got {list(self.channels)}",
                )
            windows = {str(c): windows[str(c)] for c in self.channels}
            object.__setattr__(self, "channels", tuple(windows))
        if not windows:
            raise ConfigError("series.windows", "needs at least one window, e.g. {lung: [-600, 1500]}")
        object.__setattr__(self, "windows", windows)
        for key in ("max_slices", "min_slices", "max_voxels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"series.{key}", f"expected an int >= 1, got {value!r}")
        if self.min_slices > self.max_slices:
            raise ConfigError("series.min_slices", "must not exceed series.max_slices")
        if self.pool not in ("mean", "none"):
            raise ConfigError("series.pool", f"expected mean or none, got {self.pool!r}")
        object.__setattr__(self, "modalities", tuple(str(m).strip().upper() for m in self.modalities))
        if not 0 < float(self.spacing_tolerance) < 0.5:
            raise ConfigError("series.spacing_tolerance", "expected a fraction in (0, 0.5), e.g. 0.1")


@dataclass
class SliceHeader:
    """What the header pass keeps of one instance (no PHI: the series key is hashed).

    ``uri``/``member`` say where the instance is; ``index`` is its position in
    the caller's list (for :func:`assemble_series`).
    """

    series_key: str
    modality: str
    frames: int
    rows: int | None
    columns: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    instance_number: int | None
    patient_key: str | None = None
    metadata: dict = field(default_factory=dict)
    uri: str = ""
    member: str = ""
    index: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SliceHeader:
        """Inverse of :meth:`to_dict`."""
        out = dict(d)
        for key in ("position", "orientation", "pixel_spacing"):
            if out.get(key) is not None:
                out[key] = tuple(float(v) for v in out[key])
        return cls(**{k: out[k] for k in cls.__dataclass_fields__ if k in out})


def series_key(series_uid: str, salt: str) -> str:
    """Salted hash of a SeriesInstanceUID (32 hex), like the patient key: the UID never leaves."""
    return hashlib.sha256(f"{salt}\x00series\x00{series_uid.strip()}".encode()).hexdigest()[:32]


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_slice_header(
    source: bytes | BinaryIO | Any, *, salt: str = "", options: SeriesOptions | None = None
) -> SliceHeader | None:
    """Parse one instance's header into a :class:`SliceHeader`, or ``None`` if it is no series slice.

    A series slice is a DICOM Part-10 file (``DICM`` preamble) of a modality in
    ``options.modalities`` with a SeriesInstanceUID and one frame. A
    multi-frame instance whose frame count is over ``options.max_slices`` is
    kept too, so that the series it claims to be is quarantined as such.
    Pixel data is never read (``stop_before_pixels``).

    Args:
        source: the instance's bytes, a binary file object positioned at its
            start (e.g. an fsspec file: only the header is fetched), or a
            pydicom ``Dataset``.
        salt: the patient salt; hashes the series and patient keys.
        options: which modalities and the slice limit.
    """
    import pydicom
    from pydicom.dataset import Dataset

    options = options or SeriesOptions()
    if isinstance(source, Dataset):
        ds = source
    else:
        fp = BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        try:
            head = fp.read(132)
            if bytes(head[128:132]) != b"DICM":
                return None
            fp.seek(0)
            with quiet():
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a readable Part-10 header: the per-instance path reports it
            return None
    try:
        with quiet():
            modality = str(ds.get("Modality") or "").strip().upper()
            uid = str(ds.get("SeriesInstanceUID") or "").strip()
            if modality not in options.modalities or not uid:
                return None
            frames = _int(ds.get("NumberOfFrames") or 1) or 1
            if frames > 1 and frames <= options.max_slices:
                return None  # an (enhanced) multi-frame object: embedded per frame, as before
            thickness = _floats([ds.get("SliceThickness")], 1) if ds.get("SliceThickness") not in (None, "") else None
            return SliceHeader(
                series_key=series_key(uid, salt),
                modality=modality,
                frames=frames,
                rows=_int(ds.get("Rows")),
                columns=_int(ds.get("Columns")),
                position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
                slice_thickness=thickness[0] if thickness else None,
                instance_number=_int(ds.get("InstanceNumber")),
                patient_key=patient_key(ds, salt),
                metadata=extract_metadata(ds),
            )
    except Exception:  # noqa: BLE001 - a damaged header: per-instance path
        return None


@dataclass
class SeriesPlan:
    """A checked series: slice order and geometry, before any pixel is read.

    Attributes:
        order: indices into the header list, sorted along the normal.
        positions: mm along the normal of each sorted slice.
        normal: the slice normal (row direction × column direction).
        spacing: native ``(z, y, x)`` spacing in mm.
        shape: native ``(D, H, W)``.
        target_shape / target_spacing: on the patient axes (:func:`to_patient_axes`), after resampling.
        affine: RAS affine of the sorted stack (:func:`stack_affine`).
    """

    order: list[int]
    positions: list[float]
    normal: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    target_shape: tuple[int, int, int]
    target_spacing: tuple[float, float, float]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))


def _distinct(values: Sequence[tuple[float, ...]], tol: float, relative: bool = False) -> int:
    """Number of clusters of tuples that differ by more than ``tol`` (greedy)."""
    reps: list[np.ndarray] = []
    for v in values:
        a = np.asarray(v, dtype=np.float64)
        if not any(
            np.max(np.abs(a - r)) <= (tol * max(1e-9, float(np.max(np.abs(r)))) if relative else tol) for r in reps
        ):
            reps.append(a)
    return len(reps)


def target_geometry(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], options: SeriesOptions
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The resampled ``(D, H, W)`` and the spacing it reaches, checked against ``series.max_voxels``.

    Raises:
        LimitExceeded: the resampled volume has more than ``options.max_voxels`` voxels.
    """
    target = tuple(s if t is None else t for s, t in zip(spacing, options.spacing or (None, None, None)))
    d, h, w = (max(1, int(round(n_ * s / t))) for n_, s, t in zip(shape, spacing, target))
    voxels = int(np.prod((d, h, w), dtype=np.int64))
    if voxels > options.max_voxels:
        raise LimitExceeded(
            f"resampled volume {d}x{h}x{w} = {voxels:.3g} voxels "
            f"exceeds series.max_voxels = {options.max_voxels:.3g}; coarsen series.spacing "
            "or raise series.max_voxels"
        )
    # the spacing actually reached (extent / size), which differs from the target by rounding
    zs, ys, xs = (n_ * s / t for n_, s, t in zip(shape, spacing, (d, h, w)))
    return (d, h, w), (zs, ys, xs)


# ------------------------------------------------------------------ patient axes


@dataclass
class PatientGrid:
    """Voxels turned to DICOM's patient axes (:data:`LPS_AXES`), as a 3D encoder receives them.

    Attributes:
        values: ``(D, H, W)``: slices inferior to superior, rows anterior to
            posterior, columns right to left (an axial series' own order).
        spacing: ``(z, y, x)`` mm of ``values``.
        normal: LPS unit direction of the ``D`` axis.
        origin: LPS position (mm) of voxel ``(0, 0, 0)``.
        source_orientation: the input's voxel axes as nibabel's axis codes
            (``LPS`` for an axial DICOM stack, ``PIL`` for a sagittal one...).
    """

    values: np.ndarray
    spacing: tuple[float, float, float]
    normal: tuple[float, float, float]
    origin: tuple[float, float, float]
    source_orientation: str


def stack_affine(
    orientation: Sequence[float] | np.ndarray, origin: Sequence[float] | np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """The RAS affine (nibabel's convention, as a NIfTI holds it) of a DICOM stack.

    Voxel ``(i, j, k)`` is column ``i``, row ``j`` of sorted slice ``k``.

    Args:
        orientation: ImageOrientationPatient (row direction, column direction).
        origin: ImagePositionPatient of the first slice along the normal.
        spacing: ``(z, y, x)`` mm: slice step and PixelSpacing (rows, columns).
    """
    iop = np.asarray(orientation, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    normal /= float(np.linalg.norm(normal)) or 1.0
    dz, dy, dx = (float(v) for v in spacing)
    affine = np.eye(4)
    affine[:3, 0] = row * dx * _LPS_TO_RAS
    affine[:3, 1] = col * dy * _LPS_TO_RAS
    affine[:3, 2] = normal * dz * _LPS_TO_RAS
    affine[:3, 3] = np.asarray(origin, dtype=np.float64) * _LPS_TO_RAS
    return affine


def _lps_transform(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nibabel's orientation transform from ``affine``'s voxel axes to :data:`LPS_AXES`, and the voxel sizes."""
    from nibabel import orientations as ornt

    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    if not np.all(zooms > 0):
        raise SeriesError("the volume's affine has a zero voxel size")
    start = ornt.io_orientation(affine)
    return ornt.ornt_transform(start, ornt.axcodes2ornt(LPS_AXES)), zooms


def patient_axes_geometry(
    shape: Sequence[int], spacing: Sequence[float], affine: np.ndarray
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``(D, H, W)`` and ``(z, y, x)`` spacing that :func:`to_patient_axes` will give (no voxels needed).

    Args:
        shape: ``(D, H, W)`` of the stack as acquired.
        spacing: its ``(z, y, x)`` spacing.
        affine: :func:`stack_affine` of it.
    """
    xform, _ = _lps_transform(affine)
    ijk_shape, ijk_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (n, s) in enumerate(zip(reversed(tuple(shape)), reversed(tuple(spacing)))):
        ijk_shape[int(xform[axis, 0])], ijk_spacing[int(xform[axis, 0])] = int(n), float(s)
    return (ijk_shape[2], ijk_shape[1], ijk_shape[0]), (ijk_spacing[2], ijk_spacing[1], ijk_spacing[0])


def to_patient_axes(values: np.ndarray, affine: np.ndarray) -> PatientGrid:
    """Turn voxels ``(i, j, k)`` with a RAS ``affine`` to DICOM's patient axes, ``(D, H, W)``.

    The one reorientation of every volume (DICOM series, enhanced multi-frame
    objects, NIfTI): the voxel axes nearest to left, posterior and superior are
    flipped and permuted onto them (nibabel's ``io_orientation``; no
    interpolation, so an oblique stack keeps its voxels). An axial stack is
    unchanged; a sagittal or coronal one becomes the axial stack of the same
    voxels, so one phantom gives one model input whatever the acquisition plane.

    Args:
        values: ``(i, j, k)`` = (columns, rows, slices) voxels.
        affine: RAS affine of ``values`` (:func:`stack_affine` for DICOM, the
            image's own for NIfTI).

    Raises:
        SeriesError: the affine has a zero voxel size.
    """
    from nibabel import orientations as ornt

    affine = np.asarray(affine, dtype=np.float64)
    xform, zooms = _lps_transform(affine)
    turned = ornt.apply_orientation(values, xform)
    spacing_ijk = np.empty(3)
    for axis in range(3):
        spacing_ijk[int(xform[axis, 0])] = zooms[axis]
    # the reoriented voxel grid's affine (RAS); DICOM's patient axes negate x and y
    new_affine = affine @ ornt.inv_ornt_aff(xform, values.shape)
    ras_normal = new_affine[:3, 2] / (np.linalg.norm(new_affine[:3, 2]) or 1.0)
    normal = (-float(ras_normal[0]), -float(ras_normal[1]), float(ras_normal[2]))
    origin = (-float(new_affine[0, 3]), -float(new_affine[1, 3]), float(new_affine[2, 3]))
    return PatientGrid(
        values=np.ascontiguousarray(np.transpose(turned, (2, 1, 0)), dtype=np.float32),
        spacing=(float(spacing_ijk[2]), float(spacing_ijk[1]), float(spacing_ijk[0])),
        normal=normal,
        origin=origin,
        source_orientation="".join(ornt.aff2axcodes(affine)),
    )


def plan_series(headers: Sequence[SliceHeader], options: SeriesOptions | None = None) -> SeriesPlan:
    """Check a series and order its slices along the normal.

    Raises:
        LimitExceeded: more slices than ``max_slices``, or a resampled volume
            over ``max_voxels``.
        SeriesError: fewer than ``min_slices``; mixed modalities; multi-frame
            instances; missing geometry; inconsistent rows/columns, pixel
            spacing or orientation; duplicate positions; a missing slice;
            uneven slice spacing; slices not stacked along the normal.
    """
    options = options or SeriesOptions()
    n = sum(max(1, h.frames) for h in headers)
    if n > options.max_slices:
        raise LimitExceeded(
            f"series has {n} slices, over series.max_slices = {options.max_slices}; "
            "raise series.max_slices to accept it"
        )
    if n < options.min_slices or not headers:
        raise SeriesError(f"series has {n} slices, fewer than series.min_slices = {options.min_slices}")
    if any(h.frames > 1 for h in headers):
        raise SeriesError("multi-frame instances cannot be stacked into a series volume")
    if len({h.modality for h in headers}) > 1:
        raise SeriesError(f"mixed modalities in one series ({', '.join(sorted({h.modality for h in headers}))})")
    sizes = sorted({(h.rows, h.columns) for h in headers}, key=str)
    if len(sizes) > 1 or sizes[0][0] is None or sizes[0][1] is None:
        shown = ", ".join(f"{r}x{c}" for r, c in sizes[:4])
        raise SeriesError(f"inconsistent or missing rows/columns across slices ({shown})")
    lacking = sum(1 for h in headers if h.position is None or h.orientation is None or h.pixel_spacing is None)
    if lacking:
        raise SeriesError(
            f"{lacking} of {len(headers)} slices lack ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
        )
    k = _distinct([h.orientation for h in headers], _IOP_TOL)  # type: ignore[misc]
    if k > 1:
        raise SeriesError(f"mixed orientations: {k} distinct ImageOrientationPatient values in one series")
    k = _distinct([h.pixel_spacing for h in headers], _PIXEL_SPACING_TOL, relative=True)  # type: ignore[misc]
    if k > 1:
        raise SeriesError(f"inconsistent pixel spacing: {k} distinct PixelSpacing values in one series")
    iop = np.asarray(headers[0].orientation, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    norm = float(np.linalg.norm(normal))
    if not norm > 0.5:
        raise SeriesError("ImageOrientationPatient does not hold two orthogonal unit directions")
    normal /= norm
    pos = np.asarray([h.position for h in headers], dtype=np.float64)
    along = pos @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    sorted_pos = along[order]
    assert headers[0].pixel_spacing is not None  # _check_geometry refused headers without it
    dy, dx = (float(v) for v in headers[0].pixel_spacing)
    if len(headers) > 1:
        gaps = np.diff(sorted_pos)
        step = float(np.median(gaps))
        dup = int(np.sum(gaps <= 1e-3 * max(1.0, abs(step))))
        if dup or not step > 0:
            raise SeriesError(
                f"duplicate slice positions: {dup} slices share a position with another "
                "(a repeated instance or two acquisitions in one series)"
            )
        worst = int(np.argmax(gaps))
        if gaps[worst] > 1.5 * step:
            missing = int(round(gaps[worst] / step)) - 1
            raise SeriesError(
                f"missing slice: a gap of {gaps[worst]:.3g} mm between sorted slices {worst} and "
                f"{worst + 1} where the spacing is {step:.3g} mm (about {max(1, missing)} "
                "slice(s) missing)"
            )
        if float(np.max(np.abs(gaps - step))) > options.spacing_tolerance * step:
            raise SeriesError(
                f"inconsistent slice spacing: gaps from {float(gaps.min()):.3g} to "
                f"{float(gaps.max()):.3g} mm (tolerance {options.spacing_tolerance:.0%})"
            )
        # In-plane drift of the origins: a tilted gantry or a sheared stack is no regular volume.
        inplane = (pos - pos[order[0]]) - np.outer(along - sorted_pos[0], normal)
        drift = float(np.max(np.linalg.norm(inplane, axis=1)))
        if drift > min(dy, dx):
            raise SeriesError(
                f"slices are not stacked along their normal (in-plane drift {drift:.3g} mm; "
                "gantry tilt or a sheared series)"
            )
    else:
        step = float(headers[0].slice_thickness or 1.0)
        if not step > 0:
            step = 1.0
    rows, cols = sizes[0]
    assert rows is not None and cols is not None  # sizes come from headers with Rows/Columns
    shape = (len(headers), int(rows), int(cols))
    spacing = (step, dy, dx)
    affine = stack_affine(iop, pos[order[0]], spacing)
    tshape, tspacing = target_geometry(*patient_axes_geometry(shape, spacing, affine), options)
    return SeriesPlan(
        order=order,
        positions=[float(v) for v in sorted_pos],
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        spacing=spacing,
        shape=shape,
        target_shape=tshape,
        target_spacing=tspacing,
        affine=affine,
    )


def validate_series(headers: Sequence[SliceHeader], options: SeriesOptions | None = None) -> str | None:
    """The reason a series cannot become a volume (PHI-free), or ``None`` when it can."""
    try:
        plan_series(headers, options)
    except (SeriesError, LimitExceeded) as err:
        return str(err)
    return None


def decode_slice(data: bytes | Any, header: SliceHeader | None = None, limits: Any = None) -> np.ndarray:
    """Decode one slice to modality values (HU for CT) with its own rescale / modality LUT.

    Args:
        data: the instance's bytes or a pydicom ``Dataset`` with pixel data.
        header: when given, the decoded size must match it.
        limits: :class:`~medray.platform.decoders.DecodeLimits`.

    Returns:
        float32 ``(rows, columns)``.
    """
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    limits = limits or DecodeLimits()
    with guarded("could not decode a series slice"):
        ds = data if isinstance(data, Dataset) else read_dataset(data, limits)
        check_header(ds, limits)
        arr = apply_modality_lut(ds.pixel_array, ds)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise SeriesError(f"a series slice decoded to shape {arr.shape}, expected one 2-D frame")
    if header is not None and arr.shape != (header.rows, header.columns):
        raise SeriesError("a slice's pixel data does not match its header's rows/columns")
    return arr


def resample_volume(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample ``(D, H, W)`` to ``shape`` with trilinear interpolation (extent-preserving)."""
    import torch
    import torch.nn.functional as F

    shape = tuple(int(v) for v in shape)
    if tuple(values.shape) == shape:
        return np.ascontiguousarray(values, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    with torch.no_grad():
        y = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return y[0, 0].numpy()


def window_channels(values: np.ndarray, windows: Mapping[str, tuple[float, float]], modality: str = "CT") -> np.ndarray:
    """Windows as channels: ``(C, D, H, W)`` float32 in ``[0, 1]``, one channel per window.

    CT values are HU and each window is linear (``center ± width / 2``). Other
    modalities (MR) have no absolute scale: each channel is the volume
    normalised between its 0.5 and 99.5 percentiles, repeated so the channel
    count stays the same.
    """
    vals = np.asarray(values, dtype=np.float32)
    if modality.upper() != "CT":
        lo, hi = (float(v) for v in np.percentile(vals, (0.5, 99.5)))
        one = np.clip((vals - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        return np.repeat(one[None], len(windows), axis=0).astype(np.float32)
    out = np.empty((len(windows), *vals.shape), dtype=np.float32)
    for c, (center, width) in enumerate(windows.values()):
        np.clip((vals - (center - width / 2.0)) / width, 0.0, 1.0, out=out[c])
    return out


@dataclass
class Volume:
    """An assembled series, on DICOM's patient axes (:data:`LPS_AXES`) whatever its acquisition plane.

    Attributes:
        values: float32 ``(D, H, W)``: modality values (HU for CT), slices
            inferior to superior, rows to posterior, columns to the patient's
            left (:func:`to_patient_axes`), resampled.
        spacing: ``(z, y, x)`` mm of ``values``.
        source_spacing / source_shape: on the patient axes, before resampling.
        positions: mm along ``normal`` of each slice before resampling, ascending.
        order: input index of each source slice (frame) sorted along the
            acquisition's slice normal.
        normal: direction of the ``D`` axis (patient coordinates, LPS).
        modality, series_key, patient_key, metadata: from the first slice
            (allow-listed metadata only).
    """

    values: np.ndarray
    spacing: tuple[float, float, float]
    source_spacing: tuple[float, float, float]
    source_shape: tuple[int, int, int]
    positions: list[float]
    order: list[int]
    normal: tuple[float, float, float]
    modality: str
    series_key: str
    patient_key: str | None
    metadata: dict

    def channels(self, windows: Mapping[str, tuple[float, float]]) -> np.ndarray:
        """``(C, D, H, W)`` in ``[0, 1]``; see :func:`window_channels`."""
        return window_channels(self.values, windows, self.modality)

    def source_range(self, index: int) -> tuple[int, int]:
        """Sorted source slices ``(first, last)`` that output slice ``index`` interpolates."""
        n_src, n_out = self.source_shape[0], self.values.shape[0]
        if n_src == n_out:
            return index, index
        centre = (index + 0.5) * n_src / n_out - 0.5
        half = 0.5 * max(1.0, n_src / n_out)
        lo = int(np.clip(math.floor(centre - half + 0.5), 0, n_src - 1))
        hi = int(np.clip(math.ceil(centre + half - 0.5), 0, n_src - 1))
        return min(lo, hi), max(lo, hi)

    def provenance(self) -> dict[str, Any]:
        """PHI-free facts about the series for a row's ``metadata``."""
        return {
            "series_key": self.series_key,
            "n_source_slices": self.source_shape[0],
            "source_shape": list(self.source_shape),
            "source_spacing_mm": [round(v, 6) for v in self.source_spacing],
            "shape": list(self.values.shape),
            "spacing_mm": [round(v, 6) for v in self.spacing],
            "normal": [round(v, 6) for v in self.normal],
            "z_range_mm": [round(self.positions[0], 4), round(self.positions[-1], 4)],
        }


def assemble_series(
    instances: Sequence[bytes | Any],
    options: SeriesOptions | None = None,
    *,
    salt: str = "",
    limits: Any = None,
    headers: Sequence[SliceHeader] | None = None,
) -> Volume:
    """Assemble one series' instances into a :class:`Volume` (the benchmark's entry point).

    Args:
        instances: each instance's bytes (Part-10) or pydicom ``Dataset``, in
            any order.
        options: :class:`SeriesOptions` (spacing, limits).
        salt: hashes the series and patient keys.
        limits: :class:`~medray.platform.decoders.DecodeLimits` per slice.
        headers: the instances' headers when already read (same order).

    Raises:
        SeriesError, LimitExceeded: the series is not one regular volume (the
            message is the reason), or ``instances`` are not series slices.
        DecodeError: a slice cannot be decoded.
    """
    options = options or SeriesOptions()
    if headers is None:
        headers = []
        for k, inst in enumerate(instances):
            h = read_slice_header(inst, salt=salt, options=options)
            if h is None:
                raise SeriesError(
                    f"instance {k} is not a single-frame {'/'.join(options.modalities)} "
                    "Part-10 slice with a SeriesInstanceUID"
                )
            headers.append(h)
    if len({h.series_key for h in headers}) > 1:
        raise SeriesError("instances of more than one series")
    plan = plan_series(headers, options)
    values = np.empty(plan.shape, dtype=np.float32)
    for z, k in enumerate(plan.order):
        values[z] = decode_slice(instances[k], headers[k], limits)
    return _volume(values, plan, headers[plan.order[0]])


def _volume(values: np.ndarray, plan: SeriesPlan, first: SliceHeader) -> Volume:
    """The sorted stack ``(D, H, W)`` as acquired -> a :class:`Volume` on the patient axes, resampled."""
    grid = to_patient_axes(np.transpose(values, (2, 1, 0)), plan.affine)
    shape = (int(grid.values.shape[0]), int(grid.values.shape[1]), int(grid.values.shape[2]))
    resampled = resample_volume(grid.values, plan.target_shape)
    offset = float(np.dot(grid.origin, grid.normal))
    return Volume(
        values=resampled,
        spacing=plan.target_spacing,
        source_spacing=grid.spacing,
        source_shape=shape,
        positions=[offset + z * grid.spacing[0] for z in range(shape[0])],
        order=plan.order,
        normal=grid.normal,
        modality=first.modality,
        series_key=first.series_key,
        patient_key=first.patient_key,
        metadata={**first.metadata, "source_orientation": grid.source_orientation},
    )


# ------------------------------------------------------------------ enhanced multi-frame CT/MR


def is_enhanced_volume(ds: Any) -> bool:
    """True for an Enhanced (or Legacy Converted Enhanced) CT/MR object: one object, a stack of frames."""
    sop = str(ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "") or "")
    return sop.strip("\x00 ") in ENHANCED_SOP_CLASSES


def _functional(ds: Any, index: int, sequence: str, keyword: str) -> Any:
    """Element ``keyword`` of macro ``sequence`` for frame ``index``: per-frame groups first, then shared."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for groups in (per[index] if per and index < len(per) else None, shared[0] if shared else None):
        items = groups.get(sequence) if groups is not None else None
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def enhanced_frame_headers(ds: Any, *, salt: str = "", options: SeriesOptions | None = None) -> list[SliceHeader]:
    """One :class:`SliceHeader` per frame of an enhanced CT/MR object, from its functional groups.

    Position (Plane Position), orientation (Plane Orientation) and pixel
    spacing / slice thickness (Pixel Measures) are read per frame, falling back
    to the shared groups, so :func:`plan_series` checks and orders the frames
    exactly as it does a classic series' slices (``index`` is the frame).

    Raises:
        LimitExceeded: more frames than ``options.max_slices`` (before any
            per-frame item is read).
    """
    options = options or SeriesOptions()
    frames = _int(ds.get("NumberOfFrames") or 1) or 1
    if frames > options.max_slices:
        raise LimitExceeded(
            f"enhanced object has {frames} frames, over series.max_slices = {options.max_slices}; "
            "raise series.max_slices to accept it"
        )
    modality = str(ds.get("Modality") or "").strip().upper()
    key = series_key(str(ds.get("SeriesInstanceUID") or ds.get("SOPInstanceUID") or ""), salt)
    pkey, metadata = patient_key(ds, salt), extract_metadata(ds)
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    out = []
    for i in range(frames):
        thickness = _functional(ds, i, "PixelMeasuresSequence", "SliceThickness")
        out.append(
            SliceHeader(
                series_key=key,
                modality=modality,
                frames=1,
                rows=rows,
                columns=columns,
                position=_floats(_functional(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(_functional(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=_floats(_functional(ds, i, "PixelMeasuresSequence", "PixelSpacing"), 2),  # type: ignore[arg-type]
                slice_thickness=_floats([thickness], 1)[0] if thickness not in (None, "") else None,  # type: ignore[index]
                instance_number=i + 1,
                patient_key=pkey,
                metadata=metadata,
                index=i,
            )
        )
    return out


@dataclass
class EnhancedStack:
    """One stack of an enhanced object: its frames (0-based, as stored) and what sets it apart.

    Attributes:
        frames: the stored frame indices of this stack.
        stack_id: Frame Content's Stack ID (``""`` when absent).
        temporal_position: Frame Content's Temporal Position Index, or ``None``.
        echo_time_ms: MR Echo's Effective Echo Time, or ``None``.
    """

    frames: list[int]
    stack_id: str = ""
    temporal_position: int | None = None
    echo_time_ms: float | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-safe provenance: ``{stack_id, temporal_position, echo_time_ms, frames}`` (no UIDs, no PHI)."""
        return {
            "stack_id": self.stack_id,
            "temporal_position": self.temporal_position,
            "echo_time_ms": self.echo_time_ms,
            "frames": len(self.frames),
        }


def enhanced_stack_groups(ds: Any) -> list[EnhancedStack]:
    """The frames of an enhanced object grouped into stacks, in order of first appearance.

    Frames belong to one stack when they share Frame Content's Stack ID and
    Temporal Position Index and MR Echo's Effective Echo Time (per frame or
    shared): several stacks, time points or echoes stored in one object
    (multi-echo MR, a perfusion series, two stacks of one localiser) each
    become their own volume. An object that marks none of them is one stack.
    """
    frames = _int(ds.get("NumberOfFrames") or 1) or 1
    groups: dict[tuple[str, int | None, float | None], list[int]] = {}
    for i in range(frames):
        stack = _functional(ds, i, "FrameContentSequence", "StackID")
        temporal = _functional(ds, i, "FrameContentSequence", "TemporalPositionIndex")
        echo = _functional(ds, i, "MREchoSequence", "EffectiveEchoTime")
        key = (
            str(stack or "").strip(),
            _int(temporal) if temporal not in (None, "") else None,
            round(float(echo), 4) if echo not in (None, "") else None,
        )
        groups.setdefault(key, []).append(i)
    return [
        EnhancedStack(frames=idx, stack_id=k[0], temporal_position=k[1], echo_time_ms=k[2]) for k, idx in groups.items()
    ]


def assemble_enhanced(
    data: bytes | Any, options: SeriesOptions | None = None, *, salt: str = "", limits: Any = None
) -> Volume:
    """An Enhanced CT/MR multi-frame object of one stack as one :class:`Volume`, as its classic series would be.

    See :func:`assemble_enhanced_stacks`, which this calls; an object of several
    stacks, echoes or time points is refused here (it is several volumes).

    Raises:
        SeriesError, LimitExceeded: as :func:`assemble_enhanced_stacks`, and an
            object of more than one stack.
        DecodeError: the frames cannot be decoded.
    """
    stacks = assemble_enhanced_stacks(data, options, salt=salt, limits=limits)
    if len(stacks) > 1:
        raise SeriesError(
            f"enhanced object holds {len(stacks)} stacks, echoes or time points: several volumes, "
            "not one (assemble_enhanced_stacks gives each)"
        )
    return stacks[0][1]


def assemble_enhanced_stacks(
    data: bytes | Any, options: SeriesOptions | None = None, *, salt: str = "", limits: Any = None
) -> list[tuple[EnhancedStack, Volume]]:
    """An Enhanced CT/MR multi-frame object as one :class:`Volume` per stack, as its classic series would be.

    The frames are grouped into stacks (:func:`enhanced_stack_groups`: Stack
    ID, temporal position, echo time), and each stack's frames are checked and
    ordered along the slice normal from the functional groups
    (:func:`enhanced_frame_headers`, :func:`plan_series`), each converted with
    its own rescale (Pixel Value Transformation, per frame or shared: HU for
    CT), then turned to the patient axes and resampled like a classic series
    (:func:`assemble_series`): the same voxels give the same volume in either form.

    Args:
        data: the object's bytes (Part-10) or a pydicom ``Dataset`` with pixel data.
        options: :class:`SeriesOptions` (spacing, limits).
        salt: hashes the series and patient keys.
        limits: :class:`~medray.platform.decoders.DecodeLimits`, checked before the frames are decoded.

    Raises:
        SeriesError, LimitExceeded: not an enhanced CT/MR object, a stack that is
            no regular stack (e.g. frames at one position that nothing marks as
            different stacks), or over a limit.
        DecodeError: the frames cannot be decoded.
    """
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    options = options or SeriesOptions()
    limits = limits or DecodeLimits()
    with guarded("malformed enhanced multi-frame header"):
        ds = data if isinstance(data, Dataset) else read_dataset(data, limits)
        if not is_enhanced_volume(ds):
            raise SeriesError("not an Enhanced CT/MR multi-frame object")
        count, photometric = check_header(ds, limits)
        if not photometric.startswith("MONOCHROME"):
            raise SeriesError(f"an enhanced CT/MR volume must be MONOCHROME, got {photometric}")
        headers = enhanced_frame_headers(ds, salt=salt, options=options)
        stacks = enhanced_stack_groups(ds)
    plans = []
    for n, stack in enumerate(stacks):
        subset = [headers[i] for i in stack.frames]
        try:
            plans.append((stack, subset, plan_series(subset, options)))
        except SeriesError as err:
            where = f"stack {n + 1} of {len(stacks)} ({len(subset)} frames)" if len(stacks) > 1 else ""
            hint = (
                "; several stacks, echoes or time points in one object are not one volume, and nothing "
                "(Stack ID, Temporal Position Index, Effective Echo Time) tells them apart"
                if str(err).startswith("duplicate slice positions")
                else ""
            )
            raise SeriesError(
                f"enhanced object of {len(headers)} frames{': ' + where if where else ''}: {err}{hint}"
            ) from None
    with guarded("could not decode the enhanced object's frames"):
        rows, columns = plans[0][2].shape[1], plans[0][2].shape[2]
        stored = np.asarray(ds.pixel_array).reshape(count, rows, columns)
        out = []
        for stack, subset, plan in plans:
            values = np.empty(plan.shape, dtype=np.float32)
            for z, k in enumerate(plan.order):
                frame = subset[k].index
                values[z] = apply_modality_lut(stored[frame], frame_view(ds, frame))
            out.append((stack, _volume(values, plan, subset[plan.order[0]])))
    return out
