"""W&B tracking in offline mode: runs, metrics and artifacts staged in the run directory (no Ray)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from medray.platform.tracking import RunArtifact, artifact_name, log_run


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # keep W&B's caches out of $HOME
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def _log_bytes(run_dir: str) -> bytes:
    import wandb

    wandb.teardown()  # the W&B service writes the run's log asynchronously; a CLI run flushes it at exit
    (log_file,) = Path(run_dir).glob("run-*.wandb")
    return log_file.read_bytes()


def test_artifact_name_is_valid_and_stable():
    a = artifact_name("embeddings", "demo_tiny_vit", "s3://b/emb/run one")
    assert a == artifact_name("embeddings", "demo_tiny_vit", "s3://b/emb/run one")
    assert a != artifact_name("embeddings", "demo_tiny_vit", "s3://b/emb/other")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", a) and a.startswith("embeddings-demo_tiny_vit-")
    assert "emb" not in a.split("-", 2)[2]  # the output is hashed, not spelled out


def test_offline_run_holds_metrics_and_the_artifact(tmp_path):
    summary = json.dumps({"records_embedded": 8, "output": "s3://b/emb"}).encode()
    name = artifact_name("embeddings", "demo_tiny_vit", "s3://b/emb")
    run_dir = log_run(
        job="embed",
        config={"encoder": {"name": "demo_tiny_vit"}},
        mode="offline",
        summary={"records_embedded": 8, "nested": {"skipped": True}},
        metrics={"records_per_s": 3.5},
        directory=str(tmp_path / "wb"),
        artifact=RunArtifact(
            name, "embeddings", files={"summary.json": summary}, metadata={"output": "s3://b/emb", "run_id": "r1"}
        ),
    )
    assert run_dir and Path(run_dir).is_dir() and Path(run_dir).name.startswith("offline-run-")
    assert Path(run_dir).is_relative_to(tmp_path / "wb")
    # the artifact's files lie in the run directory, with its manifest beside them
    staged = Path(run_dir) / "artifacts" / name
    assert (staged / "summary.json").read_bytes() == summary
    manifest = json.loads((Path(run_dir) / "artifacts" / f"{name}.manifest.json").read_text())
    assert manifest["type"] == "embeddings" and manifest["metadata"]["output"] == "s3://b/emb"
    assert set(manifest["manifest"]["contents"]) == {"summary.json"}
    # and the run's log records the metrics, the summary and the artifact (what `wandb sync` uploads)
    log = _log_bytes(run_dir)
    for token in (
        b"records_per_s",
        b"records_embedded",
        name.encode(),
        b"embeddings",
        b"summary.json",
        str(staged / "summary.json").encode(),
    ):
        assert token in log, token
    assert b"nested" not in log  # only scalars go into the summary


def test_model_artifact_copies_only_the_card_unless_weights_are_asked_for(tmp_path):
    model = tmp_path / "out" / "model"
    (model / "backbone").mkdir(parents=True)
    (model / "model_card.json").write_text(json.dumps({"id": "cxr-v1", "metrics": {"auroc": 0.9}}))
    (model / "head.safetensors").write_bytes(b"\0" * 64)
    (model / "backbone" / "model.safetensors").write_bytes(b"\1" * 64)
    metrics = json.dumps({"val": {"auroc_macro": 0.9}}).encode()
    staged = {}
    for weights in (False, True):
        name = artifact_name("model", "cxr-v1", f"{tmp_path}/out-{weights}")
        run_dir = log_run(
            job="finetune",
            config={},
            summary={"global_step": 12},
            mode="offline",
            directory=str(tmp_path / "wb"),
            run_id="ft-abc123",  # resumes training's run
            artifact=RunArtifact(
                name,
                "model",
                files={"metrics.json": metrics},
                source=str(model),
                include=None if weights else ["model_card.json"],
            ),
        )
        assert run_dir and "-ft-abc123" in Path(run_dir).name
        root = Path(run_dir) / "artifacts" / name
        staged[weights] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert json.loads((root / "model_card.json").read_text())["id"] == "cxr-v1"
        assert b"model_card.json" in _log_bytes(run_dir)
    assert staged[False] == ["metrics.json", "model_card.json"]
    assert staged[True] == ["backbone/model.safetensors", "head.safetensors", "metrics.json", "model_card.json"]


def test_a_failing_artifact_warns_and_keeps_the_run(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medray"):
        run_dir = log_run(
            job="finetune",
            config={},
            summary={"x": 1},
            mode="offline",
            directory=str(tmp_path / "wb"),
            artifact=RunArtifact("model-x", "model", source=str(tmp_path / "missing"), include=["model_card.json"]),
        )
    assert run_dir and Path(run_dir).is_dir()
    assert "W&B artifact 'model-x' skipped" in caplog.text


def test_wandb_failure_never_fails_the_job(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medray"):
        assert log_run(job="embed", config={}, summary={}, mode="no-such-mode", directory=str(tmp_path)) is None
    assert "W&B logging skipped" in caplog.text


def test_disabled_logs_nothing(tmp_path):
    assert log_run(job="embed", config={}, summary={}, mode="disabled", directory=str(tmp_path / "wb")) is None
    assert not (tmp_path / "wb").exists()
