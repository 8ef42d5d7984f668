"""``ray job submit`` of pipeline/train.py, as the README prints it, against a two-node cluster on this
machine: a head started with ``ray start --head`` and no CPUs (it runs the driver, the store and the
tracker, as on cluster.yaml's head) and a second node, ``ray start --address ...``, with the CPUs and a
cache folder of its own, where the training workers run.

Ray 2.60 turns on token authentication by default: the job CLI needs RAY_AUTH_MODE=token (the
token is in ~/.ray/auth_token). Everything is bound to 127.0.0.1.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from divdr.data.study import study_config
from divdr.data.synthetic import generate
from tests.pipeline.conftest import stop_processes_naming

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # every port the nodes listen on is a free one: fixed defaults (the dashboard agent's 52365, Ray
    # Client's 10001) collide with any other Ray on the machine, a user's included
    gcs, dashboard, agent, client, worker_agent = (free_port() for _ in range(5))
    # the job runs "python" from the PATH the head was started with: this environment's
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    caches = {node: tmp_path_factory.mktemp(f"cache-{node}") for node in ("head", "worker")}
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")  # short: Ray's socket paths live under it
    try:  # a head that starts too slowly is stopped too
        subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                        "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
                        "--num-cpus", "0", "--temp-dir", temp_dir, "--disable-usage-stats"], check=True,
                       env={**env, "DIVDR_CACHE": str(caches["head"])}, capture_output=True, timeout=300)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "4", "--dashboard-agent-listen-port", str(worker_agent),
                        "--disable-usage-stats"], check=True, env={**env, "DIVDR_CACHE": str(caches["worker"])},
                       capture_output=True, timeout=300)
        yield {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}", "caches": caches}
    finally:
        stop_processes_naming(temp_dir, f"--address=[^ ]+:{gcs}( |$)", f"127.0.0.1:{gcs}")


def submit(head: dict, *args: str, wait: bool = True, submission_id: str | None = None) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir . -- python pipeline/train.py ...``, as the README prints it. The head's
    job agent registers some seconds after `ray start` returns (longer on a loaded machine); until then
    the server refuses the job, which is not the job's failure: ask again."""
    env = {k: v for k, v in head.items() if k != "caches"}
    command = [RAY, "job", "submit", *([] if wait else ["--no-wait"]),
               *(["--submission-id", submission_id] if submission_id else []), "--working-dir", str(REPO), "--",
               "python", "pipeline/train.py", *args]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(5)


def test_train_py_as_a_ray_job(head, tmp_path):
    data = tmp_path / "study"
    generate(study_config(n_train=16, n_val=6, height=64, width=128, seed=5), data)
    out = tmp_path / "runs"
    result = submit(head, "--smoke", "--data", str(data), "--out", str(out), "--name", "job-smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert (out / "job-smoke" / "artifacts" / "final_metrics.json").exists()
    assert "| job-smoke |" in result.stdout
    assert f"run folder      {out / 'job-smoke'}" in result.stdout  # the job says where its outputs are


def test_a_job_finds_its_data_on_the_worker_node_writes_where_told_and_resumes_after_a_stop(head, tmp_path):
    shared = tmp_path / "bucket" / "study"  # a URI, as s3:// would be: each node fetches it into its cache
    generate(study_config(n_train=16, n_val=6, height=64, width=128, seed=6), shared)
    out = tmp_path / "runs"
    args = ("--smoke", "--data", shared.as_uri(), "--out", str(out), "--name", "two-node",
            "--set", "train.steps=80", "--set", "train.checkpoint_every=4", "--set", "data.max_train_images=8")
    job_id = f"two-node-{time.time_ns()}"
    first = submit(head, *args, wait=False, submission_id=job_id)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = out / "ray_results" / "two-node"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len([p for p in checkpoints.glob("checkpoint_*") if p.is_dir()]) < 2:
        time.sleep(1)
    env = {k: v for k, v in head.items() if k != "caches"}
    stopped = subprocess.run([RAY, "job", "stop", job_id], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert not (out / "two-node" / "result.json").exists()  # stopped midway
    second = submit(head, *args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = json.loads((out / "two-node" / "result.json").read_text())
    assert result["start_step"] >= 4 and result["step"] == 80  # resumed from a checkpoint of the first
    # the training workers read the data on the worker node, from its own cache; the driver on the head
    for node in ("head", "worker"):
        assert list(head["caches"][node].glob("remote-*/leftImg8bit/train")), node
