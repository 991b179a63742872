"""Checkpoint and exact resume, and repeated in-process ``train()`` calls (the comparison job's usage).

One worker process (this file, run as a script, so the gloo group and DeepSpeed's globals never live in
the pytest process) calls ``train()`` four times after a single process-group start:

1. 20 steps, checkpoints at steps 10 and 20;
2. the same config resumed from the step-10 checkpoint (model, optimizer, LRScale state, data position,
   RNG): steps 11-20 must reproduce run 1's losses and LRs exactly;
3. run 1 again without checkpoints: identical history (one process can run several arms);
4. another arm (DeepSpeed's WarmupCosineLR) in the same process: runs, and differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.integration._selfrun import run_self

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "gpt" / "cpu-tiny.json"
BASE = [
    "training.steps=20",
    "training.warmup_steps=4",
    "training.eval_every=10",
    "training.eval_batches=1",
    "training.output_dir=null",
]


def _worker(workdir: Path) -> None:
    from lrscale_megatron.launch import shutdown
    from lrscale_megatron.train import load_config, train

    ck = workdir / "ck"
    out: dict = {}
    try:
        full = train(
            load_config(
                CONFIG,
                [
                    *BASE,
                    f'checkpoint.dir="{ck}"',
                    "checkpoint.save_every=10",
                    f'training.output_dir="{workdir / "run1"}"',
                ],
            )
        )
        out["full"] = full.to_dict()
        resumed = train(
            load_config(
                CONFIG, [*BASE, f'checkpoint.load="{ck / "step10"}"', f'checkpoint.dir="{workdir / "ck2"}"']
            )
        )
        out["resumed"] = resumed.to_dict()
        out["again"] = train(load_config(CONFIG, BASE)).to_dict()
        out["cosine"] = train(
            load_config(CONFIG, [*BASE, 'deepspeed="../deepspeed/cpu-adamw-cosine.json"'])
        ).to_dict()
    finally:
        shutdown()
    (workdir / "result.json").write_text(json.dumps(out))


def test_resume_reproduces_losses_and_train_is_repeatable(tmp_path):
    r = run_self(__file__, tmp_path, tmp_path / "result.json")
    full, resumed, again, cosine = r["full"], r["resumed"], r["again"], r["cosine"]

    assert [h["step"] for h in full["history"]] == list(range(1, 21))
    assert (tmp_path / "ck" / "step10").is_dir() and (
        tmp_path / "ck" / "latest"
    ).read_text().strip() == "step20"
    assert full["checkpoint"] == str(tmp_path / "ck" / "step20")
    # the resumed run carries the first 10 steps from the checkpoint and recomputes 11..20 exactly
    assert resumed["history"][:10] == [
        {**h, "wall_s": resumed["history"][i]["wall_s"]} for i, h in enumerate(full["history"][:10])
    ]
    for a, b in zip(full["history"][10:], resumed["history"][10:]):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        assert a["train_loss"] == b["train_loss"], (a, b)
        assert a["lr"] == b["lr"]
        assert a["val_loss"] == b["val_loss"]
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert resumed["shift_loss"] == full["shift_loss"]
    # a second in-process call with the same config is identical
    assert [h["train_loss"] for h in again["history"]] == [h["train_loss"] for h in full["history"]]
    # a different arm in the same process runs and differs
    assert cosine["scheduler"] == "WarmupCosineLR" and full["scheduler"] == "LRScale"
    assert [h["lr"] for h in cosine["history"]] != [h["lr"] for h in full["history"]]
    # metrics CSV: a header and one row per step
    lines = (tmp_path / "run1" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,tokens,wall_s,train_loss,lr") and len(lines) == 21
    assert full["tokens"] == 20 * 8 * 64 and full["energy_j"] is None and full["mfu"] is None


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
