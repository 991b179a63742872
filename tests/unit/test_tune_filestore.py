"""Many writers, one head: per-run result files (atomic rename) merged into the head's store lose and
duplicate nothing; heartbeats are timestamps; a fake ``sbatch`` runs the generated array script."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from lrscale_megatron.sweep.runner import SweepGrid
from lrscale_megatron.sweep.store import SweepStore, run_id
from lrscale_megatron.tune.config import SlurmSpec
from lrscale_megatron.tune.filestore import (
    Heartbeat,
    heartbeat_age,
    heartbeat_path,
    merge_results,
    read_result,
    write_result,
)
from lrscale_megatron.tune.slurm import SlurmHead, sbatch_script

GRID = SweepGrid(
    widths=(64, 128, 256),
    depths=(2,),
    token_budgets=(1e6,),
    batch_tokens=(4096,),
    lr_min=1e-4,
    lr_max=1e-2,
    n_lr=8,
)


def _writer(runs_dir: str, configs: list[dict], seed: int) -> None:
    """Write every config's result (several writers share runs: a 'dead' node that came back)."""
    import random

    rnd = random.Random(seed)
    for c in rnd.sample(configs, len(configs)):
        steps = [(s, 3.0 - 0.01 * s, 4096 * s, 0.1 * s) for s in range(1, 21)]
        state = "diverged" if c["lr"] >= 1e-2 else "finished"
        with Heartbeat(Path(runs_dir), run_id(c), attempt=seed, every_s=0.01):
            time.sleep(rnd.random() * 0.01)
        write_result(
            Path(runs_dir),
            c,
            state,
            final_train_loss=2.0 + c["lr"],
            final_val_loss=2.1 + c["lr"],
            tokens=int(c["tokens"]),
            wall_clock_s=1.0,
            steps=steps,
            vals=[(20, 2.1 + c["lr"], 81920)],
            attempt=seed,
        )


def test_concurrent_writers_and_a_merging_head_lose_and_duplicate_nothing(tmp_path):
    configs = GRID.expand()  # 24 runs
    runs_dir, store = tmp_path / "runs", tmp_path / "head.sqlite"
    runs_dir.mkdir()
    ctx = mp.get_context("spawn")
    # 4 writers: every run is written by exactly 2 of them, concurrently, in random orders
    parts = [configs[i::2] for i in range(2)] * 2
    procs = [ctx.Process(target=_writer, args=(str(runs_dir), parts[i], i)) for i in range(4)]
    for p in procs:
        p.start()
    merges = 0
    while any(p.is_alive() for p in procs):  # the head merges while they write
        merge_results(runs_dir, store, configs)
        merges += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    found = merge_results(runs_dir, store, configs)
    assert merges >= 1 and len(found) == len(configs)
    assert not [f for f in os.listdir(runs_dir) if f.endswith(".tmp")]  # no partial file left behind
    st = SweepStore(store)
    runs = st.runs()
    assert sorted(r.run_id for r in runs) == sorted(run_id(c) for c in configs)  # each run once
    for r in runs:
        c = r.config
        if c["lr"] >= 1e-2:
            assert r.diverged and r.state == "failed"
        else:
            assert r.state == "finished" and r.final_val_loss == pytest.approx(2.1 + c["lr"])
            assert [s for s, _ in st.steps(r.run_id)] == list(range(1, 21))  # every step once
            assert [s for s, _ in st.val_losses(r.run_id)] == [20]
    st.close()
    again = merge_results(runs_dir, store, configs)  # idempotent
    assert again == found and len(SweepStore(store).runs()) == len(configs)


def test_heartbeat_is_a_timestamp_and_ages(tmp_path):
    with Heartbeat(tmp_path, "abc", attempt=1, every_s=0.05):
        time.sleep(0.2)
        age = heartbeat_age(tmp_path, "abc")
        assert age is not None and age < 0.2
    doc = json.loads(heartbeat_path(tmp_path, "abc").read_text())
    assert heartbeat_age(tmp_path, "abc", now=doc["time"] + 100) == pytest.approx(100)
    assert heartbeat_age(tmp_path, "missing") is None and read_result(tmp_path, "missing") is None


def test_sbatch_script_names_the_array_and_the_worker(tmp_path):
    spec = SlurmSpec.from_dict(
        {
            "partition": "cpu",
            "max_parallel": 4,
            "sbatch_lines": ["--account=x"],
            "setup": ["module load python"],
            "python": "/opt/py/bin/python",
        }
    )
    s = sbatch_script(tmp_path / "tasks-0.json", 28, spec, tmp_path)
    assert "#SBATCH --array=0-27%4" in s and "#SBATCH --partition=cpu" in s and "#SBATCH --account=x" in s
    assert s.index("module load python") < s.index("exec /opt/py/bin/python -m lrscale_megatron.tune.worker")
    assert s.rstrip().endswith('"$SLURM_ARRAY_TASK_ID"')
    with pytest.raises(ValueError, match=r"stale_after_s=10\.0.*Fix: raise stale_after_s"):
        SlurmSpec.from_dict({"heartbeat_s": 30.0, "stale_after_s": 10.0})


FAKE_SBATCH = r"""#!/bin/bash
# fake sbatch: --parsable SCRIPT; runs each array index with SLURM_ARRAY_TASK_ID set, in the background.
# The first submission "loses its node": its tasks only write a stale heartbeat and never finish.
script="$2"; dir="$(dirname "$script")"; n=$(cat "$dir/../count" 2>/dev/null || echo 0)
echo $((n + 1)) > "$dir/../count"
range=$(grep -- '--array=' "$script" | sed 's/.*--array=0-\([0-9]*\).*/\1/')
if [ "$n" = "0" ] && [ -n "$LOSE_FIRST" ]; then
  python3 - "$script" <<'PY'
import json, re, sys, time, pathlib
tasks = re.search(r"worker (\S+)", open(sys.argv[1]).read()).group(1)
t = json.load(open(tasks))
sys.path.insert(0, "")
from lrscale_megatron.sweep.store import run_id
for c in t["configs"]:
    pathlib.Path(t["runs_dir"], run_id(c) + ".hb").write_text(json.dumps({"time": time.time() - 1e4}))
PY
  echo "100"; exit 0
fi
mkdir -p "$dir/../jobs"
for i in $(seq 0 "$range"); do
  SLURM_ARRAY_TASK_ID=$i bash "$script" > /dev/null 2>&1 &
  echo $! >> "$dir/../jobs/$((100 + n))"
done
echo "$((100 + n))"
"""

FAKE_SQUEUE = r"""#!/bin/bash
# fake squeue -h -u USER -o %A: job 100 never leaves the queue; other jobs while one of their tasks lives
echo 100
for f in "$JOBS_DIR"/*; do
  [ -f "$f" ] || continue
  for pid in $(cat "$f"); do if kill -0 "$pid" 2>/dev/null; then basename "$f"; break; fi; done
done
"""


@pytest.mark.parametrize("lose_first", [False, True])
def test_slurm_head_with_a_fake_sbatch_merges_every_run_and_redoes_a_lost_node(
    tmp_path, monkeypatch, lose_first
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sb = bin_dir / "sbatch"
    sb.write_text(FAKE_SBATCH)
    sb.chmod(sb.stat().st_mode | stat.S_IEXEC)
    sq = bin_dir / "squeue"
    sq.write_text(FAKE_SQUEUE)
    sq.chmod(sq.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    monkeypatch.setenv("JOBS_DIR", str(tmp_path / "out" / "jobs"))
    if lose_first:
        monkeypatch.setenv("LOSE_FIRST", "1")
    grid = SweepGrid(
        widths=(64, 128),
        depths=(2,),
        token_budgets=(1e6,),
        batch_tokens=(4096,),
        lr_min=1e-3,
        lr_max=1e-2,
        n_lr=3,
    )
    configs = grid.expand()
    out = tmp_path / "out"
    out.mkdir()
    ladder = out / "ladder.json"
    ladder.write_text("{}")
    spec = SlurmSpec.from_dict(
        {"heartbeat_s": 0.05, "stale_after_s": 5.0, "poll_s": 0.2, "python": sys.executable}
    )
    head = SlurmHead(ladder, out, spec, train_fn="lrscale_megatron.sweep.fake:synthetic_train_fn")
    t0 = time.monotonic()
    head.run(configs, out / "sweep.sqlite")
    assert time.monotonic() - t0 < 60
    st = SweepStore(out / "sweep.sqlite")
    runs = st.runs()
    assert sorted(r.run_id for r in runs) == sorted(run_id(c) for c in configs)
    assert all(r.state == "finished" and len(st.steps(r.run_id)) == 5 for r in runs)
    state = json.loads((out / "slurm" / "state.json").read_text())
    assert state["submissions"] == (2 if lose_first else 1)
    assert set(state["tries"].values()) == {2 if lose_first else 1}
    assert (out / "slurm" / "array-0.sbatch").read_text().count("#SBATCH --array=0-5") == 1


def test_worker_binds_the_ladder_settings_to_the_real_train_fn(tmp_path):
    import functools

    from lrscale_megatron.sweep.megatron import gpt_train_fn
    from lrscale_megatron.tune.config import load_tune_config
    from lrscale_megatron.tune.ladder import derive_ladder
    from lrscale_megatron.tune.run import write_ladder
    from lrscale_megatron.tune.worker import GPT_TRAIN_FN, _train_fn, run_task

    root = Path(__file__).resolve().parents[2]
    lad = derive_ladder(load_tune_config(root / "configs" / "tune" / "cpu-demo.json"))
    ladder = write_ladder(lad.sweep, tmp_path)
    fn = _train_fn({"ladder": str(ladder), "train_fn": GPT_TRAIN_FN})
    assert isinstance(fn, functools.partial) and fn.func is gpt_train_fn
    assert fn.keywords["settings"].base_config == lad.target.path and fn.keywords["settings"].head_dim == 8
    # a task whose result file already says finished is skipped without training
    cfg = GRID.expand()[0]
    write_result(tmp_path / "runs", cfg, "finished", final_train_loss=2.0)
    tasks = tmp_path / "tasks.json"
    tasks.write_text(
        json.dumps(
            {
                "ladder": str(ladder),
                "runs_dir": str(tmp_path / "runs"),
                "configs": [cfg],
                "train_fn": "no.such.module:fn",
            }
        )
    )
    assert run_task(tasks, 0) == 0
