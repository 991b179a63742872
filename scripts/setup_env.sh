#!/usr/bin/env bash
# Creates ./.venv (once) and installs lrscale-megatron with what it needs.
#
#   bash scripts/setup_env.sh            # runtime + dev tools (tests, ruff, mypy) + the demo's optimizers
#   LRSCALE_EXTRAS=dev,bench bash scripts/setup_env.sh   # also the benchmark peers (PyHessian)
#
# The `demo` extra (Schedule-Free AdamW and Prodigy, the LR-free arms of `lrscale compare`) is always
# added: the demo (scripts/demo.sh) and the test suite both use it.
#
# torch: where the chosen Python already has torch, that torch is kept (a GPU cluster's own build).
# Where it has none, torch==2.13.0 is installed (the CPU wheel on these machines) and pinned with a
# constraint file for every later install, so pip never pulls the CUDA build and its GBs of packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LRSCALE_VENV:-.venv}
EXTRAS=${LRSCALE_EXTRAS:-dev,demo}
case ",$EXTRAS," in *,demo,*) ;; *) EXTRAS="$EXTRAS,demo" ;; esac
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
CONSTRAINTS="$VENV/constraints.txt"
if "$VPY" -c "import torch" 2>/dev/null; then
  TV=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
else
  "$VPY" -m pip install -q "torch==2.13.0"
  TV=2.13.0
fi
echo "torch==$TV" > "$CONSTRAINTS"
stamp="$VENV/.lrscale-installed"
want="$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VPY" -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
