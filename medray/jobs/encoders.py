"""``medray encoders [pattern]``: list encoder presets and families."""

from __future__ import annotations

from medray.encoders import get_spec, list_encoders, list_families
from medray.jobs import JobInfo

__all__ = ["JOB", "main"]

JOB = JobInfo("encoders", "list registered encoder presets and families: medray encoders [pattern]", order=91)


def main(argv: list[str]) -> int:
    """Print one encoder name per line, with family and checkpoint."""
    families = set(list_families())
    for name in list_encoders(argv[0] if argv else "*"):
        if name in families:
            print(f"{name:18s} family")
            continue
        spec = get_spec(name)
        tag = "  [untrained]" if spec.untrained else ""
        print(f"{name:18s} {spec.family:11s} {spec.checkpoint}{tag}")
    return 0
