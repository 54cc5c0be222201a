"""The report builders (no Ray, no browser): figures drawn, one self-contained page, storage, W&B."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray.platform.records import embedding_schema
from medray.platform.report import (
    REPORT_FILE,
    Report,
    embed_report,
    evaluation_report,
    outcomes_figure,
    probe_report,
    project_2d,
    read_documents,
    throughput_figure,
)
from medray.testing.reports import sample_evaluation, sample_probe

#: Anything that would make a browser fetch: a URL in an attribute, CSS url(), @import, a script.
_EXTERNAL = re.compile(
    r"""(?:src|href|action|data|poster)\s*=\s*["']?(?!#)[^"'\s>]+|url\((?!\s*["']?#)|@import|<script|<link""", re.I
)


def _drawn(svg: str) -> int:
    return len(re.findall(r"<(?:path|use|line|rect|polyline|polygon|circle)\b", svg))


def _data_groups(svg: str) -> int:
    """Groups drawn from the data (lines, markers, bars, bands), as the report marks them."""
    return len(re.findall(r'<g id="data-\d+"', svg))


def assert_self_contained(page: str) -> None:
    assert not _EXTERNAL.findall(page), _EXTERNAL.findall(page)[:3]
    assert "http://" not in page and "https://" not in page


def test_evaluation_report_draws_every_plot_it_has_data_for():
    report = evaluation_report(sample_evaluation())
    names = [f.name for f in report.figures]
    assert names == ["roc", "reliability", "forest-effusion", "forest-cardiomegaly", "history"]
    for fig in report.figures:
        assert fig.svg.startswith("<svg") and fig.svg.endswith("</svg>")
        assert _drawn(fig.svg) > 20, fig.name
        assert _data_groups(fig.svg) >= 2, fig.name
    metrics = next(t for t in report.tables if t.name == "metrics")
    assert [r[0] for r in metrics.rows] == ["effusion", "cardiomegaly", "macro"]
    assert re.fullmatch(r"0\.\d{3} \(0\.\d{3}\u2013[01]\.\d{3}\)", metrics.rows[0][1])
    subgroups = next(t for t in report.tables if t.name == "subgroups")
    assert len(subgroups.rows) == 2 * 5  # 2 labels x (3 sites + 2 sexes)
    page = report.to_html()
    assert_self_contained(page)


def test_evaluation_report_without_history_or_subgroups_draws_no_empty_plot():
    doc = sample_evaluation(("effusion",), history=False)
    doc.pop("subgroups")
    doc["reliability"] = {}
    report = evaluation_report(doc)
    assert [f.name for f in report.figures] == ["roc"]
    assert [s.title for s in report.sections] == ["Performance"]


def test_finetune_without_a_test_split_draws_its_training_only():
    report = evaluation_report({"labels": ["effusion"], "history": sample_evaluation()["history"]})
    assert [s.title for s in report.sections] == ["Training"] and [f.name for f in report.figures] == ["history"]


def test_reports_of_the_documents_evaluate_and_probe_write():
    """The shapes agreed with medray.platform.evaluation and medray.platform.probing, made by them."""
    from medray.platform.evaluation import evaluate
    from medray.platform.probing import ProbeData, learning_curves

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 2).astype(str)
    y = (rng.random((60, 2)) < 0.4).astype(float)[np.repeat(np.arange(60), 2)]
    x = rng.normal(size=(120, 8)) + y[:, :1] + 0.5 * y[:, 1:]
    site = np.array(["s1", "s2", "s3"])[rng.integers(0, 3, 120)]
    site[:2] = "tiny"  # under min_subgroup: a count without an AUROC
    doc = evaluate(y, 1 / (1 + np.exp(-x[:, :2])), ["a", "b"], groups=groups, subgroups={"site": site}, n_boot=50)
    report = evaluation_report(json.loads(json.dumps(doc)))
    assert [f.name for f in report.figures] == ["roc", "reliability", "forest-a", "forest-b"]
    assert all(_data_groups(f.svg) >= 2 for f in report.figures)
    curves = learning_curves(ProbeData(x, y, groups, ["a", "b"]), repeats=2, sizes=[8, 16])
    probe = {"kind": "probe", "encoder": {"name": "enc", "weights_hash": "ab"}, "labels": ["a", "b"], **curves}
    report = probe_report([json.loads(json.dumps(probe))])
    assert [f.name for f in report.figures] == ["efficiency"] and _data_groups(report.figures[0].svg) == 4


def test_probe_report_puts_every_encoder_and_head_on_one_plot():
    docs = [sample_probe("rad_dino", quality=0.85), sample_probe("dinov2", quality=0.7)]
    report = probe_report(docs)
    assert [f.name for f in report.figures] == ["efficiency"]
    svg = report.figures[0].svg
    # 4 lines (2 encoders x 2 heads), each with a band: fill_between draws a path per band
    assert _drawn(svg) > 40
    best = next(t for t in report.tables if t.name == "best")
    assert [r[0] for r in best.rows] == ["rad_dino", "dinov2"]
    curves = next(t for t in report.tables if t.name == "curves")
    assert len(curves.rows) == 2 * 2 * 5
    assert_self_contained(report.to_html())
    with pytest.raises(ValueError, match="at least one"):
        probe_report([])


def test_write_local_and_read_documents(tmp_path: Path):
    report = evaluation_report(sample_evaluation()).extend(probe_report([sample_probe()]))
    uri = report.write(str(tmp_path / "out"))
    assert uri == str(tmp_path / "out" / REPORT_FILE) == report.uri
    page = Path(uri).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == len(report.figures) == 6
    assert not list((tmp_path / "out" / "report").glob(".tmp-*"))  # written atomically
    curves = tmp_path / "curves"
    curves.mkdir()
    for name in ("b", "a"):
        (curves / f"{name}.json").write_text(json.dumps(sample_probe(name)))
    docs = read_documents(str(curves))
    assert [d["encoder"]["name"] for d in docs] == ["a", "b"]
    assert read_documents(str(curves / "a.json"))[0]["kind"] == "probe"


def test_text_is_escaped():
    doc = sample_evaluation(("<script>x</script>",), history=False)
    page = evaluation_report(doc).to_html()
    assert "<script>" not in page and "&lt;script&gt;" in page


def _embed_output(root: Path, n: int = 60, dim: int = 16) -> None:
    rng = np.random.default_rng(0)
    schema = embedding_schema(dim, pa.schema([("site", pa.string())]))
    modality = ["CT" if i % 3 else "CR" for i in range(n)]
    cols: dict = {name: [None] * n for name in schema.names}
    cols.update(
        record_id=[f"r{i}" for i in range(n)],
        modality=modality,
        encoder=["hf_image"] * n,
        site=[f"site{i % 2}" for i in range(n)],
        embedding=[(rng.normal(size=dim) + (3 if m == "CT" else 0)).astype("float32").tolist() for m in modality],
    )
    (root / "embeddings").mkdir(parents=True)
    for k in range(3):  # three parts
        part = pa.table({c: cols[c][k::3] for c in schema.names}, schema=schema)
        pq.write_table(part, root / "embeddings" / f"part-{k}.parquet")
    summary = {
        "run_id": "r1",
        "encoder": "hf_image",
        "untrained": True,
        "records_read": n + 3,
        "records_embedded": n,
        "rows_written": n,
        "quarantined": 3,
        "quarantined_by_class": {"DecodeError": 2, "LimitExceeded": 1},
        "skipped": 2,
        "skipped_by_reason": {"NonImageObject": 2},
        "records_done_before": 5,
        "wall_s": 9.5,
        "records_per_s": 6.6,
        "records_total_in_output": n + 10,
        "timeline": [[4.0 + i * 0.5, 6] for i in range(10)],
    }
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "runs").mkdir()
    (root / "runs" / "r0.json").write_text(json.dumps({**summary, "run_id": "r0", "records_read": 5}))
    (root / "runs" / "r1.json").write_text(json.dumps(summary))


def test_embed_report_outcomes_throughput_projection(tmp_path: Path):
    _embed_output(tmp_path)
    report = embed_report(str(tmp_path))
    assert [f.name for f in report.figures] == ["outcomes", "throughput", "projection-hf_image"]
    assert [_data_groups(f.svg) for f in report.figures] == [5, 2, 2]  # 5 bars; cumulative + rate; 2 sites
    assert "[UNTRAINED demo weights]" in report.title
    runs = next(t for t in report.tables if t.name == "runs")
    assert [r[:2] for r in runs.rows] == [["r0", "5"], ["r1", "63"]]
    scatter = report.figures[-1]
    assert "site" in scatter.title  # a carried site column wins over modality
    assert _drawn(scatter.svg) > 60  # one marker per point at least
    # a sample is capped
    small = embed_report(str(tmp_path), max_points=10)
    assert "10 embeddings" in small.figures[-1].caption
    assert_self_contained(report.to_html())


def test_embed_report_without_summary_says_what_to_give(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="medray embed"):
        embed_report(str(tmp_path))


def test_embed_report_with_no_embeddings_has_a_note(tmp_path: Path):
    (tmp_path / "summary.json").write_text(json.dumps({"encoder": "x", "quarantined": 2, "records_read": 2}))
    report = embed_report(str(tmp_path))
    assert [f.name for f in report.figures] == ["outcomes"]
    assert report.sections[-1].note.startswith("No embeddings")


def test_outcome_and_throughput_figures():
    fig = outcomes_figure([("embedded", "", 10), ("quarantined", "DecodeError", 2), ("skipped", "NoEncoder", 1)])
    assert _drawn(fig.svg) > 10
    fig = throughput_figure([[1.0, 4], [2.0, 4], [3.5, 8]])
    assert _drawn(fig.svg) > 10


def test_project_2d_separates_clusters_and_handles_tiny_inputs():
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(0, 1, (50, 8)), rng.normal(6, 1, (50, 8))])
    p = project_2d(x)
    assert p.shape == (100, 2)
    assert abs(p[:50, 0].mean() - p[50:, 0].mean()) > 5
    assert project_2d(np.ones((1, 8))).shape == (1, 2)
    assert project_2d(rng.normal(size=(5, 1))).shape == (5, 2)


def test_log_wandb_offline(tmp_path: Path):
    wandb = pytest.importorskip("wandb")
    report = probe_report([sample_probe()])
    run = wandb.init(
        project="medray-test",
        dir=str(tmp_path),
        mode="offline",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        report.log_wandb(run)
    finally:
        run.finish()
    media = list(Path(tmp_path).rglob("*.html"))
    assert media and any("<svg" in p.read_text() for p in media)


def test_log_run_logs_the_report(tmp_path: Path):
    from medray.platform.tracking import log_run

    run_dir = log_run(
        job="embed",
        config={},
        summary={"records": 1},
        mode="offline",
        directory=str(tmp_path),
        report=probe_report([sample_probe()]),
    )
    assert run_dir is not None
    assert any("<svg" in p.read_text() for p in Path(run_dir).rglob("*.html"))


def test_embed_timeline_is_small_and_relative():
    from medray.jobs.embed import _timeline

    parts = [[1000.0 + i * 0.1, 2] for i in range(1000)]
    tl = _timeline(parts, started=990.0)
    assert len(tl) <= 200 and sum(n for _t, n in tl) == 2000
    assert tl[0][0] >= 10.0 and tl[-1][0] == pytest.approx(10.0 + 99.9)
    assert _timeline([], None) == []
    assert _timeline([[5.0, 3]], None) == [[0.0, 3]]


def test_report_is_a_plain_dataclass():
    r = Report("t")
    assert r.figures == [] and r.tables == []
    assert "<h1>t</h1>" in r.to_html()
