"""The DICOM objects archives hold: enhanced multi-frame CT/MR, any acquisition plane (no Ray)."""

from __future__ import annotations

import io
import json

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
    with pytest.raises(SeriesError, match="enhanced object of 24 frames: duplicate slice positions.*several stacks"):
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


def test_stacks_and_echoes_marked_in_one_object_are_one_volume_each(phantom) -> None:
    from medray.platform.decoders.series import assemble_enhanced_stacks

    a, b = ct_series(phantom, seed=4), ct_series(phantom + 50, seed=5)
    two_stacks = enhanced_from_series(a + b, seed=1, stack_ids=["1"] * 12 + ["2"] * 12)
    stacks = assemble_enhanced_stacks(two_stacks)
    assert sorted((s.stack_id, len(s.frames)) for s, _ in stacks) == [("1", 12), ("2", 12)]
    by_id = {s.stack_id: v for s, v in stacks}
    np.testing.assert_array_equal(by_id["1"].values, assemble_series(a).values)
    np.testing.assert_array_equal(by_id["2"].values, assemble_series(b).values)
    with pytest.raises(SeriesError, match="holds 2 stacks"):
        assemble_enhanced(two_stacks)
    mr = [phantom + 1100, phantom + 1400]
    echoes = enhanced_from_series(
        ct_series(mr[0], seed=6, modality="MR") + ct_series(mr[1], seed=7, modality="MR"),
        echo_times=[12.0] * 12 + [96.5] * 12,
    )
    got = {s.echo_time_ms: (s.describe(), v) for s, v in assemble_enhanced_stacks(echoes)}
    assert sorted(got) == [12.0, 96.5]
    assert got[96.5][0] == {"stack_id": "1", "temporal_position": None, "echo_time_ms": 96.5, "frames": 12}
    np.testing.assert_array_equal(got[12.0][1].values, mr[0])
    np.testing.assert_array_equal(got[96.5][1].values, mr[1])


# ---------------------------------------------------------------- routes: volume, frames, endpoints


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict:
    from medray.encoders import build_tiny_checkpoint, get_spec
    from medray.encoders.video import build_video_checkpoint

    root = tmp_path_factory.mktemp("enc")
    return {
        "image": get_spec(
            "hf_image", checkpoint=build_tiny_checkpoint("hf_image", str(root / "i"), arch="vit", image_size=32)
        ),
        "volume": get_spec("torchvision_video", checkpoint=build_video_checkpoint(str(root / "v"), arch="r3d_18")),
    }


def _decode(datas: list[bytes], **opts) -> list[dict]:
    import pyarrow as pa

    from medray.pipeline import StageOptions, decode_batch

    n = len(datas)
    table = pa.table(
        {
            "uri": [f"in/{k}.dcm" for k in range(n)],
            "member": [""] * n,
            "record_id": [f"r{k}" for k in range(n)],
            "data": pa.array(datas, pa.large_binary()),
            "status": ["ok"] * n,
            "stage": pa.array([None] * n, pa.string()),
            "error_class": pa.array([None] * n, pa.string()),
            "message": pa.array([None] * n, pa.string()),
        }
    )
    return decode_batch(table, StageOptions(salt="s", **opts)).to_pylist()


def _pixels(row: dict) -> np.ndarray:
    return np.frombuffer(row["pixel_values"], np.dtype(row["pixel_dtype"])).reshape(row["pixel_shape"])


def test_an_enhanced_object_is_sniffed_as_a_volume(phantom) -> None:
    from medray.platform.formats import detect_modality

    files = ct_series(phantom, seed=1)
    assert detect_modality(enhanced_from_series(files), "x.dcm") == ("volume", "dicom")
    assert detect_modality(files[0], "x.dcm") == ("image", "dicom")


def test_in_volume_mode_an_enhanced_ct_is_one_record_with_its_classic_series_model_input(phantom, encoders) -> None:
    from medray.encoders import create_preprocessor
    from medray.platform.formats.registry import PrepareContext
    from medray.platform.formats.volume import prepare_volume

    files = ct_series(phantom, seed=6)
    (row,) = _decode([enhanced_from_series(files, seed=2)], encoder_spec=encoders["volume"], series={"mode": "volume"})
    assert (row["status"], row["route"], row["modality"], row["frames"]) == ("ok", "volume", "CT", [0])
    options = SeriesOptions(mode="volume")
    ctx = PrepareContext(route="volume", preprocessors={"volume": create_preprocessor(encoders["volume"])})
    want = prepare_volume(assemble_series(files, options, salt="s"), options, ctx, mode="volume")
    np.testing.assert_array_equal(_pixels(row), want.inputs)
    segments = json.loads(row["segments"])
    assert segments == want.segments and segments[0]["slice_end"] == 11
    assert row["patient_key"] == want.patient_key


def test_otherwise_its_frames_reach_the_image_encoder_each_with_its_own_rescale_and_window(phantom, encoders) -> None:
    from medray.platform.decoders import decode_dicom
    from medray.platform.decoders.base import DicomOptions

    files = ct_series(phantom, seed=6)
    windows = {0: (40.0, 400.0), 1: (-600.0, 1500.0)}
    data = enhanced_from_series(files, shuffle=False, windows=windows, shared_window=(300.0, 2000.0))
    rows = _decode([data], encoder_spec=encoders["image"], series={"mode": "slicewise"})
    assert [(r["status"], r["route"], r["frames"]) for r in rows] == [("ok", "image", list(range(12)))]
    frames = decode_dicom(data, options=DicomOptions(windows={"CT": (0.0, 100.0)})).frames
    for n in (0, 1, 2):  # frames 0 and 1: their own window; frame 2: the shared one
        ds = pydicom.dcmread(io.BytesIO(files[n]))
        ds.WindowCenter, ds.WindowWidth = windows.get(n, (300.0, 2000.0))
        buf = io.BytesIO()
        ds.save_as(buf)
        (want,) = decode_dicom(buf.getvalue(), options=DicomOptions(windows={"CT": (0.0, 100.0)})).frames
        np.testing.assert_array_equal(frames[n].image, want.image)
    assert not np.array_equal(frames[0].image, frames[1].image)


def test_an_image_endpoint_serves_an_enhanced_objects_frames(phantom, encoders) -> None:
    from medray.encoders import create_preprocessor
    from medray.serve.encoder import DecodeSettings, decode_input

    data = enhanced_from_series(ct_series(phantom, seed=6))
    served = decode_input({"data": data}, DecodeSettings(max_frames=100), create_preprocessor(encoders["image"]))
    assert served.pixels.shape[0] == 12 and served.frames == list(range(12))


def test_in_volume_mode_each_stack_of_an_object_is_an_item_of_its_record(phantom, encoders) -> None:
    from medray.encoders import create_preprocessor
    from medray.platform.formats.registry import PrepareContext
    from medray.platform.formats.volume import prepare_volume

    a, b = ct_series(phantom, seed=4), ct_series(phantom + 50, seed=5)
    data = enhanced_from_series(a + b, seed=1, shuffle=False, stack_ids=["1"] * 12 + ["2"] * 12)
    (row,) = _decode([data], encoder_spec=encoders["volume"], series={"mode": "volume"})
    assert (row["status"], row["route"], row["frames"]) == ("ok", "volume", [0, 1]), row
    options = SeriesOptions(mode="volume")
    ctx = PrepareContext(route="volume", preprocessors={"volume": create_preprocessor(encoders["volume"])})
    want = [prepare_volume(assemble_series(f, options, salt="s"), options, ctx, mode="volume") for f in (a, b)]
    np.testing.assert_array_equal(_pixels(row), np.concatenate([w.inputs for w in want]))
    segments = json.loads(row["segments"])  # one object, one series key: that of the object
    assert len({s.pop("series_key") for s in segments}) == 1
    assert segments == [{k: v for k, v in s.items() if k != "series_key"} for w in want for s in w.segments]
    stacks = json.loads(row["metadata"])["stacks"]
    assert [(s["stack_id"], s["frames"]) for s in stacks] == [("1", 12), ("2", 12)]


def test_an_enhanced_object_of_a_modality_series_do_not_list_is_skipped(phantom, encoders) -> None:
    data = enhanced_from_series(ct_series(phantom + 1100, seed=6, modality="MR"))
    (row,) = _decode([data], encoder_spec=encoders["volume"], series={"mode": "volume", "modalities": ["CT"]})
    assert (row["status"], row["error_class"]) == ("skipped", "SeriesModality"), row


# ---------------------------------------------------------------- presentation LUT shape, ICC profiles


@pytest.mark.parametrize("size", [16, 64])  # per pixel, and through the lookup table (>= 4096 pixels)
@pytest.mark.parametrize("window", [None, (2000.0, 3000.0)])
def test_presentation_lut_shape_inverse_is_shown_inverted_as_a_viewer_does(size, window) -> None:
    from medray.platform.decoders import decode_dicom
    from medray.testing.dicom_objects import monochrome_image

    pixels = (np.arange(size * size).reshape(size, size) * (4095 // (size * size - 1))).astype(np.uint16)

    def shown(**kw) -> np.ndarray:
        (frame,) = decode_dicom(monochrome_image(pixels, window=window, **kw)).frames
        return frame.image.astype(int)

    plain = shown()
    assert plain[0, 0, 0] == 0 and plain[-1, -1, 0] == 255
    np.testing.assert_array_equal(shown(presentation_lut_shape="IDENTITY"), plain)
    np.testing.assert_array_equal(shown(presentation_lut_shape="INVERSE"), 255 - plain)
    np.testing.assert_array_equal(shown(photometric="MONOCHROME1"), 255 - plain)
    # a MONOCHROME1 object saying INVERSE (as DX objects must) is inverted once, not twice
    np.testing.assert_array_equal(shown(photometric="MONOCHROME1", presentation_lut_shape="INVERSE"), 255 - plain)


def _rgb() -> np.ndarray:
    ramp = np.linspace(0, 255, 32).round().astype(np.uint8)
    return np.stack([np.tile(ramp, (8, 1)), np.tile(ramp[::-1], (8, 1)), np.full((8, 32), 128, np.uint8)], axis=-1)


def test_an_icc_profile_converts_colour_pixels_to_srgb() -> None:
    from PIL import Image, ImageCms

    from medray.platform.decoders import decode_dicom
    from medray.testing.dicom_objects import linear_rgb_profile, rgb_image

    pixels = _rgb()
    profile = linear_rgb_profile()
    (managed,) = decode_dicom(rgb_image(pixels, icc_profile=profile)).frames
    (unmanaged,) = decode_dicom(rgb_image(pixels)).frames
    np.testing.assert_array_equal(unmanaged.image, pixels)
    # the same conversion littlecms makes for a viewer: linear light -> sRGB brightens the mid-tones
    transform = ImageCms.buildTransform(
        ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB"), "RGB", "RGB"
    )
    want = np.asarray(ImageCms.applyTransform(Image.fromarray(pixels), transform))
    np.testing.assert_array_equal(managed.image, want)
    assert managed.image[0, 0, 2] > 180  # 128 linear is about 188 in sRGB


def test_an_srgb_a_damaged_and_an_optical_path_profile() -> None:
    from PIL import ImageCms

    from medray.platform.decoders import decode_dicom
    from medray.testing.dicom_objects import linear_rgb_profile, rgb_image

    pixels = _rgb()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    (same,) = decode_dicom(rgb_image(pixels, icc_profile=srgb)).frames
    assert np.abs(same.image.astype(int) - pixels).max() <= 1
    (damaged,) = decode_dicom(rgb_image(pixels, icc_profile=b"not a profile" * 10)).frames
    np.testing.assert_array_equal(damaged.image, pixels)  # shown unmanaged, as a viewer would
    ds = pydicom.dcmread(io.BytesIO(rgb_image(pixels)))
    path = pydicom.Dataset()
    path.ICCProfile = linear_rgb_profile()
    ds.OpticalPathSequence = [path]
    buf = io.BytesIO()
    ds.save_as(buf)
    (slide_like,) = decode_dicom(buf.getvalue()).frames
    (managed,) = decode_dicom(rgb_image(pixels, icc_profile=linear_rgb_profile())).frames
    np.testing.assert_array_equal(slide_like.image, managed.image)
