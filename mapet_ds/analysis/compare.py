"""Fair comparison of the objectives: pre-train x seed, fine-tune, k-NN, one table.

    python launch/compare.py --config RECIPE.yaml --objectives mim,pet,mapet --seeds 0,1,2 \
        --out runs/compare [--budget steps|compute] [--launcher "deepspeed --num_gpus 8"]

Every run is a subprocess of the ordinary CLIs (launch/pretrain.py, launch/finetune.py),
so any launcher works; everything but ``objective.name`` and the seeds is identical.
Layout under ``--out``::

    plan.json                      budget, steps and FLOPs per objective, commands
    pretrain/<obj>_seed<s>/        pre-training run dirs     finetune/<obj>_seed<s>/
    linprobe/<obj>_seed<s>/        linear probes (--linprobe-config; cached features by default)
    knn/<obj>_seed<s>.json         k-NN of the pre-trained backbone
    logs/<phase>_<obj>_seed<s>.log subprocess output          state.json  wall times
    results.csv  results.md  comparison.png

Re-running the same command skips finished runs (pre-train: a complete checkpoint at
the final step; fine-tune, linear probe: summary.json; k-NN: its JSON for that checkpoint) and resumes
partial ones (the CLIs auto-resume). A run dir whose config.yaml differs from what the
sweep would run is an error, never silently reused.

Equal compute: a training step costs 3 x forward FLOPs (models/flops.py) x global batch;
the budget is what the reference objective spends in the recipe's steps, and each
objective gets ``floor(budget / flops_per_step)`` steps (its own full lr schedule).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from mapet_ds.config import RunConfig, config_to_dict, load_config
from mapet_ds.engine.checkpoint import MARKER, newest_complete
from mapet_ds.models.flops import pretrain_forward_flops
from mapet_ds.safe_io import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
OBJECTIVES = ("mim", "pet", "mapet")
KNN_AUTO_MAX_IMAGES = 200_000  # above this, extracting train features costs a real fraction of an epoch
# Set by the sweep itself; a user override of these would break the comparison or the skip logic.
RESERVED = ("objective.name", "pretrain.seed", "finetune.seed", "pretrain.output_dir", "finetune.output_dir",
            "finetune.init", "pretrain.resume", "finetune.resume", "linprobe.seed", "linprobe.init",
            "linprobe.output_dir", "linprobe.resume", "linprobe.cache_features")


class SweepError(ValueError):
    """Bad sweep arguments or a run folder that belongs to other settings (one line)."""


# ---------------------------------------------------------------------------------------
# Planning


def flops_per_step(cfg: RunConfig) -> int:
    """Training FLOPs of one optimizer step of cfg.objective: 3 x forward FLOPs per image x global batch."""
    m = cfg.objective.num_predicted(cfg.model.num_patches)
    fwd = pretrain_forward_flops(cfg.model, cfg.objective.name, m, cfg.tokenizer.vocab_size).total
    return int(round(3 * fwd)) * cfg.pretrain.global_batch_size


def equal_compute_steps(step_flops: dict[str, int], reference: str, reference_steps: int) -> dict[str, int]:
    """max_steps per objective so that every run spends the reference's budget.

    budget = step_flops[reference] * reference_steps; steps = floor(budget / step_flops),
    so budget - step_flops[o] < total(o) <= budget: all totals within one step of each other.
    Integer arithmetic: the reference gets exactly ``reference_steps``.
    """
    if reference not in step_flops:
        raise SweepError(f"compute reference {reference!r} is not one of the objectives {sorted(step_flops)}")
    budget = step_flops[reference] * reference_steps
    steps = {o: budget // f for o, f in step_flops.items()}
    short = [o for o, s in steps.items() if s < 1]
    if short:
        raise SweepError(f"the compute budget ({budget:.3g} FLOPs) is less than one step of {', '.join(short)}: "
                         f"raise pretrain.max_steps")
    return steps


def recipe_steps(cfg: RunConfig, num_train_images: int) -> int:
    """The recipe's pre-training length in optimizer steps: max_steps, else epochs x
    (images // global batch), the trainer's steps per epoch up to per-rank rounding."""
    if cfg.pretrain.max_steps is not None:
        return cfg.pretrain.max_steps
    per_epoch = max(1, num_train_images // cfg.pretrain.global_batch_size)
    return max(1, math.ceil(cfg.pretrain.epochs * per_epoch))


@dataclass
class RunSpec:
    objective: str
    seed: int
    max_steps: int
    flops_per_step: int
    pretrain_dir: str
    finetune_dir: str
    knn_file: str
    pretrain_overrides: list[str]
    finetune_overrides: list[str]
    linprobe_dir: str = ""  # empty: no linear probe in this sweep
    linprobe_overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.objective}_seed{self.seed}"

    @property
    def total_flops(self) -> int:
        return self.flops_per_step * self.max_steps


@dataclass
class SweepPlan:
    out: str
    config: str
    finetune_config: str
    budget: str
    reference: Optional[str]
    reference_steps: int
    step_flops: dict[str, int]
    steps: dict[str, int]
    overrides: list[str]
    runs: list[RunSpec] = field(default_factory=list)
    linprobe_config: Optional[str] = None
    linprobe_cached: bool = True


def parse_list(text: str, what: str, cast=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SweepError(f"--{what} is empty")
    try:
        out = [cast(t) for t in items]
    except ValueError:
        raise SweepError(f"--{what} {text!r}: expected a comma-separated list of integers, e.g. 0,1,2") from None
    if len(set(out)) != len(out):
        raise SweepError(f"--{what} {text!r} lists an entry twice")
    return out


def build_plan(config: str, objectives: Sequence[str], seeds: Sequence[int], out: str, *,
               finetune_config: Optional[str] = None, budget: str = "steps", overrides: Sequence[str] = (),
               compute_reference: Optional[str] = None, linprobe_config: Optional[str] = None,
               linprobe_cached: bool = True) -> SweepPlan:
    """Resolve the recipe, the step count per objective and every run's overrides."""
    from mapet_ds.filelist import read_filelist

    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        raise SweepError(f"--objectives: unknown {', '.join(bad)} (choose from {', '.join(OBJECTIVES)})")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in RESERVED:
            raise SweepError(f"override {item!r}: the sweep sets {key} itself (use --objectives / --seeds / --out)")
    if budget not in ("steps", "compute"):
        raise SweepError(f"--budget {budget!r}: choose steps (the paper's setting) or compute")
    # every objective's config and the fine-tune config must load now, not after hours of pre-training
    cfgs = {o: load_config(config, [*overrides, f"objective.name={o}"]) for o in objectives}
    load_config(finetune_config or config, overrides)
    if linprobe_config is not None:
        load_config(linprobe_config, overrides)
    cfg = cfgs[objectives[0]]
    if cfg.data.train_list is None:
        raise SweepError(f"{config}: data.train_list is not set")
    ref_steps = recipe_steps(cfg, len(read_filelist(cfg.data.train_list, cfg.data.root)))
    step_flops = {o: flops_per_step(cfgs[o]) for o in objectives}
    reference = None
    if budget == "compute":
        reference = compute_reference or max(objectives, key=lambda o: step_flops[o])
        steps = equal_compute_steps(step_flops, reference, ref_steps)
    else:
        steps = {o: ref_steps for o in objectives}
    plan = SweepPlan(out=str(out), config=str(config), finetune_config=str(finetune_config or config),
                     budget=budget, reference=reference, reference_steps=ref_steps, step_flops=step_flops,
                     steps=steps, overrides=list(overrides), linprobe_config=linprobe_config,
                     linprobe_cached=linprobe_cached)
    for s in seeds:  # seed-major: an interrupted sweep still has every objective at the first seeds
        for o in objectives:
            name = f"{o}_seed{s}"
            pt, ft = Path(out) / "pretrain" / name, Path(out) / "finetune" / name
            plan.runs.append(RunSpec(
                objective=o, seed=s, max_steps=steps[o], flops_per_step=step_flops[o], pretrain_dir=str(pt),
                finetune_dir=str(ft), knn_file=str(Path(out) / "knn" / f"{name}.json"),
                pretrain_overrides=[*overrides, f"objective.name={o}", f"pretrain.seed={s}",
                                    f"pretrain.output_dir={pt}", f"pretrain.max_steps={steps[o]}"],
                finetune_overrides=[*overrides, f"finetune.seed={s}", f"finetune.init={pt}",
                                    f"finetune.output_dir={ft}"],
            ))
            if linprobe_config is not None:
                lp = Path(out) / "linprobe" / name
                plan.runs[-1].linprobe_dir = str(lp)
                plan.runs[-1].linprobe_overrides = [
                    *overrides, f"linprobe.seed={s}", f"linprobe.init={pt}", f"linprobe.output_dir={lp}",
                    f"linprobe.cache_features={'true' if linprobe_cached else 'false'}"]
    return plan


# ---------------------------------------------------------------------------------------
# Running


def resolve_launcher(launcher: Optional[str]) -> list[str]:
    """'python' -> this interpreter; 'deepspeed ...' / 'torchrun ...' -> found on PATH or beside it.
    Default: the deepspeed launcher (all local GPUs) when CUDA is visible, else plain python."""
    if launcher is None:
        import torch

        launcher = "deepspeed" if torch.cuda.is_available() else "python"
    argv = shlex.split(launcher)
    if not argv:
        raise SweepError("--launcher is empty (use 'python' or e.g. 'deepspeed --num_gpus 8')")
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    exe = shutil.which(argv[0]) or str(Path(sys.executable).parent / argv[0])
    if not Path(exe).exists():
        raise SweepError(f"--launcher {launcher!r}: {argv[0]} not found on PATH or beside {sys.executable}")
    return [exe, *argv[1:]]


def _expected_config(recipe: str, overrides: Sequence[str]) -> dict:
    return config_to_dict(load_config(recipe, overrides))


def check_run_dir(run_dir: str, recipe: str, overrides: Sequence[str]) -> None:
    """A run dir made with other settings must not be resumed or reused."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    have = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    want = _expected_config(recipe, overrides)
    diffs = [f"{sec}.{k}: {have.get(sec, {}).get(k)!r} there, {v!r} now"
             for sec, vals in want.items() for k, v in vals.items() if have.get(sec, {}).get(k) != v]
    if diffs:
        raise SweepError(f"{run_dir} holds a run with other settings ({'; '.join(diffs[:3])}): "
                         f"use a new --out, or delete that folder to redo it")


def pretrain_finished(spec: RunSpec) -> Optional[Path]:
    """The complete checkpoint at the final step, or None."""
    tag = newest_complete(Path(spec.pretrain_dir) / "checkpoints")
    if tag is not None and int(tag.name[len("step"):]) == spec.max_steps:
        return tag
    return None


def _older_than_pretrain(path: Path, spec: RunSpec) -> bool:
    """A result file written before the pre-training's final checkpoint was (re)made is stale."""
    tag = pretrain_finished(spec)
    return tag is not None and path.stat().st_mtime < (tag / MARKER).stat().st_mtime


def check_finetune_fresh(spec: RunSpec) -> None:
    """A fine-tune (or linear-probe) summary older than its pre-training checkpoint belongs to an
    earlier pre-training."""
    for run_dir, redo in ((spec.finetune_dir, "fine-tune"), (spec.linprobe_dir, "probe")):
        summary = Path(run_dir) / "summary.json"
        if run_dir and summary.is_file() and _older_than_pretrain(summary, spec):
            raise SweepError(f"{run_dir} is older than the pre-training it starts from ({spec.pretrain_dir} "
                             f"was redone): delete {run_dir} to {redo} again")


def _write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


# What a sweep writes under --out (launch/compare.py refuses an --out whose entries hold its inputs).
SWEEP_OUTPUTS = ("state.json", "plan.json", "results.csv", "results.md", "comparison.png", "logs", "pretrain",
                 "finetune", "knn", "linprobe")


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def run_logged(cmd: list[str], log_path: Path) -> tuple[int, float, str]:
    """Run a subprocess with stdout+stderr appended to log_path -> (exit code, seconds, last error line)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        wall = time.perf_counter() - t0
    lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
    return rc, wall, err


def knn_for_run(cfg: RunConfig, tag_dir: Path, *, k: int = 20, T: float = 0.07, batch_size: int = 64) -> dict:
    """Weighted k-NN top-1/top-5 of the pre-trained backbone (train list -> val list, eval transform)."""
    import torch

    from mapet_ds.analysis.knn import extract_features, knn_eval
    from mapet_ds.filelist import FileList, read_filelist
    from mapet_ds.interop.export import load_any_checkpoint
    from mapet_ds.models.vit import build_backbone
    from mapet_ds.pipelines import eval_loader

    state, _ = load_any_checkpoint(tag_dir)
    model = build_backbone(cfg.model)
    model.load_state_dict(state, strict=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    d = cfg.data

    def features(filelist: FileList):
        loader = eval_loader(filelist, img_size=cfg.model.img_size, batch_size=batch_size, shard_id=0, num_shards=1,
                             num_threads=d.num_threads, device=d.decode, crop_pct=d.crop_pct,
                             interpolation=d.interpolation, mean=d.mean, std=d.std)
        # mean-pooled, as the sweep's figures in bench/RESULTS.md were measured (k-NN's default is now [CLS])
        return extract_features(model, loader, device, pool="mean",
                                autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)

    train_f, train_y, _ = features(read_filelist(d.train_list, d.root))
    val_f, val_y, _ = features(read_filelist(d.val_list, d.root))
    res = knn_eval(train_f, train_y, val_f, val_y, k=k, T=T)
    return {**res, "tag": str(tag_dir)}


@dataclass
class Sweep:
    plan: SweepPlan
    launcher: list[str]
    ds_config: str
    finetune_ds_config: str
    knn: bool
    log: Callable[[str], None] = print
    failures: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.plan.out)

    def _state(self) -> dict:
        return read_json(self.out / "state.json", {}) or {}

    def _add_wall(self, name: str, phase: str, seconds: float) -> None:
        st = self._state()
        st.setdefault(name, {})
        st[name][f"{phase}_wall_s"] = st[name].get(f"{phase}_wall_s", 0.0) + seconds
        _write_json(st, self.out / "state.json")

    def commands(self, spec: RunSpec) -> dict[str, list[str]]:
        cmds = {
            "pretrain": [*self.launcher, str(REPO / "launch/pretrain.py"), "--ds_config", self.ds_config,
                         "--config", self.plan.config, *spec.pretrain_overrides],
            "finetune": [*self.launcher, str(REPO / "launch/finetune.py"), "--ds_config", self.finetune_ds_config,
                         "--config", self.plan.finetune_config, *spec.finetune_overrides],
        }
        if self.plan.linprobe_config is not None:
            cmds["linprobe"] = [*self.launcher, str(REPO / "launch/linprobe.py"), "--ds_config",
                                self.finetune_ds_config, "--config", self.plan.linprobe_config,
                                *spec.linprobe_overrides]
        return cmds

    def _phase_args(self, spec: RunSpec, phase: str) -> tuple[str, list[str], str]:
        """(recipe, overrides, run dir) of a phase."""
        return {"pretrain": (self.plan.config, spec.pretrain_overrides, spec.pretrain_dir),
                "finetune": (self.plan.finetune_config, spec.finetune_overrides, spec.finetune_dir),
                "linprobe": (self.plan.linprobe_config, spec.linprobe_overrides, spec.linprobe_dir)}[phase]

    def write_plan(self) -> None:
        obj = asdict(self.plan)
        obj["total_flops"] = {o: self.plan.step_flops[o] * self.plan.steps[o] for o in self.plan.steps}
        obj["launcher"], obj["knn"] = self.launcher, self.knn
        obj["commands"] = {s.name: {k: shlex.join(v) for k, v in self.commands(s).items()} for s in self.plan.runs}
        _write_json(obj, self.out / "plan.json")

    def _phase(self, spec: RunSpec, phase: str, i: int, n: int) -> bool:
        """Run one pre-train or fine-tune phase unless finished; True when finished afterwards."""
        recipe, ovr, run_dir = self._phase_args(spec, phase)
        check_run_dir(run_dir, recipe, ovr)
        done = pretrain_finished if phase == "pretrain" else (lambda s: (Path(run_dir) / "summary.json").is_file())
        what = f"[compare] {i}/{n} {phase} {spec.objective} seed {spec.seed}"
        if phase != "pretrain":
            check_finetune_fresh(spec)
        if done(spec):
            self.log(f"{what}: finished earlier, skipped")
            return True
        partial = (Path(run_dir) / "checkpoints").is_dir()
        log_path = self.out / "logs" / f"{phase}_{spec.name}.log"
        self.log(f"{what}: {'resuming' if partial else 'running'} ({phase} log: {log_path})")
        rc, wall, err = run_logged(self.commands(spec)[phase], log_path)
        self._add_wall(spec.name, phase, wall)
        if rc != 0 or not done(spec):
            msg = f"{phase} {spec.name} failed (exit {rc}, {wall:.0f} s): {err} (see {log_path})"
            self.failures.append(msg)
            self.log(f"[compare] {msg}")
            return False
        self.log(f"{what}: done in {wall:.1f} s")
        return True

    def _knn(self, spec: RunSpec, i: int, n: int) -> None:
        tag = pretrain_finished(spec)
        prev = read_json(Path(spec.knn_file))
        what = f"[compare] {i}/{n} k-NN {spec.objective} seed {spec.seed}"
        if prev is not None and prev.get("tag") == str(tag) and not _older_than_pretrain(Path(spec.knn_file), spec):
            self.log(f"{what}: finished earlier, skipped")
            return
        cfg = load_config(self.plan.config, spec.pretrain_overrides)
        t0 = time.perf_counter()
        try:
            res = knn_for_run(cfg, tag)
        except Exception as err:  # noqa: BLE001 -- one bad evaluation must not stop the sweep
            import traceback

            log_path = self.out / "logs" / f"knn_{spec.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as log:
                traceback.print_exc(file=log)
            first = str(err).splitlines()[0] if str(err) else ""
            msg = f"k-NN {spec.name} failed: {type(err).__name__}: {first} (traceback in {log_path})"
            self.failures.append(msg)
            self.log(f"[compare] {msg}")
            return
        res["wall_s"] = time.perf_counter() - t0
        _write_json(res, Path(spec.knn_file))
        self.log(f"{what}: top-1 {res['top1']:.2f} ({res['wall_s']:.1f} s)")

    def run(self) -> bool:
        """Every run in order (pre-train, k-NN, fine-tune, linear probe per objective x seed); True if all finished."""
        for spec in self.plan.runs:  # a stale folder anywhere stops the sweep before anything runs
            check_run_dir(spec.pretrain_dir, self.plan.config, spec.pretrain_overrides)
            check_run_dir(spec.finetune_dir, self.plan.finetune_config, spec.finetune_overrides)
            if spec.linprobe_dir:
                check_run_dir(spec.linprobe_dir, self.plan.linprobe_config, spec.linprobe_overrides)
            check_finetune_fresh(spec)
        self.out.mkdir(parents=True, exist_ok=True)
        self.write_plan()
        n = len(self.plan.runs)
        for i, spec in enumerate(self.plan.runs, 1):
            if not self._phase(spec, "pretrain", i, n):
                continue
            if self.knn:
                self._knn(spec, i, n)
            self._phase(spec, "finetune", i, n)
            if spec.linprobe_dir:
                self._phase(spec, "linprobe", i, n)
        return not self.failures


def knn_default(cfg: RunConfig) -> tuple[bool, str]:
    """k-NN is on by default when a val list exists and the train list is small enough to be cheap."""
    from mapet_ds.filelist import read_filelist

    if cfg.data.val_list is None:
        return False, "off (data.val_list is not set)"
    n = len(read_filelist(cfg.data.train_list, cfg.data.root))
    if n > KNN_AUTO_MAX_IMAGES:
        return False, f"off by default ({n:,} train images > {KNN_AUTO_MAX_IMAGES:,}; pass --knn to force it)"
    return True, f"on ({n:,} train images)"
