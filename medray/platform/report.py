"""The report people look at: one self-contained ``index.html`` of figures and small tables.

A :class:`Report` is a title and sections; a section holds figures (inline SVG
drawn with matplotlib) and small tables. :meth:`Report.write` saves it as ONE
file, ``<output>/report/index.html``, through the storage layer (local paths,
``s3://``...): no scripts, fonts, stylesheets or images are fetched, so it opens
from a bucket download on a machine without network. :meth:`Report.log_wandb`
logs the same figures and tables to an active W&B run.

Builders turn what the jobs write into reports:

* :func:`evaluation_report` - ``evaluation.json`` of ``medray evaluate`` and of
  ``medray finetune``'s test split: metrics table, ROC curves, reliability
  diagram, subgroup forest plots, loss and AUROC per epoch;
* :func:`probe_report` - one or more ``probe.json`` (one per encoder): the
  data-efficiency curves of every encoder x head on one plot;
* :func:`embed_report` - an existing ``medray embed`` output: outcomes by
  reason, throughput over time and a 2-D projection of a sample of embeddings;
* :func:`drift_report` - ``drift.json`` of ``medray drift``: the two-sample
  test per group over time windows and the OOD score distributions.

Only counts, metric values, label names and subgroup values reach a report:
never a record's URI, message or metadata. matplotlib is imported when a
figure is drawn, not when this module is.

Example::

    >>> report = probe_report([json.load(open("probe.json"))])   # doctest: +SKIP
    >>> report.write("s3://bucket/probe/rad_dino")                 # doctest: +SKIP
    's3://bucket/probe/rad_dino/report/index.html'
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import itertools
import json
import logging
import math
import posixpath
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medray.platform.storage import atomic_write_bytes, join_uri, open_fs

__all__ = [
    "Figure",
    "Table",
    "Section",
    "Report",
    "REPORT_FILE",
    "roc_figure",
    "reliability_figure",
    "forest_figure",
    "history_figure",
    "efficiency_figure",
    "outcomes_figure",
    "throughput_figure",
    "scatter_figure",
    "project_2d",
    "evaluation_report",
    "probe_report",
    "zeroshot_report",
    "embed_report",
    "read_documents",
    "drift_figure",
    "ood_figure",
    "drift_report",
]

log = logging.getLogger("medray.report")

#: Where a report lives under a job's output.
REPORT_FILE = "report/index.html"
#: At most this many embeddings are projected per encoder.
MAX_SCATTER_POINTS = 2000
#: Categories beyond this many share one colour ("other").
_MAX_CATEGORIES = 10
_COLORS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#222255", "#ee8866", "#44bb99"]
_DATA_IDS = itertools.count()
_OUTCOME_COLORS = {"embedded": "#228833", "quarantined": "#ee6677", "skipped": "#ccbb44", "already done": "#4477aa"}


# ---------------------------------------------------------------------------- parts of a report
@dataclass
class Figure:
    """One drawn plot.

    Attributes:
        name: a short id (``roc``, ``forest-effusion``...), unique within a report.
        title: shown above the plot.
        svg: the plot as an SVG element (no XML prolog, no external references).
        caption: one or two sentences saying how to read it.
    """

    name: str
    title: str
    svg: str
    caption: str = ""


@dataclass
class Table:
    """A small table (metrics, counts): a header and rows of already formatted cells."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    """A heading and its figures and tables, in order."""

    title: str
    items: list[Figure | Table] = field(default_factory=list)
    note: str = ""


@dataclass
class Report:
    """A title, a subtitle and sections, written as one self-contained HTML page."""

    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)
    #: where :meth:`write` last saved the page
    uri: str | None = None

    @property
    def figures(self) -> list[Figure]:
        """Every figure of every section, in order."""
        return [i for s in self.sections for i in s.items if isinstance(i, Figure)]

    @property
    def tables(self) -> list[Table]:
        """Every table of every section, in order."""
        return [i for s in self.sections for i in s.items if isinstance(i, Table)]

    def extend(self, other: Report) -> Report:
        """Append ``other``'s sections (e.g. an evaluation and the probe curves on one page)."""
        self.sections.extend(other.sections)
        return self

    def to_html(self) -> str:
        """The page: inline CSS and SVG only, no script and no external reference."""
        from medray import __version__

        when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        toc = "".join(f'<li><a href="#sec-{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections))
        body: list[str] = []
        for i, section in enumerate(self.sections):
            body.append(f'<section id="sec-{i}"><h2>{html.escape(section.title)}</h2>')
            if section.note:
                body.append(f'<p class="note">{html.escape(section.note)}</p>')
            for item in section.items:
                body.append(_figure_html(item) if isinstance(item, Figure) else _table_html(item))
            body.append("</section>")
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{html.escape(self.title)}</h1>{sub}"
            f'<p class="meta">medray {html.escape(__version__)} &middot; {when}</p>'
            f"<nav><ul>{toc}</ul></nav></header><main>{''.join(body)}</main></body></html>\n"
        )

    def write(self, output_uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
        """Save the page as ``<output_uri>/report/index.html`` (atomically) and return its URI.

        Args:
            output_uri: the job's output: a local directory or an object-store prefix.
            storage_options: as ``storage.options`` in config (flat or keyed by protocol).
        """
        uri = join_uri(output_uri.rstrip("/"), *REPORT_FILE.split("/"))
        fs, path = open_fs(uri, storage_options)
        atomic_write_bytes(fs, path, self.to_html().encode("utf-8"))
        self.uri = uri
        return uri

    def log_wandb(self, run: Any, prefix: str = "report") -> None:
        """Log every figure (as ``wandb.Html`` of its SVG) and table (as ``wandb.Table``) to ``run``.

        Args:
            run: an active W&B run (``wandb.init(...)``, online or offline).
            prefix: the key prefix, e.g. ``report/roc``.
        """
        import wandb

        payload: dict[str, Any] = {}
        for fig in self.figures:
            # inject=False: W&B's default wrapper links a stylesheet from the web
            payload[f"{prefix}/{fig.name}"] = wandb.Html(_standalone_svg(fig), inject=False)
        for table in self.tables:
            columns: list[str | int] = [*table.columns]
            payload[f"{prefix}/{table.name}"] = wandb.Table(columns=columns, data=table.rows)
        if payload:
            run.log(payload)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fff}
header{padding:18px 28px 6px;border-bottom:1px solid #ddd}h1{margin:0 0 4px;font-size:22px}
.sub,.meta{margin:2px 0;color:#555}.meta{font-size:12px}nav ul{margin:8px 0;padding:0;list-style:none}
nav li{display:inline;margin-right:14px}nav a{color:#2a5db0;text-decoration:none}
main{padding:6px 28px 40px}section{margin-top:22px}h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:3px}
figure.plot{display:inline-block;vertical-align:top;margin:10px 18px 14px 0;max-width:100%}
figure.plot svg{max-width:100%;height:auto;display:block}figure h3,.table h3{font-size:14px;margin:0 0 4px}
figcaption,.table p{color:#555;font-size:12px;max-width:640px}.note{color:#555}
table{border-collapse:collapse;font-size:13px;margin:4px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
"""


def _figure_html(fig: Figure) -> str:
    cap = f"<figcaption>{html.escape(fig.caption)}</figcaption>" if fig.caption else ""
    return (
        f'<figure class="plot" id="fig-{html.escape(fig.name)}" data-figure="{html.escape(fig.name)}">'
        f"<h3>{html.escape(fig.title)}</h3>{fig.svg}{cap}</figure>"
    )


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in table.rows)
    cap = f"<p>{html.escape(table.caption)}</p>" if table.caption else ""
    return (
        f'<div class="table" id="tab-{html.escape(table.name)}"><h3>{html.escape(table.title)}</h3>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{cap}</div>"
    )


def _standalone_svg(fig: Figure) -> str:
    return f'<div style="font-family:sans-serif"><h3>{html.escape(fig.title)}</h3>{fig.svg}</div>'


# ---------------------------------------------------------------------------- drawing
def _new_figure(width: float = 6.4, height: float = 4.2, ncols: int = 1) -> tuple[Any, list[Any]]:
    """A pyplot-free matplotlib figure (no global state, no GUI backend) and its axes."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, color="#e6e6e6", linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, axes


def _data(artists: Any) -> Any:
    """Mark what a plot draws from its data (``<g id="data-N">`` in the SVG), so a test can find it."""
    items = getattr(artists, "patches", None) or (artists if isinstance(artists, (list, tuple)) else [artists])
    for artist in items:
        artist.set_gid(f"data-{next(_DATA_IDS)}")
    return artists


def _to_svg(fig: Any) -> str:
    """Render ``fig`` as an inline ``<svg>`` element: text as paths (no font), no metadata, no prolog."""
    import matplotlib as mpl

    buf = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "path", "text.parse_math": False}):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    start = svg.find("<svg")
    svg = svg[start:]
    # the namespace names are identifiers, never fetched; inline SVG in HTML needs neither
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg, count=2)
    return svg.strip()


def _ci(metric: Mapping[str, Any] | None) -> str:
    """``0.81 (0.72-0.88)`` from ``{"value", "lo", "hi"}``; ``-`` when missing."""
    if not isinstance(metric, Mapping) or not _finite(metric.get("value")):
        return "-"
    text = f"{float(metric['value']):.3f}"
    if _finite(metric.get("lo")) and _finite(metric.get("hi")):
        text += f" ({float(metric['lo']):.3f}\u2013{float(metric['hi']):.3f})"
    return text


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _value(metric: Any) -> float:
    return float(metric["value"]) if isinstance(metric, Mapping) and _finite(metric.get("value")) else math.nan


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def roc_figure(roc: Mapping[str, Mapping[str, Sequence[float]]], metrics: Mapping[str, Any] | None = None) -> Figure:
    """ROC curves, one line per label, with AUROC and its 95 % CI in the legend.

    Args:
        roc: ``{label: {"fpr": [...], "tpr": [...]}}``.
        metrics: ``{label: {"auroc": {"value", "lo", "hi"}, ...}}`` for the legend.
    """
    fig, (ax,) = _new_figure(5.6, 4.6)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=0.8, label="chance")
    for i, (label, curve) in enumerate(roc.items()):
        auroc = (metrics or {}).get(label, {}).get("auroc")
        _data(
            ax.plot(
                list(curve.get("fpr", [])),
                list(curve.get("tpr", [])),
                color=_color(i),
                linewidth=1.6,
                drawstyle="steps-post",
                label=f"{label}: AUROC {_ci(auroc)}",
            )
        )
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)", ylabel="sensitivity")
    ax.legend(loc="lower right", fontsize=8)
    return Figure("roc", "ROC curves", _to_svg(fig), "One curve per label; AUROC with its 95 % bootstrap CI.")


def reliability_figure(
    reliability: Mapping[str, Mapping[str, Sequence[float]]], metrics: Mapping | None = None
) -> Figure:
    """Reliability diagram: observed frequency against predicted probability per bin, per label.

    Args:
        reliability: ``{label: {"confidence": [...], "frequency": [...], "count": [...]}}``.
        metrics: for the ECE in the legend.
    """
    fig, (ax,) = _new_figure(5.6, 4.6)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=0.8, label="perfect calibration")
    for i, (label, rel) in enumerate(reliability.items()):
        conf = np.asarray(rel.get("confidence", []), dtype=float)
        freq = np.asarray(rel.get("frequency", []), dtype=float)
        count = np.asarray(rel.get("count", [1] * len(conf)), dtype=float)
        ece = (metrics or {}).get(label, {}).get("ece")
        _data(ax.plot(conf, freq, color=_color(i), linewidth=1.2, label=f"{label}: ECE {_ci(ece)}"))
        sizes = 12 + 60 * (count / count.max()) if count.size and count.max() > 0 else 20
        _data(ax.scatter(conf, freq, s=sizes, color=_color(i), zorder=3))
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="predicted probability", ylabel="observed frequency")
    ax.legend(loc="upper left", fontsize=8)
    return Figure(
        "reliability",
        "Reliability diagram",
        _to_svg(fig),
        "Observed frequency of the label per bin of predicted probability; marker area grows with the bin's count.",
    )


def forest_figure(
    label: str, rows: Sequence[tuple[str, Mapping[str, Any], int]], overall: Mapping[str, Any] | None
) -> Figure:
    """Subgroup forest plot for one label: AUROC with its CI per subgroup, and the overall line and band.

    Args:
        label: the label the AUROCs are of.
        rows: ``(subgroup name, {"value", "lo", "hi"}, n)`` per subgroup, drawn top to bottom.
        overall: the overall AUROC ``{"value", "lo", "hi"}``.
    """
    height = 1.2 + 0.32 * max(1, len(rows))
    fig, (ax,) = _new_figure(6.4, height)
    ys = np.arange(len(rows))[::-1]
    if overall and _finite(overall.get("value")):
        if _finite(overall.get("lo")) and _finite(overall.get("hi")):
            ax.axvspan(float(overall["lo"]), float(overall["hi"]), color="#4477aa", alpha=0.12, linewidth=0)
        _data(ax.axvline(float(overall["value"]), color="#4477aa", linewidth=1.2, label=f"overall {_ci(overall)}"))
    for y, (_name, metric, _n) in zip(ys, rows):
        v = _value(metric)
        lo = float(metric["lo"]) if _finite(metric.get("lo")) else v
        hi = float(metric["hi"]) if _finite(metric.get("hi")) else v
        if math.isfinite(v):
            _data(ax.plot([lo, hi], [y, y], color="#222222", linewidth=1.2))
            _data(ax.plot([v], [y], marker="s", color="#222222", markersize=5))
    ax.set_yticks(ys, [f"{name} (n={n})" for name, _m, n in rows], fontsize=8)
    ax.set_xlabel(f"AUROC ({label})")
    lows = [float(m["lo"]) for _n, m, _k in rows if _finite(m.get("lo"))] + [_value(m) for _n, m, _k in rows]
    if overall and _finite(overall.get("lo")):
        lows.append(float(overall["lo"]))
    low = min((v for v in lows if math.isfinite(v)), default=0.0)
    ax.set_xlim(max(0.0, math.floor((low - 0.05) * 10) / 10), 1.0)  # zoomed on the data, AUROC's ceiling kept
    ax.set_ylim(-0.8, len(rows) - 0.2)
    if overall and _finite(overall.get("value")):
        ax.legend(loc="lower left", fontsize=8)
    return Figure(
        f"forest-{_slug(label)}",
        f"Subgroups: {label}",
        _to_svg(fig),
        "AUROC with 95 % CI per subgroup; the vertical line and band are the overall AUROC and its CI.",
    )


def history_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Loss (train and validation) and validation macro AUROC per epoch, side by side."""
    fig, (left, right) = _new_figure(9.0, 3.6, ncols=2)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    for key, color in (("train_loss", "#4477aa"), ("val_loss", "#ee6677")):
        ys = [float(h[key]) if _finite(h.get(key)) else math.nan for h in history]
        if any(math.isfinite(y) for y in ys):
            _data(left.plot(epochs, ys, marker="o", markersize=3, color=color, label=key.replace("_", " ")))
    left.set(xlabel="epoch", ylabel="loss")
    left.legend(fontsize=8)
    ys = [float(h["val_auroc_macro"]) if _finite(h.get("val_auroc_macro")) else math.nan for h in history]
    _data(right.plot(epochs, ys, marker="o", markersize=3, color="#228833", label="validation AUROC (macro)"))
    right.set(xlabel="epoch", ylabel="AUROC", ylim=(0, 1))
    right.legend(fontsize=8, loc="lower right")
    return Figure("history", "Training", _to_svg(fig), "Loss and validation macro AUROC per epoch.")


def efficiency_figure(series: Sequence[Mapping[str, Any]]) -> Figure:
    """Data-efficiency curves: AUROC against labelled patients (log2 axis), band = lo..hi.

    Args:
        series: one entry per line: ``{"name": "rad_dino / logreg", "size": [...], "auroc_mean": [...],
            "auroc_lo": [...], "auroc_hi": [...]}``.
    """
    fig, (ax,) = _new_figure(7.2, 4.8)
    sizes: set[float] = set()
    styles = ["-", "--", ":", "-."]
    for i, s in enumerate(series):
        x = np.asarray(s.get("size", []), dtype=float)
        mean = np.asarray(s.get("auroc_mean", []), dtype=float)
        if not x.size:
            continue
        sizes.update(x.tolist())
        color, style = _color(s.get("color_index", i)), styles[s.get("style_index", 0) % len(styles)]
        if s.get("auroc_lo") is not None and s.get("auroc_hi") is not None:
            _data(
                ax.fill_between(
                    x,
                    np.asarray(s["auroc_lo"], dtype=float),
                    np.asarray(s["auroc_hi"], dtype=float),
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
            )
        _data(ax.plot(x, mean, linestyle=style, marker="o", markersize=3.5, color=color, label=str(s.get("name", i))))
    ax.set_xscale("log", base=2)
    ticks = sorted(sizes)
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
    ax.set(xlabel="labelled patients in the training set", ylabel="AUROC (macro)")
    ax.legend(fontsize=8, loc="lower right")
    return Figure(
        "efficiency",
        "Data efficiency",
        _to_svg(fig),
        "Test AUROC of a head trained on n labelled patients (log2 axis): line = mean over repeats, band = spread "
        "(lo..hi). One line per encoder x head.",
    )


def outcomes_figure(bars: Sequence[tuple[str, str, int]]) -> Figure:
    """Records by outcome and reason, one horizontal bar each.

    Args:
        bars: ``(outcome, reason, records)``; outcome is embedded, quarantined, skipped or already done.
    """
    fig, (ax,) = _new_figure(6.4, 1.0 + 0.34 * max(1, len(bars)))
    ys = np.arange(len(bars))[::-1]
    counts = [n for _o, _r, n in bars]
    _data(ax.barh(ys, counts, color=[_OUTCOME_COLORS.get(o, "#999999") for o, _r, _n in bars], height=0.7))
    for y, n in zip(ys, counts):
        ax.text(n, y, f" {n}", va="center", fontsize=8)
    ax.set_yticks(ys, [f"{o}: {r}" if r else o for o, r, _n in bars], fontsize=8)
    ax.set_xlim(0, max(counts + [1]) * 1.15)
    ax.set_xlabel("records")
    return Figure(
        "outcomes",
        "Outcomes by reason",
        _to_svg(fig),
        "Every input of the run ends embedded, quarantined (could not be read or decoded, by error class) or "
        "skipped (readable but not embedded, by reason).",
    )


def throughput_figure(timeline: Sequence[Sequence[float]]) -> Figure:
    """Records per second over the run, from ``[[seconds since start, records finished], ...]``."""
    t = np.asarray([p[0] for p in timeline], dtype=float)
    n = np.asarray([p[1] for p in timeline], dtype=float)
    order = np.argsort(t)
    t, n = t[order], n[order]
    fig, (ax,) = _new_figure(6.4, 3.4)
    cum = np.cumsum(n)
    _data(
        ax.step(
            np.r_[0.0, t],
            np.r_[0.0, cum],
            where="post",
            marker="o",
            markersize=3,
            color="#4477aa",
            linewidth=1.6,
            label="records done",
        )
    )
    ax.set(xlabel="seconds since the job started", ylabel="records done")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if t.size >= 2:
        rate = ax.twinx()
        edges = np.linspace(t[0], t[-1], num=min(20, t.size) + 1)
        if edges[-1] > edges[0]:
            counts, _ = np.histogram(t, bins=edges, weights=n)
            mids = (edges[:-1] + edges[1:]) / 2
            _data(rate.plot(mids, counts / np.diff(edges), color="#ee6677", linewidth=1.0, label="records/s"))
            rate.set_ylabel("records/s")
            rate.set_ylim(bottom=0)
            rate.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    return Figure(
        "throughput",
        "Throughput",
        _to_svg(fig),
        "Records finished by the encoder over the run (cumulative) and their rate.",
    )


def project_2d(x: np.ndarray) -> np.ndarray:
    """Project rows of ``x`` onto their first two principal components (PCA by SVD; signs fixed).

    numpy's SVD rather than scikit-learn's PCA: the same result without a second of imports at the end
    of every embed run.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[:, np.isfinite(x).all(axis=0)] if x.size else x
    out = np.zeros((x.shape[0], 2))
    if x.shape[0] < 2 or x.shape[1] < 1:
        return out
    centred = x - x.mean(axis=0)
    u, sv, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(sv))
    signs = np.sign(vt[:k, np.argmax(np.abs(vt[:k]), axis=1)].diagonal())  # largest loading positive
    out[:, :k] = u[:, :k] * sv[:k] * np.where(signs == 0, 1, signs)
    return out


def scatter_figure(points: np.ndarray, colour_by: Sequence[str], key: str, name: str = "projection") -> Figure:
    """A 2-D scatter of projected embeddings, one colour per category of ``colour_by`` (legend: counts).

    Args:
        points: ``(n, 2)`` coordinates.
        colour_by: one category per point (modality, site, label...).
        key: what the categories are, for the legend title.
    """
    fig, (ax,) = _new_figure(6.0, 4.8)
    cats = [str(c) for c in colour_by]
    freq: dict[str, int] = {}
    for c in cats:
        freq[c] = freq.get(c, 0) + 1
    kept = [c for c, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:_MAX_CATEGORIES]]
    if len(freq) > len(kept):
        cats = [c if c in kept else "other" for c in cats]
        kept.append("other")
    arr = np.asarray(cats)
    size = float(np.clip(4000 / max(1, len(cats)), 6, 30))  # few points drawn larger
    for i, c in enumerate(kept):
        sel = arr == c
        _data(
            ax.scatter(
                points[sel, 0],
                points[sel, 1],
                s=size,
                alpha=0.75,
                color=_color(i),
                linewidths=0,
                label=f"{c} ({sel.sum()})",
            )
        )
    ax.set(xlabel="PC 1", ylabel="PC 2")
    ax.legend(title=key, fontsize=8, title_fontsize=8, loc="best", markerscale=1.5)
    return Figure(
        name,
        f"Embeddings (PCA), coloured by {key}",
        _to_svg(fig),
        f"The first two principal components of a sample of {len(cats)} embeddings.",
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


# ---------------------------------------------------------------------------- builders
def evaluation_report(doc: Mapping[str, Any], title: str | None = None) -> Report:
    """The report of an ``evaluation.json`` (``medray evaluate``, or ``medray finetune``'s test split).

    Draws what the document has: metrics table, ROC curves, reliability diagram,
    one forest plot per label with subgroups, loss and AUROC per epoch.

    Args:
        doc: the parsed ``evaluation.json`` (see docs/report.md for its shape).
        title: the page title; by default names the labels.
    """
    labels = list(doc.get("labels") or (doc.get("metrics") or {}).keys())
    metrics = doc.get("metrics") or {}
    counts = doc.get("counts") or {}
    sub = ", ".join(f"{n} {k}" for k, n in counts.items())
    if doc.get("aggregate"):
        sub += f"; aggregated per {doc['aggregate']}"
    report = Report(title or f"Evaluation: {', '.join(labels)}", sub.strip("; "))

    perf = Section("Performance")
    rows = []
    for label in labels:
        m = metrics.get(label) or {}
        rows.append(
            [
                label,
                _ci(m.get("auroc")),
                _ci(m.get("auprc")),
                _ci(m.get("sensitivity")),
                _ci(m.get("specificity")),
                _ci(m.get("ece")),
                f"{m['threshold']:.3g}" if _finite(m.get("threshold")) else "-",
                str(m.get("n_pos", "-")),
                str(m.get("n_neg", "-")),
            ]
        )
    macro = doc.get("macro") or {}
    if macro:
        rows.append(["macro"] + [_ci(macro.get(k)) for k in ("auroc", "auprc", "sensitivity", "specificity", "ece")])
        rows[-1] += ["", "", ""]
    perf.items.append(
        Table(
            "metrics",
            "Metrics per label",
            ["label", "AUROC", "AUPRC", "sensitivity", "specificity", "ECE", "threshold", "positives", "negatives"],
            rows,
            "Value (95 % bootstrap CI, resampled by patient); sensitivity and specificity at the threshold shown.",
        )
    )
    roc = {k: v for k, v in (doc.get("roc") or {}).items() if v and len(v.get("fpr") or []) >= 2}
    if roc:
        perf.items.append(roc_figure(roc, metrics))
    rel = {k: v for k, v in (doc.get("reliability") or {}).items() if v and len(v.get("confidence") or []) >= 1}
    if rel:
        perf.items.append(reliability_figure(rel, metrics))
    if metrics or perf.items[1:]:  # a finetune without a test split has its training curves only
        report.sections.append(perf)

    subgroups = doc.get("subgroups") or {}
    if subgroups:
        sec = Section("Subgroups")
        table_rows = []
        for label in labels:
            forest: list[tuple[str, Mapping[str, Any], int]] = []
            for column, values in subgroups.items():
                for value, per_label in values.items():
                    entry = (per_label or {}).get(label)
                    if not entry:
                        continue
                    n = int(entry.get("n", 0))
                    forest.append((f"{column}={value}", entry.get("auroc") or {}, n))
                    gap = entry.get("gap")
                    table_rows.append(
                        [label, column, str(value), _ci(entry.get("auroc")), f"{gap:+.3f}" if _finite(gap) else "-", n]
                    )
            if forest:
                sec.items.append(forest_figure(label, forest, (metrics.get(label) or {}).get("auroc")))
        sec.items.append(
            Table(
                "subgroups",
                "AUROC per subgroup",
                ["label", "column", "value", "AUROC", "gap to overall", "n"],
                [[str(c) for c in r] for r in table_rows],
            )
        )
        report.sections.append(sec)

    history = [h for h in doc.get("history") or [] if isinstance(h, Mapping)]
    if history:
        report.sections.append(Section("Training", [history_figure(history)]))
    return report


def probe_report(docs: Sequence[Mapping[str, Any]], title: str | None = None) -> Report:
    """The report of one or more ``probe.json`` (one per encoder): every encoder x head on one plot.

    Args:
        docs: parsed ``probe.json`` documents (a sweep: one per encoder).
        title: the page title; by default names the encoders.
    """
    if not docs:
        raise ValueError("probe_report needs at least one probe.json document")
    series: list[dict[str, Any]] = []
    best_rows: list[list[str]] = []
    heads: list[str] = []
    names: list[str] = []
    labels: list[str] = []
    for i, doc in enumerate(docs):
        enc = doc.get("encoder") or {}
        name = str(enc.get("name") or f"encoder {i + 1}")
        short = str(enc.get("weights_hash") or "")[:8]
        names.append(name)
        labels += [lab for lab in doc.get("labels") or [] if lab not in labels]
        for head, curve in (doc.get("curves") or {}).items():
            if head not in heads:
                heads.append(head)
            series.append(
                {
                    "name": f"{name} / {head}",
                    "size": curve.get("size") or doc.get("sizes") or [],
                    "auroc_mean": curve.get("auroc_mean") or [],
                    "auroc_lo": curve.get("auroc_lo"),
                    "auroc_hi": curve.get("auroc_hi"),
                    "color_index": i,
                    "style_index": heads.index(head),
                }
            )
        best = doc.get("best") or {}
        best_rows.append(
            [
                name,
                short or "-",
                str(best.get("head", "-")),
                str(best.get("size", "-")),
                f"{best['auroc']:.3f}" if _finite(best.get("auroc")) else "-",
            ]
        )
    report = Report(title or f"Data efficiency: {', '.join(names)}", f"labels: {', '.join(labels)}")
    sec = Section("Data efficiency")
    if any(len(s["size"]) for s in series):
        sec.items.append(efficiency_figure(series))
    sec.items.append(
        Table("best", "Best head per encoder", ["encoder", "weights", "head", "patients", "AUROC"], best_rows)
    )
    table_rows = []
    for s in series:
        for j, size in enumerate(s["size"]):
            mean = s["auroc_mean"][j] if j < len(s["auroc_mean"]) else None
            lo = (s["auroc_lo"] or [])[j] if j < len(s["auroc_lo"] or []) else None
            hi = (s["auroc_hi"] or [])[j] if j < len(s["auroc_hi"] or []) else None
            table_rows.append(
                [
                    s["name"],
                    f"{size:g}" if _finite(size) else str(size),
                    _ci({"value": mean, "lo": lo, "hi": hi}),
                ]
            )
    sec.items.append(
        Table("curves", "AUROC per training-set size", ["encoder / head", "patients", "AUROC"], table_rows)
    )
    report.sections.append(sec)
    return report


def zeroshot_report(doc: Mapping[str, Any]) -> Report:
    """The report of a ``zeroshot.json`` (``medray zeroshot``): the prompts, the scoring and, with labels, the metrics.

    Args:
        doc: the parsed ``zeroshot.json``; its ``evaluation`` (an ``evaluation.json``
            document, when a labelled manifest was given) adds the evaluation's sections.
    """
    enc = doc.get("encoder") or {}
    labels = list(doc.get("labels") or [])
    bias = enc.get("model_bias")
    rule = (
        f"sigmoid(cos x {enc.get('model_temperature', 0):.4g} + {bias:.4g}) per class"
        if enc.get("score") == "sigmoid" and bias is not None
        else f"softmax over classes of cos x {enc.get('model_temperature', 0):.4g}"
    )
    counts = doc.get("counts") or {}
    sub = f"encoder {enc.get('name')} ({str(enc.get('weights_hash') or '')[:12]}); {counts.get('images', 0)} images"
    report = Report(f"Zero-shot: {', '.join(labels)}", sub)
    prompts = doc.get("prompts") or {}
    mean = doc.get("mean_scores") or {}
    rows = [[label, "; ".join(prompts.get(label, [])), f"{float(mean.get(label, 0.0)):.3f}"] for label in labels]
    table = Table(
        "zeroshot-prompts",
        "Classes, their prompts and mean score",
        ["class", "prompts (averaged, normalised)", "mean score"],
        rows,
        caption=f"Each image's score: {rule}. The text tower embeds every prompt; a class is the "
        "normalised mean of its prompts' normalised embeddings.",
    )
    report.sections.append(Section("Zero-shot", [table]))
    if doc.get("evaluation"):
        report.extend(evaluation_report(doc["evaluation"]))
    return report


def drift_figure(groups: Sequence[Mapping[str, Any]], alpha: float) -> Figure:
    """MMD p-value (as -log10) and statistic per time window, one line per group, with the alarm level.

    Args:
        groups: ``drift.json``'s ``groups`` rows (``group``, ``window``, ``p_value``, ``statistic``).
        alpha: the alarm level drawn as a horizontal line.
    """
    fig, (left, right) = _new_figure(9.0, 3.6, ncols=2)
    windows = sorted({str(g.get("window")) for g in groups})
    names: list[str] = []
    for g in groups:
        name = " / ".join(str(v) for v in (g.get("group") or {}).values()) or "all"
        if name not in names:
            names.append(name)
    for i, name in enumerate(names[:_MAX_CATEGORIES]):
        rows = {
            str(g.get("window")): g
            for g in groups
            if (" / ".join(str(v) for v in (g.get("group") or {}).values()) or "all") == name
        }
        xs = [j for j, w in enumerate(windows) if w in rows and _finite(rows[w].get("p_value"))]
        ps = [-math.log10(max(float(rows[windows[j]]["p_value"]), 1e-12)) for j in xs]
        stats = [float(rows[windows[j]]["statistic"]) for j in xs]
        style = {"marker": "o", "markersize": 4, "color": _color(i), "label": name}
        _data(left.plot(xs, ps, **style))
        _data(right.plot(xs, stats, **style))
    left.axhline(-math.log10(alpha), color="#ee6677", linestyle="--", linewidth=1, label=f"alarm (p < {alpha:g})")
    for ax in (left, right):
        ax.set_xticks(range(len(windows)), windows, fontsize=8, rotation=30 if len(windows) > 4 else 0)
        ax.set_xlabel("time window")
    left.set(ylabel="-log10 p (MMD permutation test)")
    right.set(ylabel="MMD² (unbiased)")
    left.legend(fontsize=8)
    return Figure(
        "drift",
        "Drift over time",
        _to_svg(fig),
        "Per group and time window, the MMD two-sample test of the current embeddings against the reference: "
        "points above the dashed line alarm; the statistic on the right says how far the set moved.",
    )


def ood_figure(reference_scores: np.ndarray, current: Mapping[str, np.ndarray], threshold: float) -> Figure:
    """Histograms of OOD scores: the reference's leave-one-out scores and each current group's, with the threshold.

    Args:
        reference_scores: leave-one-out scores of the reference records.
        current: group name -> OOD scores of the current records of that group.
        threshold: the alarm threshold drawn as a vertical line.
    """
    fig, (ax,) = _new_figure(6.4, 3.8)
    every = [np.asarray(reference_scores, float)] + [np.asarray(v, float) for v in current.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in every] + [np.asarray([threshold])])
    lo, hi = float(finite.min()), float(finite.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
    kw = {"bins": bins, "density": True, "histtype": "step", "linewidth": 1.5}
    _data(ax.hist(reference_scores, color="#222255", label="reference (leave-one-out)", **kw)[2])
    for i, (name, scores) in enumerate(list(current.items())[:_MAX_CATEGORIES]):
        _data(ax.hist(scores, color=_color(i + 1), label=f"current: {name} ({len(scores)})", **kw)[2])
    ax.axvline(threshold, color="#ee6677", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="OOD score (mean cosine distance to k nearest reference records)", ylabel="density")
    ax.legend(fontsize=8)
    return Figure(
        "ood",
        "Out-of-distribution scores",
        _to_svg(fig),
        "How far each record lies from its nearest reference records. The threshold is calibrated on the "
        "reference's own leave-one-out scores; records to its right alarm.",
    )


def drift_report(
    doc: Mapping[str, Any],
    reference_scores: np.ndarray,
    current_scores: np.ndarray,
    by_group: Mapping[str, np.ndarray] | None = None,
    title: str | None = None,
) -> Report:
    """The report of ``medray drift``: drift per group over time windows, OOD score distributions, the table.

    Args:
        doc: the ``drift.json`` document.
        reference_scores: the reference's leave-one-out OOD scores.
        current_scores: every current record's OOD score.
        by_group: group name -> current scores (drawn per group when there are several).
        title: the page title; by default names the encoder.
    """
    enc = doc.get("encoder") or {}
    ood = doc.get("ood") or {}
    alpha = float(doc.get("alpha") or 0.05)
    report = Report(
        title or f"Drift: {enc.get('encoder') or 'encoder'} ({str(enc.get('weights_hash') or '')[:8]})",
        f"{(doc.get('counts') or {}).get('current')} current vs {(doc.get('counts') or {}).get('reference')} "
        f"reference records; MMD test, alarm at p < {alpha:g}",
    )
    sec = Section("Drift")
    rows = [doc["overall"], *doc.get("groups", [])] if doc.get("overall") else list(doc.get("groups", []))
    tested = [g for g in doc.get("groups", []) if _finite(g.get("p_value"))]
    if len({str(g.get("window")) for g in tested}) > 1:  # one window: the table says it all
        sec.items.append(drift_figure(tested, alpha))

    def cell(v: Any, fmt: str) -> str:
        return format(float(v), fmt) if _finite(v) else "-"

    table = [
        [
            " / ".join(str(v) for v in (g.get("group") or {}).values()) or "all",
            str(g.get("window", "all")),
            str(g.get("n_current", "-")),
            f"{g.get('n_reference', '-')} ({g.get('reference', '-')})",
            cell(g.get("statistic"), ".3g"),
            cell(g.get("p_value"), ".4f"),
            "ALARM" if g.get("alarm") else (str(g.get("skipped")) if g.get("skipped") else "ok"),
            cell(g.get("ood_alarm_rate"), ".1%"),
        ]
        for g in rows
    ]
    cols = ["group", "window", "current", "reference", "MMD²", "p", "drift", "OOD alarms"]
    sec.items.append(Table("groups", "Two-sample test per group and window", cols, table))
    report.sections.append(sec)
    sec = Section("Out of distribution")
    groups = dict(by_group or {})
    shown = groups if 1 < len(groups) <= _MAX_CATEGORIES else {"all": np.asarray(current_scores)}
    if len(reference_scores) and len(current_scores) and _finite(ood.get("threshold")):
        sec.items.append(ood_figure(np.asarray(reference_scores), shown, float(ood["threshold"])))
    sec.items.append(
        Table(
            "ood",
            "OOD alarms",
            ["k", "threshold", "calibrated at", "alarms", "alarm rate"],
            [
                [
                    str(ood.get("k", "-")),
                    cell(ood.get("threshold"), ".4f"),
                    f"reference quantile {ood.get('quantile', '-')}",
                    str(ood.get("alarms", "-")),
                    cell(ood.get("alarm_rate"), ".1%"),
                ]
            ],
        )
    )
    report.sections.append(sec)
    return report


def read_documents(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Read one JSON document, or every ``*.json`` directly under a prefix (sorted by name).

    Useful for a sweep's ``<output>/curves/``: ``probe_report(read_documents(".../curves"))``.
    """
    fs, path = open_fs(uri, storage_options)
    if path.endswith(".json"):
        paths = [path]
    else:
        fs.invalidate_cache(path)
        paths = sorted(p for p in fs.ls(path, detail=False) if str(p).endswith(".json"))
    docs = []
    for p in paths:
        with fs.open(p, "rb") as f:
            docs.append(json.load(f))
    return docs


# ---------------------------------------------------------------------------- embed outputs
def embed_report(
    output_uri: str, storage_options: Mapping[str, Any] | None = None, *, max_points: int = MAX_SCATTER_POINTS
) -> Report:
    """The report of an existing ``medray embed`` output, from what it holds.

    Reads ``summary.json`` (the last run: outcomes by reason, its timeline of
    finished records) and a sample of at most ``max_points`` embeddings per
    encoder from ``embeddings/`` (whole Parquet parts picked at random, so a
    large output costs a few parts).

    Args:
        output_uri: the embed job's output.
        storage_options: as ``storage.options`` in config.
        max_points: embeddings projected per encoder.

    Raises:
        FileNotFoundError: no ``summary.json`` under ``output_uri`` (not an embed output, or no run finished).
    """
    fs, root = open_fs(output_uri, storage_options)
    summary_path = posixpath.join(root, "summary.json")
    try:
        with fs.open(summary_path, "rb") as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no summary.json under {output_uri}: give the output of a finished `medray embed` run"
        ) from None
    untrained = " [UNTRAINED demo weights]" if summary.get("untrained") else ""
    report = Report(
        f"Embeddings: {summary.get('encoder', '?')}{untrained}",
        f"output {output_uri}; {summary.get('records_total_in_output', '?')} records in the output",
    )

    run = Section("Last run")
    runs = _recent_runs(fs, posixpath.join(root, "runs"), summary)
    run.items.append(
        Table(
            "runs",
            "Runs on this output (latest last)",
            ["run", "read", "embedded", "rows", "quarantined", "skipped", "already done", "wall s", "records/s"],
            [
                [
                    str(r.get("run_id", "-")),
                    *(
                        str(r.get(k, 0))
                        for k in (
                            "records_read",
                            "records_embedded",
                            "rows_written",
                            "quarantined",
                            "skipped",
                            "records_done_before",
                        )
                    ),
                    f"{float(r.get('wall_s') or 0):.1f}",
                    f"{float(r.get('records_per_s') or 0):.1f}",
                ]
                for r in runs
            ],
        )
    )
    bars = _outcome_bars(summary)
    if bars:
        run.items.append(outcomes_figure(bars))
    timeline = [p for p in summary.get("timeline") or [] if isinstance(p, (list, tuple)) and len(p) == 2]
    if timeline:
        run.items.append(throughput_figure(timeline))
    report.sections.append(run)

    proj = Section("Embeddings")
    for encoder, (x, cats, key) in _sample_embeddings(fs, posixpath.join(root, "embeddings"), max_points).items():
        if x.shape[0] >= 2:
            proj.items.append(scatter_figure(project_2d(x), cats, key, name=f"projection-{_slug(encoder)}"))
    if not proj.items:
        proj.note = "No embeddings to project yet (fewer than two rows)."
    report.sections.append(proj)
    return report


def _recent_runs(fs: Any, runs_dir: str, summary: Mapping[str, Any], last: int = 10) -> list[Mapping[str, Any]]:
    """The ``last`` runs of ``runs/<run_id>.json`` (ids start with their UTC time), else the summary alone."""
    try:
        fs.invalidate_cache(runs_dir)
        names = sorted(p for p in fs.ls(runs_dir, detail=False) if str(p).endswith(".json"))[-last:]
    except FileNotFoundError:
        names = []
    runs: list[Mapping[str, Any]] = []
    for name in names:
        try:
            with fs.open(name, "rb") as f:
                runs.append(json.load(f))
        except (FileNotFoundError, ValueError):  # removed since, or not a run record
            continue
    if not any(r.get("run_id") == summary.get("run_id") for r in runs):
        runs.append(summary)
    return runs


def _outcome_bars(summary: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    bars: list[tuple[str, str, int]] = []
    if summary.get("records_embedded"):
        bars.append(("embedded", "", int(summary["records_embedded"])))
    by_class = summary.get("quarantined_by_class") or {}
    for cls, n in sorted(by_class.items()):
        bars.append(("quarantined", str(cls), int(n)))
    rest = int(summary.get("quarantined") or 0) - sum(int(n) for n in by_class.values())
    if rest > 0:
        bars.append(("quarantined", "", rest))
    by_reason = summary.get("skipped_by_reason") or {}
    for reason, n in sorted(by_reason.items()):
        bars.append(("skipped", str(reason), int(n)))
    rest = int(summary.get("skipped") or 0) - sum(int(n) for n in by_reason.values())
    if rest > 0:
        bars.append(("skipped", "", rest))
    if summary.get("records_done_before"):
        bars.append(("already done", "earlier runs", int(summary["records_done_before"])))
    return bars


#: Columns that colour the projection, in order of preference (a carried manifest column wins).
_COLOUR_COLUMNS = ("site", "label", "modality")


def _sample_embeddings(fs: Any, root: str, max_points: int) -> dict[str, tuple[np.ndarray, list[str], str]]:
    """Per encoder: up to ``max_points`` embeddings (random whole parts, then random rows) and their colours.

    Parts are grouped by folder (``embeddings/<modality>/`` holds another encoder's rows), and each
    folder is read in a random order until it gave ``4 * max_points`` rows, so a large output costs a
    few parts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs.invalidate_cache(root)
    try:
        paths = sorted(p for p in fs.find(root) if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))
    except FileNotFoundError:
        return {}
    folders: dict[str, list[str]] = {}
    for p in paths:
        folders.setdefault(posixpath.dirname(p), []).append(p)
    slots: dict[str, dict[str, Any]] = {}
    for folder_paths in folders.values():
        random.Random(0).shuffle(folder_paths)
        read = 0
        for path in folder_paths:
            if read >= 4 * max_points:
                break
            try:
                with fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    names = pf.schema_arrow.names
                    if "embedding" not in names:
                        continue
                    key = next((c for c in _COLOUR_COLUMNS if c in names), "modality")
                    cols = ["embedding", *(c for c in ("encoder", key) if c in names)]
                    table = pf.read(columns=cols)
            except FileNotFoundError:  # replaced since the listing
                continue
            emb = table.column("embedding").combine_chunks()
            if not pa.types.is_fixed_size_list(emb.type) or emb.null_count:
                continue
            x = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), emb.type.list_size)
            encoders = table.column("encoder").to_pylist() if "encoder" in cols else ["embeddings"] * len(x)
            colours = table.column(key).to_pylist() if key in cols else ["unknown"] * len(x)
            read += len(x)
            for enc in sorted({str(e) for e in encoders}):
                sel = [i for i, e in enumerate(encoders) if str(e) == enc]
                slot = slots.setdefault(enc, {"x": [], "c": [], "key": key, "dim": x.shape[1]})
                if slot["dim"] != x.shape[1]:
                    continue
                slot["x"].append(x[sel])
                slot["c"] += ["unknown" if colours[i] is None else str(colours[i]) for i in sel]
    out: dict[str, tuple[np.ndarray, list[str], str]] = {}
    rng = np.random.default_rng(0)
    for enc, slot in sorted(slots.items()):
        xs = np.concatenate(slot["x"]) if slot["x"] else np.zeros((0, slot["dim"]), dtype=np.float32)
        idx = np.sort(rng.choice(len(xs), size=min(len(xs), max_points), replace=False))
        out[enc] = (xs[idx], [slot["c"][i] for i in idx], slot["key"])
    return out
