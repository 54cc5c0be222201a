"""Progress while a job runs: records done, quarantined, skipped, rate and time left.

On a terminal (stderr is a TTY) :class:`Progress` draws one bar that updates in
place; otherwise (a log file, a submitted job's log) it writes a plain line
every few seconds, with no carriage returns or colour codes, so the log stays
readable. ``MEDRAY_PROGRESS=0`` turns it off; ``MEDRAY_PROGRESS=ray`` shows Ray
Data's operator bars instead (see :func:`medray.platform.runtime.progress_mode`).

The counts come from where the pipeline already counts, never from a
per-record round trip: the fused plan's actors return their write counters to
the driver (one small row per batch), and the staged plan's sink reports each
written block's counters to a small counter actor (:func:`start_counter`) that
the driver polls about once a second.

Example:
    >>> snap = ProgressSnapshot(embedded=90, quarantined=6, skipped=4, total=200, elapsed_s=10.0, rate=10.0)
    >>> format_progress(snap, tty=False)
    'medray embed: 100/200 records (50%): 90 embedded, 6 quarantined, 4 skipped; 10.0 records/s; 10s left (10s elapsed)'
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

from medray.platform.runtime import progress_mode

__all__ = [
    "Progress",
    "ProgressSnapshot",
    "counts_of",
    "format_duration",
    "format_epoch_line",
    "format_progress",
    "start_counter",
]

#: Seconds between two lines in log mode (``MEDRAY_PROGRESS_INTERVAL`` overrides).
LOG_INTERVAL_S = 10.0
#: Seconds between two redraws of the terminal bar.
TTY_INTERVAL_S = 0.5
#: The rate (and so the time left) is measured over this many recent seconds.
RATE_WINDOW_S = 30.0

_KEYS = ("embedded", "quarantined", "skipped")


def format_duration(seconds: float | None) -> str:
    """``"45s"``, ``"3m05s"``, ``"2h07m"``; ``"?"`` for None, a negative or an infinite value."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def counts_of(stats: Mapping[str, Any] | None) -> dict[str, int]:
    """Records embedded, quarantined and skipped in one write's counters (:func:`.sink.write_tables`)."""
    stats = stats or {}
    return {
        "embedded": int(stats.get("records", 0) or 0),
        "quarantined": int(stats.get("quarantined", 0) or 0),
        "skipped": int(stats.get("skipped", 0) or 0),
    }


@dataclass(frozen=True)
class ProgressSnapshot:
    """Where a run stands.

    Attributes:
        embedded / quarantined / skipped: records so far, by outcome.
        total: records this run has to do, when known (None: no percentage, no time left).
        elapsed_s: seconds since the run started.
        rate: records per second over the recent window (None before there is one).
    """

    embedded: int
    quarantined: int
    skipped: int
    total: int | None
    elapsed_s: float
    rate: float | None

    @property
    def done(self) -> int:
        """Records with an outcome."""
        return self.embedded + self.quarantined + self.skipped

    @property
    def left_s(self) -> float | None:
        """Seconds left at the current rate (None without a total or a rate)."""
        if self.total is None or not self.rate or self.rate <= 0:
            return None
        return max(0, self.total - self.done) / self.rate


def _of_total(snap: ProgressSnapshot) -> tuple[str, str]:
    if snap.total is None or snap.total <= 0 or snap.done > snap.total:
        return f"{snap.done:,}", ""
    return f"{snap.done:,}/{snap.total:,}", f"{100.0 * snap.done / snap.total:.0f}%"


def format_progress(
    snap: ProgressSnapshot, *, tty: bool, job: str = "embed", width: int = 100, final: bool = False
) -> str:
    """One progress line.

    Args:
        snap: the counts and timings.
        tty: a terminal bar (``[####----] ...``, cut to ``width``) or a plain log line.
        job: the job's name, in the log line.
        width: the terminal's width (tty only).
        final: the closing line (the run's average rate and its duration, no time left).

    Returns:
        The line, without a newline or a carriage return.
    """
    of, pct = _of_total(snap)
    rate = f"{snap.rate:,.1f}" if snap.rate is not None else "-"
    if tty:
        bar = ""
        if pct:
            assert snap.total is not None  # a percentage needs one
            filled = int(20 * snap.done / snap.total) if snap.total else 0
            bar = f"[{'#' * filled}{'-' * (20 - filled)}] "
        tail = f"in {format_duration(snap.elapsed_s)}" if final else f"{format_duration(snap.left_s)} left"
        line = (
            f"{job} {bar}{of}{' ' + pct if pct else ''} | {snap.embedded:,} embedded, {snap.quarantined:,} "
            f"quarantined, {snap.skipped:,} skipped | {rate} rec/s | {tail}"
        )
        return line[: max(20, width - 1)]
    head = f"medray {job}: {of} records{f' ({pct})' if pct else ''}: "
    counts = f"{snap.embedded:,} embedded, {snap.quarantined:,} quarantined, {snap.skipped:,} skipped"
    if final:
        return f"{head}{counts}; {rate} records/s; done in {format_duration(snap.elapsed_s)}"
    left = f"; {format_duration(snap.left_s)} left" if snap.left_s is not None else ""
    return f"{head}{counts}; {rate} records/s{left} ({format_duration(snap.elapsed_s)} elapsed)"


class Progress:
    """The driver's progress display for a run (a context manager).

    Feed it with :meth:`add` (each write's counters, as the fused plan returns
    them) or give it ``poll`` (returns the counts so far, e.g. from the
    counter actor of :func:`start_counter`); a daemon thread redraws the bar
    (terminal) or writes a line every ``interval_s`` seconds (logs). Leaving
    the ``with`` block writes the closing line.

    Args:
        job: the job's name, shown in each line.
        total: records to do, when known (for the percentage and the time left).
        stream: where to write (default: stderr).
        tty: force terminal (True) or log (False) mode; default: ``stream.isatty()``.
        interval_s: seconds between updates; default 0.5 on a terminal, else
            ``MEDRAY_PROGRESS_INTERVAL`` or 10.
        enabled: default: :func:`~medray.platform.runtime.progress_mode` is ``"medray"``.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        job: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval_s: float | None = None,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        if interval_s is None:
            interval_s = TTY_INTERVAL_S if tty else float(os.environ.get("MEDRAY_PROGRESS_INTERVAL", LOG_INTERVAL_S))
        self.interval_s = max(0.05, float(interval_s))
        self.enabled = progress_mode() == "medray" if enabled is None else enabled
        self.poll: Callable[[], Mapping[str, int]] | None = None
        self._clock = clock
        self._counts = dict.fromkeys(_KEYS, 0)
        self._lock = threading.Lock()
        self._t0 = clock()
        self._samples: deque[tuple[float, int]] = deque([(self._t0, 0)])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = ""

    # ---------------------------------------------------------------- counts
    def add(self, stats: Mapping[str, Any] | None) -> None:
        """Add one write's counters (the dict :func:`~medray.pipeline.sink.write_tables` returns)."""
        with self._lock:
            for k, v in counts_of(stats).items():
                self._counts[k] += v

    def set_counts(self, counts: Mapping[str, int]) -> None:
        """Replace the counts with totals so far (``{"embedded", "quarantined", "skipped"}``)."""
        with self._lock:
            for k in _KEYS:
                self._counts[k] = int(counts.get(k, 0) or 0)

    def snapshot(self, now: float | None = None) -> ProgressSnapshot:
        """The counts now, with the rate over the last :data:`RATE_WINDOW_S` seconds."""
        now = self._clock() if now is None else now
        with self._lock:
            counts = dict(self._counts)
            done = sum(counts.values())
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
            t_old, d_old = self._samples[0]
        span = now - t_old
        rate = (done - d_old) / span if span > 1e-6 else None
        return ProgressSnapshot(**counts, total=self.total, elapsed_s=now - self._t0, rate=rate)

    # --------------------------------------------------------------- display
    def _width(self) -> int:
        return shutil.get_terminal_size((100, 24)).columns

    def _write(self, line: str, *, end: bool = False) -> None:
        try:
            if self.tty:
                self.stream.write("\r" + line + "\x1b[K" + ("\n" if end else ""))
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream never fails the job
            pass

    def _refresh(self) -> None:
        if self.poll is not None:
            try:
                self.set_counts(self.poll())
            except Exception:  # noqa: BLE001 - a missed poll only delays the display
                pass

    def tick(self) -> str:
        """Poll, then draw the bar (terminal) or write one line (logs); return the line."""
        self._refresh()
        line = format_progress(self.snapshot(), tty=self.tty, job=self.job, width=self._width())
        self._write(line)
        self._last = line
        return line

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def start(self) -> Progress:
        """Start the clock and, when enabled, the display thread."""
        self._t0 = self._clock()
        self._samples = deque([(self._t0, 0)])
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="medray-progress")
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the display thread and write the closing line (when enabled)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.enabled:
            return
        self._refresh()
        snap = self.snapshot()
        final = ProgressSnapshot(
            embedded=snap.embedded,
            quarantined=snap.quarantined,
            skipped=snap.skipped,
            total=snap.total,
            elapsed_s=snap.elapsed_s,
            rate=snap.done / snap.elapsed_s if snap.elapsed_s > 0 else None,
        )
        self._write(format_progress(final, tty=self.tty, job=self.job, width=self._width(), final=True), end=True)
        self.enabled = False  # once

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_counter(ray: Any) -> Any:
    """A small Ray actor that writers report their counters to and the driver polls.

    For the staged plan, whose sink writes in Ray Data tasks: each written
    block sends one ``add.remote(counts)`` (fire and forget, a few integers),
    never one message per record. The actor holds no CPU.

    Returns:
        The actor handle: ``add.remote(counts)``, ``counts.remote() -> dict``.
    """

    class ProgressCounter:
        def __init__(self) -> None:
            self._counts = dict.fromkeys(_KEYS, 0)

        def add(self, counts: Mapping[str, int]) -> None:
            for k in _KEYS:
                self._counts[k] += int(counts.get(k, 0) or 0)

        def counts(self) -> dict[str, int]:
            return dict(self._counts)

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressCounter).remote()


def format_epoch_line(
    *,
    epoch: int,
    epochs: int,
    step: int,
    loss: float,
    lr: float,
    auroc: float | None = None,
    ece: float | None = None,
    mse: float | None = None,
    left_s: float | None = None,
) -> str:
    """One line per fine-tuning epoch (printed by rank 0).

    Args:
        epoch: this epoch, counted from 1.
        epochs: epochs in the run.
        step: optimizer steps so far.
        loss: mean training loss of the epoch.
        lr: the learning rate now.
        auroc / ece: validation macro AUROC and calibration error (classification).
        mse: validation MSE (regression).
        left_s: estimated seconds to the end of training.

    Example:
        >>> format_epoch_line(epoch=2, epochs=5, step=40, loss=0.41234, lr=1e-4, auroc=0.8123, ece=0.0412, left_s=90)
        'medray finetune: epoch 2/5 step 40 loss 0.4123 val AUROC 0.812 ECE 0.041 lr 1.00e-04 1m30s left'
    """

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None and math.isfinite(v) else "-"

    val = f"MSE {num(mse, '.4g')}" if mse is not None and auroc is None else f"AUROC {num(auroc, '.3f')}"
    ece_part = f" ECE {num(ece, '.3f')}" if ece is not None or mse is None else ""
    return (
        f"medray finetune: epoch {epoch}/{epochs} step {step} loss {num(loss, '.4f')} val {val}{ece_part} "
        f"lr {lr:.2e} {format_duration(left_s)} left"
    )
