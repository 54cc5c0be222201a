"""The synthetic sample generator writes what it says it writes."""

from __future__ import annotations

import csv
import hashlib
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.errors import InvalidDicomError

from medray.testing.samples import (
    MANIFEST_COLUMNS,
    generate_samples,
    read_manifest,
    write_manifest,
)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("samples")
    t0 = time.perf_counter()
    result = generate_samples(out, n=24, seed=0)
    result["_seconds"] = time.perf_counter() - t0
    return result


def _root(samples: dict[str, Any]) -> Path:
    return Path(samples["out_dir"])


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "samples.json"  # holds out_dir
    }


def test_is_fast(samples: dict[str, Any]) -> None:
    assert samples["_seconds"] < 6.0  # ~1 s on 2 shared cores


def test_dicoms_are_valid_part10_and_decode(samples: dict[str, Any]) -> None:
    root = _root(samples)
    assert len(samples["dicom"]) == samples["expected"]["dicom_files"] == 24
    manifest = {r["path"]: r for r in read_manifest(root)}
    total_frames = 0
    for rel in samples["dicom"]:
        raw = (root / rel).read_bytes()
        assert raw[128:132] == b"DICM", rel
        ds = pydicom.dcmread(root / rel)  # no force=True: must be a real Part-10 file
        meta = ds.file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert meta.TransferSyntaxUID == samples["transfer_syntax"][rel]
        frames = int(ds.get("NumberOfFrames", 1))
        assert frames == samples["frames"][rel] == manifest[rel]["frames"]
        arr = ds.pixel_array
        expected_shape = (ds.Rows, ds.Columns) if frames == 1 else (frames, ds.Rows, ds.Columns)
        assert arr.shape == expected_shape
        assert 64 <= ds.Rows <= 128 and 64 <= ds.Columns <= 128
        assert (ds.Rows, ds.Columns) == (manifest[rel]["rows"], manifest[rel]["columns"])
        assert ds.PatientSex in ("M", "F") and ds.PatientAge.endswith("Y")
        if ds.Modality == "CT":
            assert ds.PixelRepresentation == 1 and arr.dtype.kind == "i"
            assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
            assert "WindowCenter" not in ds
            assert arr.min() < 0  # outside-FOV padding exercises signed handling
        else:
            assert ds.Modality in ("DX", "CR")
            assert ds.BitsStored == 12 and arr.max() <= 4095
            assert ds.ViewPosition in ("PA", "AP") and ds.BodyPartExamined == "CHEST"
            assert "WindowCenter" in ds and "WindowWidth" in ds and "PixelSpacing" in ds
        total_frames += frames
    assert total_frames == samples["expected"]["dicom_frames"]


def test_variants_are_covered(samples: dict[str, Any]) -> None:
    root = _root(samples)
    uids = set(samples["transfer_syntax"].values())
    expected = {
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.ExplicitVRBigEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.RLELossless,
    }
    assert expected <= uids
    assert len(samples["compressed"]) >= 2
    if not samples["skipped"]:
        assert {pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEGLSLossless} <= uids
    assert len(samples["multiframe"]) == 1
    assert samples["frames"][samples["multiframe"][0]] == 3
    photometrics = {pydicom.dcmread(root / p).PhotometricInterpretation for p in samples["dicom"]}
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    modalities = {pydicom.dcmread(root / p).Modality for p in samples["dicom"]}
    assert modalities == {"DX", "CR", "CT"}


def test_labels_patients_and_lesions(samples: dict[str, Any]) -> None:
    labels = [samples["labels"][p] for p in samples["dicom"]]
    assert sum(labels) == len(labels) // 2 == samples["expected"]["positives"]
    assert set(samples["lesions"]) == {p for p in samples["dicom"] if samples["labels"][p] == 1}
    patients = samples["patients"]
    assert len(patients) == samples["expected"]["patients"] == 6
    assert all(len(p["dicom"]) >= 2 for p in patients.values())
    assert {p["split"] for p in patients.values()} == {"train", "val", "test"}
    # a lesion is a local bright spot: the centre beats its mirror across the midline
    root = _root(samples)
    for rel, les in samples["lesions"].items():
        ds = pydicom.dcmread(root / rel)
        if ds.Modality == "CT" or "NumberOfFrames" in ds:
            continue
        img = ds.pixel_array.astype(float)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            img = 4095 - img
        r, c = round(les["row"]), round(les["col"])
        mirror = img[r - 1 : r + 2, img.shape[1] - 1 - c - 1 : img.shape[1] - 1 - c + 2].mean()
        assert img[r - 1 : r + 2, c - 1 : c + 2].mean() > mirror + 200, rel


def test_manifest_matches_and_has_no_phi(samples: dict[str, Any]) -> None:
    root = _root(samples)
    rows = read_manifest(root)
    assert len(rows) == samples["expected"]["manifest_rows"] == 24 + 2
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    with open(root / "manifest.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["path"] for r in csv_rows] == [r["path"] for r in rows]
    assert {r["path"] for r in rows} == set(samples["dicom"]) | set(samples["photos"])
    for r in rows:
        assert r["uri"] == r["path"]
        assert r["label"] == samples["labels"][r["path"]]
        assert r["sha256"] == hashlib.sha256((root / r["path"]).read_bytes()).hexdigest()
    text = (root / "manifest.csv").read_text()
    text += (root / "manifest.parquet").read_bytes().decode("latin-1")
    for s in samples["phi"]["sentinels"] + [samples["phi"]["birth_date"]]:
        assert s not in text
    assert "PHI" not in text


def test_write_manifest_rewrites_uris(tmp_path: Path) -> None:
    generate_samples(tmp_path, n=4, hostile=False)
    write_manifest(tmp_path, "s3://bucket/some/prefix/")
    rows = read_manifest(tmp_path)
    assert all(r["uri"] == f"s3://bucket/some/prefix/{r['path']}" for r in rows)
    with open(tmp_path / "manifest.csv", newline="") as f:
        assert next(csv.DictReader(f))["uri"].startswith("s3://bucket/some/prefix/dicom/")
    write_manifest(tmp_path, None)
    assert all(r["uri"] == r["path"] for r in read_manifest(tmp_path))


def test_photos(samples: dict[str, Any]) -> None:
    root = _root(samples)
    png, jpg = (root / p for p in samples["photos"])
    assert Image.open(png).format == "PNG" and Image.open(png).mode == "RGB"
    im = Image.open(jpg)
    assert im.format == "JPEG" and im.getexif()[0x0112] == 6
    assert im.size == (96, 64)  # stored
    upright = ImageOps.exif_transpose(im)
    assert upright.size == (64, 96)  # displayed: 64 wide, 96 tall
    corner = np.asarray(upright)[:8, :8].reshape(-1, 3).mean(axis=0)
    assert corner[0] > 200 and corner[1] < 60 and corner[2] < 60  # red marker top-left


def test_hostile_files(samples: dict[str, Any]) -> None:
    root = _root(samples)
    h = {k: root / v for k, v in samples["hostile"].items()}
    assert set(h) == {"not_dicom", "truncated", "bomb", "empty"}
    assert samples["expected"]["hostile_files"] == 4
    assert h["empty"].stat().st_size == 0
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(h["not_dicom"])
    good = root / samples["archives"]["archive.zip"]["sources"][samples["archives"]["archive.zip"]["dicom_members"][0]]
    trunc = h["truncated"].read_bytes()
    assert trunc[128:132] == b"DICM" and len(trunc) == good.stat().st_size // 2
    bomb = pydicom.dcmread(h["bomb"])
    assert (bomb.Rows, bomb.Columns, int(bomb.NumberOfFrames)) == (65535, 65535, 10000)
    assert bomb.SamplesPerPixel == 1 and bomb.BitsAllocated == 16
    assert len(bomb.PixelData) < 64
    assert h["bomb"].stat().st_size < 4096


def test_archives(samples: dict[str, Any]) -> None:
    root = _root(samples)
    for name, info in samples["archives"].items():
        assert len(info["dicom_members"]) == 3 == samples["expected"]["archive_dicom_members"][name]
        assert all("/" in m for m in info["dicom_members"])  # in subfolders
        assert info["hostile_members"] == ["../../etc/x"]
        if name.endswith(".zip"):
            with zipfile.ZipFile(root / name) as zf:
                names = zf.namelist()
                data = {m: zf.read(m) for m in info["dicom_members"]}
        else:
            with tarfile.open(root / name) as tf:
                names = tf.getnames()
                data = {
                    m: tf.extractfile(m).read()  # type: ignore[union-attr]
                    for m in info["dicom_members"]
                }
        assert "../../etc/x" in names
        for member, payload in data.items():
            assert payload == (root / info["sources"][member]).read_bytes()
            assert info["labels"][member] == samples["labels"][info["sources"][member]]


def test_phi_sentinels_are_planted(samples: dict[str, Any]) -> None:
    root = _root(samples)
    phi = samples["phi"]
    assert phi["enabled"] and phi["sentinels"]
    assert all("PHI" in s for s in phi["sentinels"])
    for key, pinfo in samples["patients"].items():
        values = phi["by_patient"][key]
        for rel in pinfo["dicom"]:
            ds = pydicom.dcmread(root / rel)
            assert str(ds.PatientName) == values["PatientName"] == f"PHI^SENTINEL^{key[1:]}"
            assert ds.PatientID == values["PatientID"]
            assert ds.PatientBirthDate == "19700101"
            assert ds.InstitutionName == values["InstitutionName"]
            assert ds.AccessionNumber == values["AccessionNumber"]
            assert str(ds.ReferringPhysicianName) == values["ReferringPhysicianName"]
            assert ds.OtherPatientIDsSequence[0].PatientID == values["OtherPatientID"]
            block = ds.private_block(0x0009, phi["private_creator"])
            value = block[0x01].value  # VR UN (bytes) in the implicit-VR file
            if isinstance(value, bytes):
                value = value.decode().rstrip(" \x00")
            assert value == values["Private"]
            raw = (root / rel).read_bytes()
            if rel not in phi["raw_grep_unreliable"]:
                assert values["PatientName"].encode() in raw
    assert phi["raw_grep_unreliable"]  # the deflated file
    jpg = Image.open(root / samples["photos"][1]).getexif()
    assert jpg[0x013B] in phi["sentinels"]
    png = Image.open(root / samples["photos"][0])
    assert png.text["Comment"] in phi["sentinels"]


def test_without_phi_and_hostile(tmp_path: Path) -> None:
    r = generate_samples(tmp_path, n=8, hostile=False, phi=False)
    assert r["hostile"] == {} and not (tmp_path / "hostile").exists()
    assert r["phi"]["sentinels"] == []
    for rel in r["dicom"]:
        ds = pydicom.dcmread(tmp_path / rel)
        assert "PHI" not in str(ds) and "InstitutionName" not in ds
    assert b"PHI" not in (tmp_path / r["photos"][1]).read_bytes()
    with zipfile.ZipFile(tmp_path / "archive.zip") as zf:
        assert not any(".." in n for n in zf.namelist())
    with tarfile.open(tmp_path / "archive.tar.gz") as tf:
        assert not any(".." in n for n in tf.getnames())


def test_small_n(tmp_path: Path) -> None:
    r = generate_samples(tmp_path, n=1)
    assert len(r["dicom"]) == 1 and r["expected"]["patients"] == 1
    with pytest.raises(ValueError):
        generate_samples(tmp_path, n=0)


def test_deterministic_by_seed(samples: dict[str, Any], tmp_path: Path) -> None:
    again = generate_samples(tmp_path / "a", n=24, seed=0)
    assert _tree_digest(tmp_path / "a") == _tree_digest(_root(samples))
    assert {k: v for k, v in again.items() if k != "out_dir"} == {
        k: v for k, v in samples.items() if k not in ("out_dir", "_seconds")
    }
    generate_samples(tmp_path / "b", n=24, seed=1)
    other = _tree_digest(tmp_path / "b")
    same = _tree_digest(tmp_path / "a")
    assert other.keys() == same.keys()
    assert sum(other[k] != same[k] for k in same) > len(same) // 2
