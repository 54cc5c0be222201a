"""``medray encoders [pattern]``: the encoder presets as a table, and the families."""

from __future__ import annotations

from collections.abc import Sequence

from medray.encoders import EncoderSpec, family_modalities, get_spec, list_encoders, list_families
from medray.jobs import JobInfo

__all__ = ["JOB", "encoders_table", "main"]

JOB = JobInfo("encoders", "list encoder presets (modality, size, licence, gated) and families", order=91)

_COLUMNS = ("name", "family", "modality", "dim", "licence", "gated", "checkpoint")


def _row(spec: EncoderSpec) -> list[str]:
    checkpoint = "(set encoder.checkpoint)" if spec.checkpoint_missing else spec.checkpoint
    if spec.untrained:
        checkpoint += "  [untrained]"
    gated = "-" if spec.gated is None else ("yes" if spec.gated else "no")
    return [
        spec.name,
        spec.family,
        "+".join(dict.fromkeys([spec.modality, *family_modalities(spec.family)[1:]])),  # image-text: image+text
        str(spec.embedding_dim) if spec.embedding_dim else "-",
        spec.license or "see model card",
        gated,
        checkpoint,
    ]


def encoders_table(pattern: str = "*") -> str:
    """The presets matching ``pattern`` as an aligned table, then the matching families.

    Args:
        pattern: a shell-style pattern over names, e.g. ``"dino*"``.

    Returns:
        The text ``medray encoders`` prints (no trailing newline).
    """
    families = set(list_families())
    names = list_encoders(pattern)
    rows = [list(_COLUMNS)] + [_row(get_spec(n)) for n in names if n not in families]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    if len(rows) == 1:
        lines = [f"no encoder preset matches '{pattern}'"]
    matched = [n for n in names if n in families]
    if matched:
        lines += ["", "families (any checkpoint: encoder=<family> encoder.checkpoint=<uri>): " + ", ".join(matched)]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Print the table; ``-h`` prints the usage."""
    args = list(argv)
    if args and args[0] in ("-h", "--help"):
        print(
            "usage: medray encoders [pattern]\n\nThe encoder presets (conf/encoder/*.yaml): name, family, modality, "
            "embedding size,\nlicence, whether the hub gates the checkpoint, checkpoint; then the families.\n"
            "e.g. medray encoders 'dino*'"
        )
        return 0
    print(encoders_table(args[0] if args else "*"))
    return 0
