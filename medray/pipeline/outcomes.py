"""What became of every input of an output: embedded, quarantined or skipped, by reason.

An output holds three tables of records: ``embeddings/`` (one or more rows per
record), ``quarantine/`` (could not be read or decoded: stage, error class,
PHI-free message) and ``skipped/`` (readable, deliberately not embedded:
reason and message). :func:`output_outcomes` counts distinct records in each,
by reason; a record skipped by an earlier run and embedded since counts once,
as embedded.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from medray.platform.storage import open_fs

__all__ = ["Outcomes", "output_outcomes", "format_outcomes", "run_outcomes"]


@dataclass
class Outcomes:
    """Distinct records per outcome and reason.

    Attributes:
        embedded: records with at least one embedding row, by modality.
        quarantined: records per ``(stage, error_class)``.
        skipped: records per ``(reason, modality)``.
    """

    embedded: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Every record accounted for."""
        return sum(self.embedded.values()) + sum(self.quarantined.values()) + sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``{"embedded": {modality: n}, "quarantined": {"stage/Class": n}, "skipped": {...}}``."""
        return {
            "embedded": dict(sorted(self.embedded.items())),
            "quarantined": {f"{s}/{c}": n for (s, c), n in sorted(self.quarantined.items())},
            "skipped": {f"{r}/{m}": n for (r, m), n in sorted(self.skipped.items())},
            "total": self.total,
        }


def _read(fs: Any, root: str, sub: str, columns: list[str]) -> list[dict]:
    d = posixpath.join(root, sub)
    fs.invalidate_cache(d)
    try:
        paths = sorted(p for p in fs.find(d) if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))
    except FileNotFoundError:
        return []
    rows: list[dict] = []
    for path in paths:
        try:
            with fs.open(path, "rb") as f:
                names = pq.read_schema(f).names
                f.seek(0)
                rows += pq.read_table(f, columns=[c for c in columns if c in names]).to_pylist()
        except FileNotFoundError:
            continue
    return rows


def output_outcomes(output: str, options: Mapping[str, Any] | None = None) -> Outcomes:
    """Count the records of an existing output by outcome and reason (reads ids and reasons only)."""
    fs, root = open_fs(output, options)
    out = Outcomes()
    seen: set[str] = set()
    embedded: dict[str, str] = {}
    for r in _read(fs, root, "embeddings", ["record_id", "modality"]):  # embeddings/<modality>/ too
        embedded.setdefault(r["record_id"], str(r.get("modality") or "unknown"))
    out.embedded.update(Counter(embedded.values()))
    seen.update(embedded)
    quarantined: dict[str, tuple[str, str]] = {}
    for r in _read(fs, root, "quarantine", ["record_id", "stage", "error_class"]):
        if r["record_id"] not in seen:
            quarantined[r["record_id"]] = (str(r.get("stage")), str(r.get("error_class")))
    out.quarantined.update(Counter(quarantined.values()))
    seen.update(quarantined)
    skipped: dict[str, tuple[str, str]] = {}
    for r in _read(fs, root, "skipped", ["record_id", "reason", "modality"]):
        if r["record_id"] not in seen:
            skipped[r["record_id"]] = (str(r.get("reason")), str(r.get("modality")))
    out.skipped.update(Counter(skipped.values()))
    return out


def run_outcomes(stats: Mapping[str, Any]) -> Outcomes:
    """The outcomes of one run, from its write counters.

    ``outcome_counts`` of :func:`~medray.pipeline.sink.write_tables`: what the closing
    table of ``medray embed`` shows, with no second pass over the output.
    """
    out = Outcomes()
    for outcome, reason, detail, n in stats.get("outcome_counts") or []:
        if outcome == "embedded":
            out.embedded[str(reason)] += int(n)
        elif outcome == "quarantined":
            out.quarantined[(str(detail), str(reason))] += int(n)
        elif outcome == "skipped":
            out.skipped[(str(reason), str(detail))] += int(n)
    return out


def format_outcomes(
    outcomes: Outcomes,
    output: str,
    *,
    title: str | None = None,
    first: str = "embedded",
    notes: Sequence[str] = (),
) -> str:
    """The outcome table as a person reads it, with where each kind of row lives.

    Args:
        outcomes: the counts.
        output: the output they were read from (where the quarantine and skipped rows are).
        title: the first line (default: ``outcomes of <output>: <total> records``).
        first: the name of the first outcome (``embedded``; ``finetune`` counts ``labelled`` rows per split).
        notes: lines added after the table.
    """
    head = title if title is not None else f"outcomes of {output}: {outcomes.total} records"
    lines = [head, f"  {'outcome':<12} {'reason':<32} {'records':>9}"]
    for modality, n in sorted(outcomes.embedded.items()):
        lines.append(f"  {first:<12} {modality:<32} {n:>9}")
    for (stage, cls), n in sorted(outcomes.quarantined.items()):
        lines.append(f"  {'quarantined':<12} {f'{cls} ({stage})':<32} {n:>9}")
    for (reason, modality), n in sorted(outcomes.skipped.items()):
        lines.append(f"  {'skipped':<12} {f'{reason} ({modality})':<32} {n:>9}")
    lines.append(
        f"  rows: {posixpath.join(output, 'quarantine')} and {posixpath.join(output, 'skipped')} "
        "(record_id, uri, member, reason, message)"
    )
    lines += [f"  {note}" for note in notes]
    return "\n".join(lines)
