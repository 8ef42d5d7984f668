"""cluster.yaml passes Ray's own cluster-config schema (prepare, then validate, as Ray's tests do),
with no cloud credentials, and never exposes the dashboard, job API or GCS ports."""

import os
import re
import subprocess
import sys
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


# ---- installing on a node: torch for the node's driver, then the project ------------------------------

SETUP = CLUSTER_YAML.parent / "cluster-setup.sh"
SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}             Driver Version: {driver}     CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
"""


def fake_nvidia_smi(folder: Path, driver: str | None, cuda: str | None) -> Path:
    """An nvidia-smi that prints the header of a driver (or, with ``cuda`` None, fails as on a CPU node)."""
    path = folder / "nvidia-smi"
    if cuda is None:
        body = ('echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver." >&2\n'
                "exit 9\n")
    else:
        body = f"cat <<'EOF'\n{SMI_HEADER.format(driver=driver, cuda=cuda)}EOF\n"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def setup(command: str, nvidia_smi: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{SETUP}" && {command}'], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "NVIDIA_SMI": nvidia_smi, **env}, check=False)


@pytest.mark.parametrize(("driver", "cuda", "index"), [
    ("535.230.02", "12.2", "cu126"),  # a CUDA 12 deep-learning image: minor-version compatibility
    ("560.35.03", "12.6", "cu126"),
    ("570.133.20", "12.8", "cu128"),
    ("575.57.08", "12.9", "cu128"),
    ("580.65.06", "13.0", "cu130"),
    ("590.10.01", "13.1", "cu130"),
])
def test_a_gpu_node_gets_the_wheels_of_its_driver(tmp_path, driver, cuda, index):
    done = setup("torch_index", str(fake_nvidia_smi(tmp_path, driver, cuda)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == index


def test_a_cpu_node_gets_the_cpu_wheels(tmp_path):
    missing = setup("torch_index", str(tmp_path / "no-such-nvidia-smi"))
    failing = setup("torch_index", str(fake_nvidia_smi(tmp_path, None, None)))  # the head: a GPU image, no GPU
    assert (missing.stdout.strip(), failing.stdout.strip()) == ("cpu", "cpu")
    assert "no nvidia-smi" in missing.stderr and "reaches no driver" in failing.stderr


def test_a_driver_older_than_cuda_12_stops_the_setup(tmp_path):
    done = setup("torch_index", str(fake_nvidia_smi(tmp_path, "470.256.02", "11.4")))
    assert done.returncode != 0 and done.stdout == ""
    assert "supports CUDA 11.4" in done.stderr and "CUDA 12 or later" in done.stderr


def test_the_project_is_installed_without_replacing_the_nodes_torch(tmp_path):
    """The whole install with a python whose pip only records what it is asked (the snippet that reads
    the installed versions runs in this environment's python): torch from the driver's index first,
    then the project constrained to the torch and torchvision installed."""
    log = tmp_path / "calls.log"
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
if [ "$1" = "-c" ]; then echo "-c" >> {log}; exec {sys.executable} "$@"; fi
echo "$@" >> {log}
prev=""
for a in "$@"; do if [ "$prev" = "-c" ]; then cat "$a" >> {log}; fi; prev=$a; done
""")
    python.chmod(0o755)
    done = setup("install_node /home/ubuntu/divdr", str(fake_nvidia_smi(tmp_path, "570.133.20", "12.8")),
                 PYTHON=str(python))
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == ("-m pip install -q torch>=2.9,<2.15 torchvision>=0.24,<0.30 "
                        "--index-url https://download.pytorch.org/whl/cu128")
    assert calls[1] == "-c"
    assert calls[2].startswith("-m pip install -q -c ") and calls[2].endswith(" -e /home/ubuntu/divdr")
    from importlib.metadata import version

    # the constraints pip was given: the installed versions as pip knows them (a download.pytorch.org
    # wheel's carry its build tag, 2.10.0+cu128; PyPI's 2.14.1 here carries none)
    assert calls[3:] == [f"torch=={version('torch')}", f"torchvision=={version('torchvision')}"]


def test_every_node_runs_the_setup_and_its_torch_range_is_the_projects(config):
    import tomllib

    assert config["setup_commands"] == ["bash /home/ubuntu/divdr/cluster-setup.sh /home/ubuntu/divdr"]
    assert config["file_mounts"]["/home/ubuntu/divdr"] == "."  # the script travels with the project
    dependencies = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    script = SETUP.read_text()
    for name in ("torch", "torchvision"):
        (spec,) = [d for d in dependencies if re.match(rf"{name}\b(?!vision)", d)]
        assert f'{name.upper()}_SPEC="{spec}"' in script


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
