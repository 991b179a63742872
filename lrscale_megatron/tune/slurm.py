"""``lrscale tune --launcher slurm``: the ladder as an sbatch job array; results merged by the head.

The head (the ``lrscale tune`` process, e.g. on a login node) writes ``OUT/slurm/tasks-K.json`` (the
runs of submission K) and ``OUT/slurm/array-K.sbatch``, submits it with ``sbatch --parsable``, then
polls: it merges the result files (:mod:`lrscale_megatron.tune.filestore`) into ``OUT/sweep.sqlite``
(the head's own store; compute nodes never open it) and resubmits every run that lost its node:

* its heartbeat is older than ``slurm.stale_after_s``, or
* its array job has left the queue (``squeue``) and the run has no result and no fresh heartbeat.

Each run is resubmitted at most ``slurm.max_resubmits`` times. Failed runs (a Python error, written to
their result file) are not resubmitted: the tune stops and names them. Killing the head loses nothing:
the job ids it submitted are kept in ``OUT/slurm/state.json``; a new ``lrscale tune`` call picks them up.

The generated script, for 28 runs (``sbatch --parsable OUT/slurm/array-0.sbatch``)::

    #!/bin/bash
    #SBATCH --job-name=lrscale-tune
    #SBATCH --array=0-27
    #SBATCH --time=60
    #SBATCH --cpus-per-task=1
    #SBATCH --output=OUT/slurm/%A_%a.out
    set -euo pipefail
    exec /path/to/python -m lrscale_megatron.tune.worker OUT/slurm/tasks-0.json "$SLURM_ARRAY_TASK_ID"
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lrscale_megatron.sweep.store import SweepStore, run_id
from lrscale_megatron.tune.config import SlurmSpec
from lrscale_megatron.tune.filestore import (
    DONE_STATES,
    atomic_write_json,
    heartbeat_age,
    heartbeat_path,
    merge_results,
)
from lrscale_megatron.tune.worker import GPT_TRAIN_FN

logger = logging.getLogger(__name__)


def sbatch_script(tasks_path: Path, n: int, spec: SlurmSpec, log_dir: Path) -> str:
    """The job-array script running ``n`` tasks of ``tasks_path`` (one ladder run each)."""
    array = f"0-{n - 1}" + (f"%{spec.max_parallel}" if spec.max_parallel > 0 else "")
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=lrscale-tune",
        f"#SBATCH --array={array}",
        f"#SBATCH --time={spec.time_min}",
        f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
        f"#SBATCH --output={log_dir}/%A_%a.out",
    ]
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={spec.gpus_per_task}")
    lines += [f"#SBATCH {opt}" for opt in spec.sbatch_lines]
    lines.append("set -euo pipefail")
    lines += list(spec.setup)
    python = spec.python or sys.executable
    lines.append(
        f"exec {shlex.quote(python)} -m lrscale_megatron.tune.worker {shlex.quote(str(tasks_path))} "
        '"$SLURM_ARRAY_TASK_ID"'
    )
    return "\n".join(lines) + "\n"


def submit(script: Path, sbatch: str = "sbatch") -> str:
    """``sbatch --parsable SCRIPT`` -> the job id; a failed submission names the command and the fix."""
    cmd = [sbatch, "--parsable", str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError:
        raise RuntimeError(
            f"launcher=slurm: {sbatch!r} not found; fix: run `lrscale tune` on a SLURM login node, or use "
            "--launcher local"
        ) from None
    job = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job:
        raise RuntimeError(
            f"`{shlex.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}; "
            "fix: check the slurm section (partition, time_min, sbatch_lines) of the tune config"
        )
    return job


def queued_jobs(squeue: str = "squeue") -> set[str] | None:
    """Array job ids of this user still known to SLURM; ``None`` when ``squeue`` cannot be asked."""
    user = os.environ.get("USER", "")
    try:
        proc = subprocess.run(
            [squeue, "-h", "-u", user, "-o", "%A"], capture_output=True, text=True, check=False, timeout=60
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


class SlurmHead:
    """Submits, watches and resubmits the ladder's runs; the state survives a killed head."""

    def __init__(
        self,
        ladder: Path,
        out_dir: Path,
        spec: SlurmSpec,
        train_fn: str = GPT_TRAIN_FN,
        sbatch: str = "sbatch",
        squeue: str = "squeue",
    ) -> None:
        self.ladder, self.out_dir, self.spec = ladder, out_dir, spec
        self.train_fn, self.sbatch, self.squeue = train_fn, sbatch, squeue
        self.runs_dir = out_dir / "runs"
        self.slurm_dir = out_dir / "slurm"
        self.state_path = self.slurm_dir / "state.json"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.slurm_dir.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = {"submissions": 0, "job_of": {}, "tries": {}}
        if self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text())

    def _save(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def submit_runs(self, configs: list[dict[str, Any]]) -> str:
        k = int(self.state["submissions"])
        tasks = self.slurm_dir / f"tasks-{k}.json"
        atomic_write_json(
            tasks,
            {
                "ladder": str(self.ladder.resolve()),
                "runs_dir": str(self.runs_dir.resolve()),
                "heartbeat_s": self.spec.heartbeat_s,
                "train_fn": self.train_fn,
                "attempt": k + 1,
                "configs": configs,
            },
        )
        script = self.slurm_dir / f"array-{k}.sbatch"
        script.write_text(sbatch_script(tasks.resolve(), len(configs), self.spec, self.slurm_dir.resolve()))
        job = submit(script, self.sbatch)
        for c in configs:
            rid = run_id(c)
            self.state["job_of"][rid] = job
            self.state["tries"][rid] = int(self.state["tries"].get(rid, 0)) + 1
        self.state["submissions"] = k + 1
        self._save()
        logger.info("submitted %d run(s) as job array %s (%s)", len(configs), job, script)
        return job

    def lost(self, pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pending runs to (re)submit: never submitted, stale heartbeat, or job gone without a trace."""
        queue = queued_jobs(self.squeue)
        now = time.time()
        out = []
        for c in pending:
            rid = run_id(c)
            job = self.state["job_of"].get(rid)
            age = heartbeat_age(self.runs_dir, rid, now)
            if job is None:
                out.append(c)
            elif age is not None and age > self.spec.stale_after_s:
                logger.warning("run %s: heartbeat %.0f s old (job %s): node lost; redoing it", rid, age, job)
                out.append(c)
            elif queue is not None and job not in queue and (age is None or age > 3 * self.spec.heartbeat_s):
                logger.warning("run %s: job %s left the queue without a result; redoing it", rid, job)
                out.append(c)
        return out

    def run(self, configs: list[dict[str, Any]], store: Path) -> None:
        """Until every run of ``configs`` is finished or diverged (merged into ``store``)."""
        while True:
            merged = merge_results(self.runs_dir, store, configs)
            failed = [rid for rid, st in merged.items() if st == "failed"]
            if failed:
                raise RuntimeError(
                    f"{len(failed)} ladder run(s) failed: {failed[:5]} (tracebacks in "
                    f"{self.runs_dir}/<run_id>.json); fix: correct the cause, delete those files, re-run"
                )
            pending = [c for c in configs if merged.get(run_id(c)) not in DONE_STATES]
            if not pending:
                return
            redo = self.lost(pending)
            over = [
                run_id(c)
                for c in redo
                if int(self.state["tries"].get(run_id(c), 0)) > self.spec.max_resubmits
            ]
            if over:
                raise RuntimeError(
                    f"run(s) {over[:5]} lost their node {self.spec.max_resubmits + 1} times; fix: check the "
                    f"job logs in {self.slurm_dir}, raise slurm.time_min or slurm.max_resubmits"
                )
            if redo:
                for c in redo:
                    heartbeat_path(self.runs_dir, run_id(c)).unlink(missing_ok=True)
                self.submit_runs(redo)
            logger.info("slurm: %d of %d runs done", len(configs) - len(pending), len(configs))
            time.sleep(self.spec.poll_s)


def run_slurm(ladder: Path, out_dir: Path, spec: SlurmSpec, train_fn: str = GPT_TRAIN_FN) -> None:
    """Every run of the ladder through SLURM job arrays, merged into ``OUT/sweep.sqlite``."""
    from lrscale_megatron.sweep.cli import load_sweep_config, prepare_data

    sc = load_sweep_config(ladder)
    if train_fn == GPT_TRAIN_FN:
        prepare_data(sc.settings, sc.grid.seq_len)  # once, on the head, before the nodes start
    configs = sc.grid.expand()
    store = SweepStore(sc.store)  # the head's store: created here, written only by this process
    store.add_runs(configs)
    store.close()
    SlurmHead(ladder, out_dir, spec, train_fn).run(configs, sc.store)
