"""Linear probing (launch/linprobe.py): cached and full protocol, random init, 2 ranks, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, run_py

LINPROBE = REPO / "launch/linprobe.py"
ZERO2 = REPO / "ds_configs/zero2.json"


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def probe_ws(demo_workspace):
    ws = demo_workspace
    if not (ws / "runs/for_lp/checkpoints/step00000004/complete.json").is_file():
        run_py([REPO / "launch/pretrain.py", "--ds_config", ZERO2, "--config", "pretrain.yaml",
                "pretrain.output_dir=runs/for_lp", "pretrain.max_steps=4"], cwd=ws)
    (ws / "linprobe.yaml").write_text(
        "model: {size: null, embed_dim: 48, depth: 2, num_heads: 3, img_size: 64, patch_size: 16}\n"
        "data: {train_list: data/train.txt, val_list: data/val.txt, num_threads: 1, rand_augment: null}\n"
        "optim: {warmup_steps: 1, warmup_lr: 0.0, min_lr: 0.0, weight_decay: 0.0, clip_grad: null}\n"
        "linprobe: {global_batch_size: 16, max_steps: 6, log_every: 1, save_every: 2, eval_every: 100,\n"
        "           blr: 6.4, cache_features: true}\n")
    lines = (ws / "data/val.txt").read_text().splitlines()
    (ws / "data/val49.txt").write_text("\n".join(lines[:49]) + "\n")  # shards of 25 and 24 on 2 ranks
    return ws


def test_cached_probe_of_a_pretraining_run(probe_ws):
    """The exact command shape; summary/TensorBoard; the head on top of the backbone, evaluated on the
    images (the uncached path), scores what the cached run scored: cached features == image features."""
    ws = probe_ws
    proc = run_py([LINPROBE, "--config", "linprobe.yaml", "linprobe.init=runs/for_lp", "data.train_list=data/train.txt",
                   "data.val_list=data/val49.txt", "linprobe.max_steps=6", "linprobe.output_dir=runs/lp1"], cwd=ws)
    assert "[linprobe] done: top-1 " in proc.stdout
    assert "LARS lr 0.4 (blr 6.4 x batch 16 / 256)" in proc.stdout  # lr = blr x batch / 256
    s = json.loads((ws / "runs/lp1/summary.json").read_text())
    assert isinstance(s["top1"], float) and isinstance(s["top5"], float) and s["count"] == 49
    assert 0 <= s["top1"] <= s["top5"] <= 100 and s["steps"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ws / "runs/lp1/tb"))
    acc.Reload()
    assert {"train/loss", "eval/top1", "eval/top5", "opt/lr"} <= set(acc.Tags()["scalars"])

    from mapet_ds.config import load_config
    from mapet_ds.engine.finetune import evaluate
    from mapet_ds.interop.export import load_any_checkpoint
    from mapet_ds.models.probe import LinearProbe, build_probe_backbone
    from mapet_ds.pipelines import eval_loader

    cfg = load_config(ws / "runs/lp1/config.yaml")
    vit, report = build_probe_backbone(cfg.model, load_any_checkpoint(ws / "runs/for_lp")[0])
    assert report["kind"] == "backbone"
    probe = LinearProbe(vit, 48, 10, cfg.linprobe.pool)  # the run's pool: its cached features are compared below
    ck = torch.load(ws / "runs/lp1/checkpoints/step00000006/mp_rank_00_model_states.pt", weights_only=False)
    head = {k[len("head."):]: v for k, v in ck["module"].items() if k.startswith("head.")}
    assert set(head) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias"}  # BN: no affine
    probe.head.load_state_dict(head)
    loader = eval_loader(ws / "data/val49.txt", img_size=64, batch_size=16, shard_id=0, num_shards=1, num_threads=1,
                         device="cpu", crop_pct=cfg.data.crop_pct)
    res = evaluate(probe, loader, torch.device("cpu"))
    assert res["count"] == 49 and res["top1"] == pytest.approx(s["top1"]) and res["top5"] == pytest.approx(s["top5"])
    feats = torch.load(ws / "runs/lp1/features.pt", weights_only=True)
    batch = next(iter(loader))
    ids = batch["sample_ids"]
    assert torch.allclose(probe.features(batch["images"]), feats["val_feats"][ids], atol=1e-5)


def test_two_ranks_gather_every_feature_and_count_each_sample_once(probe_ws):
    ws = probe_ws
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(LINPROBE), "--ds_config", str(ZERO2), "--config", "linprobe.yaml", "linprobe.init=runs/for_lp",
           "data.val_list=data/val49.txt", "linprobe.output_dir=runs/lp2", "linprobe.max_steps=2"]
    proc = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ZeRO stage 2 -> 0" in proc.stdout and "micro batch 8 x accum 1 x 2 rank(s)" in proc.stdout
    assert json.loads((ws / "runs/lp2/summary.json").read_text())["count"] == 49
    two = torch.load(ws / "runs/lp2/features.pt", weights_only=True)
    if not (ws / "runs/lp1/features.pt").is_file():
        pytest.skip("needs test_cached_probe_of_a_pretraining_run's run")
    one = torch.load(ws / "runs/lp1/features.pt", weights_only=True)
    for k in ("train_feats", "val_feats"):  # every row gathered to its sample id, same as one rank's
        assert torch.allclose(one[k], two[k], atol=1e-5)
    assert torch.equal(one["val_labels"], two["val_labels"]) and one["val_labels"].shape == (49,)


def test_feature_eval_loader_shards_each_sample_once():
    from mapet_ds.engine.feature_cache import FeatureEvalLoader

    feats, labels = torch.randn(49, 4), torch.arange(49)
    seen, lengths = [], []
    for rank in range(3):
        batches = list(FeatureEvalLoader(feats, labels, batch_size=8, shard_id=rank, num_shards=3,
                                         device=torch.device("cpu")))
        lengths.append(len(batches))
        seen += [int(i) for b in batches for i in b["sample_ids"][b["valid"]]]
    assert lengths == [3, 3, 3] and sorted(seen) == list(range(49))


def test_full_protocol_trains_only_the_head(probe_ws):
    ws = probe_ws
    run_py([LINPROBE, "--config", "linprobe.yaml", "linprobe.init=runs/for_lp", "linprobe.cache_features=false",
            "linprobe.pool=cls", "data.hflip=0.5", "linprobe.max_steps=2", "linprobe.output_dir=runs/lpfull"], cwd=ws)
    from mapet_ds.interop.export import load_any_checkpoint
    from mapet_ds.models.probe import PROBE_HEAD_INIT_STD

    before = load_any_checkpoint(ws / "runs/for_lp")[0]
    after = torch.load(ws / "runs/lpfull/checkpoints/step00000002/mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    backbone = {k[len("backbone."):]: v for k, v in after.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(backbone[k], before[k]) for k in backbone)  # frozen, bit for bit
    assert "backbone.norm.weight" in after and not any(k.startswith("backbone.head") for k in after)
    assert "head.0.weight" not in after and int(after["head.0.num_batches_tracked"]) == 2  # BN: no affine, trained
    w = after["head.1.weight"]
    assert w.shape == (10, 48) and 0.5 * PROBE_HEAD_INIT_STD < float(w.std()) < 5 * PROBE_HEAD_INIT_STD
    assert float(after["head.1.bias"].abs().sum()) > 0  # the head did train
    assert json.loads((ws / "runs/lpfull/summary.json").read_text())["pool"] == "cls"


def test_random_init_resumes_exactly_after_sigkill(probe_ws):
    ws = probe_ws
    base = [LINPROBE, "--config", "linprobe.yaml", "linprobe.init=random"]
    run_py([*base, "linprobe.output_dir=runs/lpr_full"], cwd=ws)
    full = _losses(ws / "runs/lpr_full")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    killed = run_py([*base, "linprobe.output_dir=runs/lpr_kill"], cwd=ws, env={"MAPET_FAULT": "step:5"}, check=False)
    assert killed.returncode == -9
    resumed = run_py([*base, "linprobe.output_dir=runs/lpr_kill"], cwd=ws)
    assert "resumed from runs/lpr_kill/checkpoints/step00000004" in resumed.stdout
    assert "features from runs/lpr_kill/features.pt" in resumed.stdout  # no second extraction
    assert _losses(ws / "runs/lpr_kill") == full  # bitwise-equal losses (fp32 CPU)
    a = json.loads((ws / "runs/lpr_full/summary.json").read_text())
    b = json.loads((ws / "runs/lpr_kill/summary.json").read_text())
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])


def test_missing_init_is_one_line(probe_ws):
    proc = run_py([LINPROBE, "--config", "linprobe.yaml", "linprobe.output_dir=runs/lpnone"], cwd=probe_ws, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: linprobe.init is not set") and proc.stderr.count("\n") == 1


def test_probe_pools_are_the_knn_features():
    """pool='mean' is the patch-token mean (it once fell through to [CLS]), pool='cls' the [CLS] token."""
    from mapet_ds.analysis.knn import pooled_features
    from mapet_ds.config import ModelConfig
    from mapet_ds.models.probe import LinearProbe
    from mapet_ds.models.vit import build_backbone

    torch.manual_seed(0)
    vit = build_backbone(ModelConfig(size=None, embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=16))
    images = torch.randn(3, 3, 32, 32)
    tokens = vit.eval().forward_features(images)  # [3, 1 + 4, 48]
    mean = LinearProbe(vit, 48, 10, "mean").features(images)
    cls = LinearProbe(vit, 48, 10, "cls").features(images)
    assert torch.allclose(mean, tokens[:, 1:].mean(1), atol=1e-6) and torch.allclose(cls, tokens[:, 0], atol=1e-6)
    assert not torch.allclose(mean, cls, atol=1e-3)
    assert torch.equal(mean, pooled_features(vit, images, "mean"))


def test_feature_caches_of_the_pooling_bug_are_not_reused(tmp_path):
    """Format /1 caches may hold [CLS] features labelled pool 'mean': extracted again, never loaded."""
    from mapet_ds.engine import feature_cache as fc

    sig = {"pool": "mean", "init": "run"}
    fc.save_cache(tmp_path / "features.pt", sig, {"train": (torch.ones(2, 3), torch.zeros(2, dtype=torch.int64))})
    assert fc.load_cache(tmp_path / "features.pt", sig)["train_feats"].shape == (2, 3)
    data = torch.load(tmp_path / "features.pt", weights_only=True)
    data["format"] = "mapet_ds.linprobe_features/1"
    torch.save(data, tmp_path / "features.pt")
    assert fc.load_cache(tmp_path / "features.pt", sig) is None
