"""The README's JAX example runs as written (in a child process, so its jax state stays there)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _jax_example() -> str:
    text = README.read_text()
    section = text.split("\n## JAX API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's JAX section has one python example"
    return blocks[0]


def test_readme_jax_example_runs():
    code = _jax_example()
    assert 8 <= len(code.strip().splitlines()) <= 16  # a ~10-line example
    check = (
        "\nassert res.converged and res.lambda_max > 0, res\n"
        "assert abs(float(opt.init(params)[0].mu['w1'].sum())) == 0.0\n"
        "print('OK', pred.peak_lr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout and "True" in proc.stdout.splitlines()[0]
