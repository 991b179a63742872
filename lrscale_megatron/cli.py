"""The ``lrscale`` command: one entry point, one sub-command per job.

    lrscale compare configs/compare/cpu-demo.json           # cosine / inverse-sqrt / lrscale, time to target
    lrscale spectrum --preset tiny --json out.json          # Hessian spectrum of a GPT preset
    lrscale fit --steplaw-csv PATH --out LAW.json           # fit a learning-rate law
    lrscale predict --params 1.3e9 --tokens 1e11 --batch-tokens 4e6 --json
    lrscale prepare-data --corpus shakespeare --vocab-size 8192 --out data/   # IndexedDataset .bin/.idx
    lrscale sweep configs/sweep/cpu-sweep.json                # LR sweep into a crash-safe SQLite store
    lrscale tune configs/tune/cpu-demo.json --out out/tune/cpu-demo   # target -> proxy ladder -> peak LR
    lrscale plot LOGDIR                                       # PNGs of LR, lambda_max and loss
    lrscale init DIR                                          # example configs + JSON schemas, no checkout needed
    lrscale schema train                                      # a config's JSON schema (no name: list them)

Run under torchrun as ``python -m lrscale_megatron.cli ...``.
"""

from __future__ import annotations

import argparse
import sys

from lrscale_megatron.logutil import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrscale", description=__doc__.split("\n")[0])
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    from lrscale_megatron import spectrum

    sp = sub.add_parser("spectrum", help="top Hessian eigenvalues / trace / per-layer sharpness of a GPT")
    spectrum.add_arguments(sp)
    sp.set_defaults(func=spectrum.run)

    from lrscale_megatron.law import cli as law_cli

    law_cli.add_subcommands(sub)

    from lrscale_megatron import plot
    from lrscale_megatron.compare import cli as compare_cli
    from lrscale_megatron.sweep import cli as sweep_cli
    from lrscale_megatron.tune import cli as tune_cli

    sweep_cli.add_subcommand(sub)
    tune_cli.add_subcommand(sub)
    plot.add_subcommand(sub)
    compare_cli.add_subcommand(sub)
    from lrscale_megatron import init_cmd

    init_cmd.add_subcommands(sub)
    sub.add_parser("prepare-data", help="tokenize a shipped corpus into Megatron .bin/.idx (see --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    # The DeepSpeed launcher appends --local_rank=N; torchrun sets LOCAL_RANK instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if argv and argv[0] == "prepare-data":
        from lrscale_megatron.data.prepare import prepare_main

        setup_logging("INFO")
        return prepare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    rc = args.func(args)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
