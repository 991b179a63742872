"""``lrscale compare CONFIG``: LRScale against hand-set baselines at equal compute, to a target loss.

``config`` (typed JSON, ``configs/compare/*.json``) -> ``arms`` (one train config per arm x LR x seed) ->
``runner`` (in-process :func:`lrscale_megatron.train.train` calls, each result saved as it finishes) ->
``metrics`` (time to target, spread) -> ``summary`` (per-run / per-arm figures) + ``cost`` (compute to a
tuned LR) -> ``report`` (``report.json``, done-when checks) -> ``markdown`` (``report.md``) + ``plots``.
``optimizers``: the LR-free arms (Schedule-Free AdamW, Prodigy) as DeepSpeed client optimizers.
"""

from lrscale_megatron.compare.config import (
    ARM_NAMES,
    CompareConfig,
    CompareConfigError,
    compare_config_from_dict,
    load_compare_config,
)
from lrscale_megatron.compare.report import build_report, write_report
from lrscale_megatron.compare.runner import CompareRuns, run_compare

__all__ = [
    "ARM_NAMES",
    "CompareConfig",
    "CompareConfigError",
    "CompareRuns",
    "build_report",
    "compare_config_from_dict",
    "load_compare_config",
    "run_compare",
    "write_report",
]
