"""Pre-training with real DeepSpeed (gloo, CPU): launchers, logging, exact resume, faults."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port, run_py

PRETRAIN = REPO / "launch/pretrain.py"
ZERO2 = REPO / "ds_configs/zero2.json"



def _losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_two_ranks_deepspeed_launcher_zero2(demo_workspace):
    ws = demo_workspace
    deepspeed = Path(sys.executable).parent / "deepspeed"
    out = "runs/ds2"
    proc = subprocess.run(
        [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(PRETRAIN),
         "--ds_config", str(ZERO2), "--config", "pretrain.yaml", f"pretrain.output_dir={out}",
         "pretrain.max_steps=12", "pretrain.save_every=6", "pretrain.vis_every=6"],
        cwd=ws, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "micro batch 8 x accum 1 x 2 rank(s), fp32, ZeRO 2" in proc.stdout
    recs = _losses(ws / out)
    assert [r["step"] for r in recs] == list(range(1, 13))
    first = sum(r["loss"] for r in recs[:3]) / 3
    last = sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 0.05, f"loss did not decrease: {first:.4f} -> {last:.4f}"
    scalars = _scalars(ws / out)
    for tag in ["train/loss", "train/token_acc", "opt/lr", "opt/weight_decay", "opt/grad_norm",
                "opt/skipped_steps", "throughput/images_per_sec", "throughput/images_per_sec_per_device",
                "time/data_wait_fraction", "memory/max_allocated_gib", "tokenizer/codes_used",
                "tokenizer/code_perplexity"]:
        assert tag in scalars, f"missing TensorBoard scalar {tag}"
    assert len(scalars["train/loss"]) == 6 and scalars["opt/skipped_steps"][-1] == 0
    assert 1 <= scalars["tokenizer/codes_used"][-1] <= 64
    # pictures every vis_every steps: TensorBoard images and PNG files of the expected sizes
    from PIL import Image

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ws / out / "tb"))
    acc.Reload()
    assert {"pretrain/plan", "pretrain/position_accuracy", "tokenizer/token_maps",
            "tokenizer/code_usage"} <= set(acc.Tags()["images"])
    vis = ws / out / "vis"
    assert len(list(vis.glob("step00000006_*.png"))) == 4 and len(list(vis.glob("step00000012_*.png"))) == 4
    assert Image.open(vis / "step00000012_pretrain_position_accuracy.png").size == (900, 800)
    w, h = Image.open(vis / "step00000012_pretrain_plan.png").size
    assert w == 1200 and h > 4 * 260  # 4 image rows of ~260 px panels, title and legend
    import io

    import numpy as np

    for tag in ("pretrain/plan", "pretrain/position_accuracy", "tokenizer/token_maps", "tokenizer/code_usage"):
        png = np.asarray(Image.open(vis / f"step00000012_{tag.replace('/', '_')}.png").convert("RGB"))
        assert png.shape[1] >= 800, tag
        tb = acc.Images(tag)[-1]  # TensorBoard shows the very same picture
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(tb.encoded_image_string)).convert("RGB")), png), tag
    # the resolved configs are in the run dir
    ds = json.loads((ws / out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 3.0
    assert "global_batch_size: 16" in (ws / out / "config.yaml").read_text()
    # both ranks wrote their loader/RNG state and the marker closes the checkpoint
    tag = ws / out / "checkpoints" / "step00000012"
    assert {"rank00000.pt", "rank00001.pt", "complete.json"} <= {p.name for p in tag.iterdir()}


def test_exact_resume_after_kill_and_kill_during_save(demo_workspace):
    ws = demo_workspace
    base = ["--ds_config", ZERO2, "--config", "pretrain.yaml"]
    run_py([PRETRAIN, *base, "pretrain.output_dir=runs/full"], cwd=ws)
    full = _losses(ws / "runs/full")
    assert len(full) == 8

    # SIGKILL after step 6: resume from the step-4 checkpoint
    killed = run_py([PRETRAIN, *base, "pretrain.output_dir=runs/kill"], cwd=ws, env={"MAPET_FAULT": "step:6"},
                    check=False)
    assert killed.returncode == -9
    resumed = run_py([PRETRAIN, *base, "pretrain.output_dir=runs/kill"], cwd=ws)
    assert "resumed from runs/kill/checkpoints/step00000004" in resumed.stdout
    assert _losses(ws / "runs/kill") == full  # bitwise-equal losses (fp32 CPU)

    # SIGKILL in the middle of saving step 8: that tag stays incomplete and is never loaded
    killed = run_py([PRETRAIN, *base, "pretrain.output_dir=runs/save"], cwd=ws,
                    env={"MAPET_FAULT": "after_shards:8"}, check=False)
    assert killed.returncode == -9
    partial = ws / "runs/save/checkpoints/step00000008"
    assert (partial / "mp_rank_00_model_states.pt").exists() and not (partial / "complete.json").exists()
    resumed = run_py([PRETRAIN, *base, "pretrain.output_dir=runs/save"], cwd=ws)
    assert "resumed from runs/save/checkpoints/step00000004" in resumed.stdout
    assert _losses(ws / "runs/save") == full
    assert (partial / "complete.json").exists()


@pytest.mark.parametrize("ds_name", ["zero2.json", "zero0.json"])
def test_nonfinite_steps_are_skipped_counted_then_stop(demo_workspace, ds_name):
    # ZeRO-2: DeepSpeed's overflow check skips; ZeRO-0 fp32: the trainer's own check
    ws = demo_workspace
    out = ws / f"runs/nan_{ds_name}"
    proc = run_py([PRETRAIN, "--ds_config", REPO / "ds_configs" / ds_name, "--config", "pretrain.yaml",
                   f"pretrain.output_dir={out}",
                   "pretrain.save_every=2", "pretrain.log_every=1", "pretrain.max_nonfinite=3"],
                  cwd=ws, env={"MAPET_FAULT": "nan_loss:5"}, check=False)
    assert proc.returncode == 2
    assert "WARNING step 5: non-finite loss or gradient norm, update skipped (1 skipped so far)" in proc.stdout
    assert "3 consecutive non-finite steps (up to step 7, pretrain.max_nonfinite=3): stopped" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one line, no traceback
    scalars = _scalars(out)
    assert scalars["opt/skipped_steps"][-1] == 3
    steps = sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*") if (p / "complete.json").exists())
    assert steps[-1] == 4  # the last good checkpoint is kept; nothing saved after the bad steps


def test_zero0_matches_zero2_and_synthetic_data(demo_workspace):
    ws = demo_workspace
    for name in ("zero0", "zero2"):
        run_py([PRETRAIN, "--ds_config", REPO / f"ds_configs/{name}.json", "--config", "pretrain.yaml",
                f"pretrain.output_dir=runs/cmp_{name}", "pretrain.max_steps=5"], cwd=ws)
    # same clipping and AdamW update whichever engine path (ZeRO-0 clips in the trainer)
    assert _losses(ws / "runs/cmp_zero0") == _losses(ws / "runs/cmp_zero2")
    proc = run_py([PRETRAIN, "--ds_config", ZERO2, "--config", "pretrain.yaml", "pretrain.output_dir=runs/synth",
                   "pretrain.max_steps=4", "data.synthetic=true", "data.train_list=null",
                   "tokenizer.token_store=null", "pretrain.vis_every=2"], cwd=ws)
    recs = _losses(ws / "runs/synth")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(3.0 < r["loss"] < 6.0 for r in recs)
    assert "new run: step 0/4" in proc.stdout
    assert not (ws / "runs/synth/vis").exists()  # no file list, so no fixed images to draw


def test_hostfile_two_nodes_on_localhost(demo_workspace, tmp_path):
    ws = demo_workspace
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    procs = [
        subprocess.Popen(
            [str(deepspeed), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
             "--master_addr", "127.0.0.1", "--master_port", str(port), str(PRETRAIN),
             "--ds_config", str(ZERO2), "--config", "pretrain.yaml", "pretrain.output_dir=runs/nodes",
             "pretrain.max_steps=4"],
            cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "x 2 rank(s)" in outs[0]
    tag = ws / "runs/nodes/checkpoints/step00000004"
    assert (tag / "complete.json").exists() and (tag / "rank00001.pt").exists()
