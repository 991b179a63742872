"""Megatron compatibility: an ``OptimizerParamScheduler`` with the LRScale schedule and online peak.

* :class:`LRScaleParamScheduler` subclasses megatron-core's ``OptimizerParamScheduler`` (same
  ``step(increment)``, ``get_lr(param_group)``, ``get_wd``, ``state_dict``/``load_state_dict``;
  weight-decay handling and per-group ``max_lr``/``min_lr``/``wd_mult`` overrides are inherited).
  **Units: ``num_steps`` counts what ``step(increment)`` is given. Megatron-LM's training loop passes
  ``increment = global_batch_size`` — samples — so ``warmup_steps``, ``total_steps`` and
  ``online.adapt_every`` of its :class:`~lrscale_megatron.scheduler.LRScaleConfig` are in samples.**
* :func:`add_lrscale_args` is an ``extra_args_provider`` adding ``--lr-decay-style lrscale`` and the
  ``--lrscale-*`` options.
* :func:`patch_megatron_training` (opt-in, reversible, version-checked) swaps the one symbol
  ``megatron.training.training.OptimizerParamScheduler`` for a constructor that builds
  :class:`LRScaleParamScheduler` when ``--lr-decay-style lrscale`` and the original otherwise.

Launch with Megatron-LM (``megatron.training`` must be importable; the PyPI megatron-core wheel does
not ship it)::

    # pretrain_lrscale.py
    from megatron.training import pretrain
    from lrscale_megatron.integrations.megatron import add_lrscale_args, patch_megatron_training
    patch_megatron_training()
    pretrain(train_ds_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
             extra_args_provider=add_lrscale_args)

    # one process / one node / many nodes
    torchrun --nproc_per_node 1 pretrain_lrscale.py --lr-decay-style lrscale --lr 3e-4 ...
    torchrun --nproc_per_node 8 pretrain_lrscale.py --lr-decay-style lrscale --lrscale-law gpt-adamw ...
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint $HEAD:29500 pretrain_lrscale.py ...

Modules: :mod:`.megatron_scheduler` (the scheduler), :mod:`.megatron_args` (command line),
:mod:`.megatron_patch` (the runtime patch); this module re-exports their public names.
"""

from __future__ import annotations

from lrscale_megatron.integrations.megatron_args import (
    DECAY_STYLE_NAME,
    add_lrscale_args,
    config_from_megatron_args,
)
from lrscale_megatron.integrations.megatron_patch import (
    SUPPORTED_MCORE,
    is_patched,
    patch_megatron_training,
    unpatch_megatron_training,
)
from lrscale_megatron.integrations.megatron_scheduler import LRScaleParamScheduler

__all__ = [
    "DECAY_STYLE_NAME",
    "SUPPORTED_MCORE",
    "LRScaleParamScheduler",
    "add_lrscale_args",
    "config_from_megatron_args",
    "patch_megatron_training",
    "unpatch_megatron_training",
    "is_patched",
]
