"""Patient-level splits: per row, deterministic, no patient in two splits (no Ray)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from medray.jobs.finetune.data import (
    ExampleSpec,
    SplitPlan,
    count_splits,
    examples_batch,
    header_keys_batch,
    keep_split,
    parse_target,
    split_batch,
)
from medray.platform.splits import SplitFractions, assign_split, assign_splits, split_value

FR = SplitFractions(val=0.2, test=0.1)


def test_same_group_same_split_and_reproducible():
    groups = [f"patient-{i}" for i in range(500)]
    a = assign_splits(groups, seed=3, fractions=FR, salt="s")
    b = [assign_split(g, seed=3, fractions=FR, salt="s") for g in reversed(groups)][::-1]
    assert a == b  # per row: order and batching do not matter


def test_fractions_are_respected_roughly_and_seed_or_salt_change_the_split():
    groups = [f"p{i}" for i in range(4000)]
    counts = Counter(assign_splits(groups, seed=0, fractions=FR))
    assert abs(counts["val"] / 4000 - 0.2) < 0.03 and abs(counts["test"] / 4000 - 0.1) < 0.03
    other_seed = assign_splits(groups, seed=1, fractions=FR)
    other_salt = assign_splits(groups, seed=0, fractions=FR, salt="x")
    base = assign_splits(groups, seed=0, fractions=FR)
    assert other_seed != base and other_salt != base
    assert 0.0 <= split_value("p1", seed=0) < 1.0


def test_rows_of_one_patient_never_straddle_splits():
    rng = np.random.default_rng(0)
    patients = [f"P{rng.integers(0, 150):03d}" for _ in range(3000)]  # many rows per patient
    splits = assign_splits(patients, seed=7, fractions=FR)
    seen: dict[str, set] = {}
    for p, s in zip(patients, splits):
        seen.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in seen.values())
    assert {next(iter(s)) for s in seen.values()} == {"train", "val", "test"}


def test_missing_groups_fall_back_to_the_record_and_bad_fractions_fail():
    out = assign_splits([None, "", "p"], seed=0, fractions=FR, fallbacks=["r1", "r2", "r3"])
    assert len(out) == 3
    with pytest.raises(ValueError):
        assign_splits([None], seed=0, fractions=FR)
    with pytest.raises(ValueError):
        SplitFractions(val=0.6, test=0.4)
    with pytest.raises(ValueError):
        SplitFractions(val=-0.1)
    assert assign_split("p", seed=0, fractions=SplitFractions(val=0.0, test=0.0)) == "train"


def test_split_batch_by_group_column_and_by_split_column():
    table = pa.table(
        {
            "uri": [f"s3://b/{i}.dcm" for i in range(6)],
            "patient": ["a", "a", "b", "b", "c", None],
            "fold": ["train", "Validation", "TEST", "train", "dev", "train"],
        }
    )
    by_group = split_batch(table, SplitPlan("group", "patient", seed=0, fractions=FR)).column("split").to_pylist()
    assert by_group[0] == by_group[1] and by_group[2] == by_group[3]
    by_col = split_batch(table, SplitPlan("column", "fold")).column("split").to_pylist()
    assert by_col == ["train", "val", "test", "train", "val", "train"]
    assert keep_split(split_batch(table, SplitPlan("column", "fold")), "val").num_rows == 2


def test_header_pass_groups_by_the_salted_dicom_patient_key(tmp_path):
    import pyarrow.parquet as pq

    from medray.platform.decoders import decode_bytes
    from medray.platform.records import record_id
    from medray.testing.samples_train import generate_training_samples

    info = generate_training_samples(str(tmp_path), n_patients=6, images_per_patient=2, size=32)
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    datas = [(tmp_path / r["path"]).read_bytes() for r in rows]
    table = pa.table(
        {
            "uri": [r["uri"] for r in rows],
            "member": [""] * len(rows),
            "patient": [r["patient"] for r in rows],
            "record_id": [record_id(r["uri"]) for r in rows],
            "data": datas,
            "status": ["ok"] * len(rows),
        }
    )
    plan = SplitPlan("patient_key", seed=0, fractions=SplitFractions(val=0.5), salt="salt")
    out = header_keys_batch(table, "salt", plan)
    assert "data" not in out.column_names
    keys = out.column("patient_key").to_pylist()
    # the header key equals the key the full decoder computes
    assert keys[0] == decode_bytes(datas[0], name="x.dcm", salt="salt").patient_key
    by_patient: dict[str, set] = {}
    for p, k, s in zip(out.column("patient").to_pylist(), keys, out.column("split").to_pylist()):
        by_patient.setdefault(p, set()).add((k, s))
    assert len(by_patient) == info["n"] // 2 and all(len(v) == 1 for v in by_patient.values())


def test_targets_and_counts_per_task():
    binary = ExampleSpec("binary", ("lesion",), ("lesion",))
    assert parse_target([1], binary) == [1.0] and parse_target(["false"], binary) == [0.0]
    assert parse_target([None], binary) is None
    with pytest.raises(ValueError):
        parse_target([2], binary)
    multi = ExampleSpec("multiclass", ("none", "lesion"), ("finding",))
    assert parse_target(["lesion"], multi) == [1.0]
    with pytest.raises(ValueError):
        parse_target(["other"], multi)
    regr = ExampleSpec("regression", ("severity",), ("severity",))
    assert parse_target(["2.5"], regr) == [2.5] and parse_target([float("nan")], regr) is None

    table = pa.table({"uri": ["a", "b", "c", "d"], "lesion": [1, 0, 0, 1], "fold": ["train", "train", "val", "val"]})
    counts = count_splits(iter(table.to_batches()), SplitPlan("column", "fold"), binary)
    assert counts["train"]["positives"]["lesion"] == 1 and counts["val"]["negatives"]["lesion"] == 1
    bad = pa.table({"uri": ["a"], "lesion": ["maybe"], "fold": ["train"]})
    from medray.platform.errors import ConfigError

    with pytest.raises(ConfigError, match="task.labels"):
        count_splits(iter(bad.to_batches()), SplitPlan("column", "fold"), binary)


def test_examples_batch_one_row_per_frame_with_targets_and_subgroups():
    shape = [2, 3, 4, 4]  # two frames
    pixels = np.arange(np.prod(shape), dtype=np.float32)
    table = pa.table(
        {
            "record_id": ["r1", "r2"],
            "status": ["ok", "error"],
            "pixel_values": [pixels.tobytes(), None],
            "pixel_shape": [shape, None],
            "frames": [[0, 1], None],
            "modality": ["DX", None],
            "metadata": [json.dumps({"manufacturer": "ACME"}), None],
            "patient_key": ["k1", None],
            "lesion": [1, 0],
            "age": [45, 70],
            "site": ["A", "B"],
        }
    )
    spec = ExampleSpec("binary", ("lesion",), ("lesion",), subgroups=("age_band", "site", "manufacturer"))
    out = examples_batch(table, spec, SplitPlan("patient_key", seed=0, fractions=FR)).to_pylist()
    assert len(out) == 2 and [r["frame"] for r in out] == [0, 1]
    assert np.frombuffer(out[1]["x"], np.float32)[0] == pixels[48]
    assert out[0]["y"] == [1.0] and out[0]["sg_age_band"] == "40-59" and out[0]["sg_site"] == "A"
    assert out[0]["sg_manufacturer"] == "ACME" and out[0]["split"] == out[1]["split"]
    assert out[0]["patient_key"] == "k1"


def test_manifest_readers_stream_and_hash(tmp_path):
    import hashlib

    import pyarrow.csv as pacsv

    from medray.platform.manifest import iter_manifest_batches, manifest_columns, manifest_sha256

    table = pa.table({"uri": ["a", "b"], "lesion": [0, 1]})
    pacsv.write_csv(table, tmp_path / "m.csv")
    assert manifest_columns(str(tmp_path / "m.csv")) == ["uri", "lesion"]
    got = pa.Table.from_batches(list(iter_manifest_batches(str(tmp_path / "m.csv"), ["lesion"])))
    assert got.column("lesion").to_pylist() == [0, 1]
    assert manifest_sha256(str(tmp_path / "m.csv")) == hashlib.sha256((tmp_path / "m.csv").read_bytes()).hexdigest()
