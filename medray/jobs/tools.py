"""Small utility commands: ``medray samples`` and ``medray encoders``."""

from __future__ import annotations

from medray.jobs import JobInfo
from medray.testing.samples import generate_samples

__all__ = ["JOB", "main"]

JOB = JobInfo(
    "samples", "write synthetic sample DICOMs, photos, archives and a manifest: medray samples <dir> [n]", order=90
)


def main(argv: list[str]) -> int:
    """``medray samples <out_dir> [n]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: medray samples <out_dir> [n]")
        return 0 if argv else 2
    n = int(argv[1]) if len(argv) > 1 else 24
    info = generate_samples(argv[0], n=n)
    exp = info.get("expected", {})
    print(
        f"wrote {exp.get('dicom_files')} DICOMs, {exp.get('photos')} photos, archives, hostile files and "
        f"manifests to {argv[0]}"
    )
    return 0
