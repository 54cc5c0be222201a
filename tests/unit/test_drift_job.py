"""``medray drift`` on synthetic embed outputs with a known shift (no Ray): groups, windows, errors, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from medray.jobs.drift import DriftConf, run_drift
from medray.platform.drift import OODReference
from medray.platform.errors import ConfigError
from medray.platform.records import record_id


def _embed_output(
    root: Path, x: np.ndarray, *, prefix: str, weights: str = "w1", meta: list[dict] | None = None
) -> str:
    """A minimal `medray embed` output: _medray.json and one embeddings part."""
    (root / "embeddings").mkdir(parents=True)
    (root / "_medray.json").write_text(json.dumps({"encoder": "tiny", "weights_hash": weights}))
    n = len(x)
    uris = [f"{prefix}/{i}.dcm" for i in range(n)]
    table = pa.table(
        {
            "record_id": [record_id(u, "") for u in uris],
            "uri": uris,
            "member": [""] * n,
            "segment": [None] * n,
            "embedding": pa.array(list(x.astype(np.float32)), pa.list_(pa.float32())),
            "modality": ["DX" if i % 2 else "CT" for i in range(n)],
            "metadata": [json.dumps(m) for m in (meta or [{"manufacturer": "ACME"}] * n)],
        }
    )
    pq.write_table(table, root / "embeddings" / "part-0.parquet")
    return str(root)


def _cloud(n: int, seed: int, shift: float = 0.0, dim: int = 16) -> np.ndarray:
    centre = np.random.default_rng(99).normal(size=dim) * 2
    x = centre + np.random.default_rng(seed).normal(size=(n, dim))
    x[:, :4] += shift
    return x


def _conf(**kw: Any) -> Any:
    c = OmegaConf.merge(OmegaConf.structured(DriftConf), {"permutations": 200, **kw})
    return OmegaConf.to_object(c)


def test_drift_alarms_on_a_shift_only(tmp_path: Path) -> None:
    ref = _embed_output(tmp_path / "ref", _cloud(120, 1), prefix="r")
    same = _embed_output(tmp_path / "same", _cloud(120, 2), prefix="s")
    moved = _embed_output(tmp_path / "moved", _cloud(120, 3, shift=2.0), prefix="m")
    quiet = run_drift(_conf(reference=ref, current=same))
    loud = run_drift(_conf(reference=ref, current=moved))
    assert quiet["overall"]["p_value"] > 0.05 and not quiet["overall"]["alarm"] and quiet["alarms"] == 0
    assert loud["overall"]["p_value"] < 0.01 and loud["overall"]["alarm"]
    assert [g["group"] for g in loud["groups"]] == [{"modality": "CT"}, {"modality": "DX"}]
    assert all(g["reference"] == "matched" and g["n_reference"] == 60 for g in loud["groups"])
    assert loud["ood"]["alarm_rate"] > quiet["ood"]["alarm_rate"]
    out = Path(loud["output"])
    assert out == tmp_path / "moved" / "drift"
    scores = pq.read_table(out / "ood.parquet").to_pydict()
    assert len(scores["ood_score"]) == 120 and set(scores["modality"]) == {"CT", "DX"}
    assert json.loads((out / "drift.json").read_text())["overall"]["alarm"] is True
    ood = OODReference.load(str(out / "reference.npz"))
    assert ood.threshold == pytest.approx(loud["ood"]["threshold"])
    assert ood.provenance["weights_hash"] == "w1"
    html = (out / "report" / "index.html").read_text()
    assert "Drift over time" not in html  # no windows: no time axis
    assert "Out-of-distribution scores" in html and "ALARM" in html


def test_drift_per_site_and_window_from_a_manifest(tmp_path: Path) -> None:
    ref = _embed_output(tmp_path / "ref", _cloud(80, 1), prefix="r")
    x = np.concatenate([_cloud(40, 2), _cloud(40, 3, shift=3.0)])  # January fine, February moved
    cur = _embed_output(tmp_path / "cur", x, prefix="c")
    rows = [{"uri": f"r/{i}.dcm", "site": "A", "date": None} for i in range(80)]
    rows += [{"uri": f"c/{i}.dcm", "site": "A", "date": "2024-01-15" if i < 40 else "2024-02-03"} for i in range(80)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    doc = run_drift(
        _conf(
            reference=ref,
            current=cur,
            manifest=str(tmp_path / "manifest.parquet"),
            group_by=["site"],
            date_column="date",
            window="month",
        )
    )
    by_window = {g["window"]: g for g in doc["groups"]}
    assert set(by_window) == {"2024-01", "2024-02"}
    assert by_window["2024-01"]["p_value"] > 0.05 and not by_window["2024-01"]["alarm"]
    assert by_window["2024-02"]["p_value"] < 0.01 and by_window["2024-02"]["alarm"]
    assert "Drift over time" in (Path(doc["report"])).read_text()


def test_drift_groups_by_dicom_metadata_and_falls_back_to_the_whole_reference(tmp_path: Path) -> None:
    ref = _embed_output(tmp_path / "ref", _cloud(40, 1), prefix="r")
    meta = [{"manufacturer": "ACME" if i < 30 else "NEWCO"} for i in range(40)]
    cur = _embed_output(tmp_path / "cur", _cloud(40, 2), prefix="c", meta=meta)
    doc = run_drift(_conf(reference=ref, current=cur, group_by=["manufacturer"]))
    groups = {g["group"]["manufacturer"]: g for g in doc["groups"]}
    assert groups["ACME"]["reference"] == "matched" and groups["ACME"]["n_reference"] == 40
    assert groups["NEWCO"]["reference"] == "all" and groups["NEWCO"]["n_reference"] == 40  # a vendor never seen
    assert groups["NEWCO"]["n_current"] == 10 and groups["NEWCO"]["p_value"] is not None


def test_drift_refuses_other_weights_and_unknown_columns(tmp_path: Path) -> None:
    ref = _embed_output(tmp_path / "ref", _cloud(20, 1), prefix="r")
    other = _embed_output(tmp_path / "other", _cloud(20, 2), prefix="o", weights="w2")
    with pytest.raises(ConfigError, match="other weights"):
        run_drift(_conf(reference=ref, current=other))
    with pytest.raises(ConfigError, match="'group_by'.*'site'"):
        run_drift(_conf(reference=ref, current=ref, group_by=["site"]))
    with pytest.raises(ConfigError, match="date_column"):
        run_drift(_conf(reference=ref, current=ref, group_by=[], date_column="study_date"))
    with pytest.raises(ConfigError, match="window"):
        run_drift(_conf(reference=ref, current=ref, window="fortnight"))
    with pytest.raises(ConfigError, match="permutations"):
        run_drift(_conf(reference=ref, current=ref, permutations=10))
    doc = run_drift(_conf(reference=ref, current=ref, group_by=[]))  # one "all" group
    assert doc["groups"] == [] and doc["overall"]["reference"] == "all"


def test_p_values_do_not_depend_on_the_order_records_were_written(tmp_path: Path) -> None:
    x = _cloud(80, 2)  # no shift: a p-value in the middle, where the permutations' draw shows
    ref = _embed_output(tmp_path / "ref", _cloud(80, 1), prefix="r")
    a = _embed_output(tmp_path / "a", x, prefix="c")
    b = tmp_path / "b"
    b.mkdir()
    (b / "_medray.json").write_text((Path(a) / "_medray.json").read_text())
    (b / "embeddings").mkdir()
    table = pq.read_table(Path(a) / "embeddings" / "part-0.parquet")
    pq.write_table(table.take(np.random.default_rng(0).permutation(80)), b / "embeddings" / "part-0.parquet")
    one = run_drift(_conf(reference=ref, current=a, group_by=[]))
    two = run_drift(_conf(reference=ref, current=str(b), group_by=[]))
    assert 0.05 < one["overall"]["p_value"] == two["overall"]["p_value"]
    assert one["overall"]["statistic"] == pytest.approx(two["overall"]["statistic"])


def test_fail_on_alarm_sets_the_exit_code(tmp_path: Path, capsys) -> None:
    from medray.jobs.drift import main

    ref = _embed_output(tmp_path / "ref", _cloud(60, 1), prefix="r")
    moved = _embed_output(tmp_path / "moved", _cloud(60, 3, shift=2.0), prefix="m")
    base = {"reference": ref, "current": moved, "permutations": 200, "group_by": []}
    assert main(OmegaConf.merge(OmegaConf.structured(DriftConf), base)) == 0
    assert main(OmegaConf.merge(OmegaConf.structured(DriftConf), {**base, "fail_on_alarm": True})) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("drift: 60 current vs 60 reference records, overall MMD p=") and "ALARM" in line
