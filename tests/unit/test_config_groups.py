"""The ``storage`` and ``cluster`` config groups compose for every job; typos fail naming the key (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from medray.config import CONF_DIR, RayConf, StorageConf, register_schemas
from medray.jobs import finetune, serve
from medray.platform.storage import open_fs

JOBS = ("embed", "finetune", "serve")
REQUIRED = {"embed": ["input=/data/in", "output=/data/out"], "finetune": ["output=/data/run"], "serve": []}
CLI = str(Path(sys.executable).parent / "medray")


def _compose(job: str, *overrides: str):
    register_schemas()
    finetune.register()
    serve.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(job, overrides=[*REQUIRED[job], *overrides], return_hydra_config=False)


def _options(group: str) -> set[str]:
    return {p.stem for p in Path(CONF_DIR, group).glob("*.yaml")}


def test_the_groups_and_their_options_exist():
    assert _options("storage") == {"local", "s3", "gcs"}
    assert _options("cluster") == {"local", "remote"}


@pytest.mark.parametrize("job", JOBS)
def test_defaults_are_local_storage_and_a_local_ray(job):
    cfg = _compose(job)
    assert OmegaConf.to_container(cfg.storage) == OmegaConf.to_container(OmegaConf.structured(StorageConf))
    assert OmegaConf.to_container(cfg.ray) == OmegaConf.to_container(OmegaConf.structured(RayConf))
    assert cfg.ray.address is None and cfg.storage.options == {}


@pytest.mark.parametrize("job", JOBS)
def test_plain_overrides_keep_working(job):
    cfg = _compose(job, "+storage.options.s3.endpoint_url=http://127.0.0.1:9000", "ray.address=auto", "ray.num_cpus=2")
    assert cfg.storage.options.s3.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.ray.address == "auto" and cfg.ray.num_cpus == 2
    flat = _compose(job, "+storage.options.anon=true")
    assert OmegaConf.to_container(flat.storage.options) == {"anon": True}
    # with storage=s3 the keys exist: no `+` needed
    s3 = _compose(job, "storage=s3", "storage.options.s3.endpoint_url=http://127.0.0.1:9000")
    assert s3.storage.options.s3.endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize("job", JOBS)
def test_cluster_remote_connects_to_a_running_cluster(job):
    cfg = _compose(job, "cluster=remote")
    assert cfg.ray.address == "auto" and cfg.ray.num_cpus is None
    assert "cluster" not in cfg  # the group sets the `ray` package, nothing else
    # an explicit address still wins over the group's
    assert _compose(job, "cluster=remote", "ray.address=ray://head:10001").ray.address == "ray://head:10001"


def test_storage_s3_reads_endpoint_and_profile_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9333")
    monkeypatch.setenv("AWS_PROFILE", "research")
    s3 = _compose("embed", "storage=s3").storage.options.s3
    assert s3.endpoint_url == "http://127.0.0.1:9333" and s3.profile == "research"
    assert s3.config_kwargs.retries.max_attempts >= 3
    # a command-line value beats the environment
    assert _compose("embed", "storage=s3", "storage.options.s3.profile=other").storage.options.s3.profile == "other"


def test_storage_s3_leaves_unset_variables_to_s3fs(monkeypatch):
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9333")
    options = OmegaConf.to_container(_compose("embed", "storage=s3").storage.options, resolve=True)
    assert options["s3"]["profile"] is None
    fs, path = open_fs("s3://bucket/prefix", options)  # no network: only builds the filesystem
    assert path == "bucket/prefix"
    assert "profile" not in fs.storage_options
    assert fs.storage_options["endpoint_url"] == "http://127.0.0.1:9333"


def test_storage_gcs_composes(monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "my-project")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    gcs = _compose("finetune", "storage=gcs").storage.options.gcs
    assert gcs.project == "my-project" and gcs.token is None


def _items(node, prefix=""):
    for k, v in (node or {}).items():
        if isinstance(v, dict):
            yield from _items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("group", ["storage", "cluster"])
def test_group_files_hold_no_secrets_and_say_how_to_run(group):
    for path in Path(CONF_DIR, group).glob("*.yaml"):
        text = path.read_text()
        assert "medray " in "".join(text.splitlines()[:2]), f"{path.name}: open with the command that uses it"
        for key, value in _items(yaml.safe_load(text)):
            name = key.rsplit(".", 1)[-1].lower()
            if any(h in name for h in ("secret", "key", "token", "password", "credential", "profile")):
                # credentials and where to find them come from the environment, never the file
                assert value is None or str(value).startswith("${oc.env:"), (path.name, key)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize(
    "override,named",
    [
        ("storage.optoins={}", "storage.optoins"),
        ("ray.adress=auto", "ray.adress"),
    ],
)
def test_a_misspelt_key_fails_naming_it(job, override, named):
    with pytest.raises(ConfigCompositionException, match=named.replace(".", r"\.")):
        _compose(job, override)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("group", ["storage", "cluster"])
def test_an_unknown_option_fails_listing_the_choices(job, group):
    with pytest.raises(MissingConfigException) as err:
        _compose(job, f"{group}=nope")
    msg = str(err.value)
    assert f"'{group}/nope'" in msg
    assert all(option in msg for option in _options(group))


def test_the_cli_stops_before_ray_naming_the_group_and_its_choices(tmp_path):
    env = dict(os.environ, RAY_ADDRESS="", MEDRAY_HOME=str(tmp_path))
    for override, expected in (
        ("cluster=nope", ["cluster/nope", "local", "remote"]),
        ("storage.optoins={}", ["storage.optoins"]),
    ):
        proc = subprocess.run(
            [CLI, "embed", f"input={tmp_path}", f"output={tmp_path / 'out'}", override],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0
        assert all(e in proc.stderr for e in expected), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()
