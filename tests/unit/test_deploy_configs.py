"""serve_configs/ and cluster/: valid for Ray's own schemas, consistent with each other and the code."""

from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path

import pytest
import yaml

from ray_ad.errors import ConfigError
from tests.conftest import REPO

SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_pass_ray_serve_schema_and_point_at_real_code(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(load(path))
    [app] = schema.applications
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert callable(builder)
    app_module = importlib.import_module(module)
    assert {d.name for d in app.deployments} <= {"FleetAPI", "LineScorer"}
    assert all(hasattr(app_module, d.name) for d in app.deployments)
    assert set(app.args) <= app_module.APP_ARGS and "root" in app.args


def test_both_serve_configs_exist():
    assert [p.name for p in SERVE_CONFIGS] == ["fleet.yaml", "local.yaml"]
    local = load(REPO / "serve_configs" / "local.yaml")
    assert local["http_options"]["host"] == "127.0.0.1"  # the embedded default listens on loopback only
    fleet = load(REPO / "serve_configs" / "fleet.yaml")
    scorer = [d for d in fleet["applications"][0]["deployments"] if d["name"] == "LineScorer"][0]
    assert scorer["ray_actor_options"]["num_gpus"] == 1 and scorer["autoscaling_config"]["max_replicas"] > 1
    assert fleet["applications"][0]["args"]["root"].startswith("s3://")


def test_app_builder_names_bad_args():
    from ray_ad.serve.app import app_builder

    with pytest.raises(ConfigError, match="rooot"):
        app_builder({"rooot": "x"})
    with pytest.raises(ConfigError, match="'root'"):
        app_builder({})


def test_rayservice_serves_exactly_the_fleet_config():
    service = load(REPO / "cluster" / "kuberay" / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == load(REPO / "serve_configs" / "fleet.yaml")
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    containers = [c for w in workers for c in w["template"]["spec"]["containers"]]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers)


def test_rayjob_entrypoint_is_a_valid_adapt_target_command():
    job = load(REPO / "cluster" / "kuberay" / "rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/adapt_target.py"]
    from tests.helpers import load_job

    args = load_job("adapt_target").build_parser().parse_args(argv[2:])
    assert args.root.startswith("s3://") and args.gpus


def test_raycluster_and_launcher_config():
    cluster = load(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] > 1
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    launcher = load(REPO / "cluster" / "ray-cluster.yaml")
    jsonschema.validate(launcher, schema)
    assert launcher["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert launcher["available_node_types"]["head"]["resources"].get("GPU", 0) == 0
