"""What can be validated offline about infra/: YAML, KubeRay required fields, Serve schema, pins."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = sorted((INFRA / "k8s").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "dashboard must not be exposed outside"
    env_names = set()
    for c in _containers(head["template"]):
        env_names |= {e["name"] for e in c.get("env", [])}
    assert {"RAY_AUTH_MODE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env_names
    assert spec.get("authOptions", {}).get("mode") == "token"
    groups = spec["workerGroupSpecs"]
    assert groups
    gpu_groups = []
    for g in groups:
        assert g["groupName"] and "rayStartParams" in g
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]
        for c in _containers(g["template"]):
            if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}):
                gpu_groups.append(g)
            for e in c.get("env", []):  # secrets come from Secrets, never literals
                if "SECRET" in e["name"] or "TOKEN" in e["name"]:
                    assert "valueFrom" in e and "value" not in e
    assert gpu_groups, "a GPU worker group is required"
    assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), "GPU group must autoscale"
    assert spec.get("enableInTreeAutoscaling") is True


def test_all_infra_yaml_parses():
    files = list(INFRA.rglob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        assert _docs(f), f


def test_raycluster():
    (doc,) = _docs(INFRA / "k8s" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


@pytest.mark.parametrize("name,job", [("rayjob-embed.yaml", "embed"), ("rayjob-finetune.yaml", "finetune")])
def test_rayjobs_name_a_cluster_and_a_medray_entrypoint(name, job):
    (doc,) = _docs(INFRA / "k8s" / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    args = shlex.split(spec["entrypoint"])
    assert args[:4] == ["python", "-m", "medray.cli", job]


def test_embed_rayjob_overrides_compose_and_validate(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from medray.config import CONF_DIR, register_schemas

    (doc,) = _docs(INFRA / "k8s" / "rayjob-embed.yaml")
    overrides = shlex.split(doc["spec"]["entrypoint"])[4:]
    register_schemas()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("embed", overrides=overrides)
    assert OmegaConf.select(cfg, "encoder.name") == "rad_dino"


def test_finetune_rayjob_overrides_compose_when_the_job_exists():
    from medray.jobs import discover_jobs

    jobs = discover_jobs()
    if "finetune" not in jobs:
        pytest.skip("finetune job not built yet")
    from hydra import compose, initialize_config_dir

    from medray.config import CONF_DIR, register_schemas

    info, _ = jobs["finetune"]
    register_schemas()
    if info.register:
        info.register()
    (doc,) = _docs(INFRA / "k8s" / "rayjob-finetune.yaml")
    overrides = shlex.split(doc["spec"]["entrypoint"])[4:]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        compose(info.config_name, overrides=overrides)


def test_rayservice_serve_config_parses_with_ray_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    (doc,) = _docs(INFRA / "k8s" / "rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    schema = (
        ServeDeploySchema.model_validate(serve_cfg)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(serve_cfg)
    )
    (app,) = schema.applications
    assert app.import_path == "medray.serve.app:build_app"
    _check_cluster_spec(doc["spec"]["rayClusterConfig"])
    from medray.serve.app import ServeArgs  # the app's own argument model accepts the args

    ServeArgs.model_validate(serve_cfg["applications"][0]["args"])


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(.+)$", d)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def test_dockerfile_pins_match_pyproject():
    text = (INFRA / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    pins = _pyproject_pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert args["TORCHAUDIO_VERSION"] == pins["torchaudio"]
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["RAY_IMAGE_TAG"].startswith(pins["ray"].rstrip(".*"))


def test_cluster_launcher_has_gpu_workers():
    (doc,) = _docs(INFRA / "aws" / "cluster.yaml")
    assert doc["provider"]["type"] == "aws" and doc["head_node_type"] in doc["available_node_types"]
    types = {n["node_config"]["InstanceType"] for n in doc["available_node_types"].values()}
    assert any(t.startswith(("g4", "g5", "g6", "p3", "p4", "p5")) for t in types)
    assert "dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])
