"""``medray finetune`` end to end: real Ray Train + DeepSpeed (gloo, 2 CPU workers), real S3 (SeaweedFS).

One module-scoped corpus: learnable DICOM phantoms (lesion / effusion findings,
80 patients x 4 images, 64 px) with their manifest, and a tiny random ViT from
the encoder registry, all on the S3 server. Each test runs the console script
in a subprocess, as a user would, and reads what it wrote.

Budget (2 cores): about 5 minutes for the module; DeepSpeed's comm op is
compiled once per machine (cached in ~/.cache/torch_extensions) by the
session's ``deepspeed_warm`` fixture (tests/conftest.py), not inside a timed run.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray.encoders import build_tiny_checkpoint, hash_directory
from medray.testing.samples_train import generate_training_samples, write_training_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")
EPOCHS = 8


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory, deepspeed_warm):
    """Phantoms under s3://<bucket>/ft/data/, the manifest under ft/meta/, a tiny ViT under ft/models/."""
    root = tmp_path_factory.mktemp("ft")
    data = root / "data"
    info = generate_training_samples(str(data), n_patients=80, images_per_patient=4, size=64, seed=0)
    write_training_manifest(str(data), f"s3://{s3.bucket}/ft/data")
    fs = s3.filesystem()
    fs.put(str(data / "dicom"), f"{s3.bucket}/ft/data/", recursive=True)
    fs.put(str(data / "manifest.parquet"), f"{s3.bucket}/ft/meta/manifest.parquet")
    ckpt = build_tiny_checkpoint("hf_image", str(root / "tiny-vit"), arch="vit", image_size=32)
    fs.put(ckpt, f"{s3.bucket}/ft/models/tiny-vit", recursive=True)
    home = root / "home"
    home.mkdir()
    return {
        "info": info,
        "data": data,
        "fs": fs,
        "bucket": s3.bucket,
        "home": home,
        "ckpt_local": ckpt,
        "ckpt": f"s3://{s3.bucket}/ft/models/tiny-vit",
        "manifest": f"s3://{s3.bucket}/ft/meta/manifest.parquet",
    }


def _env(corpus, progress: bool = False) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "MEDRAY_HOME": str(corpus["home"]),
            "MEDRAY_CACHE_DIR": str(corpus["home"] / "cache"),
            "MEDRAY_PATIENT_SALT": "test-salt",
            "WANDB_MODE": "offline",
            "MEDRAY_PROGRESS": "1" if progress else "0",
            "WANDB_DIR": str(corpus["home"]),
            "RAY_DEDUP_LOGS": "0",
        }
    )
    env.pop("WANDB_API_KEY", None)
    return env


def run_medray(corpus, *args: str, timeout: int = 600, progress: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([MEDRAY, *args], env=_env(corpus, progress), capture_output=True, text=True, timeout=timeout)


def common(corpus, **over: str) -> list[str]:
    args = {
        "data.train": corpus["manifest"],
        "encoder": "hf_image",
        "encoder.checkpoint": corpus["ckpt"],
        "task": "multilabel",
        "task.labels": "[lesion,effusion]",
        "scaling.num_workers": "2",
        "scaling.use_gpu": "false",
        "train.epochs": str(EPOCHS),
        "train.batch_size": "8",
        "train.lr": "3e-3",
        "data.val_fraction": "0.25",
        "eval.subgroups": "[sex,age_band,site]",
        "tracking.mode": "offline",
    }
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def s3_json(corpus, uri: str) -> dict:
    return json.loads(corpus["fs"].cat_file(uri.split("://", 1)[1]))


def s3_table(corpus, uri: str) -> pa.Table:
    fs = corpus["fs"]
    path = uri.split("://", 1)[1]
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]
    return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(p))) for p in files])


def check_trained(summary: dict, stage: int) -> None:
    assert summary["zero_stage"] == stage and summary["num_workers"] == 2
    val = summary["metrics"]["val"]
    base = summary["baseline"]["val"]
    assert val["auroc_macro"] >= 0.9, val
    assert 0.2 <= base["auroc_macro"] <= 0.8, base  # untrained: about chance
    assert set(val["auroc"]) == {"lesion", "effusion"}
    assert 0 <= val["ece"] <= 1 and 0 <= val["accuracy"] <= 1
    groups = summary["metrics"]["subgroups"]
    assert set(groups) == {"sex", "age_band", "site"} and set(groups["site"]) == {"site-A", "site-B", "site-C"}
    assert summary["export_max_abs_diff"] is not None and summary["export_max_abs_diff"] < 1e-4


# --------------------------------------------------------------------------
# ZeRO-3 + LoRA, split by the salted DICOM patient key, artifact through `medray embed`
# --------------------------------------------------------------------------
def test_zero3_lora_learns_and_the_merged_artifact_embeds_to_the_same_predictions(corpus, tmp_path):
    out = f"s3://{corpus['bucket']}/ft/runs/zero3-lora"
    t0 = time.perf_counter()
    proc = run_medray(
        corpus,
        "finetune",
        *common(corpus, **{"deepspeed.stage": "3", "train": "lora", "train.lr": "1e-2"}),
        f"output={out}",
        progress=True,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    print(f"zero3 lora run: {time.perf_counter() - t0:.1f}s")
    assert "medray finetune:" in proc.stdout and "ZeRO-3" in proc.stdout
    summary = s3_json(corpus, out + "/summary.json")
    check_trained(summary, 3)
    # one line per epoch from rank 0, then the table of the inputs by outcome
    logged = proc.stdout + proc.stderr
    line = r"medray finetune: epoch (\d+)/(\d+) step \d+ loss [\d.]+ val AUROC [\d.]+ ECE [\d.]+ lr "
    epochs = re.findall(line, logged)
    assert [int(e) for e, _ in epochs] == list(range(1, EPOCHS + 1)) and {int(n) for _, n in epochs} == {EPOCHS}
    rows = sum(s["rows"] for s in summary["splits"].values())
    assert f"inputs of this fine-tune: {rows} manifest rows" in proc.stderr
    assert re.search(r"^  labelled +train +\d+$", proc.stderr, re.M)

    # LoRA: only the adapters and the head trained
    names = summary["trainable_parameters"]
    assert names and all("lora_" in n or n.startswith("head.") for n in names), names
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert 0 < summary["n_trainable"] < summary["n_parameters"] / 4

    # patient-level split: no patient (salted key, nor the manifest's patient) in two splits
    from medray.platform.records import record_id

    assigned = s3_table(corpus, out + "/splits/assignments").to_pylist()
    patient_of = {
        record_id(r["uri"], ""): r["patient"] for r in pq.read_table(corpus["data"] / "manifest.parquet").to_pylist()
    }
    assert len(assigned) == corpus["info"]["n"]
    by_key: dict[str, set] = {}
    by_patient: dict[str, set] = {}
    for r in assigned:
        by_key.setdefault(r["patient_key"], set()).add(r["split"])
        by_patient.setdefault(patient_of[r["record_id"]], set()).add(r["split"])
    assert len(by_key) == 80 and all(len(s) == 1 for s in by_key.values())
    assert all(len(s) == 1 for s in by_patient.values())
    assert {next(iter(s)) for s in by_key.values()} == {"train", "val"}

    # the artifact: model card + head + merged backbone in the HF layout
    import hashlib

    from safetensors.numpy import load_file

    from medray.encoders.heads import load_artifact

    # a fresh cache: the node cache is keyed by URI and may hold this URI's artifact from an earlier session
    head, card, local, sha = load_artifact(out + "/model", cache_dir=str(tmp_path / "cache"))
    assert sha == summary["artifact_sha256"]
    assert card.task == "multilabel" and card.labels == ["lesion", "effusion"] and card.backbone_included
    assert card.strategy == "lora" and card.encoder["weights_hash"] == hash_directory(corpus["ckpt_local"])
    assert card.data_manifest_sha256 == hashlib.sha256((corpus["data"] / "manifest.parquet").read_bytes()).hexdigest()
    assert card.metrics["val"]["auroc_macro"] >= 0.9 and "sex" in card.metrics["subgroups"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(local))
    assert "MEDRAY_UNTRAINED" not in os.listdir(local)
    merged = load_file(os.path.join(local, "model.safetensors"))
    base = load_file(os.path.join(corpus["ckpt_local"], "model.safetensors"))
    assert set(merged) == set(base), "adapters must be merged into the backbone's own weights"
    adapted = [k for k in base if k.endswith(("q_proj.weight", "v_proj.weight", "query.weight", "value.weight"))]
    assert adapted
    for k, v in base.items():
        if k in adapted:
            assert not np.allclose(merged[k], v), f"{k} should carry the merged adapter"
        else:
            np.testing.assert_array_equal(merged[k], v, err_msg=f"{k} is frozen under LoRA and must not change")

    # `medray embed encoder.checkpoint=<artifact>` + the head == the model's predictions at the end of training
    val_uris = {r["record_id"] for r in assigned if r["split"] == "val"}
    val_rows = [
        {"uri": r["uri"]}
        for r in pq.read_table(corpus["data"] / "manifest.parquet").to_pylist()
        if record_id(r["uri"], "") in val_uris
    ]
    manifest = tmp_path / "val.parquet"
    pq.write_table(pa.Table.from_pylist(val_rows), manifest)
    emb_out = tmp_path / "emb"
    t0 = time.perf_counter()
    proc = run_medray(
        corpus,
        "embed",
        f"input={manifest}",
        f"output={emb_out}",
        "encoder=hf_image",
        f"encoder.checkpoint={out}/model",
        f"encoder.sha256={sha}",
        "ray.num_cpus=2",
        "tracking.enabled=false",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"embed run: {time.perf_counter() - t0:.1f}s")
    emb = pq.read_table(emb_out / "embeddings").to_pylist()
    preds = {
        (r["record_id"], r["frame"]): r["prediction"]
        for r in s3_table(corpus, out + "/predictions/val.parquet").to_pylist()
    }
    assert len(emb) == len(val_rows) == len(preds)
    got = head.predict(np.array([r["embedding"] for r in emb], np.float32))
    want = np.array([preds[(r["record_id"], r["frame"])] for r in emb], np.float32)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)

    # W&B offline run written by rank 0
    assert list(Path(corpus["home"]).rglob("offline-run-*")), "no offline W&B run"
    # and the driver's `model` artifact on the same W&B run: the model card + metrics, not the weights
    cards = [json.loads(p.read_text()) for p in Path(corpus["home"]).rglob("offline-run-*/artifacts/*.manifest.json")]
    (card_art,) = [m for m in cards if m["metadata"].get("artifact") == out + "/model"]
    assert card_art["type"] == "model" and set(card_art["manifest"]["contents"]) == {"model_card.json", "metrics.json"}
    assert card_art["metadata"]["artifact_sha256"] == sha and card_art["metadata"]["weights_included"] is False


# --------------------------------------------------------------------------
# ZeRO-2 with a worker killed mid-run: restart from the last checkpoint
# --------------------------------------------------------------------------
def _registered_epochs(fs, path: str) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered (its run snapshot), not just uploaded ones."""
    fs.invalidate_cache()
    try:
        snapshot = json.loads(fs.cat_file(path + "/checkpoint_manager_snapshot.json"))
    except FileNotFoundError:
        return []
    return sorted(int(r["metrics"]["epoch"]) for r in snapshot.get("checkpoint_results", []))


def _train_workers(pid: int) -> list:
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (the CLI, its local Ray cluster, its workers)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_zero2_full_survives_a_killed_worker_and_resumes_a_stopped_run(corpus):
    """A worker killed mid-run: Ray Train restarts from the last checkpoint. Then the whole job is
    killed (a stopped run) and ``resume=true`` finishes it. The step counter continues throughout."""
    out = f"s3://{corpus['bucket']}/ft/runs/zero2-kill"
    ckpt_dir = f"{corpus['bucket']}/ft/runs/zero2-kill/checkpoints/train"
    args = [
        *common(
            corpus,
            **{
                "deepspeed.stage": "2",
                "data.group_by": "patient",
                "data.test_fraction": "0.2",
                "tracking.enabled": "false",
            },
        ),
        f"output={out}",
    ]
    # This run alone keeps Ray Train's default 2 s poll (the session sets 0.5 s, tests/conftest.py):
    # epochs then outlast this loop's polling, so the job is killed well before its last epoch.
    env = dict(_env(corpus), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="2.0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [MEDRAY, "finetune", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    fs = corpus["fs"]
    worker_killed_after = driver_killed_after = None
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            epochs = _registered_epochs(fs, ckpt_dir)
            if worker_killed_after is None and epochs:
                workers = _train_workers(proc.pid)
                if workers:
                    print(
                        f"{time.perf_counter() - t0:.1f}s: killing worker {workers[-1].pid} of "
                        f"{[w.pid for w in workers]} after registered epoch {epochs[-1]}"
                    )
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    worker_killed_after = epochs[-1]
            elif worker_killed_after is not None and epochs and epochs[-1] >= worker_killed_after + 2:
                print(f"{time.perf_counter() - t0:.1f}s: killing the job after registered epoch {epochs[-1]}")
                _kill_tree(proc.pid)
                driver_killed_after = epochs[-1]
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
        log = proc.communicate(timeout=120)[0]
    print(f"zero2 first run: {time.perf_counter() - t0:.1f}s")
    assert worker_killed_after is not None, "no training worker found to kill"
    assert driver_killed_after is not None and driver_killed_after < EPOCHS - 1, log[-4000:]
    assert "Error count: 1" in log  # Ray Train saw the dead worker and restarted the group

    # the same command without resume=true refuses to touch the run; with it, the run finishes
    proc = run_medray(corpus, "finetune", *args, timeout=120)
    assert proc.returncode == 2 and "config key 'resume'" in proc.stderr
    t1 = time.perf_counter()
    proc = run_medray(corpus, "finetune", *args, "resume=true")
    print(f"zero2 resumed run: {time.perf_counter() - t1:.1f}s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = s3_json(corpus, out + "/summary.json")
    check_trained(summary, 2)
    assert not any("lora_" in n for n in summary["trainable_parameters"])
    assert any(n.startswith("backbone.") for n in summary["trainable_parameters"])  # full fine-tuning
    steps_per_epoch = summary["history"][0]["global_step"]
    fresh, restarted, resumed = summary["attempts"]
    assert fresh["start_step"] == 0 and not fresh["resumed"]
    assert restarted["resumed"] and restarted["start_epoch"] >= worker_killed_after + 1
    assert resumed["resumed"] and resumed["start_epoch"] >= driver_killed_after + 1
    for a in (restarted, resumed):  # continued from the checkpoint, not restarted from zero
        assert a["start_step"] == a["start_epoch"] * steps_per_epoch > 0
    assert [h["epoch"] for h in summary["history"]] == list(range(EPOCHS))
    assert [h["global_step"] for h in summary["history"]] == [(e + 1) * steps_per_epoch for e in range(EPOCHS)]
    assert summary["global_step"] == EPOCHS * steps_per_epoch
    # the held-out patients, scored once with the exported artifact (re-embedded through `medray embed`)
    test = summary["test"]
    assert test["patients"] >= 8 and test["records"] == test["rows"], test
    auroc = test["auroc_macro"]
    assert auroc["lo"] <= auroc["value"] <= auroc["hi"] and auroc["value"] >= 0.8, test
    assert "test AUROC macro" in proc.stdout
    evaluation = s3_json(corpus, out + "/test/evaluation.json")
    assert evaluation["counts"]["patients"] == test["patients"] and set(evaluation["metrics"]) == {"lesion", "effusion"}
    assert summary["splits"]["test"]["rows"] == test["rows"]  # exactly the rows the split held out


# --------------------------------------------------------------------------
# bad configs stop before any worker starts, naming the key
# --------------------------------------------------------------------------
def test_bad_configs_stop_before_ray_starts(corpus, tmp_path):
    rows = pq.read_table(corpus["data"] / "manifest.parquet").to_pylist()
    for i, r in enumerate(rows):  # a split column whose val split has no lesion
        r["fold"] = "val" if (not r["lesion"] and i % 3 == 0) else "train"
    local = tmp_path / "folds.parquet"
    pq.write_table(pa.Table.from_pylist(rows), local)
    one = [
        dict(r, lesion=1 if i == next(j for j, x in enumerate(rows) if x["lesion"]) else 0) for i, r in enumerate(rows)
    ]
    single = tmp_path / "one-positive.parquet"  # a patient split (on Ray) cannot put it in train and val
    pq.write_table(pa.Table.from_pylist(one), single)
    out = tmp_path / "out"
    cases = [
        ({"task.labels": "[lesion,pneumothorax]"}, "task.labels", "unknown label column 'pneumothorax'"),
        ({"deepspeed.stage": "5"}, "deepspeed.stage", "ZeRO stage"),
        (
            {"data.train": str(local), "task": "binary", "task.labels": "[lesion]", "data.split_column": "fold"},
            "task.labels",
            "no positive examples in the val split",
        ),
        ({"train.strategy": "adapters"}, "train.strategy", "unknown strategy"),
        (
            {"data.train": str(single), "task": "binary", "task.labels": "[lesion]", "data.group_by": "patient_key"},
            "task.labels",
            "has 1 positive example(s)",
        ),
    ]

    def refused(over: dict) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.perf_counter()
        proc = run_medray(corpus, "finetune", *common(corpus, **over), f"output={out}", timeout=120)
        return proc, time.perf_counter() - t0

    # two CLIs at a time: each is mostly its own start-up (imports, config, manifest checks)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(refused, [over for over, _, _ in cases]))
    for (over, key, text), (proc, seconds) in zip(cases, runs):
        assert proc.returncode == 2, (over, proc.stderr[-2000:])
        assert f"config key '{key}'" in proc.stderr and text in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert "Ray" not in proc.stderr and not out.exists()  # nothing started, nothing written
        assert seconds < 60
    # an output that already holds a run continues only with resume=true
    (out / "checkpoints" / "train").mkdir(parents=True)
    (out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json").write_text("{}")
    proc = run_medray(corpus, "finetune", *common(corpus), f"output={out}", timeout=120)
    assert proc.returncode == 2 and "config key 'resume'" in proc.stderr
