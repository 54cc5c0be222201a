"""DICOMweb in: ``medray embed input=dicomweb+http://...`` against a real PACS (Orthanc + its DICOMweb plugin).

Orthanc runs on a free loopback port with authentication on, loaded with
generated studies and pydicom's bundled images; the job authenticates from
the environment. Embeddings from DICOMweb must equal those of the same files
read from disk (<= 1e-5), per SOP Instance UID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medray.encoders import build_tiny_checkpoint
from medray.testing.orthanc import OrthancServer
from medray.testing.samples import ct_phantom, ct_series, generate_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb")
    generate_samples(str(root / "samples"))
    files = sorted((root / "samples" / "dicom").rglob("*.dcm"))[:24]
    files += [Path(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")]
    series = root / "series"  # one CT series (8 slices), for series.mode parity
    series.mkdir()
    for k, data in enumerate(ct_series(ct_phantom(8, 32, seed=5), seed=5, series="web", patient_id="PHIID-WEB-1")):
        (series / f"{k:02d}.dcm").write_bytes(data)
        files.append(series / f"{k:02d}.dcm")
    local = root / "local"  # the same files on disk, named by SOP Instance UID
    local.mkdir()
    sops = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sops[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
        shutil.copy(f, local / f"{ds.SOPInstanceUID}.dcm")
    ckpt = build_tiny_checkpoint("hf_image", str(root / "ckpt"), arch="vit", image_size=32)
    with OrthancServer() as server:
        server.upload(files)
        yield {"server": server, "root": root, "local": local, "sops": sops, "ckpt": ckpt, "series": series}


def _run(pacs, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(
        os.environ,
        MEDRAY_HOME=str(pacs["root"] / "home"),
        MEDRAY_PATIENT_SALT="s",
        MEDRAY_PROGRESS="0",
        **(pacs["server"].env() if env is None else env),
    )
    common = [
        "encoder=hf_image",
        f"encoder.checkpoint={pacs['ckpt']}",
        "tracking.enabled=false",
        "ray.num_cpus=2",
        "decode.allow_burned_in=true",  # compare every image with its file, secondary captures included
    ]
    return subprocess.run([MEDRAY, "embed", *args, *common], env=full, capture_output=True, text=True, timeout=900)


def _emb(out: Path) -> pa.Table:
    return pq.read_table(out / "embeddings")


@pytest.fixture(scope="module")
def web_run(pacs):
    out = pacs["root"] / "out-web"
    proc = _run(pacs, f"input={pacs['server'].dicomweb_uri}", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "proc": proc}


def test_dicomweb_embeddings_equal_the_same_files_from_disk(pacs, web_run):
    out_disk = pacs["root"] / "out-disk"
    disk = _run(pacs, f"input={pacs['local']}", f"output={out_disk}")
    assert disk.returncode == 0, disk.stderr[-3000:]
    web = _emb(web_run["out"]).to_pylist()
    local = _emb(out_disk).to_pylist()
    by_sop_web = {(r["uri"].rsplit("/instances/", 1)[1], r["frame"]): r["embedding"] for r in web}
    by_sop_disk = {(r["uri"].rsplit("/", 1)[1][: -len(".dcm")], r["frame"]): r["embedding"] for r in local}
    assert set(by_sop_web) == set(by_sop_disk) and {s for s, _ in by_sop_web} == set(pacs["sops"])
    worst = max(float(np.abs(np.asarray(by_sop_web[k]) - np.asarray(by_sop_disk[k])).max()) for k in by_sop_web)
    assert worst <= 1e-5, worst
    uri = web[0]["uri"]
    assert uri.startswith("dicomweb+http://127.0.0.1:") and "/studies/" in uri and "/instances/" in uri
    text = web_run["proc"].stdout + web_run["proc"].stderr
    assert pacs["server"].password not in text  # credentials never reach logs
    for p in web_run["out"].rglob("*"):
        if p.is_file():
            assert pacs["server"].password.encode() not in p.read_bytes(), p


def test_a_rerun_resumes_by_sop_instance_uid(pacs, web_run):
    again = _run(pacs, f"input={pacs['server'].dicomweb_uri}", f"output={web_run['out']}")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((web_run["out"] / "summary.json").read_text())
    assert summary["records_read"] == 0 and "ray_init" not in summary["driver_seconds"]


def test_a_study_uri_and_a_qido_filter_narrow_the_input(pacs, tmp_path):
    study = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True).StudyInstanceUID
    one = _run(pacs, f"input={pacs['server'].dicomweb_uri}/studies/{study}", f"output={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert {r["uri"].split("/studies/")[1].split("/")[0] for r in _emb(tmp_path / "one").to_pylist()} == {study}
    mr = _run(
        pacs,
        f"input={pacs['server'].dicomweb_uri}",
        f"output={tmp_path / 'mr'}",
        "+dicomweb.query.ModalitiesInStudy=MR",
    )
    assert mr.returncode == 0, mr.stderr[-3000:]
    studies = {r["uri"].split("/studies/")[1].split("/")[0] for r in _emb(tmp_path / "mr").to_pylist()}
    expected = {s for sop, s in pacs["sops"].items() if "MR" in _modalities(pacs, s)}
    assert studies == expected and study not in studies


def _modalities(pacs, study: str) -> set[str]:
    found = set()
    for f in pacs["local"].iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if str(ds.StudyInstanceUID) == study:
            found.add(str(ds.Modality))
    return found


def test_wrong_credentials_name_what_to_set_and_leak_nothing(pacs, tmp_path):
    env = {"MEDRAY_DICOMWEB_USER": "medray", "MEDRAY_DICOMWEB_PASSWORD": "not-the-password"}
    proc = _run(pacs, f"input={pacs['server'].dicomweb_uri}", f"output={tmp_path / 'x'}", env=env)
    assert proc.returncode == 2 and "config key 'input'" in proc.stderr and "MEDRAY_DICOMWEB_USER" in proc.stderr
    assert "Traceback" not in proc.stderr and "not-the-password" not in proc.stderr + proc.stdout


def test_a_ct_series_from_dicomweb_groups_as_the_same_files_from_disk(pacs, tmp_path):
    first = pydicom.dcmread(next(pacs["series"].iterdir()), stop_before_pixels=True)
    where = f"/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    runs = {}
    for name, source in (("web", pacs["server"].dicomweb_uri + where), ("disk", str(pacs["series"]))):
        proc = _run(pacs, f"input={source}", f"output={tmp_path / name}", "series.mode=slicewise")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = {(r["series_key"], r["frame"]): r for r in _emb(tmp_path / name).to_pylist()}
    web, disk = runs["web"], runs["disk"]
    assert set(web) == set(disk) and sorted(f for _, f in web) == [-1, *range(8)]  # 8 slices + the pooled row
    worst = max(float(np.abs(np.asarray(web[k]["embedding"]) - np.asarray(disk[k]["embedding"])).max()) for k in web)
    assert worst <= 1e-5, worst
    for k in web:
        assert (web[k]["segment"], web[k]["metadata"], web[k]["record_id"]) == (
            disk[k]["segment"],
            disk[k]["metadata"],
            disk[k]["record_id"],
        )
    assert web[next(iter(web))]["uri"].startswith("dicomweb+http://")
