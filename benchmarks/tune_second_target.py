"""A second CPU target the demo does not use (KJV, width 96, 3 layers): ladder -> prediction -> the target
at the prediction vs a 4-point LR grid, 2 seeds (issue 10).

    python benchmarks/tune_second_target.py                     # ~25 min on 2 idle cores
    python benchmarks/tune_second_target.py --json docs/tune-second-target.json

Same measurement as ``benchmarks/tune_target_check.py`` (which it calls) on ``configs/tune/cpu-kjv.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_target_check import main as check  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    out = ["--json", args[args.index("--json") + 1]] if "--json" in args else []
    sys.exit(
        check(
            [
                "configs/tune/cpu-kjv.json",
                "--out",
                "out/tune/cpu-kjv",
                "--grid",
                "0.0005,0.001,0.002,0.004",
                "--seeds",
                "0,1",
                "--tune",
                *out,
            ]
        )
    )
