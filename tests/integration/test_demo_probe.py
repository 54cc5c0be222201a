"""The README's path: ``medray demo``, then ``medray probe`` on its output, then ``medray evaluate``
of the exported head, through the CLI on a local Ray (the demo's embed), as a new user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")


def _run(home: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEDRAY_HOME=str(home), MEDRAY_PATIENT_SALT="demo-salt", MEDRAY_PROGRESS="0")
    env["WANDB_MODE"] = "offline"
    return subprocess.run([MEDRAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_then_probe_then_evaluate(tmp_path):
    home = tmp_path / "home"
    demo = _run(home, "demo", "ray.num_cpus=2", "tracking.enabled=false")
    assert demo.returncode == 0, demo.stderr[-4000:]
    labels = home / "demo" / "labels.csv"
    emb = home / "demo" / "embeddings"
    assert labels.exists() and (emb / "_medray.json").exists()

    probe = _run(
        home,
        "probe",
        f"embeddings={emb}",
        f"labels={labels}",
        "task=multilabel",
        "task.labels=[lesion,effusion]",
        "subgroups=[site,sex]",
        "repeats=3",
        "bootstrap=200",
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    doc = json.loads((emb / "probe" / "probe.json").read_text())
    # 48 labelled patients (by their salted DICOM PatientID), 3 images each, all embedded
    assert doc["counts"] == {
        "records": 144,
        "patients": 48,
        "manifest_rows_not_embedded": 0,
        "records_without_patient": 0,
    }
    assert doc["sizes"][0] == 8 and doc["sizes"][-1] == doc["train_pool"]
    for head in ("logreg", "mlp"):
        curve = doc["curves"][head]
        assert len(curve["auroc_mean"]) == len(doc["sizes"]) and all(len(r) == 3 for r in curve["runs"])
    head_uri = doc["export"]["uri"]
    page = (emb / "probe" / "report" / "index.html").read_text()
    assert "<svg" in page and "http://" not in page and "https://" not in page  # self-contained
    assert (emb / "report" / "index.html").exists()  # the demo's own embed report

    evaluation = _run(
        home,
        "evaluate",
        f"model={head_uri}",
        f"data.test={labels}",
        f"data.embeddings={emb}",
        "eval.aggregate=patient",
        "eval.subgroups=[site]",
        "eval.bootstrap=200",
        f"output={tmp_path / 'eval'}",
    )
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    assert "evaluate: 48 patients of 48 patients" in evaluation.stdout
    ev = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert "<svg" in (tmp_path / "eval" / "report" / "index.html").read_text()
    assert ev["aggregate"] == "patient" and set(ev["metrics"]) == {"lesion", "effusion"}
    assert set(ev["subgroups"]["site"]) == {"site-A", "site-B", "site-C"}
    for label in ("lesion", "effusion"):
        auroc = ev["metrics"][label]["auroc"]
        assert auroc["lo"] <= auroc["value"] <= auroc["hi"]
    # without data.embeddings, the manifest is embedded with the head's encoder: the same probabilities
    subset = tmp_path / "subset.csv"
    subset.write_text("".join(labels.read_text().splitlines(keepends=True)[:16]))  # header + 5 patients
    fresh = _run(
        home, "evaluate", f"model={head_uri}", f"data.test={subset}", "eval.bootstrap=0", f"output={tmp_path / 'eval2'}"
    )
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    import pyarrow.parquet as pq

    again = _run(
        home,
        "evaluate",
        f"model={head_uri}",
        f"data.test={subset}",
        f"data.embeddings={emb}",
        "eval.bootstrap=0",
        f"output={tmp_path / 'eval3'}",
    )
    assert again.returncode == 0, again.stderr[-4000:]
    a = {r["uri"]: r for r in pq.read_table(tmp_path / "eval2" / "predictions").to_pylist()}
    b = {r["uri"]: r for r in pq.read_table(tmp_path / "eval3" / "predictions").to_pylist()}
    assert len(a) == 15 and set(a) == set(b)
    for uri, row in a.items():
        assert abs(row["p_lesion"] - b[uri]["p_lesion"]) <= 1e-5, uri
    # embeddings of another encoder are refused, naming the key
    other = tmp_path / "other"
    other.mkdir()
    marker = json.loads((emb / "_medray.json").read_text())
    (other / "_medray.json").write_text(json.dumps({**marker, "weights_hash": "0" * 64}))
    os.symlink(emb / "embeddings", other / "embeddings")
    bad = _run(home, "evaluate", f"model={head_uri}", f"data.test={labels}", f"data.embeddings={other}")
    assert bad.returncode == 2 and "data.embeddings" in bad.stderr and "Traceback" not in bad.stderr
