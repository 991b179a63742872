"""Run an integration test's own file as a script in a fresh process (DeepSpeed on CPU, one thread) and
read back the JSON it wrote: each engine then starts from a clean ``torch.distributed`` state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_self(
    script: str,
    arg: Path,
    result: Path,
    *,
    cwd: Path | None = None,
    own_port: bool = False,
    timeout: float = 600,
) -> dict:
    """``python script arg`` with ``DS_ACCELERATOR=cpu`` and the repository importable (``own_port``: without
    an inherited ``MASTER_PORT``); asserts it exits 0 (showing the end of its output otherwise) and returns
    the JSON it wrote to ``result``."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if own_port:
        env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, script, str(arg)], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(result.read_text())
