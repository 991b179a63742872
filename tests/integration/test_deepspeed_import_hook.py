"""`import lrscale_megatron` alone makes DeepSpeed resolve "type": "LRScale" (fresh interpreters)."""

import subprocess
import sys

CODE_BEFORE = """
import lrscale_megatron, sys
assert "deepspeed" not in sys.modules, "importing lrscale_megatron must not import deepspeed"
from deepspeed.runtime import lr_schedules
from lrscale_megatron.integrations.deepspeed import LRScale
assert getattr(lr_schedules, "LRScale") is LRScale
print("ok")
"""
CODE_AFTER = """
from deepspeed.runtime import lr_schedules
assert not hasattr(lr_schedules, "LRScale")
import lrscale_megatron
from lrscale_megatron.integrations.deepspeed import LRScale
assert lr_schedules.LRScale is LRScale
print("ok")
"""


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_registered_when_deepspeed_is_imported_after_lrscale():
    assert "ok" in _run(CODE_BEFORE)


def test_registered_when_deepspeed_was_imported_before_lrscale():
    assert "ok" in _run(CODE_AFTER)
