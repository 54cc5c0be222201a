"""``medray submit -m``: sweeps expand as Hydra's basic sweeper expands them; bad points stop before submission."""

from __future__ import annotations

from pathlib import Path

import pytest

from medray.config import CONF_DIR
from medray.jobs import discover_jobs
from medray.jobs.submit import _check_points, expand_sweep, main
from medray.platform.errors import ConfigError


@pytest.mark.parametrize(
    "overrides,points",
    [
        (["a=1,2"], [["a=1"], ["a=2"]]),
        (["a=range(1,3)"], [["a=1"], ["a=2"]]),
        (["a=range(0,1,0.5)"], [["a=0.0"], ["a=0.5"]]),
        (["a=choice(x,y)"], [["a=x"], ["a=y"]]),
        (["a=[1,2]"], [["a=[1,2]"]]),  # a list, not a sweep
        (["a=[1,2],[3]"], [["a=[1,2]"], ["a=[3]"]]),  # a sweep over lists
        (["a={b: 1, c: 2}"], [["a={b: 1, c: 2}"]]),  # not swept: passed exactly as typed
        (["a='x,y'"], [["a='x,y'"]]),  # quoted comma: one value
        (["a=x\\,y"], [["a=x\\,y"]]),  # escaped comma: one value
        (['a="q r","s,t"'], [['a="q r"'], ['a="s,t"']]),
        (["a=1,2", "b=x,y"], [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]),
        (["a=1,2", "c=3", "a=5"], [["a=5", "c=3"]]),  # the last value of a key wins, in its first place
        (["+x=1,2", "~y"], [["+x=1", "~y"], ["+x=2", "~y"]]),
        (
            ["input=s3://b/in/", "a=s3://x,s3://y"],
            [["input=s3://b/in/", "a=s3\\://x"], ["input=s3://b/in/", "a=s3\\://y"]],
        ),
        (
            ["output=/o/${encoder.name}", "encoder=a,b"],
            [["output=/o/${encoder.name}", "encoder=a"], ["output=/o/${encoder.name}", "encoder=b"]],
        ),
        ([], [[]]),
    ],
)
def test_sweeps_expand_like_hydra(overrides, points):
    assert expand_sweep(overrides) == points


def test_points_reparse_to_the_same_values():
    """What each submitted job receives parses (in RUN mode, as the job parses it) to the intended value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    (one,), (two,) = expand_sweep(["output='/o/${encoder.name}',/p"])
    assert parser.parse_override(one).value() == "/o/${encoder.name}"
    assert parser.parse_override(two).value() == "/p"
    (point,) = expand_sweep(["task.labels=[effusion,'a,b']"])
    assert parser.parse_override(point[0]).value() == ["effusion", "a,b"]
    (one,), (two,) = expand_sweep(["a=s3://x/${b},'s3://y,z'"])
    assert parser.parse_override(one).value() == "s3://x/${b}" and parser.parse_override(two).value() == "s3://y,z"


def test_glob_sweeps_the_matching_options_of_a_group():
    presets = sorted(p.stem for p in Path(CONF_DIR, "encoder").glob("dinov2*.yaml"))
    assert presets
    assert expand_sweep(["encoder=glob(dinov2*)"]) == [[f"encoder={p}"] for p in presets]
    assert expand_sweep(["cluster=glob(*)", "a=1"]) == [["cluster=local", "a=1"], ["cluster=remote", "a=1"]]


@pytest.mark.parametrize("bad", ["a=[1,2", "a=interval(0,1)", "a=choice(1,2"])
def test_unparseable_or_unenumerable_sweeps_name_the_overrides(bad):
    with pytest.raises(ConfigError, match="'overrides'"):
        expand_sweep([bad])


def test_every_point_is_composed_before_submission():
    embed = discover_jobs()["embed"][0]
    _check_points(embed, [["input=/a", "output=/b", "encoder=demo_tiny_vit"], ["cluster=remote"]])
    with pytest.raises(ConfigError) as err:
        _check_points(embed, [["cluster=local"], ["cluster=nope"]])
    assert "cluster=nope" in str(err.value) and "remote" in str(err.value)
    with pytest.raises(ConfigError, match="storage.optoins"):
        _check_points(embed, [["storage.optoins={}"]])


def test_a_bad_point_stops_the_whole_sweep_before_any_cluster_is_contacted(capsys):
    # no cluster listens on port 9: a submission attempt would fail differently
    code = main(
        [
            "embed",
            "-m",
            "encoder=demo_tiny_vit,no_such_encoder",
            "input=/a",
            "output=/b",
            "--address",
            "http://127.0.0.1:9",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no_such_encoder" in err and "demo_tiny_vit" in err
    assert "cannot reach" not in err
