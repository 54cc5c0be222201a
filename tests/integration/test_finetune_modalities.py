"""``medray finetune`` on record-level labels of audio recordings and text documents.

Real Ray Train + DeepSpeed (gloo), the console script in a subprocess, local
files. The corpus (:mod:`medray.testing.samples_modalities`, written under
``$MEDRAY_HOME/samples/records`` so the ``data=`` presets find it): tones whose
label is their frequency band, reports whose label is whether they mention an
effusion, and one truncated WAV. Tiny random ``hf_audio`` / ``hf_text``
encoders, frozen: a linear head on their mean-pooled window / chunk embeddings
must rank the validation records clearly above chance, the broken recording
must be a quarantine row, and the artifact must load as a serve head over its
base encoder.

Budget (2 cores): about 2-3 minutes for the module.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_finetune import run_medray  # same directory (pytest rootdir-relative import)

from medray.encoders import build_tiny_checkpoint, hash_directory
from medray.testing.samples_modalities import BROKEN_AUDIO, generate_modality_training_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def records(tmp_path_factory, deepspeed_warm):
    root = tmp_path_factory.mktemp("ftmod")
    home = root / "home"
    data = home / "samples" / "records"
    info = generate_modality_training_samples(str(data), n_patients=40, seed=0)
    ckpt = {
        fam: build_tiny_checkpoint(fam, str(root / fam), arch=arch)
        for fam, arch in (("hf_audio", "wav2vec2"), ("hf_text", "bert"))
    }
    return {"home": home, "data": data, "info": info, "ckpt": ckpt, "root": root}


def _common(**over: str) -> list[str]:
    args = {
        "train": "linear_probe",
        "train.epochs": "12",
        "train.batch_size": "8",
        "train.lr": "3e-2",
        "train.warmup_fraction": "0.0",
        "scaling.num_workers": "2",
        "tracking.mode": "offline",
        "eval.subgroups": "[site]",
    }
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def _check_head(out: Path, summary: dict, ckpt: str, task_label: str) -> None:
    """The artifact is a head over the unchanged base encoder that serve accepts."""
    from medray.encoders import create_encoder, get_spec
    from medray.encoders.heads import load_artifact
    from medray.serve.heads import check_head_card

    head, card, local, sha = load_artifact(str(out / "model"), cache_dir=str(out.parent / f"cache-{out.name}"))
    assert sha == summary["artifact_sha256"]
    assert card.labels == [task_label] and card.strategy == "linear_probe" and not card.backbone_included
    assert sorted(os.listdir(local)) == ["head.safetensors", "model_card.json"]  # references, never copies, weights
    assert card.encoder["weights_hash"] == hash_directory(ckpt) and card.encoder["checkpoint"] == ckpt
    assert card.encoder["features"] == "embeddings" and card.encoder["record_pooling"].startswith("mean")
    encoder = create_encoder(
        get_spec(
            {"name": "base", "family": card.encoder["family"], "checkpoint": ckpt, "pooling": card.encoder["pooling"]}
        ),
        device="cpu",
    )
    check_head_card(card, head.dim, {**encoder.describe(), "weights_hash": hash_directory(ckpt)})
    assert card.metrics["val"]["auroc_macro"] == summary["metrics"]["val"]["auroc_macro"]


def test_audio_recording_labels_train_a_head_on_pooled_windows(records, tmp_path):
    out = tmp_path / "audio-run"
    t0 = time.perf_counter()
    proc = run_medray(
        records,
        "finetune",
        "data=audio_tones",
        "encoder=hf_audio",
        f"encoder.checkpoint={records['ckpt']['hf_audio']}",
        "task.labels=[high]",
        "audio.window_s=1.0",
        *_common(),
        f"output={out}",
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    print(f"audio run: {time.perf_counter() - t0:.1f}s")
    assert "1 records quarantined" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["features"] == "embeddings" and summary["num_workers"] == 2
    val = summary["metrics"]["val"]
    assert val["auroc_macro"] >= 0.85, val
    assert set(summary["metrics"]["subgroups"]["site"]) == {"site-A", "site-B"}
    assert summary["export_max_abs_diff"] is not None and summary["export_max_abs_diff"] < 1e-4
    assert summary["export_records_checked"] > 0
    # every recording is one example (windows are pooled), split by patient
    splits = summary["splits"]
    assert splits["train"]["usable"] + splits["val"]["usable"] == records["info"]["audio"] - 1
    # the truncated WAV: one quarantine row, embed's format, no path-derived PHI beyond its key
    assert summary["quarantined"] == 1 and summary["quarantine_by_class"] == {"DecodeError": 1}
    rows = pq.read_table(out / "quarantine").to_pylist()
    assert [(r["uri"].endswith(BROKEN_AUDIO), r["stage"]) for r in rows] == [(True, "decode")]
    preds = pq.read_table(out / "predictions" / "val.parquet").to_pylist()
    assert len(preds) == splits["val"]["usable"] and all(r["frame"] == -1 for r in preds)
    _check_head(out, summary, records["ckpt"]["hf_audio"], "high")


def test_report_labels_from_a_text_column_train_a_head_on_pooled_chunks(records, tmp_path):
    out = tmp_path / "text-run"
    t0 = time.perf_counter()
    proc = run_medray(
        records,
        "finetune",
        "data=report_keywords",
        "encoder=hf_text",
        f"encoder.checkpoint={records['ckpt']['hf_text']}",
        "encoder.pooling=mean",
        "task.labels=[effusion]",
        *_common(**{"scaling.num_workers": "1"}),
        f"output={out}",
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    print(f"text run: {time.perf_counter() - t0:.1f}s")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["features"] == "embeddings" and summary["quarantined"] == 0
    assert summary["metrics"]["val"]["auroc_macro"] >= 0.85, summary["metrics"]["val"]
    assert summary["export_max_abs_diff"] is not None and summary["export_max_abs_diff"] < 1e-4
    _check_head(out, summary, records["ckpt"]["hf_text"], "effusion")
    # the documents never reach the run's outputs
    texts = [r["report"] for r in pq.read_table(records["data"] / "reports_inline.parquet").to_pylist()[:5]]
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not any(t.encode() in blob for t in texts), path
