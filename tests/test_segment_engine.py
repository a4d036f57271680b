"""launch/segment.py end to end on CPU: the demo command as written, exact resume after
SIGKILL, and evaluation on 1 vs 2 ranks counting every pixel once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_py

SEGMENT = REPO / "launch/segment.py"
ZERO0 = REPO / "ds_configs/zero0.json"


@pytest.fixture(scope="module")
def seg_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("seg")
    run_py([REPO / "data/make_demo.py", "--out", "D", "--num-train-per-class", "2", "--num-val-per-class", "1",
            "--size", "40", "--segmentation"], cwd=ws)
    (ws / "tiny.yaml").write_text(
        "model: {size: null, embed_dim: 48, depth: 2, num_heads: 3, img_size: 32, patch_size: 8, drop_path: 0.1}\n"
        "data: {train_list: D/seg_train.txt, val_list: D/seg_val.txt, num_threads: 1}\n"
        "optim: {lr: 1.0e-3, warmup_steps: 1, layer_decay: 0.75, clip_grad: 1.0}\n"
        "segment: {num_classes: 11, crop_size: 32, img_scale: [128, 32], out_indices: [0, 0, 1, 1],\n"
        "          decoder_channels: 16, aux_channels: 8, global_batch_size: 4, max_steps: 6, save_every: 2,\n"
        "          log_every: 1, eval_every: 100, eval_stride: 21, keep_last: 5, vis_images: 2}\n")
    return ws


def _losses(run):
    return [(r["step"], r["loss"], r["loss_aux"]) for r in map(json.loads, (run / "metrics.jsonl").open())]


def test_demo_command_as_written(seg_ws):
    ws = seg_ws
    proc = run_py([SEGMENT, "--config", REPO / "launch/recipes/demo_segment.yaml", "data.train_list=D/seg_train.txt",
                   "data.val_list=D/seg_val.txt", "segment.max_steps=1", "segment.eval_every=1",
                   "segment.output_dir=RUN"], cwd=ws)
    assert "[segment] eval step 1: mIoU" in proc.stdout and "[segment] done: mIoU" in proc.stdout
    s = json.loads((ws / "RUN/summary.json").read_text())
    assert 0 <= s["mIoU"] <= 100 and s["images"] == 10 and s["step"] == 1
    table = (ws / "RUN/iou_table.tsv").read_text().splitlines()
    assert table[0] == "class\tname\tIoU\tAcc\tpixels" and table[1].startswith("0\tbackground\t") and len(table) == 14
    from PIL import Image

    assert Image.open(ws / "RUN/seg_overlay.png").size[0] >= 900
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ws / "RUN/tb"))
    acc.Reload()
    assert {"eval/mIoU", "eval/mAcc", "eval/aAcc", "train/loss", "train/loss_aux", "opt/lr"} <= set(acc.Tags()["scalars"])
    assert "eval/overlay" in acc.Tags()["images"]


def test_resume_after_sigkill_is_exact_and_two_ranks_count_every_pixel_once(seg_ws):
    ws = seg_ws
    base = [SEGMENT, "--ds_config", ZERO0, "--config", "tiny.yaml"]
    full = run_py([*base, "segment.output_dir=runs/full"], cwd=ws)
    assert "[segment] done: mIoU" in full.stdout
    ref = _losses(ws / "runs/full")
    assert [r[0] for r in ref] == list(range(1, 7))
    killed = run_py([*base, "segment.output_dir=runs/kill"], cwd=ws, env={"MAPET_FAULT": "step:5"}, check=False)
    assert killed.returncode == -9
    resumed = run_py([*base, "segment.output_dir=runs/kill"], cwd=ws)
    assert "resumed from runs/kill/checkpoints/step00000004" in resumed.stdout
    assert _losses(ws / "runs/kill") == ref  # bitwise-equal losses (fp32 CPU)
    one = json.loads((ws / "runs/full/summary.json").read_text())
    assert one["images"] == 10 and one["pixels"] > 0

    # the same weights evaluated on 2 ranks (the run resumes after its final checkpoint and only
    # evaluates): shards of 5 images each, histograms summed -> identical pixel count and metrics
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           *map(str, base), "segment.output_dir=runs/full"]
    two = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "resumed from step 6 on 2 ranks (was 1)" in two.stdout
    s2 = json.loads((ws / "runs/full/summary.json").read_text())
    assert (s2["images"], s2["pixels"]) == (one["images"], one["pixels"])
    assert s2["mIoU"] == pytest.approx(one["mIoU"]) and s2["aAcc"] == pytest.approx(one["aAcc"])


def test_bad_input_is_a_one_line_error(seg_ws, tmp_path):
    proc = run_py([SEGMENT, "--config", "tiny.yaml", "segment.num_classes=7", f"segment.output_dir={tmp_path}/r"],
                  cwd=seg_ws, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "segment.num_classes=7 but the class names file lists 11" in proc.stderr
