"""A learnable, labelled audio + report corpus for record-level fine-tuning tests and demos.

:func:`generate_modality_training_samples` writes, for ``n_patients`` patients:

* ``audio/P000_0.wav`` ...: mono 16 kHz recordings (1-3 s) of a noisy tone,
  label ``high`` = 1 when the tone is in the high band (1.2-2.4 kHz), 0 in the
  low band (150-400 Hz);
* ``reports/P000_0.txt`` ...: short radiology-style reports from the tiny text
  vocabulary (:func:`medray.encoders.build_tiny_checkpoint`), label
  ``effusion`` = 1 when the report mentions an effusion;

plus ``audio.csv``, ``reports.csv`` (``uri``, ``patient``, label, ``site``) and
``reports_inline.parquet`` (the documents in a ``report`` column, no files),
and one truncated WAV listed in ``audio.csv`` (it must end up quarantined).

Example::

    from medray.testing.samples_modalities import generate_modality_training_samples
    generate_modality_training_samples("/tmp/records", base_uri="s3://bucket/records")
    # medray finetune data=modality_samples encoder=hf_audio encoder.checkpoint=... train=linear_probe ...
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BROKEN_AUDIO", "generate_modality_training_samples"]

#: The one unreadable recording of the corpus (its manifest row is quarantined).
BROKEN_AUDIO = "audio/broken.wav"
_RATE = 16000
_SITES = ("site-A", "site-B")
_FILLER = (
    "the heart is normal",
    "no acute change",
    "stable small nodule in the left lung",
    "mild opacity at the right lung",
    "no fracture",
    "chest study for pain",
    "history of mass",
)
_POSITIVE = ("small left effusion", "mild right effusion", "large effusion with opacity")


def _tone(rng: np.random.Generator, high: bool) -> np.ndarray:
    seconds = float(rng.uniform(1.0, 3.0))
    freq = float(rng.uniform(1200.0, 2400.0) if high else rng.uniform(150.0, 400.0))
    t = np.arange(int(_RATE * seconds)) / _RATE
    wave = rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    return (wave + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def _report(rng: np.random.Generator, positive: bool) -> str:
    parts = list(rng.choice(_FILLER, size=3, replace=False))
    if positive:
        parts.insert(int(rng.integers(0, len(parts) + 1)), str(rng.choice(_POSITIVE)))
    else:
        parts.append("no pneumonia")
    return "findings: " + ". ".join(parts) + ". impression: " + parts[0] + "."


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def generate_modality_training_samples(
    out_dir: str | os.PathLike[str],
    *,
    n_patients: int = 40,
    records_per_patient: int = 2,
    seed: int = 0,
    base_uri: str | None = None,
) -> dict[str, Any]:
    """Write the corpus (see the module docstring) under ``out_dir``.

    Args:
        out_dir: destination directory (created).
        n_patients: patients; each has ``records_per_patient`` recordings and reports.
        records_per_patient: records of each kind per patient.
        seed: everything depends only on the arguments.
        base_uri: the manifests' ``uri`` prefix (where ``out_dir`` will be uploaded);
            ``None``: local absolute paths.

    Returns:
        ``{"audio": n, "reports": n, "positives": {"high": n, "effusion": n}, "manifests": {...}}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    prefix = base_uri.rstrip("/") if base_uri else str(out.resolve())
    audio_rows, report_rows, inline_rows = [], [], []
    for p in range(n_patients):
        patient = f"P{p:03d}"
        for j in range(records_per_patient):
            site = _SITES[(p + j) % len(_SITES)]
            high = int(rng.random() < 0.5)
            name = f"audio/{patient}_{j}.wav"
            sf.write(out / name, _tone(rng, bool(high)), _RATE, format="WAV", subtype="PCM_16")
            audio_rows.append({"uri": f"{prefix}/{name}", "patient": patient, "high": high, "site": site})
            effusion = int(rng.random() < 0.5)
            text = _report(rng, bool(effusion))
            name = f"reports/{patient}_{j}.txt"
            (out / name).write_text(text, encoding="utf-8")
            report_rows.append({"uri": f"{prefix}/{name}", "patient": patient, "effusion": effusion, "site": site})
            inline_rows.append({"report": text, "patient": patient, "effusion": effusion, "site": site})
    # A WAV cut off inside its header: decoding fails, the row must be quarantined, not dropped.
    (out / BROKEN_AUDIO).write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    audio_rows.append({"uri": f"{prefix}/{BROKEN_AUDIO}", "patient": "P999", "high": 1, "site": _SITES[0]})
    _write_csv(out / "audio.csv", audio_rows)
    _write_csv(out / "reports.csv", report_rows)
    pq.write_table(pa.Table.from_pylist(inline_rows), out / "reports_inline.parquet")
    return {
        "audio": len(audio_rows),
        "reports": len(report_rows),
        "positives": {"high": sum(r["high"] for r in audio_rows), "effusion": sum(r["effusion"] for r in report_rows)},
        "manifests": {
            "audio": str(out / "audio.csv"),
            "reports": str(out / "reports.csv"),
            "reports_inline": str(out / "reports_inline.parquet"),
        },
    }
