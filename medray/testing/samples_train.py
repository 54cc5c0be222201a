"""A learnable, labelled imaging corpus for fine-tuning tests, demos and benchmarks.

:func:`generate_training_samples` writes small chest-radiograph-like DICOM
phantoms (uncompressed, MONOCHROME2, 12-bit) for ``n_patients`` patients with
``images_per_patient`` images each, plus a manifest. Two findings are drawn
independently per image, so the same corpus serves binary, multi-label and
multi-class tasks:

* ``lesion``: a bright Gaussian blob inside one lung;
* ``effusion``: a bright fluid level at the base of one lung.

Manifest columns (``manifest.parquet`` / ``manifest.csv``): ``uri``, ``path``,
``patient`` (pseudonymous ``P000``), ``lesion``, ``effusion`` (0/1),
``finding`` (``none`` | ``lesion`` | ``effusion`` | ``both``), ``severity``
(a float for regression: lesion sigma in pixels, 0 without a lesion),
``sex``, ``age``, ``site``. Every image of a patient carries the same
``PatientID``, so the salted ``patient_key`` groups them.

Example::

    from medray.testing.samples_train import generate_training_samples
    info = generate_training_samples("/tmp/train", n_patients=48)
    write_training_manifest("/tmp/train", "s3://bucket/train")  # rewrite uri before uploading
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medray.testing import samples as _samples

__all__ = ["TRAIN_MANIFEST_COLUMNS", "generate_training_samples", "write_training_manifest"]

#: Columns of the training manifest, in order.
TRAIN_MANIFEST_COLUMNS: tuple[str, ...] = (
    "uri",
    "path",
    "patient",
    "lesion",
    "effusion",
    "finding",
    "severity",
    "sex",
    "age",
    "site",
)
_SITES = ("site-A", "site-B", "site-C")
_INT_COLS = {"lesion", "effusion", "age"}


def _chest(
    rng: np.random.Generator,
    size: int,
    lesion: tuple[float, float, float] | None,
    effusion: tuple[float, float] | None,
    gain: float,
) -> np.ndarray:
    """A chest-radiograph-like image, 12-bit MONOCHROME2 values."""
    y, x = _samples._grid(size, size)
    body = _samples._ellipse(y, x, 0.05, 0.0, 0.92, 0.85)
    left = _samples._ellipse(y, x, -0.05, -0.38, 0.55, 0.28)
    right = _samples._ellipse(y, x, -0.05, 0.38, 0.55, 0.28)
    img = np.full((size, size), 0.08) + 0.45 * body - 0.30 * left - 0.30 * right
    img += 0.25 * (np.abs(x) < 0.1) * body
    if lesion is not None:
        img += 0.7 * _samples._gauss(y, x, *lesion)
    if effusion is not None:
        side, level = effusion
        lung = right if side > 0 else left
        img += 0.55 * (lung & (y > level))
    img = img * gain + rng.normal(0.0, 0.02, img.shape)
    return np.clip(np.round(img * 3600 + 200), 0, 4095).astype(np.uint16)


def generate_training_samples(
    out_dir: str | os.PathLike[str],
    *,
    n_patients: int = 64,
    images_per_patient: int = 4,
    size: int = 64,
    seed: int = 0,
    prevalence: float = 0.5,
) -> dict[str, Any]:
    """Write a learnable labelled DICOM corpus and its manifest into ``out_dir``.

    Args:
        out_dir: local directory (created if missing).
        n_patients: number of patients.
        images_per_patient: images per patient (all share one PatientID).
        size: image side in pixels.
        seed: everything is a function of the seed.
        prevalence: probability of each finding per image.

    Returns:
        A JSON-serialisable dict (also ``samples.json``): ``out_dir``, ``n``,
        ``manifest`` (file names), ``patients`` (key -> sex/age/site),
        ``positives`` (finding -> count).
    """
    if n_patients < 1 or images_per_patient < 1:
        raise ValueError("n_patients and images_per_patient must be >= 1")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    from pydicom import uid as U

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    patients: dict[str, dict[str, Any]] = {}
    for k in range(n_patients):
        key = f"P{k:03d}"
        site = _SITES[k % len(_SITES)]
        p = {
            "key": key,
            "site": site,
            "sex": "M" if rng.random() < 0.5 else "F",
            "age": int(rng.integers(20, 90)),
            "phi_values": {"PatientName": f"ANON^{key}", "PatientID": f"TRAIN-{key}"},
        }
        patients[key] = {c: p[c] for c in ("site", "sex", "age")}
        gain = {"site-A": 1.0, "site-B": 0.93, "site-C": 1.05}[site]
        for j in range(images_per_patient):
            i = k * images_per_patient + j
            has_lesion = bool(rng.random() < prevalence)
            has_effusion = bool(rng.random() < prevalence)
            lesion = None
            if has_lesion:
                cy, cx, _ = _samples._lesion_site(rng)
                lesion = (cy, cx, float(rng.uniform(0.12, 0.18)))
            effusion = None
            if has_effusion:
                effusion = (-1.0 if rng.random() < 0.5 else 1.0, float(rng.uniform(0.05, 0.25)))
            arr = _chest(rng, size, lesion, effusion, gain * float(rng.uniform(0.95, 1.05)))
            ds = _samples._base_dataset(
                seed=seed,
                patient=p,
                sop_class=U.DigitalXRayImageStorageForPresentation,
                sop_uid=_samples._uid(seed, "train-sop", i),
                modality="DX",
                series_no=1,
                instance_no=j + 1,
            )
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.ViewPosition = "PA"
            ds.BodyPartExamined = "CHEST"
            ds.PixelSpacing = [0.4, 0.4]
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
            _samples._set_pixels(ds, arr, signed=False, bits_stored=12, photometric="MONOCHROME2")
            rel = f"dicom/{key}/{i:05d}_dx.dcm"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out / rel, implicit_vr=False, little_endian=True, enforce_file_format=True)
            finding = {
                (False, False): "none",
                (True, False): "lesion",
                (False, True): "effusion",
                (True, True): "both",
            }[(has_lesion, has_effusion)]
            severity = 0.0 if lesion is None else round(lesion[2] / 2 * (size - 1), 3)
            rows.append(
                {
                    "uri": rel,
                    "path": rel,
                    "patient": key,
                    "lesion": int(has_lesion),
                    "effusion": int(has_effusion),
                    "finding": finding,
                    "severity": severity,
                    "sex": p["sex"],
                    "age": p["age"],
                    "site": site,
                }
            )
    manifest = _write_train_rows(out, rows)
    result = {
        "out_dir": str(out),
        "seed": seed,
        "n": len(rows),
        "size": size,
        "manifest": manifest,
        "patients": patients,
        "positives": {"lesion": sum(r["lesion"] for r in rows), "effusion": sum(r["effusion"] for r in rows)},
        "sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
    }
    (out / "samples.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def _write_train_rows(out: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(TRAIN_MANIFEST_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in TRAIN_MANIFEST_COLUMNS})
    types = {
        c: pa.int64() if c in _INT_COLS else (pa.float64() if c == "severity" else pa.string())
        for c in TRAIN_MANIFEST_COLUMNS
    }
    table = pa.table({c: pa.array([r[c] for r in rows], type=types[c]) for c in TRAIN_MANIFEST_COLUMNS})
    pq.write_table(table, out / "manifest.parquet")
    return {"csv": "manifest.csv", "parquet": "manifest.parquet"}


def write_training_manifest(out_dir: str | os.PathLike[str], base_uri: str | None) -> dict[str, str]:
    """Rewrite the manifest's ``uri`` column to ``<base_uri>/<path>`` (``None``: back to ``path``).

    Call before uploading ``out_dir``; idempotent.
    """
    import pyarrow.parquet as pq

    out = Path(out_dir)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    prefix = None if base_uri is None else base_uri.rstrip("/")
    for r in rows:
        r["uri"] = r["path"] if prefix is None else f"{prefix}/{r['path']}"
    return _write_train_rows(out, rows)
