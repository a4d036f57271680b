"""Webdataset shards: make_shards contents and resume, DALI shard loaders, training on shards."""

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, load_data_tool, run_py

PRETRAIN = REPO / "launch/pretrain.py"
ZERO2 = REPO / "ds_configs/zero2.json"


def _read_shards(folder):
    """{sample id: {ext: bytes}} over every tar of a shard folder, plus the keys in stored order."""
    samples, order = {}, []
    for tar_path in sorted(Path(folder).glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
                if not order or order[-1] != key:
                    order.append(key)
    return samples, order


@pytest.fixture(scope="module")
def shards(demo_workspace):
    ws = demo_workspace
    proc = run_py([REPO / "data/make_shards.py", "data/train.txt", "--token-store", "tokens", "--out", "shards/train",
                   "--shard-size", "60KB", "--workers", "2", "--no-progress"], cwd=ws)
    assert proc.stdout.startswith("160 samples in ")
    run_py([REPO / "data/make_shards.py", "data/val.txt", "--out", "shards/val", "--shard-size", "40KB",
            "--no-progress"], cwd=ws)
    return ws


def test_shards_hold_the_lists_samples_labels_and_tokens(shards):
    from mapet_ds.filelist import read_filelist
    from mapet_ds.tokenizers.store import TokenStore, spec_fingerprint

    ws = shards
    fl, store = read_filelist(ws / "data/train.txt"), TokenStore.open(ws / "tokens")
    samples, order = _read_shards(ws / "shards/train")
    assert sorted(int(k) for k in samples) == list(range(len(fl)))
    assert [int(k) for k in order] != list(range(len(fl)))  # seeded random order, not list order
    for key, s in samples.items():
        sid = int(key)
        assert set(s) == {"jpg", "cls", "id", "tok"}
        assert s["jpg"] == Path(fl.abspath(sid)).read_bytes()  # image bytes as they are
        assert np.frombuffer(s["id"], "<i8")[0] == sid and np.frombuffer(s["cls"], "<i8")[0] == fl.labels[sid]
        assert np.array_equal(np.frombuffer(s["tok"], "<i2"), store.tokens[sid])
    m = json.loads((ws / "shards/train/manifest.json").read_text())
    assert m["num_samples"] == 160 and m["num_dropped"] == 0 and m["num_classes"] == 10 and len(m["classes"]) == 10
    assert m["tokenizer"]["fingerprint"] == spec_fingerprint(store.spec)
    assert (m["tokenizer"]["grid"], m["tokenizer"]["vocab"]) == (4, 64)
    assert len(m["shards"]) > 2 and sum(s["count"] for s in m["shards"]) == 160
    for s in m["shards"]:  # DALI index beside each tar, one line per sample
        idx = (ws / "shards/train" / s["idx"]).read_text().splitlines()
        assert idx[0] == f"v1.2 {s['count']}" and len(idx) == s["count"] + 1


def test_make_shards_drops_broken_images_and_resumes(demo_workspace, tmp_path):
    ms = load_data_tool("make_shards")
    ws = demo_workspace
    lines = (ws / "data/train.txt").read_text().splitlines()[:30]
    root = tmp_path / "imgs"
    root.mkdir()
    for ln in lines:
        rel = ln.split("\t")[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((ws / "data" / rel).read_bytes())
    good = (root / lines[0].split("\t")[0]).read_bytes()
    (root / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "text.JPEG").write_text("not an image")
    (root / "list.txt").write_text("\n".join(lines + ["truncated.JPEG\t1", "text.JPEG\t2"]) + "\n")
    m = ms.make_shards(root / "list.txt", tmp_path / "out", shard_size=20_000, workers=1, progress=False)
    assert m["num_samples"] == 30 and m["num_dropped"] == 2
    assert {(d["sample_id"], d["issues"][0]) for d in m["dropped"]} == {(30, "truncated"), (31, "undecodable")}
    samples, _ = _read_shards(tmp_path / "out")
    assert sorted(int(k) for k in samples) == list(range(30))
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("shard-*")}
    assert len(first) >= 6

    # a killed run: shard 1's marker never written (partial temp tar left), shard 2's tar lost
    out = tmp_path / "out"
    (out / "progress/shard-000001.json").unlink()
    (out / "shard-000001.tar.tmp4242").write_bytes(b"partial")
    (out / "shard-000002.tar").unlink()
    (out / "manifest.json").unlink()
    t0 = os.stat(out / "shard-000000.tar").st_mtime_ns
    m2 = ms.make_shards(root / "list.txt", out, shard_size=20_000, workers=2, progress=False)
    assert m2 == m
    assert os.stat(out / "shard-000000.tar").st_mtime_ns == t0  # finished shards are kept
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == first  # and the redone ones are identical
    assert not list(out.glob("*.tmp*"))
    with pytest.raises(ms.ShardMakeError, match="is not empty and holds no plan.json of make_shards"):
        ms.make_shards(root / "list.txt", root, workers=1, progress=False)
    with pytest.raises(ms.ShardMakeError, match=r"holds shards made with other settings \(seed: 0 -> 1\)"):
        ms.make_shards(root / "list.txt", out, shard_size=20_000, seed=1, workers=1, progress=False)


def test_two_ranks_see_every_sample_once_per_epoch_with_labels_and_tokens(shards):
    from mapet_ds.filelist import read_filelist
    from mapet_ds.pipelines.shards import eval_shard_loader, pretrain_shard_loader
    from mapet_ds.tokenizers.store import TokenStore

    ws = shards
    fl, store = read_filelist(ws / "data/train.txt"), TokenStore.open(ws / "tokens")
    labels = torch.tensor(fl.labels)
    epochs = {0: [], 1: []}
    for rank in range(2):
        loader = pretrain_shard_loader(ws / "shards/train", img_size=64, batch_size=8, shard_id=rank, num_shards=2,
                                       seed=3, num_threads=1, device="cpu", tokenizer_view_size=32)
        assert loader.steps_per_epoch == 10
        for epoch in range(2):
            for _ in range(loader.steps_per_epoch):
                b = next(loader)
                assert b["images"].shape == (8, 3, 64, 64) and b["tok_images"].shape == (8, 3, 32, 32)
                assert torch.equal(b["labels"], labels[b["sample_ids"]])
                assert b["tokens"].dtype == torch.int16 and torch.equal(b["tokens"].long(),
                                                                         store.rows(b["sample_ids"]))
                epochs[epoch] += b["sample_ids"].tolist()
    for ids in epochs.values():
        assert sorted(ids) == list(range(160))
    assert epochs[0] != epochs[1]  # reshuffled

    # fine-tuning batches take their labels from the shards too
    from mapet_ds.pipelines.shards import finetune_shard_loader

    b = next(finetune_shard_loader(ws / "shards/train", img_size=64, batch_size=8, shard_id=0, num_shards=2, seed=0,
                                   num_threads=1, device="cpu", rand_augment=None))
    assert b["images"].shape == (8, 3, 64, 64) and torch.equal(b["labels"], labels[b["sample_ids"]])

    # state() after an epoch boundary: a loader rebuilt from it yields the same batches bitwise
    kw = dict(img_size=64, batch_size=8, shard_id=1, num_shards=2, seed=3, num_threads=1, device="cpu")
    loader = pretrain_shard_loader(ws / "shards/train", **kw)
    for _ in range(12):
        next(loader)
    state = loader.state()
    ahead = [next(loader) for _ in range(9)]  # crosses into epoch 2
    again = pretrain_shard_loader(ws / "shards/train", checkpoint=state, **kw)
    for a, b in zip(ahead, (next(again) for _ in range(9))):
        assert all(torch.equal(a[k], b[k]) for k in ("images", "sample_ids", "labels", "tokens"))
    with pytest.raises(ValueError, match="num_shards: saved 2, now 4"):
        pretrain_shard_loader(ws / "shards/train", checkpoint=state, **{**kw, "num_shards": 4})

    # eval: 3 ranks, padding masked out, every val sample counted once with its label
    val = read_filelist(ws / "data/val.txt")
    seen = []
    for rank in range(3):
        loader = eval_shard_loader(ws / "shards/val", img_size=64, batch_size=8, shard_id=rank, num_shards=3,
                                   num_threads=1, device="cpu")
        assert len(loader) == 3  # ceil(ceil(50 / 3) / 8) on every rank
        for b in loader:
            ids = b["sample_ids"][b["valid"]]
            assert torch.equal(b["labels"][b["valid"]], torch.tensor(val.labels)[ids])
            seen += ids.tolist()
    assert sorted(seen) == list(range(50))
    # the same pixels as the file-list eval loader, sample by sample
    from mapet_ds.pipelines import eval_loader

    ref = {}
    for b in eval_loader(val, img_size=64, batch_size=16, shard_id=0, num_shards=1, num_threads=1, device="cpu"):
        ref.update({int(i): im for i, im, v in zip(b["sample_ids"], b["images"], b["valid"]) if v})
    for b in eval_shard_loader(ws / "shards/val", img_size=64, batch_size=16, shard_id=0, num_shards=1,
                               num_threads=1, device="cpu"):
        assert all(torch.equal(im, ref[int(i)]) for i, im, v in zip(b["sample_ids"], b["images"], b["valid"]) if v)


def test_pretrain_on_shards_resumes_bitwise_after_sigkill(shards):
    ws = shards
    base = ["--ds_config", ZERO2, "--config", "pretrain.yaml", "data.train_list=null",
            "data.train_shards=shards/train"]
    run_py([PRETRAIN, *base, "pretrain.output_dir=runs/sh_full"], cwd=ws)
    full = (ws / "runs/sh_full/metrics.jsonl").read_text()
    assert len(full.splitlines()) == 8
    killed = run_py([PRETRAIN, *base, "pretrain.output_dir=runs/sh_kill"], cwd=ws, env={"MAPET_FAULT": "step:6"},
                    check=False)
    assert killed.returncode == -9
    resumed = run_py([PRETRAIN, *base, "pretrain.output_dir=runs/sh_kill"], cwd=ws)
    assert "resumed from runs/sh_kill/checkpoints/step00000004" in resumed.stdout
    assert (ws / "runs/sh_kill/metrics.jsonl").read_text() == full  # bitwise-equal losses (fp32 CPU)


def test_mismatched_shards_are_refused_in_one_line(shards, tmp_path):
    from mapet_ds.config import ConfigError, load_config
    from mapet_ds.pipelines.shards import ShardSetError, check_tokens, open_shards

    ws = shards
    proc = run_py([PRETRAIN, "--ds_config", ZERO2, "--config", "pretrain.yaml", "data.train_list=null",
                   "data.train_shards=shards/train", "tokenizer.vocab_size=128", "pretrain.output_dir=runs/sh_bad"],
                  cwd=ws, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    fp = json.loads((ws / "shards/train/manifest.json").read_text())["tokenizer"]["fingerprint"]
    assert proc.stderr == (f"error: shard set shards/train (tokenizer {fp[:12]}) has vocab 64 but "
                           f"tokenizer.vocab_size=128: set tokenizer.vocab_size=64, or make the shards again with "
                           f"data/make_shards.py from a matching store\n")
    ss = open_shards(ws / "shards/train")
    check_tokens(ss, grid=4, vocab=64, kind="pixel_kmeans", fingerprint=fp[:8], codebook=str(ws / "codebook.pt"),
                 token_store=str(ws / "tokens"), pixel_norm="luma")  # the matching recipe passes
    for kw, msg in [({"grid": 14}, "has a 4x4 token grid but the model's patch grid is 14x14"),
                    ({"kind": "kclip"}, "holds k-means tokens of a 'pixel' extractor, but tokenizer.kind=kclip"),
                    ({"fingerprint": "0123abcd"}, "does not match tokenizer.fingerprint=0123abcd"),
                    ({"pixel_norm": "patch"}, "holds tokens made with pixel_norm=luma but tokenizer.pixel_norm=patch")]:
        with pytest.raises(ShardSetError, match=msg):
            check_tokens(ss, **{"grid": 4, "vocab": 64, **kw})
    # the store's tokenizer view travels in the manifest; a random-resized-crop run is refused
    from mapet_ds.pipelines.graphs import pretrain_view_spec

    store_view = json.loads((ws / "tokens/meta.json").read_text())["view"]
    assert ss.tokenizer["view"] == store_view and store_view["crop"] == "center_square"
    check_tokens(ss, grid=4, vocab=64, view=pretrain_view_spec(False))
    with pytest.raises(ShardSetError, match=r"holds tokens of another view than training uses \(crop "
                                            r"'center_square' vs 'random_resized_crop'\)"):
        check_tokens(ss, grid=4, vocab=64, view=pretrain_view_spec(True))
    with pytest.raises(ShardSetError, match="carries no tokens"):
        check_tokens(open_shards(ws / "shards/val"), grid=4, vocab=64)
    with pytest.raises(ShardSetError, match=r"no shard set at .*nope \(no manifest.json\)"):
        open_shards(tmp_path / "nope")
    with pytest.raises(ConfigError, match="set data.train_list or data.train_shards, not both"):
        load_config(ws / "pretrain.yaml", ["data.train_shards=shards/train"])


def test_tokens_assign_writes_the_same_shards(shards):
    ws = shards
    proc = run_py([REPO / "launch/tokens.py", "assign", "--filelist", "data/train.txt", "--codebook", "codebook.pt",
                   "--out", "tokens", "--shards-out", "shards/via_assign", "--shard-size", "60KB"], cwd=ws)
    assert "160 samples with their tokens in" in proc.stdout
    made = {p.name: p.read_bytes() for p in (ws / "shards/train").glob("shard-*")}
    assert {p.name: p.read_bytes() for p in (ws / "shards/via_assign").glob("shard-*")} == made


def test_shard_loader_states_are_not_resharded():
    """An elastic resume of a shard run on another world size is refused in one line: which
    samples a shard reader used sits in DALI's shuffle buffer, not in its state."""
    from mapet_ds.pipelines.loaders import STATE_FORMAT, merge_rank_states

    states = [json.dumps({"format": STATE_FORMAT, "kind": "pretrain_shards", "epoch": 0, "step": 3})] * 2
    with pytest.raises(ValueError, match=r"^a run on shards \(data.train_shards\) resumes only on the world size it "
                                         r"was saved with: start it on 2 rank\(s\)$"):
        merge_rank_states(states)
