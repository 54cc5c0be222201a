"""Resume on the driver: the output's finished ids, and the anti-join that leaves only new records (no Ray)."""

from __future__ import annotations

import pyarrow as pa

from medray.pipeline.resume import DONE_IDS, anti_join, done_index
from medray.pipeline.sink import existing_record_ids, write_parquet_atomic
from medray.platform.records import record_id, tile_record_id
from medray.platform.sources import ARCHIVE_MEMBER_PENDING


def _write(out: str, sub: str, rows: list[dict]) -> None:
    write_parquet_atomic(pa.Table.from_pylist(rows), out, sub, None)


def test_done_index_reads_embeddings_and_quarantine_once_per_record(tmp_path) -> None:
    out = str(tmp_path / "out")
    assert len(done_index(out, None)) == 0  # no output yet
    a, b = record_id("/in/a.png"), record_id("/in/b.dcm")
    series = record_id("medray-series:k", "series")
    _write(out, "embeddings", [{"record_id": a, "uri": "/in/a.png", "series_key": None, "frame": f} for f in range(3)])
    _write(out, "embeddings", [{"record_id": series, "uri": "/in/s/1.dcm", "series_key": "k", "frame": -1}])
    _write(out, "quarantine", [{"record_id": b, "uri": "/in/b.dcm", "stage": "decode"}])
    index = done_index(out, None)
    assert len(index) == 3 and index.ids == {a, b, series} and index.series == {series}
    assert existing_record_ids(out, None) == {a, b, series}


def test_anti_join_drops_finished_objects_and_hands_archives_and_slides_their_own_ids(tmp_path) -> None:
    out = str(tmp_path / "out")
    member = record_id("/in/x.zip", "m1.dcm")
    tile = tile_record_id("/in/slide.svs", "", "tile/0/0/0")
    _write(
        out,
        "embeddings",
        [
            {"record_id": record_id("/in/a.png"), "uri": "/in/a.png"},
            {"record_id": member, "uri": "/in/x.zip"},
            {"record_id": tile, "uri": "/in/slide.svs"},
        ],
    )
    rows = [
        {"uri": "/in/a.png", "member": ""},
        {"uri": "/in/new.png", "member": ""},
        {"uri": "/in/x.zip", "member": ARCHIVE_MEMBER_PENDING},
        {"uri": "/in/slide.svs", "member": ""},
    ]
    left = anti_join(rows, done_index(out, None))
    assert [r["uri"] for r in left] == ["/in/new.png", "/in/x.zip", "/in/slide.svs"]
    assert [r[DONE_IDS] for r in left] == [[], [member], [tile]]  # never the whole finished set
    assert anti_join(rows, done_index(str(tmp_path / "fresh"), None)) == rows


def test_read_stage_skips_a_rows_own_finished_members(tmp_path) -> None:
    import zipfile

    from medray.pipeline import StageOptions, read_batch

    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m1.txt", "one")
        zf.writestr("m2.txt", "two")
    table = pa.table(
        {
            "uri": [str(path)],
            "member": [ARCHIVE_MEMBER_PENDING],
            DONE_IDS: pa.array([[record_id(str(path), "m1.txt")]], pa.list_(pa.string())),
        }
    )
    out = read_batch(table, StageOptions())
    assert out.column("member").to_pylist() == ["m2.txt"] and DONE_IDS not in out.column_names


def test_the_listing_is_one_arrow_table_in_listing_order_with_each_rows_own_finished_ids(tmp_path) -> None:
    from medray.pipeline.resume import anti_join_table, listing_table

    out = str(tmp_path / "out")
    rows = [{"uri": f"/in/{k:03d}.zip", "member": ARCHIVE_MEMBER_PENDING} for k in range(50)]
    rows += [{"uri": f"/in/{k:03d}.png", "member": ""} for k in range(50)]
    finished = [{"record_id": record_id(f"/in/{k:03d}.png"), "uri": f"/in/{k:03d}.png"} for k in range(0, 50, 2)]
    members = [{"record_id": record_id(f"/in/{k:03d}.zip", "m.dcm"), "uri": f"/in/{k:03d}.zip"} for k in (7, 3)]
    _write(out, "embeddings", finished + members)
    table = listing_table(iter(rows), chunk=16)  # several chunks
    assert table.num_rows == 100 and table.column_names == ["uri", "member"]
    left = anti_join_table(table, done_index(out, None))
    want = [r for r in rows if not (r["uri"].endswith(".png") and int(r["uri"][4:7]) % 2 == 0)]
    assert left.column("uri").to_pylist() == [r["uri"] for r in want]  # the listing's order is kept
    ids = dict(zip(left.column("uri").to_pylist(), left.column(DONE_IDS).to_pylist()))
    assert ids["/in/007.zip"] == [members[0]["record_id"]] and ids["/in/003.zip"] == [members[1]["record_id"]]
    assert sum(len(v) for v in ids.values()) == 2  # never the whole finished set
    assert anti_join_table(table, done_index(str(tmp_path / "fresh"), None)).equals(table)
    assert listing_table(iter([])).num_rows == 0
