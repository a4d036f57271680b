"""The demo command (CI size): its stages, the labelled subset, final-eval reporting, structure tokens.

Whether pre-training wins is a measurement (bench/RESULTS.md), not a unit property: no test asserts it.
"""

import json
import math
import re

import pytest
from conftest import REPO, run_py

from mapet_ds.demo import SIZES, stratified_subset
from mapet_ds.filelist import FileListError, read_filelist, write_filelist
from mapet_ds.tokenizers import Codebook


def test_stratified_subset_is_per_class_seeded_and_refuses_small_classes(tmp_path):
    full = write_filelist(tmp_path / "train.txt", [(f"c{i % 3}/{i}.jpg", i % 3) for i in range(30)])
    a = stratified_subset(full, 4, 7, tmp_path / "few_a.txt")
    stratified_subset(full, 4, 7, tmp_path / "few_b.txt")
    stratified_subset(full, 4, 8, tmp_path / "few_c.txt")
    fa, fb, fc = (read_filelist(tmp_path / n) for n in ("few_a.txt", "few_b.txt", "few_c.txt"))
    assert a["seed"] == 7 and a["num_images"] == 12 and a["per_class"] == 4
    assert sorted(fa.labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert fa.paths == fb.paths and fa.paths != fc.paths  # the seed decides, and only the seed
    src = read_filelist(full)
    assert all(src.labels[src.paths.index(p)] == y for p, y in zip(fa.paths, fa.labels))
    assert fa.root == src.root  # written beside the list: same image root
    with pytest.raises(FileListError, match="class 0 has 10 images, fewer than the 11"):
        stratified_subset(full, 11, 0, tmp_path / "few_d.txt")


@pytest.mark.timeout(2400)  # 9 tool runs: a few minutes on a quiet box, far more on a loaded one
def test_demo_command_small(tmp_path):
    out = tmp_path / "demo"
    proc = run_py([REPO / "launch/demo.py", "--out", out], cwd=tmp_path, env={"MAPET_DEMO_SMALL": "1"},
                  timeout=1800)
    text = proc.stdout
    for stage in ("1/6 make the demo dataset", "2/6 fit the pixel k-means tokenizer", "3/6 pre-train MaPeT",
                  "4/6 fine-tune the pre-trained ViT on 40 labelled", "4/6 fine-tune the randomly initialised ViT",
                  "5/6 k-NN on frozen [CLS] features: pre-trained", "5/6 k-NN on frozen [CLS] features: random init",
                  "6/6 linear probe on frozen [CLS] features: pre-trained",
                  "6/6 linear probe on frozen [CLS] features: random init", "summary"):
        assert f"== {stage}" in text, stage
    # one table: few-label fine-tune, k-NN, linear probe; pre-trained vs scratch/random
    assert re.search(r"pre-trained\s+scratch/random", text)
    for row in ("fine-tune, 4 labels/class (final eval)", "k-NN (k=20), frozen [CLS], 120 labels",
                "linear probe, frozen [CLS], 120 labels"):
        assert row in text
    assert "pictures:" in text and "confusion_matrix.png" in text
    s = json.loads((out / "summary.json").read_text())

    # structure tokens: the demo's codebook is per-patch luma
    assert Codebook.load(out / "tokens/codebook.pt").meta["extractor"]["pixel_norm"] == "luma"
    assert s["pixel_norm"] == "luma" and s["probe_pool"] == "cls"
    # pre-training on the unlabelled list lowered the loss
    assert math.isfinite(s["pretrain_loss_start"]) and s["pretrain_loss_end"] < s["pretrain_loss_start"]
    assert (out / "runs/pretrain_mapet/checkpoints/step00000016/complete.json").is_file()

    # the labelled subset: 4 per class (CI size), stratified, seed recorded, drawn from train, disjoint from val
    few = read_filelist(out / "data/train_few_seed0.txt")
    train, val = read_filelist(out / "data/train.txt"), read_filelist(out / "data/val.txt")
    assert s["subset"]["seed"] == 0 == s["seed"] and s["subset"]["per_class"] == SIZES["small"]["labels"] == 4
    assert s["subset"]["list"] == str(out / "data/train_few_seed0.txt")
    assert sorted(few.labels) == sorted(list(range(10)) * 4)
    assert set(few.paths) <= set(train.paths) and not set(few.paths) & set(val.paths)

    # reported fine-tune figures = each run's final evaluation (its summary.json), and the only
    # evaluation the run made was at its last step: nothing selected on val
    for arm in ("pretrained", "scratch"):
        run = json.loads((out / f"runs/finetune_{arm}_seed0/summary.json").read_text())
        assert s[f"finetune_top1_{arm}"] == round(run["top1"], 2)
        assert s[f"finetune_top5_{arm}"] == round(run["top5"], 2)
        assert json.loads((out / f"runs/finetune_{arm}_seed0/best.json").read_text())["step"] == 6
    assert len(re.findall(r"\[finetune\] eval step (\d+)", text)) == 2  # one per arm
    assert set(re.findall(r"\[finetune\] eval step (\d+)", text)) == {"6"}

    # frozen-feature k-NN of the pre-trained backbone and of a random one (no checkpoint)
    knn_pre = json.loads((out / "runs/knn_pretrained.json").read_text())
    knn_rand = json.loads((out / "runs/knn_random.json").read_text())
    assert knn_rand["checkpoint"] == "random" and knn_pre["pool"] == knn_rand["pool"] == "cls"
    assert s["knn_top1_pretrained"] == round(knn_pre["knn_top1"], 2) and s["knn_top1_random"] == round(
        knn_rand["knn_top1"], 2)
    assert knn_pre["num_train"] == s["train_images"] == 120 and s["val_images"] == 40
    if (REPO / "launch/linprobe.py").is_file():
        for arm in ("pretrained", "random"):
            lp = json.loads((out / f"runs/linprobe_{arm}/summary.json").read_text())
            assert s[f"linprobe_top1_{arm}"] == round(lp["top1"], 2)

    # a rerun skips every finished stage
    again = run_py([REPO / "launch/demo.py", "--out", out], cwd=tmp_path, env={"MAPET_DEMO_SMALL": "1"})
    assert "   $ " not in again.stdout  # no stage command ran
    assert "== summary" in again.stdout
    assert json.loads((out / "summary.json").read_text())["finetune_top1_pretrained"] == s["finetune_top1_pretrained"]


def test_evaluate_random_init_needs_knn_and_config(tmp_path):
    proc = run_py([REPO / "launch/evaluate.py", "random"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "error: checkpoint 'random' is the random-init k-NN baseline: pass --knn and --config" in \
        proc.stdout + proc.stderr


def test_finetune_only_needs_a_finished_demo(tmp_path, capsys):
    from mapet_ds.demo import main

    assert main(["--out", str(tmp_path / "d"), "--small", "--seed", "3", "--finetune-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --finetune-only needs a finished demo pre-training in") and err.count("\n") == 1
    assert not (tmp_path / "d/data").exists()  # nothing was made


def test_a_pretraining_of_another_length_is_refused(tmp_path, capsys):
    from mapet_ds.demo import main

    pre = tmp_path / "d/runs/pretrain_mapet"
    pre.mkdir(parents=True)
    (pre / "config.yaml").write_text("pretrain:\n  max_steps: 300\n")
    assert main(["--out", str(tmp_path / "d"), "--small"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {pre} is a 300-step pre-training of an older demo (this one runs "
                   f"{SIZES['small']['pretrain_steps']}): delete {tmp_path / 'd'} or pass another --out\n")
    assert not (tmp_path / "d/data").exists()  # nothing was made
