"""``--dry-run``: validate a config without GPUs and without building the model (unless it is small).

Reports
* parameter counts: exact for megatron's local-spec GPTModel (:meth:`ModelConfig.num_params`), the GPT-3
  paper's ``12 L h^2 + (V + S) h`` and their ratio; for models under ``BUILD_CHECK_MAX_PARAMS`` the exact
  count is also checked against a model built on CPU (one process, tp = pp = 1);
* the layout: ``tp * pp * dp == world_size`` and the batch split (micro-batches per iteration);
* memory per GPU (largest pipeline stage = the first), in GiB:
  weights + gradients + Adam states under the ZeRO stage (mixed precision per Rajbhandari et al. 2020,
  ZeRO Sec. 3: 2 + 2 + 12 bytes per parameter; fp32: 4 + 4 + 8) and activations after Korthikanti et al.
  2022 (Eq. 2, no recomputation, no sequence parallelism): ``s b h L (10 + 24/t + 5 a s / (h t))`` bytes on
  the first stage, which holds ``pp`` micro-batches in flight under 1F1B (the ``5as/ht`` term is dropped
  for ``transformer_impl`` ``transformer_engine``/``auto``: fused attention keeps no score matrix); fp32 activations take twice that;
* the online curvature measurement's extra memory per GPU (:func:`lrscale_megatron.preflight.measurement_memory`:
  fp32 vectors over the first stage's parameters, independent of ``max_iter`` for ``k=1``; exact products
  add the first backward's graph, about two micro-batches' activations) for ``hvp`` ``fd`` and ``exact``,
  and the peak of a step in which a measurement runs: weights + grads + optimizer + the measurement (its
  own forward/backward fits in the activations the training step frees);
* the peak LR predicted by the shipped law next to the config's baseline LR.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from lrscale_megatron.train.config import TrainConfig

logger = logging.getLogger(__name__)

BUILD_CHECK_MAX_PARAMS = 20_000_000
GIB = 1024**3
DEFAULT_LAW = "steplaw-dense"


@dataclass(frozen=True)
class DryRunReport:
    """Attributes: see the module docstring; memory in GiB, ``built_params`` ``None`` when not built."""

    name: str
    params: int
    params_gpt3_formula: int
    params_ratio: float
    non_embedding_params: int
    built_params: int | None
    tp: int
    pp: int
    dp: int
    world_size: int
    micro_batches_per_step: int
    zero_stage: int
    mixed_precision: str
    memory_gib: dict[str, float]
    measurement_gib: dict[str, dict[str, float]]
    tokens: float
    batch_tokens: float
    baseline_lr: float | None
    baseline_lr_source: str | None
    predicted_lr: float | None
    predicted_lr_interval: tuple[float, float] | None
    prediction_warnings: tuple[str, ...]
    law: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        mem = self.memory_gib
        lines = [
            f"config {self.name}: OK",
            f"  parameters      {self.params:,} exact (megatron local spec); 12*L*h^2+(V+S)*h = "
            f"{self.params_gpt3_formula:,} (ratio {self.params_ratio:.4f}); non-embedding {self.non_embedding_params:,}",
        ]
        if self.built_params is not None:
            lines.append(f"  built model     {self.built_params:,} parameters (tp=pp=1, CPU) == exact count")
        lines += [
            f"  layout          tp({self.tp}) * pp({self.pp}) * dp({self.dp}) = world_size({self.world_size}); "
            f"{self.micro_batches_per_step} micro-batches per step per rank",
            f"  memory/GPU      {mem['total']:.2f} GiB = weights {mem['weights']:.2f} + grads {mem['grads']:.2f} "
            f"+ optimizer {mem['optimizer']:.2f} + activations {mem['activations']:.2f} "
            f"(ZeRO {self.zero_stage}, {self.mixed_precision}, first pipeline stage)",
            *self._measurement_lines(),
            f"  tokens          {self.tokens:.4g} total, {self.batch_tokens:.4g} per step",
            f"  baseline LR     {self.baseline_lr!r} ({self.baseline_lr_source or 'no source given'})",
        ]
        if self.predicted_lr is not None:
            lo, hi = self.predicted_lr_interval or (self.predicted_lr, self.predicted_lr)
            lines.append(
                f"  predicted LR    {self.predicted_lr:.4g} [{lo:.3g}, {hi:.3g}] from law {self.law!r}"
            )
            lines += [f"    warning: {w}" for w in self.prediction_warnings]
        return "\n".join(lines)

    def _measurement_lines(self) -> list[str]:
        out = []
        for mode, mm in self.measurement_gib.items():
            graph = f" (vectors {mm['vectors']:.2f} + graph {mm['graph']:.2f})" if mode == "exact" else ""
            out.append(
                f"  online measure  hvp={mode}: +{mm['extra']:.2f} GiB/GPU{graph}, "
                f"{mm['x_param_bytes']:.1f} x parameter bytes, any max_iter; peak of a measuring step "
                f"{mm['peak']:.2f} GiB vs training step {self.memory_gib['total']:.2f} GiB"
            )
        return out


def stage_params(cfg: TrainConfig) -> float:
    """Parameters on one GPU of the first pipeline stage (its layers / tp + the embeddings / tp)."""
    m, p = cfg.model, cfg.parallel
    h, L, V, S = m.hidden_size, m.num_layers, m.vocab_size, m.seq_length
    per_layer = (m.num_params() - (V + S) * h - 2 * h - (0 if m.tie_embeddings else V * h)) / L
    return per_layer * L / p.pp / p.tp + V * h / p.tp + S * h


def micro_batch_activations(
    cfg: TrainConfig, *, tp: int | None = None, pp: int | None = None, micro_batch_size: int | None = None
) -> float:
    """Bytes of one micro-batch's activations on the first stage (Korthikanti et al. 2022, Eq. 2);
    ``tp``, ``pp``, ``micro_batch_size`` override the config's."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp = p.tp if tp is None else tp
    pp = p.pp if pp is None else pp
    b = t.micro_batch_size if micro_batch_size is None else micro_batch_size
    h, L, S, a = m.hidden_size, m.num_layers, m.seq_length, m.num_heads
    attn = 5 * a * S / (h * tp) if m.transformer_impl == "local" else 0.0  # TE / auto on GPU: fused attention
    mixed = bool(cfg.deepspeed.get("bf16", {}).get("enabled") or cfg.deepspeed.get("fp16", {}).get("enabled"))
    return S * b * h * (L / pp) * (10 + 24 / tp + attn) * (1 if mixed else 2)


def measurement_estimate(cfg: TrainConfig, dp: int) -> dict[str, dict[str, float]]:
    """GiB per GPU of one online measurement (``fd`` and ``exact``) next to the training step's."""
    from lrscale_megatron.preflight import measurement_memory

    step = memory_estimate(cfg, dp)
    ds = cfg.deepspeed
    mixed = bool(ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"))
    pbytes = 2 if mixed else (8 if cfg.training.dtype == "float64" else 4)
    online = ((ds.get("scheduler") or {}).get("params") or {}).get("online") or {}
    precondition = bool(online.get("precondition", True)) if isinstance(online, dict) else True
    n = int(stage_params(cfg))
    get = online.get if isinstance(online, dict) else (lambda k, d: d)
    vectors, split = str(get("vectors", "device")) if pbytes < 4 else "device", int(get("batch_split", 1))
    vectors = "device" if vectors == "auto" else vectors  # auto: device unless it will not fit (preflight)
    runs = [("fd", vectors, split), ("exact", "device", split)]
    if pbytes < 4 and vectors == "device":  # what online.vectors="host" would hold (curvature/hostvectors.py)
        runs.append(("fd", "host", 2 if cfg.training.micro_batch_size % 2 == 0 else 1))
    out = {}
    for mode, where, parts in runs:
        mm = measurement_memory(
            n,
            mode=mode,
            param_bytes=pbytes,
            precondition=precondition,
            activation_bytes=int(micro_batch_activations(cfg)),
            vectors=where,
            batch_split=parts,
        )
        resident = step["weights"] + step["grads"] + step["optimizer"]
        own_pass = micro_batch_activations(cfg) / GIB  # the held batch's forward/backward
        out[mode if where == vectors else f"{mode}, vectors={where}, batch_split={parts}"] = {
            "extra": mm.total_bytes / GIB,
            "vectors": mm.vectors_bytes / GIB,
            "graph": mm.graph_bytes / GIB,
            "x_param_bytes": mm.total_bytes / (n * pbytes),
            "peak": resident + own_pass + mm.total_bytes / GIB,
        }
    return out


def memory_estimate(cfg: TrainConfig, dp: int) -> dict[str, float]:
    """GiB per GPU on the first pipeline stage (see the module docstring for the formulas)."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    h, L, S, a = m.hidden_size, m.num_layers, m.seq_length, m.num_heads
    stage = stage_params(cfg)
    ds = cfg.deepspeed
    zero = int(ds.get("zero_optimization", {}).get("stage", 0))
    mixed = bool(ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"))
    w_b, g_b, o_b = (
        (2, 2, 12)
        if mixed
        else (4 if t.dtype != "float64" else 8,) * 2 + (8 if t.dtype != "float64" else 16,)
    )
    weights = stage * w_b
    grads = stage * g_b / (dp if zero >= 2 else 1)
    optimizer = stage * o_b / (dp if zero >= 1 else 1)
    b, tp = t.micro_batch_size, p.tp
    attn = 5 * a * S / (h * tp) if m.transformer_impl == "local" else 0.0  # TE / auto on GPU: fused attention
    act = S * b * h * (L / p.pp) * (10 + 24 / tp + attn) * min(p.pp, cfg.check_batch(dp))
    act *= 1 if mixed else 2
    out = {
        "weights": weights / GIB,
        "grads": grads / GIB,
        "optimizer": optimizer / GIB,
        "activations": act / GIB,
    }
    out["total"] = sum(out.values())
    return out


def dry_run(cfg: TrainConfig, build_check: bool | None = None, law: str = DEFAULT_LAW) -> DryRunReport:
    """Validate ``cfg`` and estimate its cost; builds the model only when small (or ``build_check``)."""
    from lrscale_megatron.law.lawfile import load_law
    from lrscale_megatron.law.predict import predict

    m, p, t = cfg.model, cfg.parallel, cfg.training
    world = p.world_size if p.world_size is not None else p.tp * p.pp * (p.dp or 1)
    dp = p.resolve_dp(world)
    gas = cfg.check_batch(dp)
    from lrscale_megatron.train.setup import deepspeed_config

    deepspeed_config(cfg, dp)  # fills "auto", checks batch keys / precision / leftovers
    exact, approx = m.num_params(), m.approx_params()
    built = None
    if build_check or (build_check is None and exact <= BUILD_CHECK_MAX_PARAMS):
        built = count_built_params(cfg)
        if built != exact:
            raise AssertionError(f"built model has {built:,} parameters, the analytic count says {exact:,}")
    batch_tokens = float(t.global_batch_size * m.seq_length)
    tokens = batch_tokens * t.steps
    pred = predict(
        load_law(law), params=float(m.num_non_embedding_params()), tokens=tokens, batch_tokens=batch_tokens
    )
    ds = cfg.deepspeed
    return DryRunReport(
        name=m.name,
        params=exact,
        params_gpt3_formula=approx,
        params_ratio=exact / approx,
        non_embedding_params=m.num_non_embedding_params(),
        built_params=built,
        tp=p.tp,
        pp=p.pp,
        dp=dp,
        world_size=world,
        micro_batches_per_step=gas,
        zero_stage=int(ds.get("zero_optimization", {}).get("stage", 0)),
        mixed_precision="bf16"
        if ds.get("bf16", {}).get("enabled")
        else ("fp16" if ds.get("fp16", {}).get("enabled") else t.dtype),
        memory_gib=memory_estimate(cfg, dp),
        measurement_gib=measurement_estimate(cfg, dp),
        tokens=tokens,
        batch_tokens=batch_tokens,
        baseline_lr=t.lr,
        baseline_lr_source=t.lr_source,
        predicted_lr=pred.peak_lr,
        predicted_lr_interval=pred.interval,
        prediction_warnings=pred.warnings,
        law=law,
    )


def count_built_params(cfg: TrainConfig) -> int:
    """Build the whole model at tp = pp = 1 on CPU (one local process group) and count its parameters."""
    import torch.distributed as dist

    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.train.config import ParallelConfig
    from lrscale_megatron.train.setup import build_model

    owns_group = not dist.is_initialized()
    ctx = init_megatron(1, 1, seed=0)
    try:
        one = cfg.replace(parallel=ParallelConfig(), model=cfg.model.replace(init="megatron"))
        model = build_model(one, ctx)
        return sum(p.numel() for p in model.parameters())
    finally:
        if owns_group:
            shutdown()
