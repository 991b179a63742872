"""``python -m lrscale_megatron.train CONFIG [--dry-run] [--override key=value ...] [--json OUT]``.

One process (CPU)::

    python -m lrscale_megatron.train configs/gpt/cpu-tiny.json
    python -m lrscale_megatron.train configs/gpt/gpt3-1.3b.json --dry-run

One node::

    torchrun --nproc_per_node 4 -m lrscale_megatron.train configs/gpt/cpu-tiny.json \\
        --override parallel.tp=2 parallel.pp=2
    deepspeed --num_gpus 8 --module lrscale_megatron.train configs/gpt/gpt3-1.3b.json

Many nodes: ``scripts/pretrain_multinode_*.sh`` and ``scripts/pretrain_gpt.sbatch``.
"""

from __future__ import annotations

import argparse
import json
import sys

from lrscale_megatron.logutil import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrscale_megatron.train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="JSON config (configs/gpt/*.json)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, count parameters, estimate memory and predict the LR; no GPU, no training",
    )
    p.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="set config values, e.g. training.steps=20 parallel.tp=2 (values are JSON)",
    )
    p.add_argument("--json", dest="json_out", default=None, help="write the result (or dry-run report) here")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    from lrscale_megatron.train.config import ConfigError, load_config

    # The DeepSpeed launcher appends --local_rank=N; torchrun sets LOCAL_RANK instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.override)
        if args.dry_run:
            from lrscale_megatron.train.dryrun import dry_run

            report = dry_run(cfg)
            print(report.render(), flush=True)
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(report.to_dict(), f, indent=2)
            return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    import torch.distributed as dist

    from lrscale_megatron.launch import shutdown
    from lrscale_megatron.train.loop import train

    try:
        result = train(cfg)
        if args.json_out and dist.get_rank() == 0:
            with open(args.json_out, "w") as f:
                json.dump(result.to_dict(), f, indent=2)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
