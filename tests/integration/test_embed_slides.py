"""A pyramidal slide beside a photo TIFF on S3 (SeaweedFS) through ``medray embed``.

Real Ray, real S3, the console script in a subprocess. The slide is larger
than ``decode.max_bytes``, so it can only be embedded through ranged tile
reads (a whole-object read would quarantine it). One row per tissue tile, one
pooled row per slide; the rerun adds nothing.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tiffslide
from PIL import Image
from test_embed_cli import read_parts, run_medray  # same directory (pytest rootdir-relative import)

from medray.encoders import build_tiny_checkpoint, create_encoder, get_spec
from medray.platform.decoders.slide import SlideOptions, plan_slide
from medray.testing.media import slide_tiff

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def slides(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    fs = s3.filesystem()
    slide = slide_tiff(size=1024, mpp=0.25, levels=4)
    photo = io.BytesIO()
    Image.new("RGB", (48, 40), (180, 60, 120)).save(photo, format="TIFF")
    fs.pipe(f"{s3.bucket}/slides/case-1.tif", slide)
    fs.pipe(f"{s3.bucket}/slides/photo.tif", photo.getvalue())
    local = build_tiny_checkpoint("hf_image", str(root / "vit"), arch="vit", image_size=32)
    fs.put(local, f"{s3.bucket}/models/slide-vit", recursive=True)
    home = root / "home"
    home.mkdir()
    return {
        "bucket": s3.bucket,
        "fs": fs,
        "slide": slide,
        "local": local,
        "home": home,
        "ckpt": f"s3://{s3.bucket}/models/slide-vit",
    }


def test_slide_tiles_pooled_row_and_idempotent_rerun(slides):
    fs, bucket = slides["fs"], slides["bucket"]
    out = f"s3://{bucket}/out/slides"
    args = [
        "embed",
        f"input=s3://{bucket}/slides/",
        f"output={out}",
        "encoder=hf_image",
        f"encoder.checkpoint={slides['ckpt']}",
        "ray.num_cpus=2",
        "tracking.mode=offline",
        "slide.tile_size=64",
        "slide.target_mpp=0.5",
        "decode.max_bytes=1000000",
        "compute.read_batch_size=1",
        "compute.decode_batch_size=4",
    ]
    assert len(slides["slide"]) > 1_000_000  # larger than decode.max_bytes: only ranged reads get it in
    proc = run_medray(slides, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = plan_slide(tiffslide.TiffSlide(io.BytesIO(slides["slide"])), SlideOptions(target_mpp=0.5, tile_size=64))
    n = len(plan.tiles)
    assert 4 <= n < plan.tiles_total
    summary = json.loads(fs.cat(f"{bucket}/out/slides/summary.json"))
    assert summary["slides"] == {
        "slides": 1,
        "pooled": 1,
        "tiles": n,
        "background_tiles": plan.background,
        "damaged_tiles": 0,
    }
    assert summary["quarantined"] == 0 and summary["records_embedded"] == n + 1
    assert f"{plan.background} background tiles skipped" in proc.stdout

    rows = read_parts(fs, out + "/embeddings").to_pylist()
    photo = [r for r in rows if r["uri"].endswith("photo.tif")]
    assert [(r["segment"], r["modality"]) for r in photo] == [("frame", "photo")]
    tiles = sorted((r for r in rows if r["segment"] == "tile"), key=lambda r: r["frame"])
    assert [(r["tile_x"], r["tile_y"], r["level"], r["mpp"]) for r in tiles] == [(t.x, t.y, 1, 0.5) for t in plan.tiles]
    assert all(r["n_frames"] == n and r["modality"] == "slide" for r in tiles)
    assert [r["tissue_fraction"] for r in tiles] == pytest.approx([t.tissue_fraction for t in plan.tiles])
    pooled = [r for r in rows if r["segment"] == "pooled"]
    assert len(pooled) == 1 and pooled[0]["frame"] == -1 and pooled[0]["uri"].endswith("case-1.tif")
    np.testing.assert_allclose(pooled[0]["embedding"], np.mean([r["embedding"] for r in tiles], axis=0), atol=1e-6)
    # a tile's embedding equals the encoder applied to that region read directly
    encoder = create_encoder(get_spec("hf_image", checkpoint=slides["local"]), device="cpu", dtype="float32")
    t = plan.tiles[-1]
    region = tiffslide.TiffSlide(io.BytesIO(slides["slide"])).read_region((t.x, t.y), 1, (64, 64)).convert("RGB")
    np.testing.assert_allclose(
        tiles[-1]["embedding"], encoder.embed(encoder.preprocess([np.asarray(region)]))[0], atol=1e-5
    )

    proc = run_medray(slides, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fs.invalidate_cache()
    summary = json.loads(fs.cat(f"{bucket}/out/slides/summary.json"))
    assert summary["records_embedded"] == 0 and summary["records_done_before"] == n + 2
    assert summary["slides"]["pooled"] == 0
    assert len(read_parts(fs, out + "/embeddings")) == len(rows)
