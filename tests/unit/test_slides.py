"""Whole-slide images through the same stages as images (no Ray): routing, tissue, tile grid, pixels, pooling."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiffslide
from PIL import Image

from medray.encoders import build_tiny_checkpoint, create_encoder, get_spec
from medray.pipeline import EncoderActor, StageOptions, decode_batch, read_batch
from medray.pipeline.sink import embeddings_table, pool_slides, write_parquet_atomic
from medray.platform.decoders.slide import (
    SlideOptions,
    is_slide,
    open_slide,
    otsu_threshold,
    plan_slide,
    read_tile,
    tissue_mask,
)
from medray.platform.errors import ConfigError, LimitExceeded
from medray.platform.formats import detect_modality
from medray.platform.records import record_id, tile_record_id
from medray.testing.media import slide_tiff


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "case.tif"
    path.write_bytes(slide_tiff(size=1024, mpp=0.25, levels=4))
    return str(path)


@pytest.fixture(scope="module")
def slide(slide_path):
    return tiffslide.TiffSlide(slide_path)


def _photo_tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(buf, format="TIFF")
    return buf.getvalue()


def test_slides_route_by_structure_photo_tiffs_stay_images(slide):
    data = slide_tiff(size=256, levels=2)
    assert detect_modality(data, "scan.png") == ("slide", "slide")
    assert detect_modality(_photo_tiff(), "photo.tif") == ("image", "image")
    photo = tiffslide.TiffSlide(io.BytesIO(_photo_tiff()))
    assert not is_slide(photo, "photo.svs")  # strips, not tiles: never a slide
    single = tiffslide.TiffSlide(io.BytesIO(slide_tiff(size=256, levels=1)))
    assert not is_slide(single, "x.tif") and is_slide(single, "x.svs")  # tiled: the .svs hint decides
    assert is_slide(slide)


def test_tissue_mask_otsu_on_saturation():
    img = np.full((40, 60, 3), 250, np.uint8)
    img[10:30, 20:50] = (200, 80, 160)
    mask, thr = tissue_mask(img)
    assert mask.sum() == 20 * 30 and mask[10:30, 20:50].all() and 0.08 <= thr < 0.6
    assert otsu_threshold(np.array([0, 0, 200, 200], np.uint8)) == pytest.approx(0 / 255)
    blank, thr = tissue_mask(np.random.default_rng(0).integers(240, 256, (32, 32, 3)).astype(np.uint8))
    assert not blank.any() and thr >= 0.08  # noise on white is not tissue
    assert tissue_mask(img, threshold=0.99)[0].sum() == 0


@pytest.mark.parametrize(
    "target, level, read_size, grid",
    [(0.25, 0, 64, 16), (0.5, 1, 64, 8), (0.6, 1, 77, 6), (1.0, 2, 64, 4), (2.0, 3, 64, 2), (4.0, 3, 128, 1)],
)
def test_tile_grid_picks_the_lowest_resolution_level_at_or_below_target(slide, target, level, read_size, grid):
    plan = plan_slide(slide, SlideOptions(target_mpp=target, tile_size=64))
    assert (plan.level, plan.read_size, plan.tiles_total) == (level, read_size, grid * grid)
    assert plan.metadata["level_mpp"] <= target and "mpp_note" not in plan.metadata
    step0 = round(64 * target / 0.25)
    assert all(t.x % step0 == 0 and t.y % step0 == 0 and t.level == level and t.mpp == target for t in plan.tiles)


def test_no_mpp_falls_back_to_level_0_and_says_so():
    s = tiffslide.TiffSlide(io.BytesIO(slide_tiff(size=512, mpp=None, levels=3)))
    plan = plan_slide(s, SlideOptions(target_mpp=0.5, tile_size=64))
    assert (plan.level, plan.read_size, plan.tiles_total) == (0, 64, 64)
    assert "no mpp" in plan.metadata["mpp_note"] and all(t.mpp is None for t in plan.tiles)
    fine = plan_slide(s, SlideOptions(target_mpp=0.5, tile_size=64))  # deterministic
    assert fine.tiles == plan.tiles


def test_background_tiles_skipped_and_counted(slide):
    plan = plan_slide(slide, SlideOptions(target_mpp=0.5, tile_size=64, min_tissue_fraction=0.5))
    assert 0 < len(plan.tiles) < plan.tiles_total
    assert plan.background == plan.tiles_total - len(plan.tiles) == plan.metadata["background_tiles"]
    assert all(t.tissue_fraction >= 0.5 for t in plan.tiles)
    # the blob is centred at (0.3, 0.35) of the slide with radius 0.22: every kept tile touches it
    for t in plan.tiles:
        cx, cy = (t.x + 64) / 1024, (t.y + 64) / 1024
        assert ((cx - 0.3) ** 2 + ((cy - 0.35) / 0.8) ** 2) < (0.22 + 0.1) ** 2
    assert [t.index for t in plan.tiles] == list(range(len(plan.tiles)))
    loose = plan_slide(slide, SlideOptions(target_mpp=0.5, tile_size=64, min_tissue_fraction=0.0))
    assert len(loose.tiles) == loose.tiles_total == 64
    blank = tiffslide.TiffSlide(io.BytesIO(slide_tiff(size=512, levels=3, blob=(0.5, 0.5, 0.0))))
    assert plan_slide(blank, SlideOptions(tile_size=64)).tiles == []
    with pytest.raises(LimitExceeded, match="slide.max_tiles"):
        plan_slide(slide, SlideOptions(target_mpp=0.5, tile_size=64, max_tiles=2))


def test_tile_pixels_equal_read_region(slide):
    plan = plan_slide(slide, SlideOptions(target_mpp=0.5, tile_size=64))
    for t in plan.tiles[:3]:
        want = np.asarray(slide.read_region((t.x, t.y), t.level, (64, 64)).convert("RGB"))
        np.testing.assert_array_equal(read_tile(slide, t), want)
    t = plan_slide(slide, SlideOptions(target_mpp=0.6, tile_size=64)).tiles[0]
    region = slide.read_region((t.x, t.y), t.level, (77, 77)).convert("RGB").resize((64, 64), Image.BILINEAR)
    np.testing.assert_array_equal(read_tile(slide, t), np.asarray(region))


def test_slide_options_name_the_key():
    with pytest.raises(ConfigError, match="slide.target_mpp"):
        SlideOptions(target_mpp=0)
    with pytest.raises(ConfigError, match="slide.tissue_threshold"):
        SlideOptions(tissue_threshold=1.5)
    with pytest.raises(ConfigError, match="slide.min_tissue_fraction"):
        SlideOptions(min_tissue_fraction=2)


def test_read_parts_split_slides_from_everything_else(slide_path, tmp_path):
    """The pipeline's two read branches: slides (tiles, spread by a repartition) and the rest; each record once."""
    opts = StageOptions(encoder_spec=get_spec("hf_image", checkpoint="/x"), slide={"target_mpp": 0.5, "tile_size": 64})
    photo = tmp_path / "photo.tif"
    photo.write_bytes(_photo_tiff())
    src = pa.table({"uri": [slide_path, str(photo), "nope://bucket/x.dcm"], "member": ["", "", ""]})
    n = len(plan_slide(open_slide(slide_path), SlideOptions(target_mpp=0.5, tile_size=64)).tiles)

    def uris(part: str) -> list[str]:
        return read_batch(src, opts, part=part).column("uri").to_pylist()

    assert uris("slides") == [slide_path] * n  # tiles only; the bad URI is not its to report
    assert uris("main") == [str(photo), "nope://bucket/x.dcm"]  # no slide; the bad URI quarantined here
    assert uris("all") == [slide_path] * n + [str(photo), "nope://bucket/x.dcm"]
    with pytest.raises(ValueError):
        read_batch(src, opts, part="tiles")


def test_stages_expand_tiles_embed_resume_and_pool(slide_path, tmp_path):
    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path / "vit"), arch="vit", image_size=32)
    spec = get_spec("hf_image", checkpoint=ckpt)
    opts = StageOptions(encoder_spec=spec, slide={"target_mpp": 0.5, "tile_size": 64})
    photo = tmp_path / "photo.tif"
    photo.write_bytes(_photo_tiff())
    src = pa.table({"uri": [slide_path, str(photo)], "member": ["", ""]})
    read = read_batch(src, opts)
    plan = plan_slide(open_slide(slide_path), SlideOptions(target_mpp=0.5, tile_size=64))
    n = len(plan.tiles)
    assert read.num_rows == n + 1 and read.column("data").to_pylist()[:n] == [None] * n  # never read whole
    assert read.column("record_id").to_pylist()[:n] == [tile_record_id(slide_path, "", t.tile_id) for t in plan.tiles]
    decoded = decode_batch(read, opts)
    assert decoded.column("status").to_pylist() == ["ok"] * (n + 1)
    assert decoded.column("modality").to_pylist() == ["slide"] * n + ["photo"]
    actor = EncoderActor(
        {"family": spec.family, "checkpoint": ckpt, "name": "hf_image"},
        device="cpu",
        dtype="float32",
        provenance={"encoder": "hf_image"},
    )
    out = actor(decoded)
    rows = out.to_pylist()
    tiles = [r for r in rows if r["segment"] == "tile"]
    assert len(tiles) == n and [r["segment"] for r in rows].count("frame") == 1
    t0, r0 = plan.tiles[0], tiles[0]
    assert (r0["tile_x"], r0["tile_y"], r0["level"], r0["mpp"], r0["frame"], r0["n_frames"]) == (
        t0.x,
        t0.y,
        1,
        0.5,
        0,
        n,
    )
    assert r0["tissue_fraction"] == pytest.approx(t0.tissue_fraction)
    # a tile's embedding equals the encoder applied to that region read directly
    encoder = create_encoder(spec, device="cpu", dtype="float32")
    region = np.asarray(tiffslide.TiffSlide(slide_path).read_region((t0.x, t0.y), 1, (64, 64)).convert("RGB"))
    np.testing.assert_allclose(r0["embedding"], encoder.embed(encoder.preprocess([region]))[0], atol=1e-5)

    # resume: tiles already done are not emitted again; a finished slide is not even opened
    done = frozenset(r["record_id"] for r in tiles[:3])
    again = read_batch(src.slice(0, 1), StageOptions(encoder_spec=spec, slide=opts.slide, done=done))
    assert again.num_rows == n - 3
    assert (
        read_batch(
            src.slice(0, 1), StageOptions(encoder_spec=spec, done=frozenset({record_id(slide_path, "")}))
        ).num_rows
        == 0
    )
    # every tile written, pooled row missing: one marker row ("noop") that makes the job pool, never written
    marker = decode_batch(
        read_batch(
            src.slice(0, 1),
            StageOptions(encoder_spec=spec, slide=opts.slide, done=frozenset(r["record_id"] for r in tiles)),
        ),
        opts,
    )
    assert marker.column("status").to_pylist() == ["noop"] and marker.column("modality").to_pylist() == ["slide"]
    from medray.pipeline.sink import make_sink

    sink_stats = make_sink(str(tmp_path / "marker-out"), None, "test").write([actor(marker)], None)
    assert (sink_stats["slide_rows"], sink_stats["quarantined"], sink_stats["rows"]) == (1, 0, 0)
    assert not (tmp_path / "marker-out").exists()
    # a slide over slide.max_tiles is one quarantine row keyed by the slide
    capped = read_batch(
        src.slice(0, 1), StageOptions(encoder_spec=spec, slide={"tile_size": 64, "target_mpp": 0.5, "max_tiles": 1})
    )
    assert capped.column("status").to_pylist() == ["error"]
    assert capped.column("record_id").to_pylist() == [record_id(slide_path, "")]

    # pooled row: only once all tiles are written, then never again
    output = str(tmp_path / "out")
    ok = embeddings_table(out.filter(pa.array([r["segment"] == "tile" for r in rows])))
    write_parquet_atomic(ok.slice(0, n - 1), output, "embeddings", None)
    assert pool_slides(output, None)["pooled"] == 0  # a tile is missing
    write_parquet_atomic(ok.slice(n - 1), output, "embeddings", None)
    stats = pool_slides(output, None)
    assert stats == {"slides": 1, "pooled": 1, "tiles": n, "background_tiles": plan.background, "damaged_tiles": 0}
    assert pool_slides(output, None)["pooled"] == 0
    table = pq.read_table(str(tmp_path / "out" / "embeddings"))
    pooled = [r for r in table.to_pylist() if r["segment"] == "pooled"]
    assert len(pooled) == 1 and pooled[0]["record_id"] == record_id(slide_path, "") and pooled[0]["frame"] == -1
    np.testing.assert_allclose(pooled[0]["embedding"], np.mean([r["embedding"] for r in tiles], axis=0), atol=1e-6)


def test_embed_config_slide_keys_and_slide_encoder(tmp_path):
    from hydra import compose, initialize_config_dir

    from medray.config import CONF_DIR, register_schemas
    from medray.jobs.embed import EmbedJob

    register_schemas()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s.svs").write_bytes(b"x")

    def job(*overrides: str) -> EmbedJob:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return EmbedJob(
                compose("embed", overrides=[f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", *overrides])
            )

    j = job("encoder=phikon", "slide.target_mpp=1", "slide.tile_size=256")
    assert j.slide_opts == {
        "target_mpp": 1.0,
        "tile_size": 256,
        "tissue_threshold": None,
        "min_tissue_fraction": 0.25,
        "max_tiles": 100_000,
        "max_pixels": 100_000_000_000,
        "max_damaged_fraction": 0.1,
    }
    assert set(job("encoder=hubert_base", "encoders.slide=uni").specs) == {"audio", "slide"}
    with pytest.raises(ConfigError, match="slide.target_mpp"):
        job("slide.target_mpp=0")
    with pytest.raises(ConfigError, match="encoders.slide"):
        job("encoder=phikon", "encoders.slide=hubert_base")


def test_slide_without_slide_or_image_encoder_is_skipped_unread(slide_path, tmp_path):
    ckpt = build_tiny_checkpoint("hf_audio", str(tmp_path / "w2v"), arch="wav2vec2")
    opts = StageOptions(encoder_spec=get_spec("hf_audio", checkpoint=ckpt))
    decoded = decode_batch(read_batch(pa.table({"uri": [slide_path], "member": [""]}), opts), opts)
    assert decoded.column("status").to_pylist() == ["skipped"]
    assert decoded.column("route").to_pylist() == ["slide"]
    assert decoded.column("record_id").to_pylist() == [record_id(slide_path, "")]


def test_slide_branch_is_planned_when_inputs_may_hold_slides(tmp_path):
    """Names decide only whether the pipeline adds its slide branch; content still decides what is a slide."""
    from medray.jobs.embed import _manifest_may_hold_slides, may_hold_slides

    assert may_hold_slides(["s3://b/a.dcm", "s3://b/case.SVS"]) and may_hold_slides(["x/y.tiff"])
    assert not may_hold_slides(["s3://b/a.dcm", "s3://b/1.2.840.113619", "r.txt", "a.wav"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,label\n/a/1.dcm,0\n/a/2.ndpi,1\n")
    assert _manifest_may_hold_slides(str(manifest), {})
    manifest.write_text("report,label\nno uri column here,0\n")
    assert not _manifest_may_hold_slides(str(manifest), {})
