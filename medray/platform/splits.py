"""Deterministic patient-level splits, computed one row at a time.

A row's split depends only on its group (the salted patient key, or any
grouping column), the seed and the fractions, never on the other rows. So
every Ray task computes the same split for a patient with no global list on
the driver, all images of one patient land in one split, and a fixed seed
reproduces the split on any machine.

The group value is hashed with the salt and the seed (SHA-256), mapped to a
number in ``[0, 1)``, and compared with the cumulative fractions
``train | val | test``.

Example:
    >>> fr = SplitFractions(val=0.2, test=0.1)
    >>> assign_split("patient-17", seed=0, fractions=fr) == assign_split("patient-17", seed=0, fractions=fr)
    True
    >>> assign_split("patient-17", seed=0, fractions=SplitFractions(val=0.0, test=0.0))
    'train'
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SPLITS", "SplitFractions", "assign_split", "assign_splits", "split_value"]

#: Split names, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFractions:
    """Shares of groups in ``val`` and ``test``; ``train`` gets the rest."""

    val: float = 0.2
    test: float = 0.0

    def __post_init__(self) -> None:
        for name in ("val", "test"):
            v = getattr(self, name)
            if not (0.0 <= float(v) < 1.0):
                raise ValueError(f"{name} fraction must be within [0, 1), got {v}")
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test fractions must be < 1 (train needs data), got {self.val + self.test}")

    @property
    def train(self) -> float:
        """Share of groups in ``train``."""
        return 1.0 - self.val - self.test


def split_value(group: str, *, seed: int, salt: str = "") -> float:
    """The group's position in ``[0, 1)``: a pure function of (salt, seed, group)."""
    digest = hashlib.sha256(f"medray-split\x00{salt}\x00{int(seed)}\x00{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def assign_split(group: Any, *, seed: int, fractions: SplitFractions, salt: str = "") -> str:
    """Split of one group: ``train``, ``val`` or ``test``.

    Args:
        group: the grouping value (patient key, or a grouping column's value).
            ``None``/empty cannot be grouped: callers pass a per-record
            fallback (e.g. the record id) instead.
        seed: split seed; another seed gives another, equally valid split.
        fractions: val/test shares.
        salt: mixed into the hash, so split membership of a raw grouping
            value cannot be guessed without it.
    """
    if group is None or str(group) == "":
        raise ValueError("cannot assign a split to an empty group; pass a per-record fallback key")
    u = split_value(str(group), seed=seed, salt=salt)
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val:
        return "val"
    return "test"


def assign_splits(
    groups: Iterable[Any],
    *,
    seed: int,
    fractions: SplitFractions,
    salt: str = "",
    fallbacks: Sequence[Any] | None = None,
) -> list[str]:
    """:func:`assign_split` for a batch; an empty group uses ``fallbacks[i]`` instead."""
    out: list[str] = []
    for i, g in enumerate(groups):
        if g is None or str(g) == "":
            if fallbacks is None:
                raise ValueError(f"row {i} has no group value and no fallback key")
            g = f"record:{fallbacks[i]}"
        out.append(assign_split(g, seed=seed, fractions=fractions, salt=salt))
    return out
