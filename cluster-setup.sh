#!/usr/bin/env bash
# Installs this project on a node of cluster.yaml (its setup_commands run this on every node, head included):
# torch and torchvision built for the node's NVIDIA driver first, then the project, which may not replace them.
#
#   bash cluster-setup.sh [PROJECT_DIR]          # install (PYTHON=python3 by default)
#   source cluster-setup.sh && torch_index       # only say which wheels this node needs: cpu, cu126, cu128, cu130
#
# Which wheels: the CUDA version the driver supports ("CUDA Version" in nvidia-smi's header), matched to the
# newest wheel build it can run: 13.0 or later -> cu130, 12.8 or later -> cu128, other 12.x -> cu126 (CUDA's
# minor-version compatibility: a 12.x driver, 525 or later, runs 12.6 builds). No nvidia-smi, or one that
# cannot reach a driver (a CPU node started from a GPU image) -> the CPU wheels. A driver older than CUDA 12
# stops the setup: no torch in the range below is built for it.

# Keep in step with pyproject.toml's dependencies (tests/pipeline/test_cluster_yaml.py checks it).
TORCH_SPEC="torch>=2.9,<2.15"
TORCHVISION_SPEC="torchvision>=0.24,<0.30"
WHEEL_INDEX="https://download.pytorch.org/whl"

# The CUDA version of the node's driver ("12.8"), or nothing where there is no working driver.
driver_cuda() {
  "${NVIDIA_SMI:-nvidia-smi}" 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

torch_index() {
  local version major minor
  if ! command -v "${NVIDIA_SMI:-nvidia-smi}" >/dev/null 2>&1; then
    echo "cluster-setup: no nvidia-smi: CPU wheels" >&2
    echo cpu
    return 0
  fi
  version=$(driver_cuda)
  if [ -z "$version" ]; then
    echo "cluster-setup: nvidia-smi reaches no driver (a CPU node?): CPU wheels" >&2
    echo cpu
    return 0
  fi
  major=${version%%.*}
  minor=${version#*.}
  if [ "$major" -ge 13 ]; then
    echo cu130
  elif [ "$major" -eq 12 ] && [ "$minor" -ge 8 ]; then
    echo cu128
  elif [ "$major" -eq 12 ]; then
    echo cu126
  else
    echo "cluster-setup: the driver supports CUDA $version; $TORCH_SPEC needs a driver for CUDA 12 or later" \
         "(525 or newer). Use an image with a newer driver." >&2
    return 1
  fi
}

install_node() {
  local project=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
  local python=${PYTHON:-python3}
  local index constraints
  index=$(torch_index) || return 1
  echo "cluster-setup: $TORCH_SPEC and $TORCHVISION_SPEC from $WHEEL_INDEX/$index" >&2
  "$python" -m pip install -q "$TORCH_SPEC" "$TORCHVISION_SPEC" --index-url "$WHEEL_INDEX/$index" || return 1
  # the versions just installed (with their +cuXXX tag) bind the project's install: pip keeps them
  constraints=$(mktemp) || return 1
  "$python" -c 'from importlib.metadata import version as v; print("torch==" + v("torch")); print("torchvision==" + v("torchvision"))' \
    > "$constraints" || return 1
  "$python" -m pip install -q -c "$constraints" -e "$project" || return 1
  rm -f "$constraints"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
  set -euo pipefail
  install_node "$@"
fi
