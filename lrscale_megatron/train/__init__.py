"""GPT pretraining on megatron-core + DeepSpeed: ``python -m lrscale_megatron.train CONFIG``.

``config`` (typed JSON config) -> ``setup`` (model, data, DeepSpeed engine) -> ``loop`` (:func:`train`)
with ``checkpoint`` and ``metrics``; ``dryrun`` validates a config without GPUs.
"""

from lrscale_megatron.train.config import ConfigError, TrainConfig, config_from_dict, load_config
from lrscale_megatron.train.loop import StepRecord, TrainResult, train

__all__ = [
    "ConfigError",
    "StepRecord",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "load_config",
    "train",
]
