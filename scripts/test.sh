#!/usr/bin/env bash
# The test suite. Installs what it needs (./.venv) first. Extra arguments go to pytest.
#
#   bash scripts/test.sh                 # everything (unit, distributed, integration; gpu tests skip without CUDA)
#   bash scripts/test.sh tests/unit -q   # a tier
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PYTHONWARNINGS=ignore DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest -ra "${@:-tests}"
