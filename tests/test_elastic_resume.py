"""Elastic resume: another world size or ZeRO stage, through DeepSpeed universal checkpoints.

A 2-rank ZeRO-2 run is killed after step 6 (checkpoint at step 4) and resumed on 1 and
on 3 ranks; the state right after the resume must equal the checkpoint's consolidated
fp32 state bitwise, and the interrupted epoch must use every sample id once.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, run_py
from test_pretrain_engine import _losses

PRETRAIN = REPO / "launch/pretrain.py"
FINETUNE = REPO / "launch/finetune.py"
ZERO2 = REPO / "ds_configs/zero2.json"
ZERO0 = REPO / "ds_configs/zero0.json"
# global batch 12 splits over 1, 2 and 3 ranks; 160 samples -> 13 steps per epoch on 2 ranks
OPTS = ["pretrain.global_batch_size=12", "pretrain.max_steps=14", "pretrain.log_every=1", "pretrain.save_every=4",
        "pretrain.keep_last=9"]
N_SAMPLES = 160


def _ids(prefix: Path, max_step=None) -> dict[int, list[int]]:
    """epoch -> sample ids trained on (all ranks of one run), from MAPET_DEBUG_SAMPLES logs."""
    out: dict[int, list[int]] = {}
    for f in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if max_step is None or r["step"] <= max_step:
                out.setdefault(r["epoch"], []).extend(r["ids"])
    return out


def _universal_state(tag: Path) -> dict:
    z = tag / "universal" / "zero"
    names = [p.name for p in z.iterdir() if p.is_dir()]
    keys = ("fp32", "exp_avg", "exp_avg_sq")
    return {n: {k: torch.load(z / n / f"{k}.pt", weights_only=False)["param"] for k in keys} for n in names}


def _moments_from_shards(tag: Path) -> dict:
    """AdamW moments straight from the old ranks' ZeRO-2 partitions (independent of the conversion)."""
    frags: dict = {}
    for f in sorted(tag.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda p: int(p.name.split("_")[3])):
        osd = torch.load(f, weights_only=False)["optimizer_state_dict"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = osd["base_optimizer_state"]["state"][g]
            for name, frag in mapping.items():
                for k in ("exp_avg", "exp_avg_sq"):
                    frags.setdefault(name, {}).setdefault(k, []).append(flat[k].narrow(0, frag.start, frag.numel))
    return {n: {k: torch.cat(v) for k, v in d.items()} for n, d in frags.items()}


def _assert_state_equal(dump: dict, ref: dict) -> None:
    assert set(dump["params"]) == set(ref)
    for name, d in dump["params"].items():
        for k, v in d.items():
            assert torch.equal(v, ref[name][k].view_as(v)), f"{name}.{k} differs after the resume"


def _expected_lr(ws: Path, step: int, total: int, steps_per_epoch: int) -> float:
    from mapet_ds.config import load_config
    from mapet_ds.engine.optim import Schedule

    cfg = load_config(ws / "pretrain.yaml", [])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    return Schedule(opt, cfg.optim, total, steps_per_epoch).apply(step, opt.param_groups)[0]


def _launch(args, cwd, env=None, nproc=2):
    """The real DeepSpeed launcher on ``nproc`` CPU ranks; returns the CompletedProcess (any exit code)."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


@pytest.fixture(scope="module")
def killed_two_ranks(demo_workspace):
    """A 2-rank ZeRO-2 run SIGKILLed after step 6; its newest complete checkpoint is step 4."""
    ws = demo_workspace
    proc = _launch([PRETRAIN, "--ds_config", ZERO2, "--config", "pretrain.yaml", "pretrain.output_dir=runs/el2",
                    *OPTS], ws, env={"MAPET_FAULT": "step:6", "MAPET_DEBUG_SAMPLES": str(ws / "ids_el2")})
    assert proc.returncode != 0 and "step 5/14" in proc.stdout and "step 6/14" not in proc.stdout
    tag = ws / "runs/el2/checkpoints/step00000004"
    marker = json.loads((tag / "complete.json").read_text())
    assert (marker["world_size"], marker["zero_stage"], marker["micro_batch"]) == (2, 2, 6)
    assert not (ws / "runs/el2/checkpoints/step00000008").exists()
    return ws


def test_loader_tail_epoch_is_exact_and_resumable(demo_workspace):
    """Loader level: 2 shards -> 3 shards, a same-size resume inside the tail, then 3 -> 1."""
    from mapet_ds.filelist import read_filelist
    from mapet_ds.pipelines import finetune_train_loader, pretrain_loader
    from mapet_ds.pipelines.loaders import merge_rank_states

    fl = demo_workspace / "data/train.txt"
    kw = dict(img_size=32, seed=3, num_threads=1, device="cpu")

    def take(loaders, batches):
        return [i for _ in range(batches) for ld in loaders for i in next(ld)["sample_ids"].tolist()]

    old = [pretrain_loader(fl, batch_size=6, shard_id=r, num_shards=2, **kw) for r in range(2)]
    used = take(old, 4)
    merged = merge_rank_states([ld.state() for ld in old])
    new = [pretrain_loader(fl, batch_size=4, shard_id=r, num_shards=3, checkpoint=merged, **kw) for r in range(3)]
    assert new[0].elastic_info == {"epoch": 0, "unseen": 112, "tail_batches": 9, "dropped": 4}
    tail = take(new, 3)
    # same world size inside the tail: the exact path yields the very same next batch
    again = pretrain_loader(fl, batch_size=4, shard_id=1, num_shards=3, checkpoint=new[1].state(), **kw)
    b = next(again)
    assert torch.equal(b["sample_ids"], next(new[1])["sample_ids"])
    tail += b["sample_ids"].tolist() + take([new[0], new[2]], 1)
    # re-shard again inside the tail (3 -> 1): the rest of the same epoch
    merged = merge_rank_states([new[0].state(), again.state(), new[2].state()])
    one = pretrain_loader(fl, batch_size=4, shard_id=0, num_shards=1, checkpoint=merged, **kw)
    assert one.elastic_info == {"epoch": 0, "unseen": 64, "tail_batches": 16, "dropped": 0}
    rest = take([one], 16)
    assert sorted(used + tail + rest) == list(range(N_SAMPLES))  # every sample of the epoch exactly once
    assert one.epoch == 1 and next(one)["sample_ids"].numel() == 4  # then whole-list epochs
    # fine-tuning uses the same loader: labels follow the remapped sample ids
    ft = [finetune_train_loader(fl, batch_size=8, shard_id=r, num_shards=2, rand_augment=None, **kw)
          for r in range(2)]
    for ld in ft:
        next(ld)
    ft1 = finetune_train_loader(fl, batch_size=8, shard_id=0, num_shards=1, rand_augment=None,
                                checkpoint=merge_rank_states([ld.state() for ld in ft]), **kw)
    b = next(ft1)
    labels = read_filelist(fl).labels
    assert b["labels"].tolist() == [labels[i] for i in b["sample_ids"].tolist()]


def _check_resumed_run(ws: Path, run: str, dump: Path, ids_prefix: Path, ref_tag: Path, world: int) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = torch.load(dump, weights_only=False)
    # right after the resume: step counter, AdamW step and lr continue
    assert state["step"] == 4 and state["adam_step"] == 4.0
    assert state["lr"] == _expected_lr(ws, 4, total=14, steps_per_epoch=13)
    # weights and moments equal the checkpoint's consolidated fp32 state, bitwise
    _assert_state_equal(state, _universal_state(ref_tag))
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ref_tag.parent), tag=ref_tag.name)
    assert all(torch.equal(fp32[n], d["fp32"]) for n, d in state["params"].items())
    shards = _moments_from_shards(ref_tag)
    assert all(torch.equal(shards[n][k], d[k].flatten()) for n, d in state["params"].items()
               for k in ("exp_avg", "exp_avg_sq"))
    # the interrupted epoch: 48 ids before the kill's checkpoint, the unseen rest after it, none twice
    before = _ids(ws / "ids_el2", max_step=4)[0]
    after = _ids(ids_prefix)
    assert len(before) == 48 and len(after[0]) == 108
    epoch0 = before + after[0]
    assert len(set(epoch0)) == len(epoch0) == N_SAMPLES - 4
    assert len(after[1]) == (14 - 4) * 12 - 108  # then the next epoch
    recs = _losses(ws / run)
    assert [r["step"] for r in recs] == list(range(1, 15)) and all(math.isfinite(r["loss"]) for r in recs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ws / run / "tb"))
    acc.Reload()
    text = acc.Tensors("resume/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith(f"resumed from step 4 on {world} rank")


def test_two_ranks_killed_resume_on_one_and_three_ranks(killed_two_ranks):
    ws = killed_two_ranks
    for n in (1, 3):
        shutil.copytree(ws / "runs/el2", ws / f"runs/el2_{n}")
    # a conversion killed midway leaves universal.tmp: it is discarded and redone
    junk = ws / "runs/el2_1/checkpoints/step00000004/universal.tmp/zero"
    junk.mkdir(parents=True)
    (junk / "optimizer_state.pt").write_bytes(b"cut")

    base = ["--ds_config", ZERO2, "--config", "pretrain.yaml", *OPTS]
    one = run_py([PRETRAIN, *base, "pretrain.output_dir=runs/el2_1"], cwd=ws,
                 env={"MAPET_DEBUG_RESUME_STATE": str(ws / "dump_1.pt"), "MAPET_DEBUG_SAMPLES": str(ws / "ids_1")})
    assert ("[pretrain] resumed from step 4 on 1 rank (was 2): universal checkpoint, epoch 0 continues with "
            "112 unseen samples (4 left over, fewer than one batch per rank)") in one.stdout
    assert "micro batch 6 x accum 2 x 1 rank(s), fp32, ZeRO 2" in one.stdout
    assert not (ws / "runs/el2_1/checkpoints/step00000004/universal.tmp").exists()
    _check_resumed_run(ws, "runs/el2_1", ws / "dump_1.pt", ws / "ids_1",
                       ws / "runs/el2_1/checkpoints/step00000004", 1)

    three = _launch([PRETRAIN, *base, "pretrain.output_dir=runs/el2_3"], ws, nproc=3,
                    env={"MAPET_DEBUG_RESUME_STATE": str(ws / "dump_3.pt"), "MAPET_DEBUG_SAMPLES": str(ws / "ids_3")})
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    assert ("resumed from step 4 on 3 ranks (was 2): universal checkpoint, epoch 0 continues with 112 unseen "
            "samples (4 left over") in three.stdout
    assert "micro batch 4 x accum 1 x 3 rank(s)" in three.stdout
    _check_resumed_run(ws, "runs/el2_3", ws / "dump_3.pt", ws / "ids_3", ws / "runs/el2_3/checkpoints/step00000004",
                       3)

    # a second resume reuses the converted folder (its marker is not rewritten)
    from mapet_ds.engine import elastic

    tag = ws / "runs/el2_3/checkpoints/step00000004"
    before = (tag / "universal/complete.json").read_text()
    assert elastic.universal_dir(tag, rank=0) == tag / "universal"
    assert (tag / "universal/complete.json").read_text() == before


def test_zero2_to_zero0_and_back(killed_two_ranks):
    ws = killed_two_ranks
    shutil.copytree(ws / "runs/el2", ws / "runs/z0")
    opts = [*OPTS, "pretrain.output_dir=runs/z0"]  # max_steps below overrides the one in OPTS
    # 2 ranks ZeRO-2 -> 1 rank ZeRO-0: the universal folder read into the plain AdamW (DeepSpeed cannot)
    z0 = run_py([PRETRAIN, "--ds_config", ZERO0, "--config", "pretrain.yaml", *opts, "pretrain.max_steps=8"],
                cwd=ws, env={"MAPET_DEBUG_RESUME_STATE": str(ws / "dump_z0.pt")})
    assert "resumed from step 4 on 1 rank (was 2, ZeRO 2 -> 0): universal checkpoint" in z0.stdout
    state = torch.load(ws / "dump_z0.pt", weights_only=False)
    assert state["step"] == 4 and state["adam_step"] == 4.0
    _assert_state_equal(state, _universal_state(ws / "runs/z0/checkpoints/step00000004"))
    # 1 rank ZeRO-0 (step 8) -> 1 rank ZeRO-2: the ZeRO-0 state written as a universal folder
    tag8 = ws / "runs/z0/checkpoints/step00000008"
    assert json.loads((tag8 / "complete.json").read_text())["zero_stage"] == 0
    z2 = run_py([PRETRAIN, "--ds_config", ZERO2, "--config", "pretrain.yaml", *opts, "pretrain.max_steps=10"],
                cwd=ws, env={"MAPET_DEBUG_RESUME_STATE": str(ws / "dump_z2.pt")})
    assert "resumed from step 8 on 1 rank (ZeRO 0 -> 2): universal checkpoint" in z2.stdout
    state = torch.load(ws / "dump_z2.pt", weights_only=False)
    assert state["step"] == 8 and state["adam_step"] == 8.0
    sd = torch.load(tag8 / "mp_rank_00_model_states.pt", weights_only=False)
    opt = sd["optimizer"]
    ref = {}
    for group in opt["param_groups"]:
        for idx, name in zip(group["params"], group["param_names"]):
            ref[name] = {"fp32": sd["module"][name], **{k: opt["state"][idx][k] for k in ("exp_avg", "exp_avg_sq")}}
    _assert_state_equal(state, ref)
    recs = _losses(ws / "runs/z0")
    assert [r["step"] for r in recs] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in recs)


FT_BASE = [FINETUNE, "--ds_config", ZERO2, "--config", "ft_el.yaml"]


@pytest.fixture(scope="module")
def killed_ft_two_ranks(demo_workspace):
    """A 2-rank ZeRO-2 fine-tune (EMA on) SIGKILLed after step 5; its newest complete checkpoint is step 3."""
    ws = demo_workspace
    (ws / "ft_el.yaml").write_text(
        "model: {size: null, embed_dim: 48, depth: 2, num_heads: 3, img_size: 64, patch_size: 16}\n"
        "data: {train_list: data/train.txt, val_list: data/val.txt, num_threads: 1, rand_augment: null}\n"
        "optim: {lr: 1.0e-3, warmup_steps: 1, layer_decay: 0.75}\n"
        "finetune: {global_batch_size: 16, max_steps: 6, log_every: 1, save_every: 3, eval_every: 5, keep_last: 9,\n"
        "           ema_decay: 0.9, mixup: 0.0, cutmix: 0.0, output_dir: runs/ft_el}\n")
    killed = _launch(FT_BASE, ws, env={"MAPET_FAULT": "step:5", "MAPET_DEBUG_SAMPLES": str(ws / "ids_ft2")})
    assert killed.returncode != 0 and "step 4/6" in killed.stdout
    return ws


def test_finetune_two_ranks_resumed_on_one(killed_ft_two_ranks):
    ws = killed_ft_two_ranks
    shutil.copytree(ws / "runs/ft_el", ws / "runs/ft_el1")
    one = run_py([*FT_BASE, "finetune.output_dir=runs/ft_el1"], cwd=ws,
                 env={"MAPET_DEBUG_RESUME_STATE": str(ws / "dump_ft.pt"), "MAPET_DEBUG_SAMPLES": str(ws / "ids_ft1")})
    assert ("[finetune] resumed from step 3 on 1 rank (was 2): universal checkpoint, epoch 0 continues with "
            "112 unseen samples") in one.stdout
    assert "micro batch 8 x accum 2 x 1 rank(s)" in one.stdout
    state = torch.load(ws / "dump_ft.pt", weights_only=False)
    assert state["step"] == 3 and state["adam_step"] == 3.0
    _assert_state_equal(state, _universal_state(ws / "runs/ft_el1/checkpoints/step00000003"))
    before, after = _ids(ws / "ids_ft2", max_step=3)[0], _ids(ws / "ids_ft1")[0]
    assert len(before) == 48 and len(after) == 48 and not set(before) & set(after)
    assert json.loads((ws / "runs/ft_el1/summary.json").read_text())["top1"] >= 0.0


def test_two_ranks_killed_resume_on_two_ranks_equals_uninterrupted(killed_two_ranks):
    """Pre-training, same world size: 2 ranks -> SIGKILL -> 2 ranks gives the uninterrupted losses bitwise."""
    ws = killed_two_ranks
    shutil.copytree(ws / "runs/el2", ws / "runs/el2_2")
    base = [PRETRAIN, "--ds_config", ZERO2, "--config", "pretrain.yaml", *OPTS]
    full = _launch([*base, "pretrain.output_dir=runs/el2_full"], ws)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    two = _launch([*base, "pretrain.output_dir=runs/el2_2"], ws)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "resumed from runs/el2_2/checkpoints/step00000004: step 4/14" in two.stdout
    assert "universal checkpoint" not in two.stdout  # the exact (non-elastic) path
    full_losses = _losses(ws / "runs/el2_full")
    assert [r["step"] for r in full_losses] == list(range(1, 15))
    assert _losses(ws / "runs/el2_2") == full_losses  # every metric of every step, bitwise (fp32 CPU)


def test_finetune_two_ranks_killed_resume_on_two_ranks_equals_uninterrupted(killed_ft_two_ranks):
    """Fine-tuning: losses, final accuracy and the EMA weights equal the uninterrupted run's bitwise,
    so the resumed run continued the checkpointed EMA (a fresh copy of the weights would differ)."""
    ws = killed_ft_two_ranks
    shutil.copytree(ws / "runs/ft_el", ws / "runs/ft_el2")
    full = _launch([*FT_BASE, "finetune.output_dir=runs/ft_full"], ws)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    two = _launch([*FT_BASE, "finetune.output_dir=runs/ft_el2"], ws)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "resumed from runs/ft_el2/checkpoints/step00000003: step 3/6" in two.stdout
    full_losses = _losses(ws / "runs/ft_full")
    assert [r["step"] for r in full_losses] == list(range(1, 7))
    assert _losses(ws / "runs/ft_el2") == full_losses
    summary = lambda run: json.loads((ws / run / "summary.json").read_text())  # noqa: E731
    assert summary("runs/ft_el2")["top1"] == summary("runs/ft_full")["top1"]

    def states(run, step):
        sd = torch.load(ws / run / f"checkpoints/step{step:08d}/mp_rank_00_model_states.pt", weights_only=False)
        return sd["module"], sd["ema"]

    weights3, ema3 = states("runs/ft_el2", 3)
    assert any(not torch.equal(ema3[k], weights3[k]) for k in ema3)  # the EMA is not just the weights
    for run in ("runs/ft_el2", "runs/ft_full"):
        assert set(states(run, 6)[1]) == set(ema3)
    resumed, uninterrupted = states("runs/ft_el2", 6)[1], states("runs/ft_full", 6)[1]
    for k, v in uninterrupted.items():
        assert torch.equal(resumed[k], v), f"EMA {k} differs after the resume"


def test_rebatch_keeps_the_global_batch_or_refuses_in_one_line():
    from mapet_ds.config import ConfigError, TrainConfig
    from mapet_ds.engine.elastic import rebatch

    saved = {"world_size": 8, "zero_stage": 2, "micro_batch": 32}
    t = TrainConfig(global_batch_size=256)
    assert (lambda c: (c.micro_batch_size, c.grad_accum))(rebatch(t, 4, saved, "pretrain")) == (32, 2)
    assert (lambda c: (c.micro_batch_size, c.grad_accum))(rebatch(t, 16, saved, "pretrain")) == (16, 1)
    t = TrainConfig(global_batch_size=96, micro_batch_size=10)
    assert (lambda c: (c.micro_batch_size, c.grad_accum))(rebatch(t, 4, saved, "pretrain")) == (8, 3)
    with pytest.raises(ConfigError) as err:
        rebatch(TrainConfig(global_batch_size=16), 3, {"world_size": 2}, "pretrain")
    assert str(err.value) == ("pretrain.global_batch_size=16 cannot be split over 3 ranks (the checkpoint was "
                              "written on 2): resume on a world size that divides 16")


@pytest.mark.parametrize("fused", [True, False])
def test_universal_state_lands_where_torch_adamw_keeps_it(tmp_path, fused):
    """Every restored AdamW state entry has the device and dtype of torch's own load_state_dict
    (fused: ``step`` a float32 tensor on the parameter's device, not a CPU tensor)."""
    from types import SimpleNamespace

    from mapet_ds.engine.elastic import load_universal_into_plain

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ref_opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused, foreach=False if fused else None)
    model(torch.randn(2, 4)).sum().backward()
    ref_opt.step()
    ref_opt.load_state_dict(ref_opt.state_dict())  # torch's own placement of every entry
    for name, p in model.named_parameters():
        d = tmp_path / "zero" / name
        d.mkdir(parents=True)
        st = ref_opt.state[p]
        torch.save({"param": p.detach().clone()}, d / "fp32.pt")
        torch.save({"param": st["exp_avg"].clone()}, d / "exp_avg.pt")
        torch.save({"param": st["exp_avg_sq"].clone()}, d / "exp_avg_sq.pt")
        torch.save(st["step"].cpu().clone(), d / "step.pt")  # DeepSpeed's universal files hold it on the CPU
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused, foreach=False if fused else None)
    load_universal_into_plain(SimpleNamespace(optimizer=fresh, module=model), tmp_path)
    for p in model.parameters():
        assert fresh.state[p].keys() == ref_opt.state[p].keys()
        for key, value in fresh.state[p].items():
            ref = ref_opt.state[p][key]
            assert (value.device, value.dtype) == (ref.device, ref.dtype), key
            assert torch.equal(value, ref), key
    model(torch.randn(2, 4)).sum().backward()
    fresh.step()  # the fused kernel takes the restored state
    assert float(fresh.state[p]["step"]) == 2.0


def test_fused_adamw_step_goes_to_the_parameter_device():
    """What the CPU cannot show above: the fused ``step`` follows the parameter off the CPU."""
    from mapet_ds.engine.elastic import adamw_step_tensor

    p = torch.empty(3, device="meta")
    for group in ({"fused": True}, {"capturable": True}):
        t = adamw_step_tensor(7.0, p, group)
        assert t.device.type == "meta" and t.dtype == torch.float32
    t = adamw_step_tensor(7.0, p, {"fused": False, "foreach": True})
    assert t.device.type == "cpu" and t.dtype == torch.float32 and float(t) == 7.0
