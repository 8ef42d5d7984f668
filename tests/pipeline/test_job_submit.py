"""``ray job submit`` of pipeline/train.py against a local head started with ``ray start --head``.

Ray 2.60 turns on token authentication by default: the job CLI needs RAY_AUTH_MODE=token (the
token is in ~/.ray/auth_token). Everything is bound to 127.0.0.1.
"""

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
def head():
    # every port the head listens on is a free one: fixed defaults (the dashboard agent's 52365, Ray
    # Client's 10001) collide with any other Ray on the machine, a user's included
    gcs, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
    # the job runs "python" from the PATH the head was started with: this environment's
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")  # short: Ray's socket paths live under it
    try:  # a head that starts too slowly is stopped too
        subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                        "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
                        "--num-cpus", "4",
                        "--temp-dir", temp_dir, "--disable-usage-stats"], check=True, env=env, capture_output=True,
                       timeout=300)
        yield {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_processes_naming(temp_dir, f"--address=[^ ]+:{gcs}( |$)")  # Ray Client's server names the GCS only


def test_train_py_as_a_ray_job(head, tmp_path):
    data = tmp_path / "study"
    generate(study_config(n_train=16, n_val=6, height=64, width=128, seed=5), data)
    out = tmp_path / "runs"
    submit = [RAY, "job", "submit", "--working-dir", str(REPO), "--", "python", "pipeline/train.py", "--smoke",
              "--data", str(data), "--out", str(out), "--name", "job-smoke"]
    # The head's job agent registers some seconds after `ray start` returns (longer on a loaded machine);
    # until then the server refuses the job, which is not the job's failure: ask again.
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(submit, env=head, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    assert (out / "job-smoke" / "artifacts" / "final_metrics.json").exists()
    assert "| job-smoke |" in result.stdout
