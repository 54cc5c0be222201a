"""Progress while a job runs and the closing outcome table (no Ray)."""

from __future__ import annotations

import io
import time

import pyarrow as pa
import pytest

from medray.pipeline.outcomes import format_outcomes, run_outcomes
from medray.pipeline.progress import (
    Progress,
    ProgressSnapshot,
    counts_of,
    format_duration,
    format_epoch_line,
    format_progress,
)
from medray.pipeline.sink import aggregate_stats, write_tables
from medray.platform.records import record_id
from medray.platform.runtime import progress_mode
from tests.unit.test_sink import _ok_rows


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_durations_read_like_a_person_writes_them():
    assert format_duration(0) == "0s"
    assert format_duration(59.4) == "59s"
    assert format_duration(185) == "3m05s"
    assert format_duration(7620) == "2h07m"
    assert format_duration(None) == "?" and format_duration(float("inf")) == "?" and format_duration(-1) == "?"


def test_log_line_has_counts_rate_and_time_left_and_no_control_characters():
    snap = ProgressSnapshot(embedded=1200, quarantined=20, skipped=14, total=5000, elapsed_s=27.0, rate=50.0)
    line = format_progress(snap, tty=False)
    assert line == (
        "medray embed: 1,234/5,000 records (25%): 1,200 embedded, 20 quarantined, 14 skipped; "
        "50.0 records/s; 1m15s left (27s elapsed)"
    )
    assert "\r" not in line and "\x1b" not in line
    # no total (a manifest, archives): no percentage, no time left
    line = format_progress(ProgressSnapshot(3, 1, 0, None, 5.0, 0.8), tty=False)
    assert line.startswith("medray embed: 4 records: 3 embedded, 1 quarantined, 0 skipped; 0.8 records/s")
    assert "left" not in line and "%" not in line
    final = format_progress(ProgressSnapshot(10, 1, 1, 12, 6.0, 2.0), tty=False, final=True)
    assert final.endswith("12/12 records (100%): 10 embedded, 1 quarantined, 1 skipped; 2.0 records/s; done in 6s")


def test_terminal_bar_fits_the_width():
    snap = ProgressSnapshot(embedded=50, quarantined=0, skipped=0, total=100, elapsed_s=10.0, rate=5.0)
    bar = format_progress(snap, tty=True, width=200)
    assert bar.startswith("embed [##########----------] 50/100 50% | 50 embedded, 0 quarantined, 0 skipped")
    assert bar.endswith("5.0 rec/s | 10s left")
    assert len(format_progress(snap, tty=True, width=40)) == 39


def test_rate_is_measured_over_the_recent_window():
    clock = FakeClock()
    p = Progress("embed", total=1000, stream=io.StringIO(), tty=False, enabled=True, clock=clock).start()
    clock.t += 60  # a slow start (actors loading their model)
    p.add({"records": 10})
    assert p.snapshot().rate == pytest.approx(10 / 60)
    for _ in range(10):  # then 10 records/s
        clock.t += 5
        p.add({"records": 45, "quarantined": 3, "skipped": 2})
        snap = p.snapshot()
    assert snap.rate == pytest.approx(10.0)
    assert snap.done == 510 and snap.left_s == pytest.approx(49.0)


def test_log_mode_writes_plain_lines_then_a_closing_line():
    out = io.StringIO()
    with Progress("embed", total=4, stream=out, tty=False, interval_s=0.05, enabled=True) as p:
        p.add({"records": 2, "quarantined": 1, "skipped": 1, "rows": 5})
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert all(ln.startswith("medray embed: ") for ln in lines)
    assert "2 embedded, 1 quarantined, 1 skipped" in lines[0]
    assert lines[-1].startswith("medray embed: 4/4 records (100%)") and "done in" in lines[-1]


def test_tty_mode_redraws_one_line_in_place():
    out = io.StringIO()
    polled = {"embedded": 0}

    def poll() -> dict:
        polled["embedded"] += 1
        return dict(polled)

    p = Progress("embed", total=10, stream=out, tty=True, enabled=True)
    p.poll = poll  # the staged plan's counter actor
    p.start()
    p.tick()
    p.tick()
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\x1b[K\n")
    assert "embed [" in text and "3/10" in text


def test_progress_off_writes_nothing(monkeypatch):
    monkeypatch.setenv("MEDRAY_PROGRESS", "0")
    assert progress_mode() == "off"
    out = io.StringIO()
    with Progress("embed", total=3, stream=out) as p:
        p.add({"records": 3})
    assert out.getvalue() == "" and p.snapshot().done == 3
    monkeypatch.setenv("MEDRAY_PROGRESS", "ray")
    assert progress_mode() == "ray" and not Progress("embed").enabled
    monkeypatch.delenv("MEDRAY_PROGRESS")
    assert progress_mode() == "medray" and Progress("embed").enabled


def test_counts_come_from_the_write_counters():
    assert counts_of({"records": 3, "rows": 9, "quarantined": 1, "skipped": 2}) == {
        "embedded": 3,
        "quarantined": 1,
        "skipped": 2,
    }
    assert counts_of(None) == {"embedded": 0, "quarantined": 0, "skipped": 0}


def test_epoch_line():
    line = format_epoch_line(epoch=1, epochs=3, step=12, loss=0.693, lr=3e-4, auroc=0.5, ece=0.12, left_s=30)
    assert line == "medray finetune: epoch 1/3 step 12 loss 0.6930 val AUROC 0.500 ECE 0.120 lr 3.00e-04 30s left"
    line = format_epoch_line(epoch=3, epochs=3, step=36, loss=1.5, lr=0.0, mse=0.25, left_s=0)
    assert "val MSE 0.25 lr" in line and "AUROC" not in line and line.endswith("0s left")
    assert "AUROC - ECE -" in format_epoch_line(epoch=1, epochs=1, step=1, loss=1.0, lr=1.0, auroc=float("nan"))


def _bad_rows() -> pa.Table:
    return pa.table(
        {
            "uri": ["/d/bad.dcm", "/d/sr.dcm"],
            "member": ["", ""],
            "record_id": [record_id("/d/bad.dcm"), record_id("/d/sr.dcm")],
            "status": ["error", "skipped"],
            "stage": ["decode", "decode"],
            "error_class": ["DecodeError", "NonImageObject"],
            "message": ["truncated pixel data", "structured report"],
            "route": [None, "image"],
        }
    )


def test_closing_table_counts_this_runs_outcomes_by_reason(tmp_path):
    out = str(tmp_path / "emb")
    first = write_tables([_ok_rows(3), _bad_rows()], out, None, "0")
    second = write_tables([_ok_rows(1)], out, None, "0")
    stats = aggregate_stats([first, second])
    outcomes = run_outcomes(stats)
    assert dict(outcomes.embedded) == {"CR": 4}
    assert dict(outcomes.quarantined) == {("decode", "DecodeError"): 1}
    assert dict(outcomes.skipped) == {("NonImageObject", "image"): 1}
    table = format_outcomes(outcomes, out, title="outcomes of this run: 6 records", notes=["2 done before"])
    lines = table.splitlines()
    assert lines[0] == "outcomes of this run: 6 records"
    assert lines[2].split() == ["embedded", "CR", "4"]
    assert lines[3].split() == ["quarantined", "DecodeError", "(decode)", "1"]
    assert lines[4].split() == ["skipped", "NonImageObject", "(image)", "1"]
    assert lines[-1].strip() == "2 done before"


def test_finetune_closing_table_counts_labelled_rows_and_unusable_records(tmp_path):
    import dataclasses

    from medray.jobs.finetune.data import QuarantineTarget, write_quarantine
    from medray.jobs.finetune.recipe import FinetuneResult, inputs_table

    out = str(tmp_path / "ft")
    bad = _bad_rows().drop_columns(["route"])
    write_quarantine(bad, QuarantineTarget(out, {}, "0"))
    fields = {f.name: None for f in dataclasses.fields(FinetuneResult) if f.default is dataclasses.MISSING}
    res = FinetuneResult(  # type: ignore[arg-type]
        **{
            **fields,
            "output": out,
            "splits": {
                "train": {"rows": 12, "usable": 10},
                "val": {"rows": 4, "usable": 4},
                "test": {"rows": 2, "usable": 2},
            },
        }
    )
    lines = inputs_table(res).splitlines()
    assert lines[0] == "inputs of this fine-tune: 18 manifest rows, 16 labelled"
    body = [ln.split() for ln in lines[2:6]]
    assert body == [
        ["labelled", "test", "2"],
        ["labelled", "train", "10"],
        ["labelled", "val", "4"],
        ["quarantined", "DecodeError", "(decode)", "1"],
    ]
    skipped = {" ".join(ln.split()) for ln in lines if ln.strip().startswith("skipped")}
    assert skipped == {"skipped NonImageObject (decode) 1", "skipped Unlabelled (manifest) 2"}
