"""cluster.yaml passes Ray's own cluster-config schema (prepare, then validate, as Ray's tests do),
with no cloud credentials, and never exposes the dashboard, job API or GCS ports."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
PRIVATE_PORTS = {6379, 8265, 8076, 5000}


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_for_ray(config):
    validate_config(prepare_config(config))


def test_gpu_workers_and_autoscaling_bounds(config):
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith(("g", "p"))
    assert 0 <= workers["min_workers"] <= workers["max_workers"] <= config["max_workers"]
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("[gpu]" in c for c in config["setup_commands"])


def test_no_private_port_open_to_the_internet(config):
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "security_group" not in config["provider"]  # Ray would add SSH from 0.0.0.0/0 to a group it made


def test_ray_creates_no_security_group_so_adds_no_open_ssh_rule(config, monkeypatch):
    """What Ray's AWS provider would do with this file: when it creates a group, it always adds SSH from
    0.0.0.0/0 (``_create_default_ssh_inbound_rules``); with every node type naming its group, it creates
    none (and calls no AWS API)."""
    from ray.autoscaler._private.aws import config as aws_config

    def create_groups(*args, **kwargs):
        raise AssertionError("Ray would create a security group (with SSH open to 0.0.0.0/0)")

    monkeypatch.setattr(aws_config, "_upsert_security_groups", create_groups)
    prepared = prepare_config(config)
    assert aws_config._configure_security_group(prepared) is prepared
    assert all(t["node_config"]["SecurityGroupIds"] for t in prepared["available_node_types"].values())
    assert {"CidrIp": "0.0.0.0/0"} in aws_config._create_default_ssh_inbound_rules()[0]["IpRanges"]  # still so


def test_every_node_starts_ray_with_the_token(config):
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), starts


def test_the_launcher_needs_are_an_extra():
    import tomllib

    pyproject = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())
    assert any(r.startswith("boto3") for r in pyproject["project"]["optional-dependencies"]["cluster"])


def test_a_broken_config_is_refused(config):
    broken = {**config, "available_node_types": {**config["available_node_types"]}}
    broken["available_node_types"]["gpu_worker"] = {**broken["available_node_types"]["gpu_worker"],
                                                    "min_workers": "many"}
    with pytest.raises(Exception, match=r"many|min_workers"):
        validate_config(prepare_config(broken))
