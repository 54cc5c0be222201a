"""``medray embed ... watch=true`` follows a real PACS (Orthanc + DICOMweb): each new instance embedded once.

One Orthanc for the module. The watch runs as a subprocess through the CLI:
instances uploaded while it runs are embedded in its next rounds; SIGTERM
ends it after the current round; instances uploaded while it is stopped are
picked up by the next start from the cursor it left in the output
(``_watch.json``), with nothing embedded twice and nothing missed. The
feeds themselves (Orthanc's change log, QIDO-RS by StudyDate) are checked
in-process against the same server.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medray.encoders import build_tiny_checkpoint
from medray.platform.dicomweb import OrthancChanges, QidoSince, open_feed
from medray.testing.orthanc import OrthancServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb-watch")
    ckpt = build_tiny_checkpoint("hf_image", str(root / "ckpt"), arch="vit", image_size=32)
    with OrthancServer() as server:
        yield {"server": server, "root": root, "ckpt": ckpt}


def _upload(pacs, n: int, *, study_date: str | None = None) -> set[str]:
    """``n`` new CT instances (pydicom's CT_small with fresh UIDs, one new study); their SOP Instance UIDs."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    folder = pacs["root"] / "up" / study
    folder.mkdir(parents=True)
    sops = set()
    for k in range(n):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        if study_date:
            ds.StudyDate = study_date
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        sops.add(str(ds.SOPInstanceUID))
    pacs["server"].upload(sorted(folder.iterdir()))
    return sops


def _cmd(pacs, out: Path, *extra: str) -> tuple[list[str], dict]:
    env = dict(
        os.environ,
        MEDRAY_HOME=str(pacs["root"] / "home"),
        MEDRAY_PATIENT_SALT="s",
        MEDRAY_PROGRESS="0",
        **pacs["server"].env(),
    )
    args = [
        MEDRAY,
        "embed",
        f"input={pacs['server'].dicomweb_uri}",
        f"output={out}",
        "watch=true",
        "dicomweb.interval_s=1",
        "encoder=hf_image",
        f"encoder.checkpoint={pacs['ckpt']}",
        "tracking.enabled=false",
        "ray.num_cpus=2",
        "decode.allow_burned_in=true",
        *extra,
    ]
    return args, env


def _embedded(out: Path) -> list[str]:
    """SOP Instance UIDs of the output's embedding rows (one per row: duplicates show)."""
    if not (out / "embeddings").exists():
        return []
    rows = pq.read_table(out / "embeddings", columns=["uri"]).column("uri").to_pylist()
    return [u.rsplit("/instances/", 1)[1] for u in rows]


def _wait(what, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"watch exited early ({proc.returncode})")
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_watch_embeds_new_instances_once_and_resumes_from_its_cursor(pacs):
    # Two job starts and two embedding rounds (the suite's budget): the first round lists the
    # (empty) server without starting Ray; instances uploaded while the watch runs are the second.
    out = pacs["root"] / "out"
    args, env = _cmd(pacs, out)
    log = open(pacs["root"] / "watch1.log", "w+")  # noqa: SIM115 - read back below
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        # round 1 lists the server; the cursor appears once that round is over
        _wait(lambda: (out / "_watch.json").exists(), 120, proc)
        assert not _embedded(out) and not (out / "runs").exists()  # an idle round runs no job
        first = _upload(pacs, 3)
        _wait(lambda: first <= set(_embedded(out)), 180, proc)
        proc.send_signal(signal.SIGTERM)  # ends after the current round
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    text = log.read()
    assert "watch ended" in text and "signal" in text, text[-3000:]
    assert pacs["server"].password not in text and next(iter(first)) not in text  # no UIDs in logs
    # rounds with nothing new ran no job: one run record per round that embedded something
    assert len(list((out / "runs").glob("*.json"))) == len(re.findall(r"^round \d+: ", text, re.M)) == 1
    cursor = json.loads((out / "_watch.json").read_text())
    assert cursor["feed"] == "changes" and cursor["cursor"] > 0 and pacs["server"].password not in json.dumps(cursor)

    # stopped: more arrive; the next start resumes from the cursor, no duplicates, nothing missed
    second = _upload(pacs, 2)
    args, env = _cmd(pacs, out, "dicomweb.idle_exit_s=2")
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "idle_exit_s" in again.stdout
    done = _embedded(out)
    assert len(done) == len(set(done)) and set(done) == first | second
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_read"] == 2 and summary["records_done_before"] == 3


def test_the_feeds_find_what_is_new(pacs, monkeypatch):
    for k, v in pacs["server"].env().items():
        monkeypatch.setenv(k, v)
    uri = pacs["server"].dicomweb_uri
    changes = open_feed(uri)
    assert isinstance(changes, OrthancChanges)
    head = changes.head()
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    fresh = _upload(pacs, 2, study_date=today)
    old = _upload(pacs, 1, study_date="20040119")
    found = changes.poll(head)
    assert {r["uri"].rsplit("/", 1)[1] for r in found.rows} == fresh | old and found.cursor > head
    assert not changes.poll(found.cursor).rows
    # a study URI narrows the change log too
    study = found.rows[0]["uri"].split("/studies/")[1].split("/")[0]
    narrow = open_feed(f"{uri}/studies/{study}").poll(head)
    assert {r["uri"] for r in narrow.rows} == {r["uri"] for r in found.rows if f"/studies/{study}/" in r["uri"]}
    # series mode: a series is taken whole once Orthanc calls it stable (StableAge=1 s here)
    stable = open_feed(uri, stable_series=True)
    deadline, got = time.monotonic() + 30, set()
    while time.monotonic() < deadline and got != fresh | old:
        got = {r["uri"].rsplit("/", 1)[1] for r in stable.poll(head).rows}
        time.sleep(0.5)
    assert got == fresh | old
    # QIDO by StudyDate: only studies dated from the cursor on
    qido = open_feed(uri, "qido")
    assert isinstance(qido, QidoSince)
    since = qido.poll(qido.head())
    assert {r["uri"].rsplit("/", 1)[1] for r in since.rows} == fresh and since.cursor == qido.head()
