"""Live out-of-distribution scores: each image request against a reference loaded with the encoder.

``serve.ood.reference`` names a ``medray embed`` output of the served encoder
(the reference is calibrated when the replica starts) or the ``reference.npz``
that ``medray drift`` writes (calibrated already). Each ``/v1/embeddings``
answer of the encoder then carries ``"ood": {"score", "threshold", "alarm"}``:
the mean cosine distance of the request's record embedding (its pooled row, or
the mean of its frames, as ``medray drift`` scores a stored record) to its
``k`` nearest reference embeddings (:class:`medray.platform.drift.OODReference`).

Prometheus, through ``ray.serve.metrics`` (exported by each node's Ray metrics
agent with a ``ray_`` prefix):

* ``medray_ood_score`` - histogram of the scores (buckets around the threshold);
* ``medray_ood_alarms`` - counter of requests over the threshold;
* ``medray_ood_threshold`` - gauge of the threshold, so an alert rule can read it.

The threshold is ``serve.ood.threshold`` when set, else the calibrated one.
No ray import at module level: :mod:`medray.serve.config` reads :class:`OODConf`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from medray.platform.drift import OODReference
from medray.platform.errors import ConfigError

__all__ = ["OODConf", "OODMonitor", "check_ood", "load_reference", "DEFAULT_BUCKETS"]

log = logging.getLogger("ray.serve.medray.ood")

#: Histogram bucket upper bounds (cosine distances lie in [0, 2]); the threshold is added.
DEFAULT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)


@dataclass
class OODConf:
    """``serve.ood``: the live OOD score (off while ``reference`` is null).

    Attributes:
        reference: a ``medray embed`` output of the served encoder, or a ``reference.npz`` of ``medray drift``.
        threshold: alarm above this score; null: the threshold calibrated on the reference.
        k: neighbours averaged (an embed output only; a saved reference keeps its own).
        quantile: calibration quantile of the reference's leave-one-out scores (an embed output only).
        buckets: histogram bucket bounds; null: :data:`DEFAULT_BUCKETS` plus the threshold.
    """

    reference: Optional[str] = None
    threshold: Optional[float] = None
    k: int = 5
    quantile: float = 0.99
    buckets: Optional[List[float]] = None


def check_ood(conf: Any) -> None:
    """Refuse bad ``serve.ood`` values before Ray starts.

    Raises:
        ConfigError: naming the ``serve.ood.*`` key at fault.
    """
    if conf.k < 1:
        raise ConfigError("serve.ood.k", f"must be >= 1, got {conf.k}")
    if not 0.0 < conf.quantile <= 1.0:
        raise ConfigError("serve.ood.quantile", f"must be in (0, 1], got {conf.quantile}")
    if conf.threshold is not None and not 0.0 <= conf.threshold <= 2.0:
        raise ConfigError("serve.ood.threshold", f"a cosine distance in [0, 2] or null, got {conf.threshold}")
    if conf.buckets is not None:
        b = [float(x) for x in conf.buckets]
        if not b or any(x <= 0 for x in b) or b != sorted(set(b)):
            raise ConfigError("serve.ood.buckets", f"increasing positive bounds or null, got {list(conf.buckets)}")


def load_reference(
    conf: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None, *, weights_hash: str | None = None
) -> OODReference:
    """The reference ``serve.ood.reference`` names: a saved ``.npz``, or an embed output calibrated now.

    Args:
        conf: ``serve.ood`` as a dict.
        storage_options: fsspec options of the reference's storage.
        weights_hash: the served encoder's; a reference of other weights is refused.

    Raises:
        ConfigError: (``serve.ood.reference``) missing, unreadable, or of other weights.
    """
    uri = str(conf["reference"])
    key = "serve.ood.reference"
    if uri.endswith(".npz"):
        ref = OODReference.load(uri, storage_options, key=key)
    else:
        from medray.pipeline.records import read_record_embeddings

        try:
            records = read_record_embeddings(uri, storage_options)
        except ConfigError as err:
            raise ConfigError(key, str(err).split(": ", 1)[-1]) from None
        ref = OODReference.fit(
            records.x,
            k=int(conf.get("k", 5)),
            quantile=float(conf.get("quantile", 0.99)),
            provenance={**records.encoder, "source": uri},
        )
    theirs = ref.provenance.get("weights_hash")
    if weights_hash and theirs and theirs != weights_hash:
        raise ConfigError(
            key,
            f"'{uri}' holds embeddings of other weights (weights_hash {str(theirs)[:12]}) than the served encoder "
            f"({weights_hash[:12]}); embed a reference with this encoder or set serve.ood.reference=null",
        )
    return ref


class OODMonitor:
    """Scores request embeddings against a reference and exports the Prometheus metrics.

    Args:
        reference: the calibrated reference.
        threshold: alarm above this; None: ``reference.threshold``.
        encoder: the encoder name (the metrics' ``encoder`` tag).
        buckets: histogram bounds; None: :data:`DEFAULT_BUCKETS` plus the threshold.
        metrics: create the ``ray.serve.metrics`` (off outside a Serve replica, e.g. in unit tests).
    """

    def __init__(
        self,
        reference: OODReference,
        *,
        threshold: float | None = None,
        encoder: str = "",
        buckets: list[float] | None = None,
        metrics: bool = True,
    ) -> None:
        self.reference = reference
        self.threshold = float(reference.threshold if threshold is None else threshold)
        self._tags = {"encoder": encoder or "encoder"}
        bounds = sorted({*(buckets or DEFAULT_BUCKETS), round(self.threshold, 6)} - {0.0})
        self.buckets = [float(b) for b in bounds if b > 0]
        self._histogram: Any = None
        self._alarms: Any = None
        if metrics:
            from ray.serve.metrics import Counter, Gauge, Histogram

            keys = ("encoder",)
            self._histogram = Histogram(
                "medray_ood_score",
                description="OOD score of each embedded image request (mean cosine distance to the reference).",
                boundaries=self.buckets,
                tag_keys=keys,
            )
            self._alarms = Counter(
                "medray_ood_alarms", description="Image requests whose OOD score is over the threshold.", tag_keys=keys
            )
            gauge = Gauge("medray_ood_threshold", description="The OOD alarm threshold in force.", tag_keys=keys)
            gauge.set(self.threshold, tags=self._tags)

    @classmethod
    def from_conf(
        cls,
        conf: Mapping[str, Any] | None,
        storage_options: Mapping[str, Any] | None = None,
        *,
        encoder: Mapping[str, Any] | None = None,
        metrics: bool = True,
    ) -> OODMonitor | None:
        """The monitor ``serve.ood`` asks for, or None when ``serve.ood.reference`` is null.

        Raises:
            ConfigError: the reference cannot be read, or does not fit the encoder (weights, dim).
        """
        if not conf or not conf.get("reference"):
            return None
        enc = dict(encoder or {})
        ref = load_reference(conf, storage_options, weights_hash=enc.get("weights_hash"))
        dim = enc.get("dim")
        if dim and int(dim) != ref.dim:
            raise ConfigError("serve.ood.reference", f"holds {ref.dim}-d embeddings; the encoder embeds {dim}-d")
        monitor = cls(
            ref,
            threshold=conf.get("threshold"),
            encoder=str(enc.get("name") or ""),
            buckets=conf.get("buckets"),
            metrics=metrics,
        )
        log.info(
            "OOD reference loaded: %d embeddings, k=%d, threshold %.4f", len(ref.vectors), ref.k, monitor.threshold
        )
        return monitor

    def observe(self, embedding: np.ndarray) -> dict[str, Any]:
        """Score one request (its record embedding), record the metrics; ``{"score", "threshold", "alarm"}``."""
        score = float(self.reference.score(np.asarray(embedding, dtype=np.float32).reshape(1, -1))[0])
        alarm = score > self.threshold
        if self._histogram is not None:
            self._histogram.observe(score, tags=self._tags)
            if alarm:
                self._alarms.inc(tags=self._tags)
        return {"score": score, "threshold": self.threshold, "alarm": bool(alarm)}
