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
    rules = config["provider"]["security_group"]["IpPermissions"]
    for rule in rules:
        ports = set(range(rule["FromPort"], rule["ToPort"] + 1))
        assert not ports & PRIVATE_PORTS, rule
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", [])), rule
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_a_broken_config_is_refused(config):
    broken = {**config, "available_node_types": {**config["available_node_types"]}}
    broken["available_node_types"]["gpu_worker"] = {**broken["available_node_types"]["gpu_worker"],
                                                    "min_workers": "many"}
    with pytest.raises(Exception, match=r"many|min_workers"):
        validate_config(prepare_config(broken))
