"""``report.md`` from the report dict: headline table, done-when checks, ratios, grid, compute to a tuned
LR, online overhead, plots and notes. Pure string formatting."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(x: float | None, fmt: str = "{:.4g}") -> str:
    return "—" if x is None else fmt.format(x)


def _pm(st: dict[str, Any], fmt: str = "{:.4g}") -> str:
    if st["mean"] is None:
        return "not reached"
    s = f"{fmt.format(st['mean'])} ± {fmt.format(st['std'])} [{fmt.format(st['min'])}, {fmt.format(st['max'])}]"
    return s + (f" ({st['n_missing']} seed(s) not reached)" if st["n_missing"] else "")


def _load(x: Any) -> str:
    return "n/a" if not x else "/".join(f"{v:.2f}" for v in x)


def _corpora(rep: dict[str, Any]) -> tuple[str, str]:
    c = rep.get("corpora") or {}
    return str(c.get("train") or "a data prefix"), str(c.get("held_out") or "none").upper()


def _lambada_sentence(rep: dict[str, Any]) -> str:
    lam = rep.get("lambada")
    if not lam:
        return " No last-word metric (the runs were trained with `data.lambada_passages` = 0)."
    return (
        f" Last-word acc: LAMBADA-style greedy accuracy on {lam['n']} held-out passages from "
        f"{lam['source']} (the word counts when the argmax reproduces all its tokens); last-word NLL: "
        "the word's negative log-likelihood in nats, which still ranks models too small to get words right."
    )


def time_to_target_table(rep: dict[str, Any]) -> str:
    """The headline table (also printed by the CLI)."""
    on_gpu = rep["machine"]["device"] == "cuda"
    lines = [
        "| arm | peak LR | reached | steps to target | wall to target (s) | tokens to target | GPU-h | energy (J) "
        "| final val loss (equal steps) | held-out ppl | last-word acc | last-word NLL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in rep["arms"]:
        st = a["stats"]
        lines.append(
            f"| {a['name']} | {a['peak_lr']:.4g} | {a['reached']} | {_pm(st['steps_to_target'], '{:.1f}')} "
            f"| {_pm(st['wall_to_target_s'], '{:.1f}')} | {_f(a['tokens_to_target'], '{:.3g}')} "
            f"| {_f(a['gpu_hours_to_target'], '{:.3g}') if on_gpu else 'n/a (CPU)'} "
            f"| {_f(a['energy_to_target_j'], '{:.3g}') if a['energy_to_target_j'] is not None else 'unavailable'} "
            f"| {_pm(st['final_val_loss'], '{:.4f}')} | {_pm(st['shift_ppl'], '{:.2f}')} "
            f"| {_pm(st['lambada_acc'], '{:.3f}')} | {_pm(st['lambada_word_nll'], '{:.2f}')} |"
        )
    return "\n".join(lines)


def checks_table(rep: dict[str, Any]) -> str:
    """The done-when checks (issue 10) as a table; a missing figure is 'unknown', never 'met'."""
    lines = ["| check | value | threshold | met |", "|---|---|---|---|"]
    for c in rep["done_when"]:
        v = _f(c["value"], "{:.3f}")
        if c["value"] is None and c.get("lower_bound") is not None:
            v = f"not reached (>= {c['lower_bound']:.3f})"
        met = {True: "yes", False: "**no**", None: "unknown"}[c["met"]]
        lines.append(
            f"| {c['check']} | {v} | {'<' if '< 1' in c['check'] else '<='} {c['threshold']} | {met} |"
        )
    return "\n".join(lines)


def compute_section(c: dict[str, Any]) -> list[str]:
    p, lrs, g = c["proxies"], c["lrscale"], c["grid"]
    out = [
        "",
        "## Compute to a tuned LR",
        "",
        "| route | runs | FLOPs | wall (s) |",
        "|---|---|---|---|",
        f"| proxy ladder (`lrscale tune`) | {_f(p['runs'], '{:d}')} | {_f(lrs['proxy_flops'], '{:.3g}')} "
        f"| {_f(lrs['proxy_wall_s'], '{:.0f}')} |",
        f"| + one target run at the predicted LR | 1 | {_f(lrs['target_run_flops'], '{:.3g}')} "
        f"| {_f(lrs['target_run_wall_s'], '{:.0f}')} |",
        f"| **= LRScale** | | **{_f(lrs['total_flops'], '{:.3g}')}** | **{_f(lrs['total_wall_s'], '{:.0f}')}** |",
        f"| {g['k']}-point cosine grid on the target | {g['k']} | {_f(g['total_flops'], '{:.3g}')} "
        f"| {_f(g['total_wall_s'], '{:.0f}')} |",
        "",
        f"LRScale / grid: FLOPs {_f(c['lrscale_over_grid_flops'], '{:.3f}')}, wall "
        f"{_f(c['lrscale_over_grid_wall'], '{:.3f}')}; the proxy ladder costs "
        f"{_f(c['proxy_flops_over_one_target_run'], '{:.2f}')} target runs of FLOPs ({c['notes']}).",
    ]
    if p["source"]:
        out.append(f"Proxy cost read from `{p['source']}` (keys {p.get('keys')}).")
    out += [f"- unknown: {m}" for m in p["missing"]]
    return out


def render_markdown(rep: dict[str, Any], plots: list[str]) -> str:
    cfg = rep["config"]
    peak = rep["offline_peak"]
    m = rep["machine"]
    out = [
        f"# Baseline comparison: {Path(cfg['source']).name}",
        "",
        f"Date {rep['date']}; {m['platform']}, {m['cpus']} CPUs, device {m['device']}; load average "
        f"(1/5/15 min) when this report started {_load(m['load_avg_start'])}, at its end "
        f"{_load(m['load_avg_end'])}; 1-min load as each run finished: "
        f"{_pm(m['load_avg_1min_over_runs'], '{:.2f}') if m['load_avg_1min_over_runs']['n'] else 'not recorded'}.",
        f"Train config `{cfg['train_config']}` (overrides {cfg['overrides'] or 'none'}), {rep['steps']} "
        f"iterations per run, seeds {rep['seeds']}, validation every {cfg['eval_every']} iterations. "
        f"Trained on {_corpora(rep)[0]}; held-out corpus {_corpora(rep)[1]}." + _lambada_sentence(rep),
        "",
        f"**Target validation loss: {rep['target_loss']:.4f}** ({rep['target_rule']}).",
        "",
        f"**Copied LR {rep['baseline']['lr']:.4g}** (`cosine`, `inverse_sqrt`): "
        f"{rep['baseline']['justification']}",
        "",
        f"**LRScale offline peak {peak['peak_lr']:.4g}** from {peak['source']}"
        + (
            f" (fit interval {peak['interval'][0]:.3g}–{peak['interval'][1]:.3g})."
            if peak["interval"]
            else "."
        ),
    ]
    if peak["warnings"]:
        out += ["", "The law extrapolates here — its prediction is outside what it was fitted on:"]
        out += [f"- {w}" for w in peak["warnings"]]
    sl = rep.get("steplaw_peak")
    if sl:
        out += [
            "",
            f"**Step Law formula peak {sl['peak_lr']:.4g}** from {sl['source']} (published, not refitted).",
        ]
        out += [f"- {w}" for w in sl["warnings"]]
    if "schedulefree" in cfg["arms"]:
        out += [
            "",
            f"**Schedule-Free AdamW** lr {cfg['schedulefree']['lr']:.4g}, no schedule, warmup in the optimizer "
            "(facebookresearch/schedule_free README: warmup recommended, beta1 0.9, AdamW LR 1x-10x the "
            "schedule-based one; the package default). Evaluated at its averaged point x (optimizer.eval()).",
        ]
    if "prodigy" in cfg["arms"]:
        p = cfg["prodigy"]
        out += [
            "",
            f"**Prodigy** lr {p['lr']}, d_coef {p['d_coef']}, safeguard_warmup {p['safeguard_warmup']}, "
            f"use_bias_correction {p['use_bias_correction']}, warmup + cosine annealing to 0 "
            "(konstmish/prodigy README). Its LR column is the multiplier, not the step size it estimates.",
        ]
    out += ["", "## Time to target", "", time_to_target_table(rep), ""]
    out += [
        "Mean ± sample std [min, max] over seeds. Steps to target: the validation loss interpolated linearly "
        "between the last evaluation above the target and the first at or below it; an arm's headline "
        "figure needs every seed to reach the target. Wall-clock is training time only (evaluation "
        "excluded), on a machine shared with other jobs: compare it within this report only. Held-out "
        f"ppl: exp(validation loss) on {_corpora(rep)[1]} (`data.shift`), a corpus the model never trained on.",
        "",
        "## Done when (issue 10)",
        "",
        checks_table(rep),
        "",
        "## Ratios",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    out += [f"| {k} | {_f(v, '{:.3f}')} |" for k, v in rep["ratios"].items()]
    if rep["grid"] is not None:
        g = rep["grid"]
        out += [
            "",
            f"## Tuned baseline: cosine LR grid ({len(g['lrs'])} points, {g['selection']})",
            "",
            "| LR | final val loss | steps to target | reached |",
            "|---|---|---|---|",
        ]
        for p in g["points"]:
            best = " **(best)**" if p["lr"] == g["best_lr"] else ""
            out.append(
                f"| {p['lr']:.4g}{best} | {_pm(p['final_val_loss'], '{:.4f}')} "
                f"| {_f(p['steps_to_target'], '{:.1f}')} | {p['reached']} |"
            )
        if g["best_at_edge"]:
            out += ["", "The grid's best LR is at its edge: the grid may not bracket the optimum."]
    if rep.get("compute_to_tuned_lr"):
        out += compute_section(rep["compute_to_tuned_lr"])
    ov = rep["online_overhead"]
    if ov is not None:
        out += [
            "",
            "## Online adaptation overhead",
            "",
            f"- within the online run (measurement steps' excess over the median step): "
            f"{_pm(ov['measured_steps'], '{:.2%}')}",
            f"- paired total wall-clock, online / offline − 1 (same seed; load noise included): "
            f"{_pm(ov['paired_total'], '{:.2%}')}",
        ]
        for s in ov["per_seed"]:
            out.append(
                f"- seed {s['seed']}: {s['n_measurements']} measurements ({s['n_accepted']} accepted, "
                f"{s['n_peak_changed']} changed the peak), {s['measure_s']:.2f} s of {s['train_s']:.1f} s"
            )
    out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    out += [
        "",
        "## Notes",
        "",
        "- Same model, data order, batch and seeds in every arm; AdamW betas, eps and weight decay from the "
        "train config's DeepSpeed JSON in every arm (the LR-free arms use them in their own optimizer); "
        "otherwise only the scheduler block and the peak LR differ.",
        "- GPU-hours are n/a on CPU; energy is `null` (unavailable) without NVML, never 0.",
        "- lambda_max is measured only by the `lrscale_online` arm (a measurement costs training time, so "
        "the other arms do not pay for one).",
        f"- Runs: {rep['runs']['trained']} trained now, {rep['runs']['reused']} reused from `runs/`.",
        "",
    ]
    return "\n".join(out)
