#!/usr/bin/env bash
# Creates the environment (.venv) and runs the main job on the embedded default. The README's first command.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -e .
exec "$VENV/bin/python" pipeline/main_job.py "$@"
