"""Compute to a tuned LR: ``lrscale tune``'s proxy ladder + one target run vs a K-point LR grid on the target.

Both sides are counted per seed (every seed repeats either). A training run's FLOPs are ``6 N D`` (``N``
non-embedding parameters as ``lrscale tune`` counts its proxies, ``D`` training tokens; attention score
FLOPs and evaluation are left out on both sides); its wall-clock is the whole run as the job measured it
(setup + training + evaluation, ``elapsed_s``), summed over runs (run-seconds: the ladder's workers may
run in parallel). The proxy ladder's FLOPs, wall-clock and run count come from ``lrscale tune``'s
``prediction.json``: ``costs.proxy_flops`` / ``proxy_wall_s`` / ``proxy_runs``, or else the first
numeric entry whose key path names the proxies (``proxy``/``proxies``/``ladder``/``sweep``) and ends in
``flops`` / ``wall_s`` / ``runs`` (ratios left out). The key used is reported; a figure that is not there
is ``None`` with the reason, never a guess.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_PROXY_WORDS = ("proxy", "proxies", "ladder", "sweep")


def _leaves(d: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], float]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, (*path, str(k).lower()))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield path, float(d)


def _find(d: dict[str, Any], exact: str, suffixes: tuple[str, ...]) -> tuple[float | None, str | None]:
    """The leaf ``costs.<exact>``, else the first numeric leaf whose path mentions the proxies and whose key
    ends with one of ``suffixes`` (keys naming a ratio - ``over``, ``ratio``, ``per`` - left out)."""
    leaves = list(_leaves(d))
    for path, v in leaves:
        if path == ("costs", exact):
            return v, ".".join(path)
    for path, v in leaves:
        last = path[-1] if path else ""
        if any(w in last for w in ("over", "ratio", "per_")):
            continue
        if last.endswith(suffixes) and any(w in p for p in path for w in _PROXY_WORDS):
            return v, ".".join(path)
    return None, None


def proxy_cost(tune: str | None) -> dict[str, Any]:
    """``{"flops", "wall_s", "runs", "source", "missing"}`` of the proxy ladder from ``tune`` (a folder
    holding ``prediction.json``, or that file); ``missing`` says what could not be read and why."""
    out: dict[str, Any] = {"flops": None, "wall_s": None, "runs": None, "source": None, "missing": []}
    if tune is None:
        out["missing"].append("no `tune` output given in the compare config")
        return out
    p = Path(tune)
    if p.is_dir():
        p = p / "prediction.json"
    if not p.is_file():
        out["missing"].append(f"{p} not found (run `lrscale tune` first)")
        return out
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        out["missing"].append(f"{p} is not valid JSON ({e})")
        return out
    out["source"] = str(p)
    flops, k_f = _find(d, "proxy_flops", ("flops",))
    wall, k_w = _find(d, "proxy_wall_s", ("wall_s", "wall", "seconds"))
    runs, k_r = _find(d, "proxy_runs", ("runs", "n_runs"))
    out.update(flops=flops, wall_s=wall, runs=int(runs) if runs is not None else None)
    out["keys"] = {"flops": k_f, "wall_s": k_w, "runs": k_r}
    for name, v in (("flops", flops), ("wall_s", wall)):
        if v is None:
            out["missing"].append(f"{p} has no proxy-ladder {name} entry")
    return out


def run_flops(res: dict[str, Any], n_params: float) -> float:
    """``6 N D`` of one saved run (``N`` = ``n_params``, ``D`` = its ``tokens``)."""
    return 6.0 * n_params * float(res["tokens"])


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def compute_to_tuned_lr(
    offline_runs: list[dict[str, Any]],
    grid_runs: dict[float, list[dict[str, Any]]],
    tune: str | None,
    n_params: float,
) -> dict[str, Any]:
    """The table's numbers: ``lrscale`` (proxies + one target run), ``grid`` (K target runs), their ratios.

    ``offline_runs``: the ``lrscale_offline`` arm's runs (one per seed); ``grid_runs``: the grid's runs
    by LR (one per seed each); ``n_params``: the target's non-embedding parameters. Wall-clock means
    are over seeds.
    """
    proxies = proxy_cost(tune)
    target_flops = _mean([run_flops(r, n_params) for r in offline_runs])
    target_wall = _mean([float(r.get("elapsed_s", r["wall_s"])) for r in offline_runs])
    k = len(grid_runs)
    grid_flops = (
        sum(_mean([run_flops(r, n_params) for r in rs]) or 0.0 for rs in grid_runs.values()) if k else None
    )
    grid_wall = (
        sum(_mean([float(r.get("elapsed_s", r["wall_s"])) for r in rs]) or 0.0 for rs in grid_runs.values())
        if k
        else None
    )
    lrs_flops = _add(proxies["flops"], target_flops)
    lrs_wall = _add(proxies["wall_s"], target_wall)
    return {
        "proxies": proxies,
        "lrscale": {
            "proxy_flops": proxies["flops"],
            "proxy_wall_s": proxies["wall_s"],
            "target_run_flops": target_flops,
            "target_run_wall_s": target_wall,
            "total_flops": lrs_flops,
            "total_wall_s": lrs_wall,
        },
        "grid": {"k": k, "total_flops": grid_flops, "total_wall_s": grid_wall},
        "lrscale_over_grid_flops": _ratio(lrs_flops, grid_flops),
        "lrscale_over_grid_wall": _ratio(lrs_wall, grid_wall),
        "proxy_flops_over_one_target_run": _ratio(proxies["flops"], target_flops),
        "notes": "per seed; FLOPs = 6 N D (N non-embedding parameters, D training tokens); wall = "
        "run-seconds of whole runs (setup, training, evaluation)",
    }
