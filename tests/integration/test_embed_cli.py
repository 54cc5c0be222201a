"""``medray embed`` end to end through the CLI: real Ray, real S3 (SeaweedFS).

One module-scoped corpus (generated DICOMs, photos, archives, hostile files,
planted PHI) is uploaded to the S3 server; each test runs the console script
in a subprocess, as a user would, and reads what it wrote.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray.encoders import build_tiny_checkpoint, hash_directory
from medray.platform.decoders import DicomOptions
from medray.testing.samples import generate_samples, write_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDRAY = str(Path(sys.executable).parent / "medray")
JOB_DICOM_OPTIONS = DicomOptions(windows={"CT": (-600.0, 1500.0)})  # conf/embed.yaml's default


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    """Samples under s3://<bucket>/in/, a manifest under meta/, two tiny checkpoints under models/."""
    root = tmp_path_factory.mktemp("corpus")
    samples = root / "samples"
    info = generate_samples(str(samples))
    write_manifest(str(samples), f"s3://{s3.bucket}/in")
    fs = s3.filesystem()
    for sub in ("dicom", "photos", "hostile"):
        fs.put(str(samples / sub), f"{s3.bucket}/in/", recursive=True)
    for name in ("archive.zip", "archive.tar.gz"):
        fs.put(str(samples / name), f"{s3.bucket}/in/{name}")
    fs.put(str(samples / "manifest.parquet"), f"{s3.bucket}/meta/manifest.parquet")
    fs.put(str(samples / "manifest.csv"), f"{s3.bucket}/meta/manifest.csv")
    ckpts = {}
    for family, arch in (("hf_image", "dinov2"), ("timm_image", "vit")):
        local = build_tiny_checkpoint(family, str(root / f"{family}-{arch}"), arch=arch, image_size=32)
        fs.put(local, f"{s3.bucket}/models/{family}-{arch}", recursive=True)
        ckpts[family] = {
            "local": local,
            "uri": f"s3://{s3.bucket}/models/{family}-{arch}",
            "sha256": hash_directory(local),
        }
    home = root / "home"
    home.mkdir()
    return {"info": info, "samples": samples, "ckpt": ckpts, "home": home, "bucket": s3.bucket, "fs": fs}


def run_medray(corpus, *args: str, timeout: int = 600, progress: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        {
            "MEDRAY_HOME": str(corpus["home"]),
            "MEDRAY_CACHE_DIR": str(corpus["home"] / "cache"),
            "MEDRAY_PATIENT_SALT": "test-salt",
            "WANDB_MODE": "offline",
            "MEDRAY_PROGRESS": "0",
            "WANDB_DIR": str(corpus["home"]),
        }
    )
    env.pop("WANDB_API_KEY", None)
    if progress:  # medray's own progress, as a log shows it (stderr is a pipe here, not a terminal)
        env.update({"MEDRAY_PROGRESS": "1", "MEDRAY_PROGRESS_INTERVAL": "1"})
    return subprocess.run([MEDRAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def read_parts(fs, uri: str) -> pa.Table:
    path = uri.split("://", 1)[-1]
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet")) if fs.exists(path) else []
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else pa.table({})


def common(corpus, ckpt_family="hf_image"):
    c = corpus["ckpt"][ckpt_family]
    return [f"encoder={ckpt_family}", f"encoder.checkpoint={c['uri']}", "ray.num_cpus=2", "tracking.mode=offline"]


@pytest.fixture(scope="module")
def prefix_run(corpus):
    out = f"s3://{corpus['bucket']}/out/prefix"
    proc = run_medray(
        corpus,
        "embed",
        f"input=s3://{corpus['bucket']}/in/",
        f"output={out}",
        "max_error_fraction=0.5",
        *common(corpus),
        progress=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "proc": proc}


def test_prefix_s3_to_s3_rows_schema_provenance(corpus, prefix_run):
    fs, info = corpus["fs"], corpus["info"]
    emb = read_parts(fs, prefix_run["out"] + "/embeddings")
    exp = info["expected"]
    n_archive = sum(exp["archive_dicom_members"].values())
    assert emb.num_rows == exp["dicom_frames"] + exp["photos"] + n_archive
    # exactly one row per (record, frame)
    keys = set(zip(emb.column("record_id").to_pylist(), emb.column("frame").to_pylist()))
    assert len(keys) == emb.num_rows
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert set(emb.column("weights_hash").to_pylist()) == {corpus["ckpt"]["hf_image"]["sha256"]}
    assert set(emb.column("encoder").to_pylist()) == {"hf_image"}
    assert all(emb.column("preprocessing_hash").to_pylist()) and all(emb.column("medray_version").to_pylist())
    # the tiny checkpoint carries the MEDRAY_UNTRAINED marker: rows say so without encoder.untrained=true
    assert set(emb.column("untrained").to_pylist()) == {True}
    assert all(len(s) == 64 for s in emb.column("content_sha256").to_pylist())
    # multi-frame DICOM: one row per frame with its index
    mf = info["multiframe"][0]
    frames = sorted(f for u, f in zip(emb.column("uri").to_pylist(), emb.column("frame").to_pylist()) if u.endswith(mf))
    assert frames == list(range(info["frames"][mf]))
    # archive members are records of their own, keyed by member name
    members = {m for m in emb.column("member").to_pylist() if m}
    assert set(info["archives"]["archive.zip"]["dicom_members"]) <= members
    # allow-listed metadata only, and a salted patient key
    meta = json.loads(emb.column("metadata")[0].as_py())
    assert "PatientName" not in meta and "patient_name" not in meta
    dicom_rows = [
        m for m, u in zip(emb.column("modality").to_pylist(), emb.column("uri").to_pylist()) if "/dicom/" in u
    ]
    assert set(dicom_rows) >= {"DX", "CR", "CT"}
    summary = json.loads(fs.cat(prefix_run["out"].split("://")[1] + "/summary.json"))
    assert summary["records_embedded"] == exp["dicom_files"] + exp["photos"] + n_archive
    assert summary["quarantined"] == 6 and summary["stage_seconds"]["decode"] > 0
    assert "medray embed:" in prefix_run["proc"].stdout


def _progress_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("medray embed: ") and " records" in ln]


def test_progress_lines_in_a_log_and_the_closing_outcome_table(corpus, prefix_run):
    """Not a terminal: plain progress lines (no carriage returns, no ANSI codes) with the counts,
    then the table of this run's outcomes by reason (the fused plan: counts from the actors)."""
    err, summary = prefix_run["proc"].stderr, json.loads(corpus["fs"].cat(prefix_run["out"][5:] + "/summary.json"))
    assert "\r" not in err and "\x1b[" not in err
    lines = _progress_lines(err)
    counts = re.compile(r"\d+ embedded, \d+ quarantined, \d+ skipped; [\d.,-]+ records/s")
    assert lines and all(counts.search(ln) for ln in lines)
    embedded, quarantined, skipped = summary["records_embedded"], summary["quarantined"], summary["skipped"]
    assert f"{embedded} embedded, {quarantined} quarantined, {skipped} skipped" in lines[-1] and "done in" in lines[-1]
    table = err[err.index("outcomes of this run:") :].splitlines()
    assert table[0] == f"outcomes of this run: {embedded + quarantined + skipped} records"
    rows = [ln.split() for ln in table[2:] if ln.startswith("  ") and not ln.strip().startswith("rows:")]
    assert sum(int(r[-1]) for r in rows if r[0] == "embedded") == embedded
    q = {r[1]: int(r[-1]) for r in rows if r[0] == "quarantined"}
    assert {"LimitExceeded", "ReadError"} <= set(q) and sum(q.values()) == quarantined
    assert err.rindex("medray embed: ") < err.index("outcomes of this run:")  # the table closes the run


def test_staged_plan_writes_the_same_rows_as_the_fused_plan(corpus, prefix_run):
    """On CPU the default plan fuses read, decode, embed and write per actor; the staged plan
    (decode tasks feeding an encoder pool, as on GPU nodes) must write the same records."""
    out = f"s3://{corpus['bucket']}/out/prefix-staged"
    proc = run_medray(
        corpus,
        "embed",
        f"input=s3://{corpus['bucket']}/in/",
        f"output={out}",
        "max_error_fraction=0.5",
        "compute.fuse=false",
        *common(corpus),
        progress=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    fs = corpus["fs"]
    # the staged plan's sink reports each block's counts to a counter actor the driver polls
    summary = json.loads(fs.cat(out[5:] + "/summary.json"))
    last = _progress_lines(proc.stderr)[-1]
    assert f"{summary['records_embedded']} embedded, {summary['quarantined']} quarantined" in last
    assert "outcomes of this run:" in proc.stderr

    def rows(uri: str) -> dict:
        t = read_parts(fs, uri + "/embeddings")
        return {
            (r, f): e
            for r, f, e in zip(
                t.column("record_id").to_pylist(), t.column("frame").to_pylist(), t.column("embedding").to_pylist()
            )
        }

    fused, staged = rows(prefix_run["out"]), rows(out)
    assert set(fused) == set(staged)
    assert max(float(np.abs(np.asarray(fused[k]) - np.asarray(staged[k])).max()) for k in fused) <= 1e-5
    q = {r["record_id"] for r in read_parts(fs, out + "/quarantine").to_pylist()}
    assert q == {r["record_id"] for r in read_parts(fs, prefix_run["out"] + "/quarantine").to_pylist()}


def test_run_is_tracked_in_wandb_offline(corpus, prefix_run):
    runs = list(Path(corpus["home"]).glob("wandb/offline-run-*"))
    assert runs, "no offline W&B run directory"
    assert any(p.suffix == ".wandb" and p.stat().st_size > 0 for r in runs for p in r.iterdir())


def test_hostile_inputs_are_quarantined_with_reasons(corpus, prefix_run):
    q = read_parts(corpus["fs"], prefix_run["out"] + "/quarantine").to_pylist()
    by_name = {(r["member"] or r["uri"].rsplit("/", 1)[-1]): r for r in q}
    assert by_name["bomb.dcm"]["error_class"] == "LimitExceeded"
    assert by_name["not_dicom.dcm"]["error_class"] == "UnsupportedFormat"
    assert by_name["empty.dcm"]["stage"] == "decode"
    assert by_name["truncated.dcm"]["error_class"] in ("DecodeError", "LimitExceeded")
    assert by_name["../../etc/x"]["stage"] == "read" and by_name["../../etc/x"]["error_class"] == "ReadError"
    assert len(q) == 6 and all(r["message"] for r in q)


def test_no_phi_in_outputs_or_logs(corpus, prefix_run):
    sentinels = corpus["info"]["phi"]["sentinels"]
    assert sentinels
    fs = corpus["fs"]
    texts = [prefix_run["proc"].stdout, prefix_run["proc"].stderr]
    for p in fs.find(prefix_run["out"].split("://")[1]):
        if p.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                texts.append(str(pq.read_table(f).to_pylist()))
        else:
            texts.append(fs.cat(p).decode("utf-8", "replace"))
    for p in Path(corpus["home"]).rglob("*"):
        if p.is_file() and p.suffix in (".log", ".json", ".yaml", ".txt", ".wandb"):
            texts.append(p.read_bytes().decode("utf-8", "replace"))
    logs = Path("/tmp/ray/session_latest/logs")
    if logs.exists():
        for p in logs.rglob("*"):
            if p.is_file() and p.stat().st_size < 20_000_000:
                texts.append(p.read_bytes().decode("utf-8", "replace"))
    blob = "\n".join(texts)
    leaked = [s for s in sentinels if s in blob]
    assert not leaked, f"PHI leaked: {leaked[:3]}"


def test_rerun_is_a_noop(corpus, prefix_run):
    fs = corpus["fs"]
    before = sorted(fs.find(prefix_run["out"].split("://")[1] + "/embeddings"))
    proc = run_medray(
        corpus,
        "embed",
        f"input=s3://{corpus['bucket']}/in/",
        f"output={prefix_run['out']}",
        "max_error_fraction=0.5",
        *common(corpus),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = sorted(fs.find(prefix_run["out"].split("://")[1] + "/embeddings"))
    assert before == after
    summary = json.loads(fs.cat(prefix_run["out"].split("://")[1] + "/summary.json"))
    assert summary["records_read"] == 0 and summary["records_done_before"] == summary["records_total_in_output"]
    # the checkpoint's processor was not built again: the output remembers its preprocessing hash
    # (Ray does start: the input's archives keep their rows and are opened to check their members)
    assert "preprocessing_wait" not in summary["driver_seconds"]
    first = json.loads(fs.cat(prefix_run["out"].split("://")[1] + f"/runs/{_first_run_id(fs, prefix_run)}.json"))
    assert 0 < first["first_row_s"] < first["wall_s"] + 30 and first["driver_peak_rss_mb"] > 0


def _first_run_id(fs, prefix_run) -> str:
    runs = sorted(fs.ls(prefix_run["out"].split("://")[1] + "/runs"))
    return runs[0].rsplit("/", 1)[-1][: -len(".json")]


def test_other_encoder_into_same_output_is_refused(corpus, prefix_run):
    proc = run_medray(
        corpus,
        "embed",
        f"input=s3://{corpus['bucket']}/in/dicom/",
        f"output={prefix_run['out']}",
        *common(corpus, "timm_image"),
    )
    assert proc.returncode == 2
    assert "config key 'output'" in proc.stderr and "Traceback" not in proc.stderr


def test_manifest_to_local_with_timm_carries_columns_and_matches_plain_python(corpus, tmp_path):
    import timm
    import torch
    from PIL import Image

    from medray.platform.decoders import decode_bytes

    out = tmp_path / "emb"
    proc = run_medray(
        corpus,
        "embed",
        f"input=s3://{corpus['bucket']}/meta/manifest.parquet",
        f"output={out}",
        *common(corpus, "timm_image"),
        "encoder.pooling=pooler",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    emb = pq.read_table(out / "embeddings").to_pylist()
    manifest = pq.read_table(corpus["samples"] / "manifest.parquet").to_pylist()
    assert len({r["record_id"] for r in emb}) == len(manifest)
    by_uri = {m["uri"]: m for m in manifest}
    for r in emb:  # label and site carried; manifest's own "modality" kept as manifest_modality
        assert r["label"] == by_uri[r["uri"]]["label"] and r["site"] == by_uri[r["uri"]]["site"]
        assert r["manifest_modality"] == by_uri[r["uri"]]["modality"]
    # parity: the job's embedding == timm applied in plain Python to its own transform's output
    local = corpus["ckpt"]["timm_image"]["local"]
    model = timm.create_model(f"local-dir:{local}", pretrained=True).eval()  # timm's own loader
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    assert any(r["modality"] == "CT" for r in emb)
    for r in emb:
        rel = r["uri"].split("/in/", 1)[1]
        decoded = decode_bytes((corpus["samples"] / rel).read_bytes(), name=rel, dicom=JOB_DICOM_OPTIONS)
        img = next(f.image for f in decoded.frames if f.frame == r["frame"])
        with torch.inference_mode():
            x = transform(Image.fromarray(img)).unsqueeze(0)
            ref = model.forward_head(model.forward_features(x), pre_logits=True)[0].numpy()
        np.testing.assert_allclose(np.asarray(r["embedding"], np.float32), ref, atol=1e-5, rtol=0)


def test_prefix_embedding_matches_plain_transformers(corpus, prefix_run):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from medray.platform.decoders import decode_bytes

    local = corpus["ckpt"]["hf_image"]["local"]
    processor = AutoImageProcessor.from_pretrained(local)
    model = AutoModel.from_pretrained(local).eval()
    emb = read_parts(corpus["fs"], prefix_run["out"] + "/embeddings").to_pylist()
    picked = [r for r in emb if r["uri"].endswith((".png", ".jpg")) or r["uri"].endswith("0004_dx.dcm")]
    assert len(picked) >= 4
    for r in picked:
        rel = r["uri"].split("/in/", 1)[1]
        decoded = decode_bytes((corpus["samples"] / rel).read_bytes(), name=rel, dicom=JOB_DICOM_OPTIONS)
        img = next(f.image for f in decoded.frames if f.frame == r["frame"])
        with torch.inference_mode():
            px = processor(images=Image.fromarray(img), return_tensors="pt")["pixel_values"]
            ref = model(pixel_values=px).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(np.asarray(r["embedding"], np.float32), ref, atol=1e-5, rtol=0)


def test_error_fraction_over_limit_exits_nonzero_after_writing_quarantine(corpus, tmp_path):
    out = tmp_path / "hostile"
    proc = run_medray(corpus, "embed", f"input=s3://{corpus['bucket']}/in/hostile/", f"output={out}", *common(corpus))
    assert proc.returncode == 3
    assert "max_error_fraction" in proc.stderr and "Traceback" not in proc.stderr
    assert pq.read_table(out / "quarantine").num_rows == corpus["info"]["expected"]["hostile_files"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_run_resumes_to_exactly_one_row_per_record(corpus, tmp_path, where):
    """SIGKILL mid-run, then the same command: one row per record, exit 0, no traceback (local and s3 outputs)."""
    fs = corpus["fs"]
    if where == "s3":
        out = f"s3://{corpus['bucket']}/out/killed-{tmp_path.name}"
        key = out.split("://", 1)[1]

        def written() -> bool:
            fs.invalidate_cache()
            return fs.exists(key + "/embeddings") and any(p.endswith(".parquet") for p in fs.find(key + "/embeddings"))

        def embeddings() -> pa.Table:
            fs.invalidate_cache()
            return read_parts(fs, out + "/embeddings")

        def summary() -> dict:
            return json.loads(fs.cat_file(key + "/summary.json"))
    else:
        out = tmp_path / "resume"

        def written() -> bool:
            d = out / "embeddings"
            return d.exists() and any(p.suffix == ".parquet" for p in d.iterdir())

        def embeddings() -> pa.Table:
            return pq.read_table(out / "embeddings") if (out / "embeddings").exists() else pa.table({})

        def summary() -> dict:
            return json.loads((out / "summary.json").read_text())

    args = [
        "embed",
        f"input=s3://{corpus['bucket']}/in/dicom/",
        f"output={out}",
        *common(corpus),
        "compute.read_batch_size=1",
        "compute.decode_batch_size=1",
        "compute.batch_size=1",
        "tracking.enabled=false",
    ]
    env = dict(
        os.environ,
        MEDRAY_HOME=str(corpus["home"]),
        MEDRAY_CACHE_DIR=str(corpus["home"] / "cache"),
        MEDRAY_PATIENT_SALT="test-salt",
        MEDRAY_PROGRESS="0",
    )
    log = open(tmp_path / "killed-run.log", "wb")
    proc = subprocess.Popen([MEDRAY, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if written():
            # kill -9 the driver and everything it started (its own Ray), nobody else's Ray
            family = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for child in family:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    log.close()
    if not killed:
        print((tmp_path / "killed-run.log").read_text()[-3000:])
    first = embeddings().num_rows
    done = run_medray(corpus, *args[0:], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    emb = embeddings()
    keys = list(zip(emb.column("record_id").to_pylist(), emb.column("frame").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicated rows after resume"
    exp = corpus["info"]["expected"]
    assert len({k for k, _ in keys}) == exp["dicom_files"] and len(keys) == exp["dicom_frames"]
    print(f"killed={killed} rows_before_resume={first}")
    if killed:
        assert 0 < first < exp["dicom_frames"], "the kill should have landed mid-run"
        assert summary()["records_done_before"] > 0
    # once more: nothing left, so neither Ray nor the encoder's processor starts
    again = run_medray(corpus, *args[0:], timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    phases = summary()["driver_seconds"]
    assert "ray_init" not in phases and "preprocessing_wait" not in phases, phases


def test_multirun_sweep_writes_one_output_per_point_in_one_wandb_group(corpus, tmp_path):
    out = tmp_path / "sweep"
    proc = run_medray(
        corpus,
        "embed",
        "-m",
        f"input=s3://{corpus['bucket']}/in/photos/",
        f"output={out}/" + "${encoder.pooling}",
        "encoder.pooling=cls,mean",
        "tracking.dir=" + str(tmp_path / "wb"),
        *common(corpus)[:-1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for pooling in ("cls", "mean"):
        summary = json.loads((out / pooling / "summary.json").read_text())
        assert summary["records_embedded"] == corpus["info"]["expected"]["photos"]
        assert summary["config"]["encoder"]["pooling"] == pooling
    a = pq.read_table(out / "cls" / "embeddings").column("embedding").to_pylist()
    b = pq.read_table(out / "mean" / "embeddings").column("embedding").to_pylist()
    assert not np.allclose(np.asarray(a[0]), np.asarray(b[0]))
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
