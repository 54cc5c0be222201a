"""A DICOM whole-slide image beside the same slide as a pyramidal TIFF, on S3, through ``medray embed``.

Real Ray, real S3 (SeaweedFS), the console script in a subprocess. The DICOM
WSI is four level files in one prefix: one slide record (its base level), the
other levels skipped with their reason. Its tiles, provenance and embeddings
equal the TIFF's (<= 1e-5). A truncated WSI beside them is quarantined.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_embed_cli import read_parts, run_medray  # same directory (pytest rootdir-relative import)

from medray.encoders import build_tiny_checkpoint
from medray.testing.dicom_wsi import PATIENT_ID, dicom_wsi_files, dicom_wsi_level
from medray.testing.media import slide_pyramid, slide_tiff

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_wsi")
    fs = s3.filesystem()
    fs.pipe(f"{s3.bucket}/wsi/case-1.tif", slide_tiff(size=512, mpp=0.25, levels=3))
    for name, data in dicom_wsi_files(size=512, mpp=0.25, levels=3).items():
        fs.pipe(f"{s3.bucket}/wsi/case-1/{name}", data)
    bad = dicom_wsi_level(
        slide_pyramid(256, 1)[0], mpp=0.25, truncate_frames=2, series_uid="1.2.826.0.1.3680043.8.498.7"
    )
    fs.pipe(f"{s3.bucket}/wsi/broken/level0.dcm", bad)
    ckpt = build_tiny_checkpoint("hf_image", str(root / "vit"), arch="vit", image_size=32)
    home = root / "home"
    home.mkdir()
    return {"bucket": s3.bucket, "fs": fs, "home": home, "ckpt": ckpt}


def test_dicom_wsi_tiles_equal_the_tiff_slides(corpus):
    fs, bucket = corpus["fs"], corpus["bucket"]
    out = f"s3://{bucket}/out/dicom_wsi"
    proc = run_medray(
        corpus,
        "embed",
        f"input=s3://{bucket}/wsi/",
        f"output={out}",
        "encoder=hf_image",
        f"encoder.checkpoint={corpus['ckpt']}",
        "ray.num_cpus=2",
        "tracking.enabled=false",
        "slide.tile_size=32",
        "slide.target_mpp=0.5",
        "compute.decode_batch_size=4",
        "max_error_fraction=0.5",  # the broken slide is one of few records
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_parts(fs, out + "/embeddings").to_pylist()
    tiff = {r["frame"]: r for r in rows if r["uri"].endswith("case-1.tif")}
    dcm = {r["frame"]: r for r in rows if r["uri"].endswith("case-1/level0.dcm")}
    assert len(tiff) == 11 and sorted(tiff) == sorted(dcm)  # the tiles plus the pooled row (-1)
    keys = ("segment", "tile_x", "tile_y", "level", "mpp", "tissue_fraction", "n_frames", "modality")
    for frame, t in tiff.items():
        d = dcm[frame]
        assert [d[k] for k in keys] == [t[k] for k in keys]
        np.testing.assert_allclose(d["embedding"], t["embedding"], atol=1e-5)
        if t["segment"] == "tile":
            assert d["content_sha256"] == t["content_sha256"]  # the same tile pixels
    diff = max(float(np.abs(np.subtract(dcm[f]["embedding"], tiff[f]["embedding"])).max()) for f in tiff)
    print(f"DICOM WSI vs TIFF: {len(tiff) - 1} tiles, max |embedding difference| = {diff:.3g}")

    skipped = read_parts(fs, out + "/skipped").to_pylist()
    levels = sorted(r["uri"].rsplit("/", 1)[-1] for r in skipped if r["reason"] == "WsiLevel")
    assert levels == ["level1.dcm", "level2.dcm"]
    quarantined = read_parts(fs, out + "/quarantine").to_pylist()
    assert [(r["uri"].rsplit("/", 2)[-2], r["error_class"]) for r in quarantined] == [("broken", "DecodeError")]
    assert "shorter than its" in quarantined[0]["message"]
    summary = json.loads(fs.cat(f"{bucket}/out/dicom_wsi/summary.json"))
    assert summary["slides"]["slides"] == 2 and summary["quarantined"] == 1
    everything = json.dumps([rows, skipped, quarantined], default=str)
    assert PATIENT_ID not in everything and "Doe" not in everything


def test_dicom_wsi_from_dicomweb_is_tiled_over_wado_rs_frames(tmp_path):
    """The same slide in a PACS (Orthanc, auth on): its tiles' embeddings equal the TIFF tiles' (<= 1e-5)."""
    import io
    import subprocess
    import sys

    import tiffslide

    from medray.encoders import create_encoder, get_spec
    from medray.platform.decoders.slide import SlideOptions, plan_slide, read_tile
    from medray.testing.orthanc import OrthancServer

    for name, data in dicom_wsi_files(size=512, mpp=0.25, levels=3).items():
        (tmp_path / name).write_bytes(data)
    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path / "vit"), arch="vit", image_size=32)
    out = tmp_path / "out"
    with OrthancServer() as server:
        server.upload(sorted(tmp_path.glob("level*.dcm")))
        env = dict(os.environ, MEDRAY_HOME=str(tmp_path / "home"), MEDRAY_PROGRESS="0", **server.env())
        medray = os.path.join(os.path.dirname(sys.executable), "medray")
        args = [f"input={server.dicomweb_uri}", f"output={out}", "encoder=hf_image", f"encoder.checkpoint={ckpt}"]
        args += ["ray.num_cpus=2", "tracking.enabled=false", "slide.tile_size=32", "slide.target_mpp=0.5"]
        proc = subprocess.run([medray, "embed", *args], env=env, capture_output=True, text=True, timeout=600)
        _check_haidef_patches_over_dicomweb(server, tmp_path, ckpt)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "embeddings").to_pylist()
    tiles = sorted((r for r in rows if r["segment"] == "tile"), key=lambda r: r["frame"])
    slide = tiffslide.TiffSlide(io.BytesIO(slide_tiff(size=512, mpp=0.25, levels=3)))
    plan = plan_slide(slide, SlideOptions(target_mpp=0.5, tile_size=32))
    assert [(r["tile_x"], r["tile_y"], r["level"]) for r in tiles] == [(t.x, t.y, t.level) for t in plan.tiles]
    assert all("/instances/" in r["uri"] for r in tiles) and len({r["uri"] for r in tiles}) == 1
    encoder = create_encoder(get_spec("hf_image", checkpoint=ckpt), device="cpu", dtype="float32")
    expected = encoder.embed(encoder.preprocess([read_tile(slide, t) for t in plan.tiles]))
    diff = float(np.abs(np.asarray([r["embedding"] for r in tiles]) - np.asarray(expected)).max())
    print(f"DICOM WSI over DICOMweb vs TIFF: {len(tiles)} tiles, max |embedding difference| = {diff:.3g}")
    assert diff <= 1e-5
    skipped = pq.read_table(out / "skipped").to_pylist()
    assert sorted(r["reason"] for r in skipped) == ["WsiLevel", "WsiLevel"]


def _check_haidef_patches_over_dicomweb(server, folder, ckpt) -> None:
    """HAI-DEF patch_coordinates_list on a slide's level over DICOMweb, as the service decodes it: the same
    pixels as the level files read locally; a caller's wrong token is that request's 401, not the server's."""
    import pydicom

    from medray.encoders import create_preprocessor, get_spec
    from medray.platform.decoders.dicom_wsi import open_dicom_wsi
    from medray.platform.errors import DecodeError, ReadError
    from medray.serve.encoder import DecodeSettings, decode_input

    preprocessor = create_preprocessor(get_spec("hf_image", checkpoint=ckpt))
    settings = DecodeSettings(max_frames=16, allowed_uri_prefixes=(server.dicomweb_uri + "/",))
    local = open_dicom_wsi(str(folder / "level0.dcm"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        for level, patches in ((0, [(0, 0, 64, 64), (200, 136, 96, 80)]), (1, [(10, 20, 64, 48)])):
            ds = pydicom.dcmread(folder / f"level{level}.dcm", stop_before_pixels=True)
            uri = (
                f"{server.dicomweb_uri}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}"
            )
            got = decode_input({"dicomweb_uri": uri, "patches": patches}, settings, preprocessor)
            down = local.level_downsamples[level]
            want = [
                local.read_region((round(x * down), round(y * down)), level, (w, h), as_array=True)
                for x, y, w, h in patches
            ]
            np.testing.assert_array_equal(got.pixels, preprocessor.preprocess(want))
            assert got.frames == list(range(len(patches))) and got.modality == "SM"
        with pytest.raises(DecodeError, match="lies outside the 256x256 image"):
            decode_input({"dicomweb_uri": uri, "patches": [(250, 0, 64, 64)]}, settings, preprocessor)
        with pytest.raises(ReadError, match="HTTPError 401"):
            decode_input({"dicomweb_uri": uri, "patches": patches, "credential": "wrong-token"}, settings, preprocessor)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
