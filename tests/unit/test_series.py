"""CT/MR series as volumes: header pass, checks, ordering, HU, resampling, windows (no Ray)."""

from __future__ import annotations

import dataclasses
import io
import json
import random

import numpy as np
import pyarrow as pa
import pydicom
import pytest

from medray.platform.decoders.series import (
    SeriesError,
    SeriesOptions,
    assemble_series,
    plan_series,
    read_slice_header,
    resample_volume,
    series_key,
    validate_series,
    window_channels,
)
from medray.platform.errors import ConfigError, LimitExceeded
from medray.testing.samples import claiming_series_instance, ct_phantom, ct_series


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return ct_phantom(16, 32, seed=3)


@pytest.fixture(scope="module")
def files(phantom) -> list[bytes]:
    return ct_series(phantom, seed=3)


def _headers(files: list[bytes], salt: str = "") -> list:
    return [read_slice_header(f, salt=salt) for f in files]


def test_shuffled_series_assembles_to_the_hu_phantom(phantom, files):
    shuffled = list(files)
    random.Random(7).shuffle(shuffled)
    datasets = [pydicom.dcmread(io.BytesIO(f)) for f in shuffled]
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    # InstanceNumber is not the slice order, and each slice has its own rescale
    assert np.argsort(numbers).tolist() != np.argsort(z).tolist()
    assert len({(float(ds.RescaleSlope), float(ds.RescaleIntercept)) for ds in datasets}) > 2
    vol = assemble_series(shuffled)
    assert vol.values.dtype == np.float32 and vol.values.shape == phantom.shape
    assert np.array_equal(vol.values, phantom)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.8)) and vol.source_shape == (16, 32, 32)
    assert vol.positions == pytest.approx([-100.0 + 2.5 * k for k in range(16)])
    assert [shuffled.index(files[k]) for k in range(16)] == vol.order
    # datasets work as well as bytes (the benchmark's entry point takes either)
    assert np.array_equal(assemble_series(datasets).values, phantom)


def test_order_follows_the_slice_normal_not_z(phantom):
    # sagittal slices: the normal is -x, so z says nothing about the order
    files = ct_series(phantom, seed=5, orientation=(0, 1, 0, 0, 0, -1), origin=(40.0, -10.0, 30.0))
    shuffled = files[::-1][3:] + files[::-1][:3]
    vol = assemble_series(shuffled)
    # turned to the patient axes: slice k (along -x) becomes column W-1-k, row r (along -z) slice D-1-r
    assert np.array_equal(vol.values, np.transpose(phantom[::-1, ::-1, :], (1, 2, 0)))
    assert vol.normal == pytest.approx((0.0, 0.0, 1.0)) and vol.metadata["source_orientation"] == "PIR"
    assert [shuffled.index(files[k]) for k in range(len(files))] == vol.order


def test_header_pass_is_phi_free_and_salted(files):
    ds = pydicom.dcmread(io.BytesIO(files[0]))
    h = read_slice_header(files[0], salt="pepper")
    text = json.dumps(h.to_dict())
    assert ds.SeriesInstanceUID not in text and ds.PatientID not in text and str(ds.PatientName) not in text
    assert h.series_key == series_key(ds.SeriesInstanceUID, "pepper") != series_key(ds.SeriesInstanceUID, "salt")
    assert (h.rows, h.columns, h.frames, h.modality) == (32, 32, 1, "CT")
    assert read_slice_header(io.BytesIO(files[0]), salt="pepper") == h  # a file object: header only


def test_header_pass_leaves_other_objects_to_the_per_instance_path(files):
    assert read_slice_header(b"\x89PNG\r\n\x1a\n" + b"\0" * 200) is None
    assert read_slice_header(b"") is None
    ds = pydicom.dcmread(io.BytesIO(files[0]))
    for change in ("DX", "no-series"):
        other = pydicom.dcmread(io.BytesIO(files[0]))
        if change == "DX":
            other.Modality = "DX"
        else:
            del other.SeriesInstanceUID
        buf = io.BytesIO()
        other.save_as(buf, enforce_file_format=True)
        assert read_slice_header(buf.getvalue()) is None
    assert read_slice_header(files[0], options=SeriesOptions(modalities=("MR",))) is None
    # a multi-frame object within the limit stays per instance; one claiming too many is a series to refuse
    ds.NumberOfFrames = 3
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert read_slice_header(buf.getvalue()) is None
    claim = read_slice_header(claiming_series_instance(10_000))
    assert claim is not None and claim.frames == 10_000


def test_missing_slice_is_a_reason(phantom):
    files = ct_series(phantom, seed=3)
    del files[9]
    reason = validate_series(_headers(files))
    assert reason.startswith("missing slice") and "about 1 slice" in reason
    with pytest.raises(SeriesError, match="missing slice"):
        assemble_series(files)


def test_mixed_orientation_rows_and_spacing_are_reasons(files):
    headers = _headers(files)
    tilted = list(headers)
    tilted[4] = dataclasses.replace(tilted[4], orientation=(1.0, 0.0, 0.0, 0.0, 0.9, 0.43589))
    assert validate_series(tilted).startswith("mixed orientations: 2 distinct")
    smaller = list(headers)
    smaller[2] = dataclasses.replace(smaller[2], rows=16)
    assert "inconsistent or missing rows/columns" in validate_series(smaller)
    pixel = list(headers)
    pixel[0] = dataclasses.replace(pixel[0], pixel_spacing=(0.9, 0.9))
    assert validate_series(pixel).startswith("inconsistent pixel spacing")
    uneven = [
        dataclasses.replace(h, position=(h.position[0], h.position[1], h.position[2] + (0.6 if k % 2 else 0.0)))
        for k, h in enumerate(headers)
    ]
    assert validate_series(uneven).startswith("inconsistent slice spacing")
    dup = headers + [headers[3]]
    assert validate_series(dup).startswith("duplicate slice positions")
    sheared = [
        dataclasses.replace(h, position=(h.position[0] + 2.0 * k, h.position[1], h.position[2]))
        for k, h in enumerate(headers)
    ]
    assert validate_series(sheared).startswith("slices are not stacked along their normal")
    nogeo = list(headers)
    nogeo[1] = dataclasses.replace(nogeo[1], position=None)
    assert validate_series(nogeo).startswith("1 of 16 slices lack ImagePositionPatient")
    assert validate_series(headers) is None


def test_too_many_slices_is_refused_before_pixels(files):
    h = read_slice_header(files[0])
    many = [dataclasses.replace(h, position=(0.0, 0.0, float(k))) for k in range(10_000)]
    with pytest.raises(LimitExceeded, match="10000 slices, over series.max_slices = 2000"):
        plan_series(many)
    assert "over series.max_slices" in validate_series([read_slice_header(claiming_series_instance(10_000))])
    assert validate_series(many, SeriesOptions(max_slices=10_000)) is None
    with pytest.raises(LimitExceeded, match="max_voxels"):
        plan_series(_headers(files), SeriesOptions(spacing=(0.01, 0.01, 0.01)))


def test_resampling_to_a_configured_spacing():
    z, y, x = np.meshgrid(np.arange(16), np.arange(32), np.arange(32), indexing="ij")
    ramp = (10.0 * z + 2.0 * y - x).astype(np.float32)
    files = ct_series(ramp, seed=4, spacing=(2.5, 0.8, 0.8))
    vol = assemble_series(files, SeriesOptions(spacing=(5.0, 1.6, None)))
    assert vol.values.shape == (8, 16, 32) and vol.spacing == pytest.approx((5.0, 1.6, 0.8))
    # halving a linear field averages neighbour pairs, exactly
    expected = ramp.reshape(8, 2, 16, 2, 32).mean(axis=(1, 3))
    np.testing.assert_allclose(vol.values, expected, atol=1e-3)
    assert vol.source_range(0) == (0, 1) and vol.source_range(7) == (14, 15)
    up = resample_volume(ramp[:4, :4, :4], (8, 4, 4))
    assert up.shape == (8, 4, 4)


def test_windows_become_channels():
    hu = np.array([[[-1000.0, -600.0, 40.0, 400.0, 2000.0]]], np.float32)
    ch = window_channels(hu, SeriesOptions().windows, "CT")
    assert ch.shape == (3, 1, 1, 5) and ch.min() >= 0 and ch.max() <= 1
    np.testing.assert_allclose(ch[0, 0, 0], [(v + 1350) / 1500 if v < 150 else 1.0 for v in hu[0, 0]], atol=1e-6)
    np.testing.assert_allclose(ch[1, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    mr = window_channels(
        np.linspace(0, 100, 1000, dtype=np.float32).reshape(10, 10, 10), {"a": (0, 1), "b": (0, 1)}, "MR"
    )
    assert mr.shape == (2, 10, 10, 10) and np.array_equal(mr[0], mr[1]) and mr.max() == 1.0


def test_options_are_checked():
    with pytest.raises(ConfigError, match="series.mode"):
        SeriesOptions(mode="3d")
    with pytest.raises(ConfigError, match="series.spacing"):
        SeriesOptions(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="series.windows.lung"):
        SeriesOptions(windows={"lung": [1.0]})
    with pytest.raises(ConfigError, match="series.max_slices"):
        SeriesOptions(max_slices=0)
    picked = SeriesOptions(windows={**SeriesOptions().windows, "brain": (40, 80)}, channels=("brain", "lung"))
    assert list(picked.windows) == ["brain", "lung"] and picked.windows["brain"] == (40.0, 80.0)
    with pytest.raises(ConfigError, match="series.channels"):
        SeriesOptions(channels=("liver",))


# ---------------------------------------------------------------- pipeline stages (no Ray)
@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory) -> str:
    from medray.encoders import build_tiny_checkpoint

    return build_tiny_checkpoint("hf_image", str(tmp_path_factory.mktemp("img")), arch="vit", image_size=32)


def _opts(ckpt: str, mode: str = "slicewise", family: str = "hf_image", **series):
    from medray.encoders import get_spec
    from medray.pipeline import StageOptions

    spec = get_spec(family, checkpoint=ckpt)
    return StageOptions(salt="s", encoder_spec=spec, series={"mode": mode, **series})


def _group(files: list[bytes], tmp_path, opts) -> pa.Table:
    from medray.pipeline.series import series_header_batch

    uris = []
    for k, data in enumerate(files):
        p = tmp_path / f"{k:03d}.dcm"
        p.write_bytes(data)
        uris.append(str(p))
    random.Random(1).shuffle(uris)
    return series_header_batch(pa.table({"uri": uris, "member": [""] * len(uris)}), opts)


def test_decode_marks_series_slices_and_the_group_task_assembles(files, image_ckpt, tmp_path):
    from medray.pipeline import decode_batch
    from medray.pipeline.series import assemble_group, series_record_id

    opts = _opts(image_ckpt)
    table = pa.table(
        {
            "uri": ["a.dcm"],
            "member": [""],
            "record_id": ["r"],
            "data": [files[0]],
            "status": ["ok"],
            "stage": [None],
            "error_class": [None],
            "message": [None],
        },
        schema=pa.schema(
            [
                ("uri", pa.string()),
                ("member", pa.string()),
                ("record_id", pa.string()),
                ("data", pa.large_binary()),
                ("status", pa.string()),
                ("stage", pa.string()),
                ("error_class", pa.string()),
                ("message", pa.string()),
            ]
        ),
    )
    row = decode_batch(table, opts).to_pylist()[0]
    assert (row["status"], row["stage"]) == ("noop", "series")
    off = decode_batch(table, _opts(image_ckpt, mode="off")).to_pylist()[0]
    assert off["status"] == "ok" and off["pixel_shape"] == [1, 3, 32, 32]

    headers = _group(files, tmp_path, opts)
    assert headers.num_rows == 16 and len(set(headers.column("series_key").to_pylist())) == 1
    out = assemble_group(headers, opts).to_pylist()
    assert len(out) == 1
    rec = out[0]
    assert rec["status"] == "ok" and rec["route"] == "image" and rec["pool"] == "mean"
    assert rec["pixel_shape"] == [16, 3, 32, 32] and rec["frames"] == list(range(16))
    assert rec["record_id"] == series_record_id(headers.column("series_key")[0].as_py())
    segs = json.loads(rec["segments"])
    assert segs[5]["segment"] == "slice" and (segs[5]["slice_start"], segs[5]["slice_end"]) == (5, 5)
    meta = json.loads(rec["metadata"])
    assert meta["series"]["n_source_slices"] == 16 and meta["windows"] == ["lung", "mediastinum", "bone"]
    assert rec["uri"].endswith("000.dcm")  # the first slice along the normal
    # resume: a series already in the output is not read again
    done = dataclasses.replace(opts, done=frozenset({rec["record_id"]}))
    assert assemble_group(headers, done).num_rows == 0


def test_read_stage_fetches_only_the_header_of_series_slices(files, image_ckpt, tmp_path):
    """A series slice's pixels are read once, by its series' task: the read stage stops at the header."""
    from medray.pipeline import read_batch

    (tmp_path / "slice.dcm").write_bytes(files[0])
    xray = pydicom.dcmread(io.BytesIO(files[0]))
    xray.Modality = "CR"  # a projection image: no series branch, embedded as an image
    xray.save_as(tmp_path / "xray.dcm")
    table = pa.table({"uri": [str(tmp_path / "slice.dcm"), str(tmp_path / "xray.dcm")], "member": ["", ""]})
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in read_batch(table, _opts(image_ckpt)).to_pylist()}
    assert (rows["slice.dcm"]["status"], rows["slice.dcm"]["stage"], rows["slice.dcm"]["data"]) == (
        "noop",
        "series",
        None,
    )
    assert rows["xray.dcm"]["status"] == "ok" and rows["xray.dcm"]["data"]  # not a CT/MR series: read whole
    off = {r["uri"].rsplit("/", 1)[-1]: r for r in read_batch(table, _opts(image_ckpt, mode="off")).to_pylist()}
    assert off["slice.dcm"]["status"] == "ok" and off["slice.dcm"]["data"] == files[0]


def test_group_rows_list_a_series_and_assemble_one_record_each(phantom, files, image_ckpt, tmp_path):
    """``collect_group`` (the light map_groups body) + ``assemble_batch`` equal ``assemble_group``."""
    from medray.pipeline.series import GROUP_SCHEMA, assemble_batch, assemble_group, collect_group

    opts = _opts(image_ckpt)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    headers = _group(files, tmp_path / "a", opts)
    headers_b = _group(ct_series(phantom, seed=9, series="other"), tmp_path / "b", opts)
    rows = pa.concat_tables([collect_group(headers), collect_group(headers_b)])
    assert rows.schema == GROUP_SCHEMA and rows.num_rows == 2
    assert [len(h) for h in rows.column("headers").to_pylist()] == [16, 16]
    assert collect_group(headers.slice(0, 0)).num_rows == 0
    out = assemble_batch(rows, opts).to_pylist()
    ref = assemble_group(headers, opts).to_pylist()[0]
    assert [r["status"] for r in out] == ["ok", "ok"]
    assert out[0]["record_id"] == ref["record_id"] and out[0]["pixel_values"] == ref["pixel_values"]
    assert out[1]["record_id"] != ref["record_id"]


def test_manifest_columns_its_slices_agree_on_are_carried_onto_the_series_row(files, image_ckpt, tmp_path):
    from medray.pipeline.series import assemble_group, carried_columns, series_header_batch

    uris = []
    for k, data in enumerate(files):
        (tmp_path / f"{k:03d}.dcm").write_bytes(data)
        uris.append(str(tmp_path / f"{k:03d}.dcm"))
    opts = _opts(image_ckpt)
    table = pa.table(
        {
            "uri": uris,
            "member": [""] * len(uris),
            "label": [1] * len(uris),
            "site": ["A"] * len(uris),
            "note": [f"file {k}" for k in range(len(uris))],
        }
    )
    rec = assemble_group(series_header_batch(table, opts), opts).to_pylist()[0]
    assert rec["status"] == "ok" and (rec["label"], rec["site"], rec["note"]) == (1, "A", None)
    assert carried_columns([{"a": 1, "b": None}, {"a": 1, "b": 2}]) == {"a": 1, "b": None}
    assert carried_columns([{}, {}]) == {}


def test_a_broken_series_is_one_quarantine_row(phantom, image_ckpt, tmp_path):
    from medray.pipeline.series import assemble_group

    files = ct_series(phantom, seed=8, series="broken")
    del files[4]
    opts = _opts(image_ckpt)
    rows = assemble_group(_group(files, tmp_path, opts), opts).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["error_class"] == "SeriesError"
    assert rows[0]["message"].startswith("series of 15 instance(s): missing slice")
    assert rows[0]["pixel_values"] is None


def test_volume_mode_with_a_torchvision_video_backbone(files, tmp_path):
    from medray.encoders import create_encoder, get_spec
    from medray.encoders.video import build_video_checkpoint
    from medray.pipeline.series import assemble_group

    ckpt = build_video_checkpoint(str(tmp_path / "r3d"), arch="r3d_18")
    opts = _opts(ckpt, mode="volume", family="torchvision_video", spacing=[5.0, 1.6, 1.6])
    rec = assemble_group(_group(files, tmp_path, opts), opts).to_pylist()[0]
    assert rec["status"] == "ok" and rec["route"] == "volume" and rec["pool"] == "none"
    assert rec["pixel_shape"] == [1, 3, 8, 16, 16]
    assert json.loads(rec["segments"])[0] == {
        "series_key": json.loads(rec["metadata"])["series"]["series_key"],
        "spacing_mm": [5.0, 1.6, 1.6],
        "segment": "volume",
        "slice_start": 0,
        "slice_end": 15,
        "n_items": 16,
    }
    encoder = create_encoder(get_spec("torchvision_video", checkpoint=ckpt))
    pixels = np.frombuffer(rec["pixel_values"], np.float32).reshape(rec["pixel_shape"])
    emb = encoder.embed(np.concatenate([pixels, pixels]))
    assert emb.shape == (2, 512) and np.allclose(emb[0], emb[1], atol=1e-4)
    assert encoder.spec.untrained and encoder.describe()["family"] == "torchvision_video"
    with pytest.raises(ConfigError, match="not a torchvision_video checkpoint"):
        create_encoder(get_spec("torchvision_video", checkpoint=str(tmp_path)))


def test_embed_config_series_keys_need_their_encoder(tmp_path):
    from hydra import compose, initialize_config_dir

    from medray.config import CONF_DIR, register_schemas
    from medray.jobs.embed import EmbedJob

    register_schemas()
    base = [f"input={tmp_path}", f"output={tmp_path / 'out'}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        job = EmbedJob(
            compose(
                "embed",
                overrides=[
                    *base,
                    "series.mode=slicewise",
                    "+series.windows.brain=[40,80]",
                    "series.channels=[brain]",
                    "series.spacing=[1.5,null,0.7]",
                ],
            )
        )
        assert job.series_opts["windows"] == {"brain": [40.0, 80.0]} and job.series_opts["spacing"] == [1.5, None, 0.7]
        assert EmbedJob(compose("embed", overrides=base)).series_opts["mode"] == "off"
        # a 3D encoder implies volume mode
        volume = EmbedJob(compose("embed", overrides=[*base, "encoder=r3d_18_kinetics"]))
        assert volume.series_opts["mode"] == "volume" and volume.primary == "volume"
        for overrides, key in (
            (["series.mode=volume"], "series.mode"),
            (["series.mode=cube"], "series.mode"),
            (["series.mode=slicewise", "series.channels=[lung,bone]"], "series.windows"),
            (["series.channels=[liver]"], "series.channels"),
            (["series.mode=slicewise", "encoders.volume={family: torchvision_video, checkpoint: /x}"], "series.mode"),
        ):
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                EmbedJob(compose("embed", overrides=[*base, *overrides]))


def test_the_configured_window_order_is_the_channel_order():
    """The stage rebuilds its options from the job's; windows must keep their configured order
    (lung, mediastinum, bone), not come back sorted by name (a bug found by the benchmark)."""
    from types import SimpleNamespace

    from medray.pipeline.series import series_options

    windows = {"lung": [-600.0, 1500.0], "mediastinum": [40.0, 400.0], "bone": [400.0, 1800.0]}
    got = series_options(SimpleNamespace(series={"mode": "slicewise", "windows": windows}))
    assert list(got.windows) == ["lung", "mediastinum", "bone"]
    flipped = dict(reversed(list(windows.items())))
    assert list(series_options(SimpleNamespace(series={"mode": "slicewise", "windows": flipped})).windows) == [
        "bone",
        "mediastinum",
        "lung",
    ]
