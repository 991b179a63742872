"""Real ``deepspeed.initialize`` with ``"scheduler": {"type": "LRScale"}`` from a JSON file.

The DeepSpeed runs happen in subprocesses (this file is also the worker: ``python <this file> ...``) so
that the gloo process group and DeepSpeed's globals never live in the pytest process:
one process runs ZeRO 0/1/2/3 for 200 steps and the save/load resumes; another runs bf16 under ZeRO 1
and an engine whose ``csv_monitor`` receives the LRScale monitor's events; ``torchrun
--nproc_per_node 2`` runs ZeRO 1 over gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lrscale_megatron.schedule import lr_at

HERE = Path(__file__).resolve()
STEPS = 200
BF16_STEPS = 50
MONITOR_STEPS = 30
PARAMS = {"peak_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "total_steps": 180, "decay_style": "cosine"}
ONLINE = {
    **PARAMS,
    "decay_style": "wsd",
    "wsd_decay_fraction": 0.3,
    "online": {"enabled": True, "adapt_every": 15, "combine": "online", "max_change": 1.5},
}
GROUP1_RATIO = 0.5  # the second param group is created with lr = 0.5 x the optimizer's lr (DeepSpeed #7713)


def expected(step: int, p: dict = PARAMS) -> float:
    return lr_at(
        step,
        peak_lr=p["peak_lr"],
        min_lr=p["min_lr"],
        warmup_steps=p["warmup_steps"],
        total_steps=p["total_steps"],
        decay_style=p["decay_style"],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[2]), env.get("PYTHONPATH", "")])
    return env


# ------------------------------------------------------------------------------------------ worker


def _worker(mode: str, workdir: Path) -> None:
    import gc

    import deepspeed
    import deepspeed.ops
    import torch
    import torch.distributed as dist

    import lrscale_megatron.integrations.deepspeed as lrs_ds

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 35 s JIT build
    lrs_ds.register()
    lrs_ds.register()  # idempotent

    def config_file(params: dict, zero: int, **extra) -> str:
        cfg = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "scheduler": {"type": "LRScale", "params": params},
            "zero_optimization": {"stage": zero},
            **extra,
        }
        path = workdir / f"ds_{zero}_{len(params)}_{'_'.join(sorted(extra))}.json"
        path.write_text(json.dumps(cfg))
        return str(path)

    def engine(params: dict, zero: int, **extra):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        groups = [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 1e-3 * GROUP1_RATIO},
        ]
        eng, _, _, sched = deepspeed.initialize(
            model=model, model_parameters=groups, config=config_file(params, zero, **extra)
        )
        assert eng.lr_scheduler is sched and type(sched).__name__ == "LRScaleScheduler"
        if params.get("online"):
            # Injected estimator: a deterministic function of the weights (so of the trajectory).
            sched.attach_estimator(
                lambda ps: 1e3 + 1e3 * float(sum(p.abs().sum() for p in eng.module.parameters()))
            )
        return eng, sched

    def run(eng, start: int, stop: int, monitor=None) -> list[list[float]]:
        lrs = []
        dtype = next(eng.module.parameters()).dtype
        for i in range(start, stop):
            g = torch.Generator().manual_seed(1000 * dist.get_rank() + i)
            x = torch.randn(2, 4, generator=g).to(dtype)
            lrs.append([float(v) for v in eng.get_lr()])
            loss = eng(x).pow(2).mean()
            eng.backward(loss)
            if monitor is not None:
                monitor.log_loss(loss.float())
            eng.step()
        return lrs

    out: dict = {}
    if mode == "single":
        for zero in (0, 1, 2, 3):
            eng, sched = engine(PARAMS, zero)
            out[f"trace_zero{zero}"] = run(eng, 0, STEPS)
            out[f"optimizer_zero{zero}"] = type(eng.optimizer).__name__
            del eng, sched
            gc.collect()
        for name, params in (("offline", PARAMS), ("online", ONLINE)):
            ckpt = workdir / f"ckpt_{name}"
            eng, sched = engine(params, 1)
            run(eng, 0, 100)
            eng.save_checkpoint(str(ckpt), tag="step100")
            out[f"resume_{name}_reference"] = run(eng, 100, STEPS)
            out[f"resume_{name}_history"] = len(sched.history)
            del eng, sched
            gc.collect()
            eng, sched = engine(params, 1)
            eng.load_checkpoint(str(ckpt), tag="step100")
            out[f"resume_{name}_steps"] = sched.num_steps
            out[f"resume_{name}_resumed"] = run(eng, 100, STEPS)
            del eng, sched
            gc.collect()
    elif mode == "bf16_monitor":
        from lrscale_megatron.monitor import LRScaleMonitor

        eng, sched = engine(PARAMS, 1, bf16={"enabled": True})
        out["bf16_trace"] = run(eng, 0, BF16_STEPS)
        out["bf16_param_dtype"] = str(next(eng.module.parameters()).dtype)
        out["bf16_optimizer"] = type(eng.optimizer).__name__
        del eng, sched
        gc.collect()
        csv_monitor = {"enabled": True, "output_path": str(workdir / "ds_monitor"), "job_name": "lrscale_job"}
        eng, sched = engine(ONLINE, 1, csv_monitor=csv_monitor)
        mon = LRScaleMonitor(workdir / "lrscale_monitor", deepspeed_monitor=eng.monitor)
        sched.attach_monitor(mon)
        out["monitor_trace"] = run(eng, 0, MONITOR_STEPS, monitor=mon)
        out["monitor_history"] = sched.history
        mon.close()
        del eng, sched
        gc.collect()
    elif mode == "zero1":
        eng, sched = engine(PARAMS, 1)
        out["trace"] = run(eng, 0, STEPS)
        out["world"] = dist.get_world_size()
        del eng, sched
        gc.collect()
    if dist.get_rank() == 0:
        (workdir / f"{mode}.json").write_text(json.dumps(out))
    dist.barrier()  # clean teardown: no gloo thread left at interpreter exit (FINDINGS.md)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
    sys.exit(0)


# ------------------------------------------------------------------------------------------- tests


def _run_worker(cmd: list[str], env: dict[str, str], timeout: int = 240) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    work = tmp_path_factory.mktemp("ds_single")
    env = _env(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )
    _run_worker([sys.executable, str(HERE), "single", str(work)], env)
    return json.loads((work / "single.json").read_text())


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_lr_equals_pure_function_for_200_steps(single, zero):
    trace = single[f"trace_zero{zero}"]
    assert len(trace) == STEPS
    assert [lrs[0] for lrs in trace] == [expected(i) for i in range(STEPS)]  # bitwise
    for i, (lr0, lr1) in enumerate(trace):
        assert lr1 == pytest.approx(GROUP1_RATIO * lr0, rel=1e-12, abs=0.0), i  # user group ratio kept
    if zero:
        assert "Zero" in single[f"optimizer_zero{zero}"]  # the scheduler got (and unwrapped) a ZeRO wrapper


@pytest.mark.parametrize("name", ["offline", "online"])
def test_resume_from_checkpoint_is_bitwise(single, name):
    assert single[f"resume_{name}_steps"] == 100
    assert single[f"resume_{name}_resumed"] == single[f"resume_{name}_reference"]
    if name == "offline":
        assert [lrs[0] for lrs in single["resume_offline_resumed"]] == [
            expected(i) for i in range(100, STEPS)
        ]
    else:
        assert single["resume_online_history"] >= 10
        assert [lrs[0] for lrs in single["resume_online_resumed"]] != [
            expected(i, ONLINE) for i in range(100, STEPS)
        ]


@pytest.fixture(scope="module")
def bf16_monitor(tmp_path_factory) -> tuple[dict, Path]:
    pytest.importorskip("deepspeed")
    work = tmp_path_factory.mktemp("ds_bf16_monitor")
    env = _env(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )
    _run_worker([sys.executable, str(HERE), "bf16_monitor", str(work)], env)
    return json.loads((work / "bf16_monitor.json").read_text()), work


def test_bf16_zero1_lr_equals_pure_function_for_50_steps(bf16_monitor):
    out, _ = bf16_monitor
    assert out["bf16_param_dtype"] == "torch.bfloat16" and "Zero" in out["bf16_optimizer"]
    trace = out["bf16_trace"]
    assert [lrs[0] for lrs in trace] == [expected(i) for i in range(BF16_STEPS)]  # bitwise
    for i, (lr0, lr1) in enumerate(trace):
        assert lr1 == pytest.approx(GROUP1_RATIO * lr0, rel=1e-12, abs=0.0), i


def _ds_csv(path: Path) -> list[tuple[int, float]]:
    rows = path.read_text().splitlines()
    return [(int(s), float(v)) for s, v in (r.split(",") for r in rows[1:])]


def test_deepspeed_csv_monitor_receives_lrscale_events(bf16_monitor):
    out, work = bf16_monitor
    ds_dir = work / "ds_monitor" / "lrscale_job"
    lr0 = _ds_csv(ds_dir / "lrscale_lr_group0.csv")
    assert lr0 == [(i, lrs[0]) for i, lrs in enumerate(out["monitor_trace"])]  # the LR each iteration used
    assert [s for s, _ in _ds_csv(ds_dir / "lrscale_loss.csv")] == list(range(MONITOR_STEPS))
    hist = out["monitor_history"]
    assert len(hist) >= 2
    assert _ds_csv(ds_dir / "lrscale_lambda_max.csv") == [(h["step"], h["lambda_max"]) for h in hist]
    assert _ds_csv(ds_dir / "lrscale_peak_lr.csv") == [(h["step"], h["peak_after"]) for h in hist]
    # the monitor's own CSV holds the same LRs
    ours = (work / "lrscale_monitor" / "lrscale_steps.csv").read_text().splitlines()
    assert [float(r.split(",")[2]) for r in ours[1:]] == [v for _, v in lr0]


def test_zero1_two_gloo_processes(tmp_path):
    pytest.importorskip("deepspeed")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(HERE),
        "zero1",
        str(tmp_path),
    ]
    _run_worker(cmd, _env())
    out = json.loads((tmp_path / "zero1.json").read_text())
    assert out["world"] == 2
    assert [lrs[0] for lrs in out["trace"]] == [expected(i) for i in range(STEPS)]
