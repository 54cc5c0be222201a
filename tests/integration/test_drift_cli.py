"""``medray drift`` on phantoms with a known shift: two ``medray embed`` runs, then the drift job.

The reference is one phantom corpus; the current output holds a held-out
in-distribution split (same generator, other seeds, the reference's vendors)
and a phantom vendor the reference never saw (same generator, its files
rewritten with another manufacturer and a changed display window, which the
decoder applies as it reads them). Grouped by the DICOM ``manufacturer``,
the in-distribution groups must not alarm (p > 0.05) and the new vendor must
(p < 0.01), with OOD scores separating its records from the in-distribution
ones (AUROC >= 0.9).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from medray.encoders import build_tiny_checkpoint
from medray.testing.samples_train import generate_training_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")
NEW_VENDOR = "PHANTOM-VENDOR-Z"


def _run(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        {
            "MEDRAY_HOME": str(home),
            "MEDRAY_CACHE_DIR": str(home / "cache"),
            "MEDRAY_PATIENT_SALT": "test-salt",
            "WANDB_MODE": "offline",
            "MEDRAY_PROGRESS": "0",
            "WANDB_DIR": str(home),
        }
    )
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([MEDRAY, *args], env=env, capture_output=True, text=True, timeout=300)


def _new_vendor(src: Path, dst: Path) -> int:
    """Copy the DICOMs of ``src`` into ``dst`` as a vendor the reference never saw: another name, another window."""
    n = 0
    for path in sorted(src.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.Manufacturer = NEW_VENDOR
        ds.WindowCenter, ds.WindowWidth = 1400, 1400  # the reference's files all say 2048 / 4096
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        n += 1
    return n


def test_drift_detects_a_new_vendor_and_stays_quiet_on_held_out_data(s3, tmp_path: Path) -> None:
    t0 = time.time()
    home = tmp_path / "home"
    home.mkdir()
    ckpt = build_tiny_checkpoint("hf_image", str(tmp_path / "ckpt"), arch="dinov2", image_size=32)
    generate_training_samples(tmp_path / "ref", n_patients=24, images_per_patient=3, size=32, seed=11)
    current = tmp_path / "current"
    generate_training_samples(current / "held_out", n_patients=24, images_per_patient=3, size=32, seed=12)
    generate_training_samples(tmp_path / "other", n_patients=12, images_per_patient=3, size=32, seed=13)
    assert _new_vendor(tmp_path / "other" / "dicom", current / "new_vendor") == 36
    common = ["encoder=hf_image", f"encoder.checkpoint={ckpt}", "ray.num_cpus=2", "tracking.enabled=false"]
    for name, src in (("ref", tmp_path / "ref" / "dicom"), ("cur", current)):
        res = _run(home, "embed", f"input={src}", f"output={tmp_path / 'emb' / name}", *common)
        assert res.returncode == 0, res.stderr[-3000:]
    t_embed = time.time() - t0
    res = _run(
        home,
        "drift",
        f"reference={tmp_path / 'emb' / 'ref'}",
        f"current={tmp_path / 'emb' / 'cur'}",
        "group_by=[manufacturer]",
        "permutations=1000",
        f"output=s3://{s3.bucket}/drift/vendor",  # the outputs go to object storage
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "drift:" in res.stdout and "report" in res.stdout
    out = tmp_path / "out"
    s3.filesystem().get(f"{s3.bucket}/drift/vendor/", str(out), recursive=True)
    assert {p.name for p in out.iterdir()} >= {"drift.json", "ood.parquet", "reference.npz", "report"}
    doc = json.loads((out / "drift.json").read_text())
    groups = {g["group"]["manufacturer"]: g for g in doc["groups"]}
    assert set(groups) == {"PHANTOM-VENDOR-A", "PHANTOM-VENDOR-B", "PHANTOM-VENDOR-C", NEW_VENDOR}
    figures = {name: (g["p_value"], g["statistic"], g["reference"]) for name, g in groups.items()}
    for name in ("PHANTOM-VENDOR-A", "PHANTOM-VENDOR-B", "PHANTOM-VENDOR-C"):
        assert groups[name]["reference"] == "matched", figures
        assert groups[name]["p_value"] > 0.05 and groups[name]["alarm"] is False, figures
    assert groups[NEW_VENDOR]["reference"] == "all", figures  # never seen: compared to the whole reference
    assert groups[NEW_VENDOR]["p_value"] < 0.01 and groups[NEW_VENDOR]["alarm"] is True, figures
    # per record: the new vendor's OOD scores stand apart from the held-out in-distribution records
    scores = pq.read_table(out / "ood.parquet").to_pydict()
    shifted = np.asarray([m == NEW_VENDOR for m in scores["manufacturer"]])
    auroc = roc_auc_score(shifted, np.asarray(scores["ood_score"]))
    alarm_rate_new = float(np.mean(np.asarray(scores["ood_alarm"])[shifted]))
    alarm_rate_held = float(np.mean(np.asarray(scores["ood_alarm"])[~shifted]))
    print(
        f"drift figures: {figures}; OOD AUROC {auroc:.3f}, alarms new vendor {alarm_rate_new:.2f} "
        f"held out {alarm_rate_held:.2f}; embed {t_embed:.1f}s, total {time.time() - t0:.1f}s"
    )
    assert auroc >= 0.9
    assert alarm_rate_new > alarm_rate_held
    html = (out / "report" / "index.html").read_text()
    assert "Out-of-distribution scores" in html and NEW_VENDOR in html
