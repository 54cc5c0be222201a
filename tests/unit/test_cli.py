"""The command line without Ray: --version, per-job --help, the encoders table, the jobs table."""

from __future__ import annotations

import re

import pytest

import medray
from medray.cli import main
from medray.encoders import get_spec
from medray.jobs.encoders import encoders_table
from medray.jobs.jobs import format_jobs
from medray.platform.errors import ConfigError


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    main([flag])
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"medray {medray.__version__} (ray ") and "python 3." in out


def _groups(text: str) -> set[str]:
    """The group names listed under 'config groups'."""
    block = text.split("config groups", 1)[1].split("\n\n", 1)[0]
    return {m.group(1) for m in re.finditer(r"^  (\w+)  ", block, re.M)}


def test_embed_help_lists_only_embeds_groups(capsys):
    main(["embed", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: medray embed ")
    assert _groups(out) == {"encoder", "storage", "cluster"}
    assert "rad_dino" in out and "input" in out and "max_error_fraction" in out
    for finetune_only in ("task", "train", "data", "experiment", "deepspeed", "scaling"):
        assert not re.search(rf"^  {finetune_only}\b", out, re.M), finetune_only


def test_finetune_help_lists_its_groups(capsys):
    main(["finetune", "-h"])
    out = capsys.readouterr().out
    assert _groups(out) == {"data", "encoder", "task", "train", "storage", "cluster", "experiment"}
    assert "linear_probe" in out and "multilabel" in out and "deepspeed" in out
    main(["serve", "--help"])
    assert _groups(capsys.readouterr().out) == {"encoder", "serve", "storage", "cluster"}


def test_encoders_table_is_aligned_with_licence_and_gating():
    lines = encoders_table().splitlines()
    head = lines[0].split()
    assert head == ["name", "family", "modality", "dim", "licence", "gated", "checkpoint"]
    starts = [lines[0].index(c) for c in ("family", "modality", "dim", "licence", "gated", "checkpoint")]
    rows = {ln.split()[0]: ln for ln in lines[1:] if ln and not ln.startswith("families")}
    for line in rows.values():  # every column starts where its heading does
        for s in starts:
            assert line[s - 2 : s] == "  " and line[s] != " "
    assert "MSRLA" in rows["rad_dino"] and " 768 " in rows["rad_dino"] and " no " in rows["rad_dino"]
    assert "Owkin non-commercial" in rows["phikon"]
    assert "Apache-2.0" in rows["dinov2_base"] and "MIT" in rows["biomedbert"]
    assert " yes " in rows["uni"] and "1024" in rows["uni"]
    assert lines[-1].startswith("families") and "hf_image" in lines[-1]
    assert encoders_table("nothing*") == "no encoder preset matches 'nothing*'"


def test_card_fields_are_checked_and_stay_out_of_the_identity():
    from dataclasses import replace

    from medray.encoders import identity_key

    spec = get_spec("rad_dino")
    assert spec.license == "MSRLA" and spec.gated is False and spec.embedding_dim == 768
    assert identity_key({"image": spec}, {"image": "w"}) == identity_key(
        {"image": replace(spec, license=None, gated=None, embedding_dim=None)}, {"image": "w"}
    )
    with pytest.raises(ConfigError, match="encoder.gated"):
        get_spec("rad_dino", gated="maybe")
    with pytest.raises(ConfigError, match="encoder.embedding_dim"):
        get_spec("rad_dino", embedding_dim=0)


def test_jobs_table():
    jobs = [
        {
            "job_id": "raysubmit_b",
            "status": "RUNNING",
            "job": "embed",
            "start_time": 1_700_000_000_000,
            "end_time": None,
            "entrypoint": "python -m medray.cli embed input=s3://b/in output=s3://b/out",
        },
        {"job_id": "raysubmit_a", "status": "SUCCEEDED", "job": None, "start_time": None, "end_time": None},
    ]
    lines = format_jobs(jobs, now_ms=1_700_000_090_000).splitlines()
    assert lines[0].split()[:3] == ["job", "id", "status"]
    assert lines[1].split()[:7] == ["raysubmit_b", "RUNNING", "embed", "2023-11-14", "22:13:20", "1m30s", "medray"]
    assert lines[2].split() == ["raysubmit_a", "SUCCEEDED", "-", "-", "-"]
    assert format_jobs([]) == "no submitted jobs on this cluster"
