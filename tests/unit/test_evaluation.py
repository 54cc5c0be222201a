"""Held-out evaluation and data-efficiency curves, without Ray: metrics against scikit-learn, the
patient bootstrap, aggregation, nested training sets, and ``medray probe`` on a written embed output."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray.platform.evaluation import _draw_metrics, aggregate, bootstrap_weights, evaluate, label_metrics
from medray.platform.probing import ProbeData, default_sizes, learning_curves, split_patients
from medray.platform.records import record_id


def _scores(n_patients: int = 120, per: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), per).astype(str)
    latent = rng.normal(size=n_patients)[np.repeat(np.arange(n_patients), per)]
    y = (latent + rng.normal(size=len(groups)) * 0.5 > 0).astype(float)
    p = np.round(1 / (1 + np.exp(-(latent + rng.normal(size=len(groups))))), 2)  # ties on purpose
    return y, p, groups


def test_every_draw_equals_scikit_learn_with_those_weights():
    y, p, groups = _scores()
    weights = bootstrap_weights(groups, 25, seed=3)
    draws = _draw_metrics(y.astype(int), p, weights, 0.5)
    for k in range(25):
        want = label_metrics(y.astype(int), p, threshold=0.5, weights=weights[k])
        for metric, value in want.items():
            assert abs(draws[metric][k] - value) < 1e-9, (metric, k)


def test_bootstrap_resamples_patients_not_records():
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    w = bootstrap_weights(groups, 200, seed=0)
    assert w.shape == (200, 6) and (w.sum(axis=1) > 0).all()
    # every record of a patient carries the patient's draw count; each draw picks 3 patients
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    assert (w[:, [0, 3, 4]].sum(axis=1) == 3).all()


def test_intervals_widen_with_fewer_patients_and_hold_the_point():
    y, p, groups = _scores(n_patients=300, per=1)
    many = evaluate(y[:, None], p[:, None], ["x"], groups=groups, n_boot=400)["metrics"]["x"]["auroc"]
    few = evaluate(y[:60, None], p[:60, None], ["x"], groups=groups[:60], n_boot=400)["metrics"]["x"]["auroc"]
    for ci in (many, few):
        assert ci["lo"] <= ci["value"] <= ci["hi"]
    assert (few["hi"] - few["lo"]) > (many["hi"] - many["lo"])
    # three records per patient carry no more information than one: the interval says so
    y3, p3, g3 = np.repeat(y[:60], 3), np.repeat(p[:60], 3), np.repeat(groups[:60], 3)
    same = evaluate(y3[:, None], p3[:, None], ["x"], groups=g3, n_boot=400)["metrics"]["x"]["auroc"]
    assert abs((same["hi"] - same["lo"]) - (few["hi"] - few["lo"])) < 0.05


def test_document_shape_subgroups_and_missing_labels():
    y, p, groups = _scores()
    y2 = np.stack([y, 1 - y], axis=1)
    y2[:30, 1] = np.nan  # the second label is unlabelled for some records
    p2 = np.stack([p, 1 - p], axis=1)
    site = np.where(groups.astype(int) % 2 == 0, "A", "B")
    doc = evaluate(y2, p2, ["pos", "neg"], groups=groups, subgroups={"site": site}, n_boot=100)
    assert doc["counts"] == {"records": len(y), "patients": 120}
    assert doc["metrics"]["neg"]["n_pos"] + doc["metrics"]["neg"]["n_neg"] == len(y) - 30
    assert set(doc["subgroups"]["site"]) == {"A", "B"}
    entry = doc["subgroups"]["site"]["A"]["pos"]
    assert entry["gap"] == pytest.approx(entry["auroc"]["value"] - doc["metrics"]["pos"]["auroc"]["value"], abs=1e-5)
    assert doc["roc"]["pos"]["fpr"][0] == 0.0 and doc["roc"]["pos"]["tpr"][-1] == 1.0
    assert sum(doc["reliability"]["pos"]["count"]) == len(y)
    json.dumps(doc)  # plain JSON: no numpy scalars, no NaN


def test_aggregate_by_patient():
    y = np.array([[0], [1], [0], [0]], float)
    p = np.array([[0.2], [0.9], [0.1], [0.3]])
    ya, pa_, first = aggregate(y, p, ["a", "a", "b", "b"], "max")
    assert ya.ravel().tolist() == [1, 0] and pa_.ravel().tolist() == [0.9, 0.3] and first.tolist() == [0, 2]
    _, pm, _ = aggregate(y, p, ["a", "a", "b", "b"], "mean")
    assert pm.ravel().tolist() == pytest.approx([0.55, 0.2])


def test_training_sets_are_nested_patient_sets_and_the_test_split_is_finetunes():
    groups = np.repeat([f"p{i}" for i in range(100)], 2)
    test = split_patients(groups, test_fraction=0.3, seed=1)
    assert (test[::2] == test[1::2]).all()  # a patient is wholly in or out
    assert 20 <= test[::2].sum() <= 40
    assert default_sizes(70) == [8, 16, 32, 64, 70]
    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, 100), 2).astype(float)[:, None]
    x = rng.normal(size=(200, 8)) + y * np.eye(8)[0] * 2
    curves = learning_curves(ProbeData(x, y, groups, ["f"]), heads=["logreg"], repeats=3, seed=1)
    c = curves["curves"]["logreg"]
    assert c["size"] == curves["sizes"] and len(c["runs"]) == len(c["size"]) and len(c["runs"][0]) == 3
    assert c["auroc_mean"][-1] > 0.8 and c["auroc_mean"][-1] >= c["auroc_mean"][0] - 0.05
    assert all(lo <= m <= hi for lo, m, hi in zip(c["auroc_lo"], c["auroc_mean"], c["auroc_hi"]) if m is not None)


def _embed_output(root: Path, n_patients: int = 60, per: int = 3, dim: int = 16) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    out = root / "emb"
    (out / "embeddings").mkdir(parents=True)
    rows, manifest = [], []
    for k in range(n_patients):
        latent = rng.normal()
        for j in range(per):
            uri = str(root / f"p{k}" / f"{j}.dcm")
            y = int(latent + rng.normal() * 0.5 > 0)
            base = rng.normal(size=dim) + y * 2.0 * np.eye(dim)[0]
            rid = record_id(uri, "")
            for frame in (0, 1):  # two frames: the record's embedding is their mean
                rows.append(
                    {
                        "record_id": rid,
                        "uri": uri,
                        "member": "",
                        "frame": frame,
                        "segment": None,
                        "embedding": (base + (frame - 0.5)).astype("f4").tolist(),
                        "patient_key": f"key{k}",
                        "modality": "CR",
                    }
                )
            manifest.append({"uri": uri, "effusion": y, "site": "AB"[k % 2]})
    manifest.append({"uri": str(root / "never-embedded.dcm"), "effusion": 1, "site": "A"})
    pq.write_table(pa.Table.from_pylist(rows), out / "embeddings" / "part-0.parquet")
    ident = {"encoder": "tiny", "checkpoint": "/ckpt", "weights_hash": "ab" * 32, "preprocessing_hash": "cd" * 32}
    (out / "_medray.json").write_text(json.dumps(ident))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "effusion", "site"])
        w.writeheader()
        w.writerows(manifest)
    return out, labels


@pytest.mark.slow
def test_medray_probe_cli_writes_curves_evaluation_and_a_servable_head(tmp_path):
    from medray.encoders.heads import load_artifact

    out, labels = _embed_output(tmp_path)
    env = dict(os.environ, MEDRAY_HOME=str(tmp_path / "home"))
    cmd = [str(Path(sys.executable).parent / "medray"), "probe", f"embeddings={out}", f"labels={labels}"]
    proc = subprocess.run(
        [*cmd, "task.labels=[effusion]", "subgroups=[site]", "repeats=2", "bootstrap=50", "heads=[logreg]"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "probe: 180 records of 60 patients" in proc.stdout
    doc = json.loads((out / "probe" / "probe.json").read_text())
    assert doc["counts"]["manifest_rows_not_embedded"] == 1
    assert doc["sizes"][0] == 8 and doc["sizes"][-1] == doc["train_pool"]
    assert doc["curves"]["logreg"]["auroc_mean"][-1] > 0.8
    assert (out / "probe" / "curves" / "tiny-abababab.json").exists()
    evaluation = json.loads((out / "probe" / "evaluation.json").read_text())
    assert set(evaluation["subgroups"]["site"]) == {"A", "B"}
    head, card, _, _ = load_artifact(doc["export"]["uri"])
    assert card.encoder["weights_hash"] == "ab" * 32 and card.labels == ["effusion"]
    # the exported head scores the held-out records as the probe did (a record: the mean of its frames)
    frames: dict[str, list] = {}
    for r in pq.read_table(out / "embeddings").to_pylist():
        frames.setdefault(r["record_id"], []).append(r["embedding"])
    preds = pq.read_table(out / "probe" / "predictions").to_pylist()
    assert len(preds) == evaluation["counts"]["records"]
    x = np.stack([np.mean(frames[r["record_id"]], axis=0) for r in preds])
    np.testing.assert_allclose(head.predict(x)[:, 0], [r["p_effusion"] for r in preds], atol=1e-4)
    bad = subprocess.run([*cmd, "task.labels=[nope]"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
