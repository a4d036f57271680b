"""Results of a comparison sweep: one row per objective x seed, per-objective mean ± std,
written as results.csv, results.md and comparison.png (see mapet_ds.analysis.compare).

Numbers come from the runs' own files: metrics.jsonl (loss, token accuracy per step),
TensorBoard (throughput), summary.json (fine-tune, linear probe), knn/*.json, and the sweep's
state.json (subprocess wall time, summed over invocations of a resumed run).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from mapet_ds.analysis.compare import RunSpec, SweepPlan, read_json
from mapet_ds.analysis.visualize import figure_to_array, new_figure, save_png
from mapet_ds.safe_io import atomic_write_text

COLUMNS = ("objective", "seed", "pretrain_steps", "pretrain_flops", "pretrain_loss", "token_acc",
           "finetune_top1", "finetune_top5", "finetune_best_top1", "knn_top1", "knn_top5",
           "linprobe_top1", "linprobe_top5", "pretrain_wall_s", "pretrain_images_per_s", "finetune_wall_s",
           "linprobe_wall_s", "status")
# (column, header, format) of the Markdown tables; accuracies are percentages
MD_COLUMNS = (("pretrain_steps", "steps", "{:.0f}"), ("pretrain_flops", "pretrain FLOPs", "{:.3g}"),
              ("pretrain_loss", "pretrain loss", "{:.4f}"), ("token_acc", "token acc %", "{:.2f}"),
              ("finetune_top1", "fine-tune top-1 %", "{:.2f}"), ("finetune_top5", "fine-tune top-5 %", "{:.2f}"),
              ("knn_top1", "k-NN top-1 %", "{:.2f}"), ("pretrain_wall_s", "pretrain wall s", "{:.0f}"),
              ("pretrain_images_per_s", "pretrain img/s", "{:.1f}"))
# shown only when the sweep has a linear probe (--linprobe-config), after the k-NN column
LINPROBE_MD = ("linprobe_top1", "linear probe top-1 %", "{:.2f}")
FIXED = ("pretrain_steps", "pretrain_flops")
NAN = float("nan")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """metrics.jsonl of a run (one record per optimizer step), by step; [] if absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        recs[int(rec["step"])] = rec
    return [recs[s] for s in sorted(recs)]


def tail_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the last ``fraction`` of the values (at least one): the end-of-run level, less noisy than the last step."""
    if not values:
        return NAN
    k = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(values[-k:]))


def tb_median(run_dir: str | os.PathLike, tag: str) -> float:
    """Median of a TensorBoard scalar over the run (NaN if not logged). Throughput is logged per
    interval, so the median ignores the slow first interval (pipeline warm-up, compilation)."""
    tb = Path(run_dir) / "tb"
    if not tb.is_dir():
        return NAN
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return NAN
    return float(np.median([e.value for e in acc.Scalars(tag)]))


def _num(d: Optional[dict], key: str) -> float:
    v = (d or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else NAN


def run_row(spec: RunSpec, state: dict, knn: bool) -> dict:
    recs = read_metrics(spec.pretrain_dir)
    summary = read_json(Path(spec.finetune_dir) / "summary.json")
    probe = read_json(Path(spec.linprobe_dir) / "summary.json") if spec.linprobe_dir else None
    knn_res = read_json(Path(spec.knn_file)) if knn else None
    steps = recs[-1]["step"] if recs else 0
    st = state.get(spec.name, {})
    status = []
    if steps < spec.max_steps:
        status.append(f"pretrain at step {steps}/{spec.max_steps}")
    if summary is None:
        status.append("no fine-tune")
    if knn and knn_res is None:
        status.append("no k-NN")
    if spec.linprobe_dir and probe is None:
        status.append("no linear probe")
    return {
        "objective": spec.objective, "seed": spec.seed, "pretrain_steps": steps,
        "pretrain_flops": spec.flops_per_step * steps,
        "pretrain_loss": tail_mean([r["loss"] for r in recs]),
        "token_acc": 100.0 * tail_mean([r["acc"] for r in recs if "acc" in r]),
        "finetune_top1": _num(summary, "top1"), "finetune_top5": _num(summary, "top5"),
        "finetune_best_top1": _num(summary, "best_top1"),
        "knn_top1": _num(knn_res, "top1"), "knn_top5": _num(knn_res, "top5"),
        "linprobe_top1": _num(probe, "top1"), "linprobe_top5": _num(probe, "top5"),
        "pretrain_wall_s": _num(st, "pretrain_wall_s"),
        "pretrain_images_per_s": tb_median(spec.pretrain_dir, "throughput/images_per_sec"),
        "finetune_wall_s": _num(st, "finetune_wall_s"), "linprobe_wall_s": _num(st, "linprobe_wall_s"),
        "status": "; ".join(status) or "ok",
    }


def collect_rows(plan: SweepPlan, knn: bool) -> list[dict]:
    state = read_json(Path(plan.out) / "state.json", {}) or {}
    return [run_row(s, state, knn) for s in plan.runs]


def summarize(rows: list[dict]) -> list[dict]:
    """Per objective: n and (mean, sample std) of every numeric column, over finite values."""
    out = []
    for obj in dict.fromkeys(r["objective"] for r in rows):
        mine = [r for r in rows if r["objective"] == obj]
        agg = {"objective": obj, "n": len(mine)}
        for col in COLUMNS[2:-1]:
            v = np.asarray([r[col] for r in mine], np.float64)
            v = v[np.isfinite(v)]
            agg[col] = (float(v.mean()) if v.size else NAN, float(v.std(ddof=1)) if v.size > 1 else NAN)
        out.append(agg)
    return out


def _fmt(fmt: str, v, fixed: bool = False) -> str:
    """A number, or "mean ± std" for a (mean, std) pair; ``fixed`` columns (steps, FLOPs) drop a zero std."""
    if isinstance(v, tuple):
        m, s = v
        if not math.isfinite(m):
            return "–"
        return fmt.format(m) + (f" ± {fmt.format(s)}" if math.isfinite(s) and not (s == 0 and fixed) else "")
    return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def md_columns(plan: SweepPlan) -> tuple:
    """MD_COLUMNS, with the linear-probe column after k-NN when the sweep probes."""
    if not plan.linprobe_config:
        return MD_COLUMNS
    at = [c for c, _, _ in MD_COLUMNS].index("knn_top1") + 1
    return MD_COLUMNS[:at] + (LINPROBE_MD,) + MD_COLUMNS[at:]


def markdown(plan: SweepPlan, rows: list[dict], command: str = "") -> str:
    cols = md_columns(plan)
    head = [h for _, h, _ in cols]
    lines = ["# Objective comparison", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"- pre-train recipe `{plan.config}`, fine-tune recipe `{plan.finetune_config}`"
              + (f", overrides `{' '.join(plan.overrides)}`" if plan.overrides else ""),
              f"- budget **{plan.budget}**" + (f" (reference {plan.reference}: {plan.reference_steps} steps)"
                                               if plan.budget == "compute" else f" ({plan.reference_steps} steps)"),
              "- per objective: " + ", ".join(f"{o} {plan.steps[o]} steps x {plan.step_flops[o]:.3g} FLOPs = "
                                             f"{plan.steps[o] * plan.step_flops[o]:.3g}" for o in plan.steps),
              *([f"- linear probe recipe `{plan.linprobe_config}`, "
                 + ("cached features (eval view, no augmentation)" if plan.linprobe_cached
                    else "full protocol (augmented views)")] if plan.linprobe_config else []),
              "- pretrain loss / token acc: mean over the last 10% of steps (each objective predicts a different "
              "set of tokens, so compare these within an objective, not across)",
              "- ± is the sample standard deviation over seeds; wall s is the subprocess time (start-up included); "
              "img/s is the median logged training throughput", "",
              "## Mean ± std per objective", "",
              "| objective | seeds | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for agg in summarize(rows):
        lines.append(f"| {agg['objective']} | {agg['n']} | "
                     + " | ".join(_fmt(f, agg[c], c in FIXED) for c, _, f in cols) + " |")
    lines += ["", "## Runs", "", "| objective | seed | " + " | ".join(head) + " | status |",
              "|---|---|" + "---|" * (len(head) + 1)]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['seed']} | " + " | ".join(_fmt(f, r[c]) for c, _, f in cols)
                     + f" | {r['status']} |")
    return "\n".join(lines) + "\n"


def comparison_figure(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], x_label: str,
                      finetune_top1: dict[str, list[float]], knn_top1: Optional[dict[str, list[float]]] = None,
                      title: str = "", width: int = 1100, height: int = 420, smooth: int = 1,
                      linprobe_top1: Optional[dict[str, list[float]]] = None) -> np.ndarray:
    """Left: pre-training loss per objective, mean over seeds, shaded min..max. Right: fine-tune
    top-1 (and k-NN, linear-probe top-1) per objective, bar = mean, error bar = std over seeds.

    curves: objective -> one (x [S], loss [S]) pair per seed (x = steps or FLOPs); seeds of
    one objective are aligned on the shortest. ``smooth``: moving-average window in steps.
    -> uint8 [height, width, 3].
    """
    fig = new_figure(width, height)
    ax = fig.add_subplot(1, 2, 1)
    colours = {}
    for i, (obj, runs) in enumerate(curves.items()):
        colours[obj] = f"C{i}"
        runs = [r for r in runs if len(r[0])]
        if not runs:
            continue
        s = min(len(r[0]) for r in runs)
        x = np.asarray(runs[0][0][:s], np.float64)
        ys = np.stack([_smooth(np.asarray(r[1][:s], np.float64), smooth) for r in runs])
        ax.plot(x, ys.mean(0), color=colours[obj], lw=1.5, label=f"{obj} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        if len(runs) > 1:
            ax.fill_between(x, ys.min(0), ys.max(0), color=colours[obj], alpha=0.2, lw=0)
    ax.set_xlabel(x_label)
    ax.set_ylabel("pre-training loss" + (f" (moving avg {smooth})" if smooth > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax2 = fig.add_subplot(1, 2, 2)
    objs = list(dict.fromkeys(list(curves) + list(finetune_top1)))
    series = ([("fine-tune top-1", finetune_top1)] + ([("k-NN top-1", knn_top1)] if knn_top1 else [])
              + ([("linear probe top-1", linprobe_top1)] if linprobe_top1 else []))
    bw = 0.8 / len(series)
    for k, (name, vals) in enumerate(series):
        for i, obj in enumerate(objs):
            v = np.asarray([x for x in vals.get(obj, []) if x is not None and np.isfinite(x)], np.float64)
            if not v.size:
                continue
            mean, std = v.mean(), (v.std(ddof=1) if v.size > 1 else 0.0)
            xpos = i + (k - (len(series) - 1) / 2) * bw
            ax2.bar(xpos, mean, bw * 0.9, yerr=std if v.size > 1 else None, capsize=4, color=colours.get(obj, f"C{i}"),
                    alpha=1.0 if k == 0 else 0.45, hatch=(None, "//", "..")[min(k, 2)], edgecolor="black", lw=0.5,
                    label=name if i == 0 else None)
            ax2.text(xpos, mean + std, f"{mean:.1f}", ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(range(len(objs)), objs)
    ax2.set_ylabel("accuracy (%)")
    ax2.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_to_array(fig)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def figure(plan: SweepPlan, rows: list[dict]) -> np.ndarray:
    """comparison.png: loss vs steps (or FLOPs in compute mode), fine-tune / k-NN top-1 bars."""
    curves: dict[str, list] = {}
    for spec in plan.runs:
        recs = read_metrics(spec.pretrain_dir)
        x = np.asarray([r["step"] for r in recs], np.float64)
        if plan.budget == "compute":
            x = x * spec.flops_per_step
        curves.setdefault(spec.objective, []).append((x, np.asarray([r["loss"] for r in recs], np.float64)))
    ft = {o: [r["finetune_top1"] for r in rows if r["objective"] == o] for o in curves}
    knn = {o: [r["knn_top1"] for r in rows if r["objective"] == o] for o in curves}
    if not any(math.isfinite(v) for vals in knn.values() for v in vals):
        knn = None
    probe = {o: [r["linprobe_top1"] for r in rows if r["objective"] == o] for o in curves}
    if not any(math.isfinite(v) for vals in probe.values() for v in vals):
        probe = None
    longest = max((len(c[0]) for runs in curves.values() for c in runs), default=1)
    seeds = len({s.seed for s in plan.runs})
    title = f"{', '.join(curves)}: {seeds} seed(s), equal {plan.budget}"
    return comparison_figure(curves, "training FLOPs" if plan.budget == "compute" else "optimizer step", ft, knn,
                             title=title, smooth=max(1, longest // 50), linprobe_top1=probe)


def write_results(plan: SweepPlan, knn: bool, command: str = "") -> tuple[list[dict], dict[str, Path]]:
    """Write results.csv, results.md and comparison.png under plan.out; returns (rows, paths)."""
    out = Path(plan.out)
    rows = collect_rows(plan, knn)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "comparison.png"}
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["md"], markdown(plan, rows, command))
    save_png(figure(plan, rows), paths["png"])
    return rows, paths
