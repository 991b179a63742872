"""The LR-free optimizers a practitioner would try instead of tuning an LR, as DeepSpeed client optimizers.

* ``SFAdamW`` -> ``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024, "The Road Less Scheduled",
  arXiv 2405.15682; github.com/facebookresearch/schedule_free). The README's recommendations: no LR
  schedule, warmup through the optimizer's ``warmup_steps``, ``beta1`` 0.9 "works on most problems",
  an AdamW LR "1x-10x larger than with schedule-based approaches". It evaluates at a different point (x)
  from where it takes gradients (y): ``optimizer.eval()`` must run where ``model.eval()`` runs and
  ``optimizer.train()`` where ``model.train()`` runs. :func:`bind_train_eval` ties the two on the model
  instance, so the training loop's own ``module.eval()`` / ``module.train()`` calls switch both.
* ``Prodigy`` -> ``prodigyopt.Prodigy`` (Mishchenko & Defazio 2024, ICML, arXiv 2306.06101;
  github.com/konstmish/prodigy). README: ``lr=1.`` for all networks, ``d_coef`` to force a larger or
  smaller estimate, cosine annealing over the whole run, ``safeguard_warmup=True`` with a linear warmup,
  ``use_bias_correction=True`` (recommended with it).

Both take the train config's AdamW ``betas``, ``eps`` and ``weight_decay`` (decoupled), so the optimizer
is the only difference from the other arms. Importing this module registers both names with
:func:`lrscale_megatron.train.setup.register_client_optimizer`; the packages come with the ``demo``
extra (``pip install lrscale-megatron[demo]``) and a missing one is refused naming the extra.
Only ``lrscale compare`` registers them, and its runs write no checkpoints (a Schedule-Free checkpoint
would have to be taken in eval mode, which the training loop's checkpoint path does not do).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from lrscale_megatron.compare.config import CompareConfigError

SCHEDULEFREE = "SFAdamW"
PRODIGY = "Prodigy"
#: keys of the DeepSpeed JSON's AdamW params that carry over to the LR-free optimizers
_SHARED = ("lr", "betas", "eps", "weight_decay")


def _module(name: str, arm: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CompareConfigError(
            "arms",
            arm,
            f"needs the {name!r} package, which is not installed",
            "install the demo extra (pip install 'lrscale-megatron[demo]', or LRSCALE_EXTRAS=dev,demo "
            "bash scripts/setup_env.sh), or drop the arm",
        ) from None


def _shared(params: dict[str, Any]) -> dict[str, Any]:
    out = {k: params[k] for k in _SHARED if k in params}
    if "betas" in out:
        out["betas"] = tuple(out["betas"])
    return out


def bind_train_eval(model: torch.nn.Module, optimizer: Any) -> None:
    """Make ``model.train(mode)`` (and so ``model.eval()``) also call ``optimizer.train()`` /
    ``optimizer.eval()``: Schedule-Free's parameters hold y while training and x while evaluating."""
    module_train = model.train

    def train(mode: bool = True) -> torch.nn.Module:
        out = module_train(mode)
        if mode:
            optimizer.train()
        else:
            optimizer.eval()
        return out

    model.train = train  # type: ignore[method-assign]


def schedulefree_adamw(
    model: torch.nn.Module, groups: list[dict[str, Any]], params: dict[str, Any]
) -> torch.optim.Optimizer:
    """``AdamWScheduleFree(groups, lr, betas, eps, weight_decay, warmup_steps)``, bound to ``model``'s mode."""
    sf = _module("schedulefree", "schedulefree")
    opt = sf.AdamWScheduleFree(groups, warmup_steps=int(params.get("warmup_steps", 0)), **_shared(params))
    bind_train_eval(model, opt)
    opt.train()
    return opt


def prodigy(
    model: torch.nn.Module, groups: list[dict[str, Any]], params: dict[str, Any]
) -> torch.optim.Optimizer:
    """``Prodigy(groups, lr, betas, eps, weight_decay, d_coef, safeguard_warmup, use_bias_correction)``."""
    po = _module("prodigyopt", "prodigy")
    return po.Prodigy(
        groups,
        d_coef=float(params.get("d_coef", 1.0)),
        safeguard_warmup=bool(params.get("safeguard_warmup", True)),
        use_bias_correction=bool(params.get("use_bias_correction", True)),
        decouple=True,
        **_shared(params),
    )


def require(arms: list[str]) -> None:
    """Refuse before any training when an LR-free arm's package is missing (names the extra)."""
    for arm in arms:
        _module({"schedulefree": "schedulefree", "prodigy": "prodigyopt"}[arm], arm)


def register() -> None:
    """Register both optimizers with the train path's client-optimizer hook (idempotent)."""
    from lrscale_megatron.train.setup import register_client_optimizer

    register_client_optimizer(SCHEDULEFREE, schedulefree_adamw)
    register_client_optimizer(PRODIGY, prodigy)
