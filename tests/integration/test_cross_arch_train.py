"""The causal Mixer LM and the ViT train through the GPT's path (issue 12): ``train()`` -> the DeepSpeed
engine (``engine.backward`` / ``engine.step``) -> the ``LRScale`` scheduler from the same DeepSpeed JSON.

Run in a worker process (the file as a script: the gloo group and DeepSpeed's globals stay out of pytest).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tests.integration._selfrun import run_self

ROOT = Path(__file__).resolve().parents[2]
GPT = ROOT / "configs" / "gpt"
WARMUP, PEAK = 4, 3e-3
STEPS = {"mixer": 16, "vit": 80}  # ViT steps are cheap (32 images of 17 patch tokens); it leaves
# the uniform-class plateau (ln 10) only after ~40 steps


def _base(arch: str) -> list[str]:
    return [
        f"training.steps={STEPS[arch]}",
        f"training.warmup_steps={WARMUP}",
        f"training.lr={PEAK}",
        "training.eval_every=8",
        "training.log_every=8",
    ]


def _worker(workdir: Path) -> None:
    from lrscale_megatron.launch import shutdown
    from lrscale_megatron.train import load_config, loop, train

    engines: list[str] = []
    step = loop._engine_step

    def counting_step(engine, micro):  # the DeepSpeed engine step of pp = 1 (GPT's path)
        engines.append(type(engine).__name__)
        return step(engine, micro)

    loop._engine_step = counting_step
    out: dict = {}
    try:
        out["mixer"] = train(
            load_config(GPT / "cpu-mixer-target.json", [*_base("mixer"), "training.eval_batches=1"])
        ).to_dict()
        online = '{"enabled": true, "adapt_every": 6, "max_iter": 10}'
        out["vit_online"] = train(
            load_config(
                GPT / "cpu-vit-target.json",
                [*_base("vit"), "training.steps=18", f"deepspeed.scheduler.params.online={online}"],
            )
        ).to_dict()
        out["vit"] = train(
            load_config(GPT / "cpu-vit-target.json", [*_base("vit"), "training.eval_batches=4"])
        ).to_dict()
    finally:
        shutdown()
    out["engines"] = engines
    (workdir / "result.json").write_text(json.dumps(out))


def test_mixer_and_vit_train_through_the_deepspeed_engine_with_lrscale(tmp_path):
    r = run_self(__file__, tmp_path, tmp_path / "result.json")
    assert r.pop("engines") == ["DeepSpeedEngine"] * (sum(STEPS.values()) + 18)
    # LRScale's online mode measures the ViT's curvature in the trainer (Lanczos on its Hessian): every
    # measurement is a finite lambda_max or a refusal with its reason, never silently dropped
    online = r.pop("vit_online")
    assert online["scheduler"] == "LRScale" and len(online["adaptations"]) >= 2, online["adaptations"]
    for a in online["adaptations"]:
        assert math.isfinite(a["lambda_max"]) and a["lambda_max"] > 0, a
        assert a.get("reason"), a
    for arch, res in r.items():
        assert res["scheduler"] == "LRScale", arch
        h = res["history"]
        assert [x["step"] for x in h] == list(range(1, STEPS[arch] + 1)), arch
        lrs = [x["lr"] for x in h]
        # LRScale's warmup + cosine: rising to the peak, then falling towards 0
        assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1 : WARMUP + 1])), (arch, lrs)
        assert math.isclose(max(lrs), PEAK, rel_tol=1e-9), (arch, lrs)
        assert all(a >= b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1 :])) and lrs[-1] < 0.1 * PEAK, arch
        losses = [x["train_loss"] for x in h]
        assert all(math.isfinite(x) for x in losses), arch
        assert math.isfinite(res["final_val_loss"]), arch
    # the models learn in 16 steps: the mixer leaves the uniform-byte loss, the ViT the uniform-class one
    mixer, vit = r["mixer"], r["vit"]
    assert mixer["history"][0]["train_loss"] > math.log(264) - 0.2
    assert mixer["final_val_loss"] < mixer["history"][0]["train_loss"] - 1.0
    assert vit["final_val_loss"] < math.log(10) - 0.2
    assert mixer["shift_loss"] is not None and vit["shift_loss"] is None  # digits: no shift corpus
    # the last-word metric scores the mixer LM through the same logits call; the ViT has no text
    assert mixer["lambada"]["n"] > 0 and mixer["lambada"]["word_nll"] > 0 and vit["lambada"] is None


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
