"""Local worker processes for ``lrscale compare`` (``"workers": N``): the runs of a comparison are
independent, so on a CPU machine N single-threaded processes train N runs at once.

The parent lists the runs not yet in ``<output_dir>/runs/``, writes the resolved config to
``<output_dir>/workers/config.json`` and starts N processes
(``python -m lrscale_megatron.compare.cli <that file> --worker``), each with its own one-process gloo
group. A worker walks the same run list and claims a run by creating ``runs/<run id>.claim`` exclusively
(``O_CREAT | O_EXCL``), so each run is trained once and the faster worker takes more runs; it saves the
result as the one-process job does (atomic rename). The parent removes claims left by an earlier, killed
job before it starts the workers, waits for them, refuses to go on if one failed (naming its log,
``workers/worker-<i>.log``), then loads every run from disk and writes the report as usual. Each run
seeds every RNG from its config, so a run's result does not depend on which process trained it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from lrscale_megatron.compare.config import CompareConfig

logger = logging.getLogger(__name__)

#: Environment a worker must not inherit: each starts its own one-process group on a free port.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def claim(runs_dir: Path, rid: str) -> bool:
    """Take run ``rid`` for this process; ``False`` when another worker has it."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(runs_dir / f"{rid}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def resolved_config(cfg: CompareConfig, out: Path) -> dict:
    """``cfg`` as a file a worker can load from anywhere: absolute paths, one process, no tune lookup."""
    d = cfg.to_dict()
    d.pop("source", None)
    d.update(train_config=str(cfg.train_config_path().resolve()), output_dir=str(out.resolve()), workers=1)
    return d


def run_workers(cfg: CompareConfig, out: Path, pending: list[str], force: bool) -> None:
    """Train the ``pending`` run ids on ``min(cfg.workers, len(pending))`` processes; raise if one fails."""
    runs_dir, wdir = out / "runs", out / "workers"
    wdir.mkdir(parents=True, exist_ok=True)
    for stale in runs_dir.glob("*.claim"):
        stale.unlink()
    path = wdir / "config.json"
    path.write_text(json.dumps(resolved_config(cfg, out), indent=1))
    n = min(cfg.workers, len(pending))
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "lrscale_megatron.compare.cli", str(path), "--worker"]
    cmd += ["--force"] if force else []
    logger.info("compare: %d runs on %d worker processes (logs %s)", len(pending), n, wdir)
    logs = [open(wdir / f"worker-{i}.log", "w") for i in range(n)]  # noqa: SIM115 (closed below)
    procs: list[subprocess.Popen] = []
    try:
        procs += [subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT) for f in logs]
        done = -1
        while any(p.poll() is None for p in procs):
            now = sum((runs_dir / f"{rid}.json").is_file() for rid in pending)
            if now != done:
                logger.info("compare: workers: %d/%d runs finished", now, len(pending))
                done = now
            time.sleep(2.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
        for c in runs_dir.glob("*.claim"):
            c.unlink()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tail = (wdir / f"worker-{failed[0]}.log").read_text()[-2000:]
        raise RuntimeError(
            f"compare: worker(s) {failed} failed; see {wdir}/worker-<i>.log. Last lines:\n{tail}"
        )
    missing = [rid for rid in pending if not (runs_dir / f"{rid}.json").is_file()]
    if missing:
        raise RuntimeError(f"compare: workers finished without runs {missing}; see {wdir}/worker-<i>.log")
