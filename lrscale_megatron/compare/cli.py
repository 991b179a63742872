"""``lrscale compare CONFIG [--set key=value ...] [--force]``: run the arms, write the report.

One process (CPU)::

    lrscale compare configs/compare/cpu-demo.json
    lrscale compare configs/compare/cpu-bench.json --set output_dir=out/bench seeds=[0,1,2]
    lrscale compare configs/compare/cpu-demo.json --set workers=2   # 2 runs at once (2 cores)

One node (every rank trains every run together; all ranks must see ``output_dir``)::

    torchrun --nproc_per_node 4 -m lrscale_megatron.cli compare CONFIG \\
        --set 'overrides=["parallel.tp=2","parallel.pp=2"]'

Many nodes: the same under ``scripts/pretrain_multinode_torchrun.sh``'s launcher, with a shared
``output_dir``. Finished runs are kept in ``<output_dir>/runs/``: a rerun skips them (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="comparison config (configs/compare/*.json)")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="edit the compare config, e.g. output_dir=out/x steps=50 seeds=[0,1] (values are JSON)",
    )
    p.add_argument("--force", action="store_true", help="retrain runs already saved under <output_dir>/runs/")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process of "workers": N


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``compare`` on the ``lrscale`` command's sub-parsers."""
    sp = subparsers.add_parser(
        "compare",
        help="LRScale vs copied-LR, Step Law, LR-free and tuned-grid baselines: time to target loss",
    )
    add_arguments(sp)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lrscale_megatron.compare.config import CompareConfigError, load_compare_config
    from lrscale_megatron.train.config import ConfigError

    try:
        cfg = load_compare_config(args.config, args.overrides)
    except (CompareConfigError, ConfigError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    import torch.distributed as dist

    from lrscale_megatron.compare.markdown import checks_table, time_to_target_table
    from lrscale_megatron.compare.report import write_report
    from lrscale_megatron.compare.runner import run_compare, run_worker
    from lrscale_megatron.launch import shutdown

    out = Path(cfg.output_dir)
    if getattr(args, "worker", False):
        try:
            n = run_worker(cfg, out, force=args.force)
            logger.info("compare worker: trained %d runs", n)
        finally:
            shutdown()
        return 0
    try:
        runs = run_compare(cfg, out, force=args.force)
        if not dist.is_initialized() or dist.get_rank() == 0:
            rep = write_report(runs, out)
            print(f"\ntarget validation loss {rep['target_loss']:.4f} ({rep['target_rule']})", flush=True)
            print(time_to_target_table(rep), flush=True)
            print("\n" + checks_table(rep), flush=True)
            print(
                f"\nreport: {out / 'report.md'}  (JSON: {out / 'report.json'}; plots: "
                f"{', '.join(str(out / p) for p in rep['plots'])})",
                flush=True,
            )
    except (CompareConfigError, ConfigError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lrscale_megatron.compare.cli CONFIG`` until ``lrscale compare`` is wired."""
    from lrscale_megatron.logutil import setup_logging

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    p = argparse.ArgumentParser(prog="lrscale compare", description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
