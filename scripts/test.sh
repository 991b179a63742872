#!/usr/bin/env bash
# The test suite. Installs what it needs (./.venv) first. Extra arguments go to pytest.
#
#   bash scripts/test.sh                 # everything (unit, distributed, integration; gpu tests skip without CUDA)
#   bash scripts/test.sh tests/unit -q   # a tier
set -euo pipefail
cd "$(dirname "$0")/.."
# dev tools, the benchmark peers (PyHessian, GPL-3, compared against in tests/unit/test_benchmarks_smoke.py)
# and the JAX API's extra (jax, optax; tests/unit/test_jax_*.py): the README's command and CI run the same
# suite, nothing skipped for a missing extra
export LRSCALE_EXTRAS="${LRSCALE_EXTRAS:-dev,bench,jax}"
bash scripts/setup_env.sh
export PYTHONWARNINGS=ignore DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest -ra "${@:-tests}"
