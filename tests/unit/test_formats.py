"""The format registry and the NIfTI format (no Ray).

A format is a plugin: registered by name, sniffed by content, prepared by one
function that the pipeline, fine-tuning and the server share. NIfTI is the
proof: the same array written as a DICOM series and as a NIfTI file becomes the
same model input, so the same embeddings.
"""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pyarrow as pa
import pytest

from medray.platform.decoders.base import DecodeLimits
from medray.platform.decoders.series import SeriesOptions, assemble_series
from medray.platform.errors import ConfigError, DecodeError, LimitExceeded, UnsupportedFormat
from medray.platform.formats import (
    Format,
    PrepareContext,
    Prepared,
    build_options,
    detect_modality,
    get_format,
    list_formats,
    media_types,
    register_format,
    segment_columns,
)
from medray.platform.formats import registry as format_registry
from medray.platform.formats.nifti import NiftiOptions, nifti_volume, read_nifti
from medray.platform.formats.volume import prepare_volume
from medray.testing.media import nifti_bytes
from medray.testing.samples import ct_nifti, ct_phantom, ct_series

# ---------------------------------------------------------------- the registry


def test_built_in_formats_are_registered_in_sniff_order() -> None:
    names = list_formats()
    assert set(names) >= {"nifti", "sr", "dicom", "slide", "image", "audio", "text"}
    assert names[0] == "nifti" and names[-1] == "text"  # specific magic first, loose UTF-8 test last
    assert names.index("sr") < names.index("dicom") and names.index("slide") < names.index("image")


def test_unknown_format_names_the_known_ones_and_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="unknown format 'dicon'.*dicom"):
        get_format("dicon")
    with pytest.raises(ValueError, match="already registered"):
        register_format(get_format("audio"))


def test_media_types_and_columns_come_from_the_formats() -> None:
    types = media_types()
    for mt in ("application/dicom", "image/png", "image/jpeg", "audio/wav", "audio/flac", "audio/ogg", "text/plain"):
        assert mt in types
    assert types["application/x-nifti"] == "input.nii"
    # the provenance columns keep the order files were written with before formats were plugins
    assert [name for name, _ in segment_columns()] == [
        "segment",
        "start_s",
        "end_s",
        "channel",
        "token_start",
        "token_end",
        "tile_x",
        "tile_y",
        "level",
        "mpp",
        "tissue_fraction",
        "series_key",
        "slice_start",
        "slice_end",
        "spacing_mm",
    ]


def test_format_options_are_checked_by_their_format_with_the_key_at_fault() -> None:
    assert build_options({"nifti": {"modality": "mr"}})["nifti"] == NiftiOptions(modality="MR")
    with pytest.raises(ConfigError) as err:
        build_options({"nifti": {"modalty": "CT"}})
    assert err.value.key == "nifti.modalty"
    with pytest.raises(ConfigError) as err:
        build_options({"nifti": {"modality": "PET"}})
    assert err.value.key == "nifti.modality"


def test_a_new_format_is_one_registration_and_the_pipeline_routes_it(monkeypatch, tmp_path) -> None:
    """A toy ``.npy`` format, registered here, is sniffed and prepared by the unchanged decode stage."""
    from medray.encoders import build_tiny_checkpoint, get_spec
    from medray.pipeline import StageOptions, decode_batch

    def sniff(data: bytes, name: str) -> str | None:
        return "image" if bytes(data[:6]) == b"\x93NUMPY" else None

    def prepare(data: bytes, ctx: PrepareContext) -> Prepared:
        arr = np.load(io.BytesIO(data))
        pixels = ctx.preprocessor.preprocess([np.repeat(arr[..., None], 3, axis=-1)])
        return Prepared(pixels, None, "none", "npy", {"shape": list(arr.shape)})

    toy = Format(name="npy", modality="image", sniff=sniff, prepare=prepare, priority=1, extensions=(".npy",))
    monkeypatch.setitem(format_registry._FORMATS, "npy", toy)
    buf = io.BytesIO()
    np.save(buf, np.full((8, 8), 7, np.uint8))
    assert detect_modality(buf.getvalue(), "x.npy") == ("image", "npy")

    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path / "img"), arch="vit", image_size=32)
    opts = StageOptions(encoder_spec=get_spec("hf_image", checkpoint=ckpt))
    row = decode_batch(_table([buf.getvalue()], ["a.npy"]), opts).to_pylist()[0]
    assert (row["status"], row["modality"], row["pixel_shape"]) == ("ok", "npy", [1, 3, 32, 32])


# ---------------------------------------------------------------- NIfTI


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return ct_phantom(12, 32, seed=4)


def test_nifti_is_sniffed_by_content_plain_and_gzipped(phantom) -> None:
    raw = ct_nifti(phantom)
    assert detect_modality(raw, "scan.nii") == ("volume", "nifti")
    assert detect_modality(raw, "no-extension") == ("volume", "nifti")
    assert detect_modality(ct_nifti(phantom, compress=True), "scan.nii.gz") == ("volume", "nifti")
    two = nifti_bytes(np.zeros((4, 4, 3), np.float32), np.eye(4), version=2)
    assert detect_modality(two, "v2.nii") == ("volume", "nifti")
    assert detect_modality(ct_nifti(phantom, compress=True), "") == ("volume", "nifti")  # content, not name
    with pytest.raises(UnsupportedFormat):  # other gzip content is inflated no further than a header
        detect_modality(gzip.compress(b"\x00" * 400_000), "blob.gz")


@pytest.mark.parametrize(
    "variant", [{}, {"flip_columns": True}, {"compress": True}, {"flip_columns": True, "compress": True}]
)
def test_a_nifti_and_a_dicom_series_of_one_array_are_the_same_volume(phantom, variant) -> None:
    options = SeriesOptions(mode="slicewise")
    series = assemble_series(ct_series(phantom, seed=4), options, salt="s")
    volume = nifti_volume(read_nifti(ct_nifti(phantom, **variant)), options, key="k", salt="s")
    np.testing.assert_array_equal(volume.values, series.values)
    np.testing.assert_allclose(volume.spacing, series.spacing, rtol=1e-6)
    np.testing.assert_allclose(volume.normal, series.normal, atol=1e-9)
    np.testing.assert_allclose(volume.positions, series.positions, atol=1e-4)
    assert volume.patient_key is None and volume.metadata["source_format"] == "nifti1"


def test_nifti_and_series_give_the_same_model_input_slicewise_and_as_a_volume(phantom, tmp_path) -> None:
    from medray.encoders import build_tiny_checkpoint, create_preprocessor, get_spec
    from medray.encoders.video import build_video_checkpoint
    from medray.platform.formats import prepare_record

    image = create_preprocessor(
        get_spec(
            "hf_image", checkpoint=build_tiny_checkpoint("hf_image", str(tmp_path / "i"), arch="vit", image_size=32)
        )
    )
    volume = create_preprocessor(
        get_spec("torchvision_video", checkpoint=build_video_checkpoint(str(tmp_path / "v"), arch="r3d_18"))
    )
    pres = {"image": image, "volume": volume}
    for mode, route in (("slicewise", "image"), ("volume", "volume")):
        options = SeriesOptions(mode=mode)
        ctx = PrepareContext(route=route, preprocessors=pres, options={"series": options}, salt="s")
        want = prepare_volume(assemble_series(ct_series(phantom, seed=4), options, salt="s"), options, ctx, mode=mode)
        fmt, got = prepare_record(ct_nifti(phantom, flip_columns=True, compress=True), ctx)
        assert fmt.name == "nifti" and got.route == route == want.route
        np.testing.assert_array_equal(got.inputs, want.inputs)
        assert [s["segment"] for s in got.segments or []] == [s["segment"] for s in want.segments or []]
        assert got.pool == want.pool and got.metadata["series_mode"] == mode


def test_nifti_route_follows_series_mode_and_the_configured_encoders() -> None:
    nifti = get_format("nifti")
    both = {"image": object(), "volume": object()}
    slicewise = PrepareContext(preprocessors=both, options={"series": SeriesOptions(mode="slicewise")})
    assert nifti.resolve_route("volume", slicewise) == "image"
    assert nifti.resolve_route("volume", PrepareContext(preprocessors=both, options={})) == "image"
    as_volume = PrepareContext(preprocessors=both, options={"series": SeriesOptions(mode="volume")})
    assert nifti.resolve_route("volume", as_volume) == "volume"
    assert nifti.resolve_route("volume", PrepareContext(preprocessors={"volume": object()})) == "volume"


def _header(shape: tuple[int, ...]) -> bytes:
    image = nifti_bytes(np.zeros((2, 2, 2), np.float32), np.eye(4))
    head = bytearray(image[:352])
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    head[40:56] = struct.pack("<8h", *dims)
    return bytes(head)


def test_nifti_limits_are_checked_from_the_header_before_inflating() -> None:
    huge = _header((4096, 4096, 4096))
    with pytest.raises(LimitExceeded, match="voxels, over max_pixels"):
        read_nifti(huge)
    # a gzip bomb: the header promises 64 MiB; the check stops it before any of it is inflated
    bomb = gzip.compress(_header((512, 512, 64)) + b"\x00" * (512 * 512 * 64 * 4), compresslevel=1)
    with pytest.raises(LimitExceeded, match="bytes inflated, over max_bytes"):
        read_nifti(bomb, DecodeLimits(max_bytes=1 << 20))
    with pytest.raises(DecodeError, match="truncated"):
        read_nifti(_header((16, 16, 16)) + b"\x00" * 100)


def test_nifti_volume_limits_four_d_and_no_phi_from_header_text(phantom) -> None:
    import nibabel as nib

    data = np.stack([np.transpose(phantom, (2, 1, 0)), np.transpose(phantom, (2, 1, 0)) + 5], axis=-1)
    image = nib.Nifti1Image(data.astype(np.float32), np.diag([0.8, 0.8, 2.5, 1.0]))
    image.header["descrip"] = b"PHIID-NIFTI Jane Doe 1970-01-01"
    raw = image.to_bytes()
    options = SeriesOptions(mode="slicewise")
    second = nifti_volume(read_nifti(raw), options, NiftiOptions(volume_index=1), key="k")
    first = nifti_volume(read_nifti(raw), options, NiftiOptions(volume_index=0), key="k")
    assert np.allclose(second.values - first.values, 5.0)
    assert "PHIID" not in repr(first.metadata) and "Doe" not in repr(first.metadata)
    with pytest.raises(Exception, match="has no volume 2"):
        nifti_volume(read_nifti(raw), options, NiftiOptions(volume_index=2), key="k")
    with pytest.raises(LimitExceeded, match="series.max_slices"):
        nifti_volume(read_nifti(raw), SeriesOptions(mode="slicewise", max_slices=4), key="k")
    with pytest.raises(LimitExceeded, match="series.max_voxels"):
        nifti_volume(read_nifti(raw), SeriesOptions(mode="slicewise", max_voxels=1000), key="k")


def test_a_nifti_without_an_encoder_for_it_is_skipped_with_its_reason(phantom, tmp_path) -> None:
    from medray.encoders import build_tiny_checkpoint, get_spec
    from medray.pipeline import StageOptions, decode_batch

    ckpt = build_tiny_checkpoint("hf_audio", str(tmp_path / "a"), arch="hubert")
    opts = StageOptions(encoder_spec=get_spec("hf_audio", checkpoint=ckpt))
    row = decode_batch(_table([ct_nifti(phantom)], ["ct.nii"]), opts).to_pylist()[0]
    assert (row["status"], row["stage"]) == ("skipped", "route")
    assert row["error_class"] == "NoEncoder"
    assert row["message"].startswith("no encoder configured for modality 'image'")


def _table(datas: list[bytes], names: list[str]) -> pa.Table:
    n = len(datas)
    return pa.table(
        {
            "uri": names,
            "member": [""] * n,
            "record_id": [f"r{k}" for k in range(n)],
            "data": pa.array(datas, pa.large_binary()),
            "status": ["ok"] * n,
            "stage": pa.array([None] * n, pa.string()),
            "error_class": pa.array([None] * n, pa.string()),
            "message": pa.array([None] * n, pa.string()),
        }
    )
