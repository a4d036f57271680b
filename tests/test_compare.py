"""Comparison sweep: planning (equal steps / equal compute), a reduced real sweep on the demo
data (table, figure), and a re-run that skips every finished run."""

import csv
import importlib.util
import math
import os
from pathlib import Path

import pytest
from conftest import REPO, run_py

from mapet_ds.config import load_config
from mapet_ds.analysis.compare import (
    OBJECTIVES, SweepError, build_plan, check_run_dir, equal_compute_steps, flops_per_step,
)

COMPARE = REPO / "launch/compare.py"
RECIPE = """\
_base_: pretrain.yaml
objective: {mask_patches: 6, min_block_patches: 2}
data: {val_list: data/val.txt}
pretrain: {max_steps: 4, save_every: 4, log_every: 2}
finetune: {global_batch_size: 16, max_steps: 4, log_every: 2, save_every: 100, eval_every: 100}
"""
SWEEP = ["--config", "compare_pt.yaml", "--objectives", "mim,mapet", "--seeds", "0,1", "--out", "runs/compare",
         "--launcher", "python"]


def _cli():
    spec = importlib.util.spec_from_file_location("compare_cli", COMPARE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_equal_compute_totals_within_one_step(size):
    fps = {o: flops_per_step(load_config(None, [f"model.size={size}", f"objective.name={o}"])) for o in OBJECTIVES}
    assert fps["mapet"] > fps["pet"] > fps["mim"]
    assert 2.0 < fps["mapet"] / fps["mim"] < 3.0  # two streams: ~2.4x MIM per step
    for ref_steps in (1, 3, 999, 187_500):
        steps = equal_compute_steps(fps, "mapet", ref_steps)
        assert steps["mapet"] == ref_steps and steps["mim"] >= steps["pet"] >= ref_steps
        if ref_steps > 10:
            assert steps["mim"] > steps["pet"] > ref_steps
        budget = fps["mapet"] * ref_steps
        totals = {o: steps[o] * fps[o] for o in fps}
        for o in fps:
            assert budget - fps[o] < totals[o] <= budget
        for a in fps:
            for b in fps:
                assert abs(totals[a] - totals[b]) < max(fps[a], fps[b])
    # a cheaper reference hands the expensive objective fewer steps, still within one step
    steps = equal_compute_steps(fps, "mim", 1000)
    assert steps["mim"] == 1000 and steps["mapet"] < 1000
    with pytest.raises(SweepError, match="less than one step of b"):
        equal_compute_steps({"a": 10, "b": 100}, "a", 1)


def test_compute_plan_and_bad_arguments(demo_workspace, monkeypatch, capsys):
    monkeypatch.chdir(demo_workspace)
    (demo_workspace / "compare_pt.yaml").write_text(RECIPE)
    plan = build_plan("compare_pt.yaml", ["mim", "pet", "mapet"], [0, 3], "runs/plan_only", budget="compute")
    assert plan.reference == "mapet" and plan.steps["mapet"] == 4 and plan.steps["mim"] > plan.steps["pet"] > 4
    assert len(plan.runs) == 6
    run = next(r for r in plan.runs if r.objective == "pet" and r.seed == 3)
    assert f"pretrain.max_steps={plan.steps['pet']}" in run.pretrain_overrides
    assert {"objective.name=pet", "pretrain.seed=3", "pretrain.output_dir=runs/plan_only/pretrain/pet_seed3"} \
        <= set(run.pretrain_overrides)
    assert {"finetune.seed=3", "finetune.init=runs/plan_only/pretrain/pet_seed3"} <= set(run.finetune_overrides)
    totals = [r.total_flops for r in plan.runs]
    assert max(totals) - min(totals) < max(plan.step_flops.values())
    steps_plan = build_plan("compare_pt.yaml", ["mim", "mapet"], [0], "runs/plan_only", overrides=["pretrain.max_steps=9"])
    assert steps_plan.steps == {"mim": 9, "mapet": 9} and steps_plan.reference is None

    cli = _cli()
    assert cli.main(["--config", "compare_pt.yaml", "--objectives", "mim,bert"]) == 2
    assert cli.main(["--config", "compare_pt.yaml", "objective.name=mim"]) == 2
    assert cli.main(["--config", "pretrain.yaml", "--objectives", "mim"]) == 2  # 75 masked of 16 patches
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        "error: --objectives: unknown bert (choose from mim, pet, mapet)",
        "error: override 'objective.name=mim': the sweep sets objective.name itself (use --objectives / --seeds / --out)",
        "error: pretrain.yaml: objective.mask_patches=75 must be < the 16 patches of model.img_size=64/patch_size=16",
    ]


def test_sweep_table_figure_and_rerun_skips(demo_workspace, monkeypatch, capsys):
    ws = demo_workspace
    monkeypatch.chdir(ws)
    (ws / "compare_pt.yaml").write_text(RECIPE)
    assert _cli().main(SWEEP) == 0
    first = capsys.readouterr().out
    assert first.count(": running") == 8 and "k-NN mapet seed 1: top-1" in first
    out = ws / "runs/compare"

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["objective"], r["seed"]) for r in rows) == [("mapet", "0"), ("mapet", "1"), ("mim", "0"), ("mim", "1")]
    for r in rows:
        assert r["status"] == "ok" and r["pretrain_steps"] == "4"
        for col in ("pretrain_flops", "pretrain_loss", "token_acc", "finetune_top1", "finetune_top5", "knn_top1",
                    "pretrain_wall_s", "pretrain_images_per_s", "finetune_wall_s"):
            assert math.isfinite(float(r[col])), (col, r)
        assert 0 <= float(r["finetune_top1"]) <= float(r["finetune_top5"]) <= 100
        assert 3.0 < float(r["pretrain_loss"]) < 5.0  # ~ln(64) at the start of training
    flops = {r["objective"]: float(r["pretrain_flops"]) for r in rows}
    assert flops["mapet"] > 1.5 * flops["mim"]
    md = (out / "results.md").read_text()
    assert "| mim | 2 |" in md and "| mapet | 2 |" in md and " ± " in md
    from PIL import Image

    with Image.open(out / "comparison.png") as im:
        assert im.size == (1100, 420)

    # Re-running the same command launches nothing: every phase is skipped, no file changes.
    watched = [p for d in ("pretrain", "finetune", "knn", "logs") for p in (out / d).rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in watched}
    proc = run_py([COMPARE, *SWEEP], cwd=ws)
    assert proc.stdout.count("finished earlier, skipped") == 12 and ": running" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert list(csv.DictReader((out / "results.csv").open())) == rows

    # A folder made with other settings is refused before anything runs.
    proc = run_py([COMPARE, *SWEEP, "model.drop_path=0.2"], cwd=ws, check=False)
    assert proc.returncode == 2
    assert "runs/compare/pretrain/mim_seed0 holds a run with other settings (model.drop_path" in proc.stderr
    with pytest.raises(SweepError, match="use a new --out"):
        check_run_dir(str(out / "pretrain/mapet_seed1"), "compare_pt.yaml", ["objective.name=mim"])
    assert not Path(out / "logs/knn_mim_seed0.log").exists()

    # A pre-training redone after its fine-tune makes that fine-tune stale: refused, not reused.
    marker = out / "pretrain/mapet_seed0/checkpoints/step00000004/complete.json"
    st = marker.stat()
    os.utime(marker, ns=(st.st_atime_ns, st.st_mtime_ns + 10**12))
    try:
        capsys.readouterr()
        assert _cli().main(SWEEP) == 2
        assert "runs/compare/finetune/mapet_seed0 is older than the pre-training it starts from" in capsys.readouterr().err
    finally:
        os.utime(marker, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_table_mean_and_std_recomputed_from_the_runs_files(tmp_path):
    """results.md / summarize against means and sample stds computed here from hand-written
    metrics.jsonl (loss over the last 10% of steps), summary.json and k-NN files."""
    import dataclasses
    import json
    import statistics

    from mapet_ds.analysis.compare import RunSpec, SweepPlan
    from mapet_ds.analysis.report import summarize, write_results

    losses = {("mim", 0): [5.0, 4.0, 3.5, 3.25, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3],  # 12 steps: last 2
              ("mim", 1): [5.0] * 10 + [2.0, 2.2],
              ("mim", 2): [4.0] * 10 + [2.5, 2.9],
              ("mapet", 0): [4.0] * 11 + [1.5],
              ("mapet", 1): [4.0] * 10 + [1.0, 2.0]}
    top1 = {("mim", 0): 40.0, ("mim", 1): 45.5, ("mim", 2): 50.0, ("mapet", 0): 60.0, ("mapet", 1): 64.0}
    knn = {("mim", 0): 10.0, ("mim", 1): 12.0, ("mim", 2): 17.0, ("mapet", 0): 20.0, ("mapet", 1): 30.0}
    runs = []
    for (obj, seed), curve in losses.items():
        pt, ft = tmp_path / f"pt_{obj}{seed}", tmp_path / f"ft_{obj}{seed}"
        pt.mkdir()
        ft.mkdir()
        (pt / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v, "acc": v / 10})
                                                  + "\n" for i, v in enumerate(curve)))
        (ft / "summary.json").write_text(json.dumps({"top1": top1[obj, seed], "top5": 99.0, "best_top1": 70.0}))
        (tmp_path / f"knn_{obj}{seed}.json").write_text(json.dumps({"top1": knn[obj, seed], "top5": 90.0}))
        known = dict(objective=obj, seed=seed, max_steps=12, flops_per_step=1000, pretrain_dir=str(pt),
                     finetune_dir=str(ft), knn_file=str(tmp_path / f"knn_{obj}{seed}.json"), pretrain_overrides=[],
                     finetune_overrides=[])
        # fields other sweeps add (e.g. a linear probe) point at files that do not exist: NaN columns
        extra = {f.name: str(tmp_path / f"absent_{f.name}_{obj}{seed}") for f in dataclasses.fields(RunSpec)
                 if f.name not in known and f.default is dataclasses.MISSING
                 and f.default_factory is dataclasses.MISSING}
        runs.append(RunSpec(**known, **extra))
    plan = SweepPlan(out=str(tmp_path), config="x.yaml", finetune_config="x.yaml", budget="steps", reference=None,
                     reference_steps=12, step_flops={"mim": 1000, "mapet": 1000}, steps={"mim": 12, "mapet": 12},
                     overrides=[], runs=runs)
    rows, paths = write_results(plan, knn=True)

    def expect(obj, per_run):
        vals = [per_run(seed) for (o, seed) in losses if o == obj]
        return statistics.mean(vals), statistics.stdev(vals)

    tail = lambda o: (lambda s: statistics.mean(losses[o, s][-2:]))  # noqa: E731  ceil(0.1 * 12) = 2 steps
    expected = {o: {"pretrain_loss": expect(o, tail(o)),
                    "token_acc": expect(o, lambda s, o=o: 10.0 * statistics.mean(losses[o, s][-2:])),
                    "finetune_top1": expect(o, lambda s, o=o: top1[o, s]),
                    "knn_top1": expect(o, lambda s, o=o: knn[o, s])} for o in ("mim", "mapet")}
    assert expected["mim"]["pretrain_loss"] == pytest.approx((7.15 / 3, statistics.stdev([2.35, 2.1, 2.7])))  # tails (2.4+2.3)/2 ...
    agg = {a["objective"]: a for a in summarize(rows)}
    for obj, cols in expected.items():
        assert agg[obj]["n"] == (3 if obj == "mim" else 2)
        for col, (mean, std) in cols.items():
            assert agg[obj][col] == pytest.approx((mean, std), rel=1e-12), (obj, col)
    # the Markdown row shows the same numbers, rounded as its header says
    md = paths["md"].read_text()
    table = md.split("## Mean ± std per objective")[1].split("## Runs")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for ln in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        e = expected[cells["objective"]]
        assert cells["pretrain loss"] == "{:.4f} ± {:.4f}".format(*e["pretrain_loss"])
        assert cells["token acc %"] == "{:.2f} ± {:.2f}".format(*e["token_acc"])
        assert cells["fine-tune top-1 %"] == "{:.2f} ± {:.2f}".format(*e["finetune_top1"])
        assert cells["k-NN top-1 %"] == "{:.2f} ± {:.2f}".format(*e["knn_top1"])
        assert cells["steps"] == "12"

LINPROBE_RECIPE = """\
_base_: compare_pt.yaml
data: {rand_augment: null}
optim: {warmup_steps: 1, warmup_lr: 0.0, min_lr: 0.0, weight_decay: 0.0, clip_grad: null}
linprobe: {global_batch_size: 16, max_steps: 4, log_every: 2, save_every: 100, eval_every: 100, blr: 6.4}
"""


def test_sweep_linear_probe_column(demo_workspace, monkeypatch, capsys):
    """--linprobe-config adds a cached linear probe per run: its own phase, CSV/Markdown column,
    a bar in the figure, skipped on a re-run."""
    ws = demo_workspace
    monkeypatch.chdir(ws)
    (ws / "compare_pt.yaml").write_text(RECIPE)
    (ws / "compare_lp.yaml").write_text(LINPROBE_RECIPE)
    args = ["--config", "compare_pt.yaml", "--objectives", "mapet", "--seeds", "0", "--out", "runs/compare_lp",
            "--launcher", "python", "--no-knn", "--linprobe-config", "compare_lp.yaml"]
    cli = _cli()
    assert cli.main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "linear probe (cached features)" in dry
    lp_cmd = next(x for x in dry.splitlines() if x.startswith("mapet_seed0 linprobe: "))
    for part in ("launch/linprobe.py", "--config compare_lp.yaml", "linprobe.seed=0",
                 "linprobe.init=runs/compare_lp/pretrain/mapet_seed0", "linprobe.cache_features=true",
                 "linprobe.output_dir=runs/compare_lp/linprobe/mapet_seed0"):
        assert part in lp_cmd, (part, lp_cmd)
    assert cli.main([*args, "linprobe.init=x"]) == 2
    assert "the sweep sets linprobe.init itself" in capsys.readouterr().err

    assert cli.main(args) == 0
    out = ws / "runs/compare_lp"
    assert "1/1 linprobe mapet seed 0: running" in capsys.readouterr().out
    (row,) = list(csv.DictReader((out / "results.csv").open()))
    probe = __import__("json").loads((out / "linprobe/mapet_seed0/summary.json").read_text())
    assert probe["cache_features"] is True and probe["init"] == "runs/compare_lp/pretrain/mapet_seed0"
    assert float(row["linprobe_top1"]) == pytest.approx(probe["top1"]) and row["status"] == "ok"
    assert float(row["linprobe_top5"]) == pytest.approx(probe["top5"]) and float(row["linprobe_wall_s"]) > 0
    md = (out / "results.md").read_text()
    assert "| k-NN top-1 % | linear probe top-1 % |" in md and "cached features (eval view, no augmentation)" in md
    assert f"| {probe['top1']:.2f} |" in md

    # the re-run skips the probe too
    assert cli.main(args) == 0
    assert "1/1 linprobe mapet seed 0: finished earlier, skipped" in capsys.readouterr().out


def test_markdown_without_probe_has_no_probe_column(demo_workspace, monkeypatch):
    from mapet_ds.analysis.report import markdown

    monkeypatch.chdir(demo_workspace)
    (demo_workspace / "compare_pt.yaml").write_text(RECIPE)
    plan = build_plan("compare_pt.yaml", ["mim"], [0], "runs/plan_no_probe")
    assert plan.runs[0].linprobe_dir == "" and "linear probe" not in markdown(plan, [])
