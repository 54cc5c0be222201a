"""The DICOM objects archives hold: enhanced multi-frame CT/MR, any acquisition plane (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from medray.platform.decoders.series import (
    SeriesError,
    SeriesOptions,
    assemble_enhanced,
    assemble_series,
    enhanced_frame_headers,
    is_enhanced_volume,
    plan_series,
    read_slice_header,
)
from medray.platform.errors import LimitExceeded
from medray.testing.dicom_objects import enhanced_from_series, phantom_acquisition
from medray.testing.samples import ct_phantom, ct_series


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return ct_phantom(12, 24, seed=7)


def _acquire(phantom: np.ndarray, plane: str, seed: int = 7, modality: str = "CT") -> list[bytes]:
    kw = phantom_acquisition(phantom, plane)
    return ct_series(kw.pop("phantom"), seed=seed, modality=modality, **kw)


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_any_acquisition_plane_reaches_the_encoder_on_the_patient_axes(phantom, plane) -> None:
    axial = assemble_series(_acquire(phantom, "axial"))
    other = assemble_series(_acquire(phantom, plane, seed=8)[::-1])
    assert np.array_equal(axial.values, phantom)
    np.testing.assert_array_equal(other.values, axial.values)
    np.testing.assert_allclose(other.spacing, axial.spacing, rtol=1e-6)
    np.testing.assert_allclose(other.positions, axial.positions, atol=1e-4)
    np.testing.assert_allclose(other.normal, (0.0, 0.0, 1.0), atol=1e-9)
    assert other.source_shape == axial.source_shape == phantom.shape
    assert other.metadata["source_orientation"] == {"sagittal": "PIR", "coronal": "LIP"}[plane]


def test_resampling_targets_the_patient_axes_not_the_acquisition_axes(phantom) -> None:
    options = SeriesOptions(spacing=(1.25, None, None))  # z: inferior-superior, whatever the plane
    axial = assemble_series(_acquire(phantom, "axial"), options)
    sagittal_files = _acquire(phantom, "sagittal")
    plan = plan_series([read_slice_header(f) for f in sagittal_files], options)
    sagittal = assemble_series(sagittal_files, options)
    assert plan.target_shape == axial.values.shape == sagittal.values.shape == (24, 24, 24)
    np.testing.assert_allclose(sagittal.values, axial.values, atol=1e-3)
    np.testing.assert_allclose(sagittal.spacing, (1.25, 0.8, 0.8), rtol=1e-6)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_sagittal_and_an_axial_acquisition_of_one_phantom_give_one_model_input(phantom, modality, tmp_path) -> None:
    from medray.encoders import create_preprocessor, get_spec
    from medray.encoders.video import build_video_checkpoint
    from medray.platform.formats.registry import PrepareContext
    from medray.platform.formats.volume import prepare_volume

    pre = create_preprocessor(
        get_spec("torchvision_video", checkpoint=build_video_checkpoint(str(tmp_path / "v"), arch="r3d_18"))
    )
    options = SeriesOptions(mode="volume")
    ctx = PrepareContext(route="volume", preprocessors={"volume": pre}, options={"series": options})
    values = phantom + (2048 if modality == "MR" else 0)
    axial = assemble_series(_acquire(values, "axial", modality=modality), options)
    sagittal = assemble_series(_acquire(values, "sagittal", seed=9, modality=modality), options)
    a, b = (prepare_volume(v, options, ctx, mode="volume").inputs for v in (axial, sagittal))
    assert a.shape == b.shape and np.array_equal(a, b)


# ---------------------------------------------------------------- enhanced multi-frame


def test_an_enhanced_ct_is_the_volume_of_its_classic_series(phantom) -> None:
    files = ct_series(phantom, seed=11)
    data = enhanced_from_series(files, seed=3)  # frames shuffled, per-frame rescale
    ds = pydicom.dcmread(io.BytesIO(data))
    assert is_enhanced_volume(ds) and int(ds.NumberOfFrames) == 12
    slopes = {float(g.PixelValueTransformationSequence[0].RescaleSlope) for g in ds.PerFrameFunctionalGroupsSequence}
    assert len(slopes) == 2  # frames rescale differently: each must use its own
    assert read_slice_header(data) is None  # not a classic slice: the series branch leaves it alone
    classic = assemble_series(files, salt="s")
    enhanced = assemble_enhanced(data, salt="s")
    np.testing.assert_array_equal(enhanced.values, classic.values)
    assert enhanced.spacing == pytest.approx(classic.spacing) and enhanced.positions == pytest.approx(classic.positions)
    assert enhanced.series_key == classic.series_key and enhanced.patient_key == classic.patient_key
    assert sorted(enhanced.order) == list(range(12)) and enhanced.order != list(range(12))
    assert enhanced.modality == "CT"


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_an_enhanced_mr_in_another_plane_is_turned_to_the_patient_axes(phantom, plane) -> None:
    enhanced = assemble_enhanced(enhanced_from_series(_acquire(phantom + 1100, plane, modality="MR")))
    assert enhanced.modality == "MR"
    np.testing.assert_array_equal(enhanced.values, phantom + 1100)


def test_frame_geometry_comes_from_the_functional_groups(phantom) -> None:
    ds = pydicom.dcmread(io.BytesIO(enhanced_from_series(ct_series(phantom, seed=2), shuffle=False)))
    headers = enhanced_frame_headers(ds)
    assert [h.position for h in headers] == [(-12.5, -12.5, -100.0 + 2.5 * k) for k in range(12)]
    assert {h.orientation for h in headers} == {(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    assert {h.pixel_spacing for h in headers} == {(0.8, 0.8)} and {h.frames for h in headers} == {1}


def test_an_enhanced_object_that_is_no_regular_stack_says_why(phantom) -> None:
    files = ct_series(phantom, seed=4)
    twice = enhanced_from_series(files + ct_series(phantom, seed=5), seed=1)  # two stacks, one object
    with pytest.raises(SeriesError, match="duplicate slice positions"):
        assemble_enhanced(twice)
    with pytest.raises(SeriesError, match="missing slice"):
        assemble_enhanced(enhanced_from_series(files[:5] + files[6:]))
    with pytest.raises(LimitExceeded, match="series.max_slices"):
        assemble_enhanced(enhanced_from_series(files), SeriesOptions(max_slices=8))
    with pytest.raises(SeriesError, match="not an Enhanced CT/MR"):
        assemble_enhanced(files[0])
    ds = pydicom.dcmread(io.BytesIO(enhanced_from_series(files)))
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    with pytest.raises(SeriesError, match="lack ImagePositionPatient, ImageOrientationPatient"):
        assemble_enhanced(ds)
