"""DALI pipelines (CPU mode here): geometry vs PIL/torchvision, sharding, exact resume, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import load_data_tool
from PIL import Image

from mapet_ds.filelist import FileListError, read_filelist, write_filelist
from mapet_ds.pipelines import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    eval_loader,
    finetune_train_loader,
    parse_rand_augment,
    pretrain_loader,
    tokenizer_view_loader,
)

pytest.importorskip("nvidia.dali")

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """20 train + 10 val non-square demo JPEGs (sides 40-50 px), lists beside them."""
    root = tmp_path_factory.mktemp("demo")
    load_data_tool("make_demo").make_demo(root, num_train_per_class=2, num_val_per_class=1, size=40, seed=1)
    return root


def _pil(path) -> Image.Image:
    return Image.open(path).convert("RGB")


def _to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo normalisation: float [3,H,W] -> [0,255] scale."""
    return (x * STD + MEAN) * 255.0


def _assert_close_pixels(d: torch.Tensor) -> None:
    """d: [N,3,H,W] absolute differences in grey levels (0..255)."""
    assert d.mean() < 0.5, d.mean()
    assert d.flatten().quantile(0.99) <= 2.0
    assert d.max() <= 16


# -- tokenizer view -------------------------------------------------------------------------

def test_tokenizer_view_matches_pil_centre_square_in_list_order(demo):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    fl = read_filelist(demo / "train.txt")
    batches = list(tokenizer_view_loader(fl, size=32, batch_size=6, device="cpu"))
    assert [b["images"].shape[0] for b in batches] == [6, 6, 6, 2]
    ids = torch.cat([b["sample_ids"] for b in batches])
    assert ids.dtype == torch.int64 and ids.tolist() == list(range(len(fl)))
    images = torch.cat([b["images"] for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)
    diffs = []
    for i in range(len(fl)):
        pil = _pil(fl.abspath(i))
        side = min(pil.size)
        # the release's view: timm's RandomResizedCrop at scale 1, ratio 1 floors odd margins
        top, left = (pil.size[1] - side) // 2, (pil.size[0] - side) // 2
        ref = TF.resize(TF.crop(pil, top, left, side, side), [32, 32], interpolation=InterpolationMode.BICUBIC)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
        diffs.append((images[i].float() - ref).abs())
    d = torch.stack(diffs)
    # Not bit-exact: DALI's and PIL's JPEG decoders upsample chroma differently and their
    # antialiased cubic kernels round differently. Measured here: mean 0.19 grey levels,
    # 99th percentile 1, max 3 (of 255). A crop or size off by one pixel would shift these
    # sharp-edged shapes and give a mean of several levels.
    _assert_close_pixels(d)


def test_tokenizer_view_shards_cover_list_in_order(demo):
    seen = []
    for rank in range(3):
        loader = tokenizer_view_loader(demo / "train.txt", size=16, batch_size=4, shard_id=rank, num_shards=3)
        ids = [i for b in loader for i in b["sample_ids"].tolist()]
        assert len(loader) == -(-len(ids) // 4)
        seen += ids
    assert seen == list(range(20))


# -- eval --------------------------------------------------------------------------------------

def test_eval_matches_torchvision_reference_and_labels(demo):
    from torchvision import transforms as T

    fl = read_filelist(demo / "train.txt")
    crop_pct = 0.875  # resize shorter side to 36, centre crop 32: odd margins occur
    ref_tf = T.Compose([T.Resize(int(32 / crop_pct), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                        T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    loader = eval_loader(fl, img_size=32, batch_size=8, shard_id=0, num_shards=1, device="cpu", crop_pct=crop_pct)
    assert len(loader) == 3
    diffs, n = [], 0
    for b in loader:
        assert b["images"].dtype == torch.float32 and b["images"].shape == (8, 3, 32, 32)
        for img, sid, y, v in zip(b["images"], b["sample_ids"], b["labels"], b["valid"]):
            if not v:
                continue
            n += 1
            assert int(y) == fl.labels[int(sid)]
            ref = ref_tf(_pil(fl.abspath(int(sid))))
            diffs.append((_to_pixels(img) - _to_pixels(ref)).abs())
    assert n == len(fl)
    d = torch.stack(diffs)
    # Same reasoning as the tokenizer view (decoder + kernel rounding); measured here:
    # mean 0.19 grey levels, 99th percentile 1, max 7.
    _assert_close_pixels(d)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 12])
def test_eval_counts_every_sample_once_for_any_world_size(demo, world):
    fl = read_filelist(demo / "val.txt")  # 10 samples; world 12 leaves two ranks empty
    counted, batches = [], set()
    for rank in range(world):
        loader = eval_loader(fl, img_size=16, batch_size=3, shard_id=rank, num_shards=world, device="cpu")
        out = list(loader)
        batches.add(len(out))
        assert len(out) == len(loader)
        for b in out:
            assert b["valid"].dtype == torch.bool and b["images"].shape == (3, 3, 16, 16)
            counted += b["sample_ids"][b["valid"]].tolist()
            assert b["labels"][b["valid"]].tolist() == [fl.labels[i] for i in b["sample_ids"][b["valid"]]]
    assert sorted(counted) == list(range(10))
    assert len(batches) == 1  # same number of batches on every rank


def test_eval_loader_reiterates_after_partial_pass(demo):
    loader = eval_loader(demo / "val.txt", img_size=16, batch_size=3, shard_id=0, num_shards=1, device="cpu")
    first = next(iter(loader))["sample_ids"].tolist()
    full = [b["sample_ids"].tolist() for b in loader]
    assert full[0] == first == [0, 1, 2] and len(full) == 4


# -- pre-training ------------------------------------------------------------------------------

def _epoch_ids(loader, epochs: int) -> list[list[int]]:
    out = []
    for _ in range(epochs):
        ids = []
        for _ in range(loader.steps_per_epoch):
            ids += next(loader)["sample_ids"].tolist()
        out.append(ids)
    return out


def test_pretrain_two_ranks_disjoint_cover_and_reshuffle(demo):
    ranks = [pretrain_loader(demo / "train.txt", img_size=16, batch_size=5, shard_id=r, num_shards=2, seed=3,
                             device="cpu") for r in range(2)]
    assert all(r.steps_per_epoch == 2 for r in ranks)
    per_rank = [_epoch_ids(r, 3) for r in ranks]
    for e in range(3):
        a, b = per_rank[0][e], per_rank[1][e]
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(20))
    assert per_rank[0][0] != per_rank[0][1]  # a new order every epoch
    assert ranks[0].epoch == 3 and ranks[0].step_in_epoch == 0


def test_pretrain_unequal_shards_stay_in_step(demo):
    # 20 samples over 3 ranks: shards of 6, 7, 7; every rank yields 2 batches of 3 per epoch.
    ranks = [pretrain_loader(demo / "train.txt", img_size=16, batch_size=3, shard_id=r, num_shards=3, seed=0,
                             device="cpu") for r in range(3)]
    assert [r.steps_per_epoch for r in ranks] == [2, 2, 2]
    per_rank = [_epoch_ids(r, 2) for r in ranks]
    for e in range(2):
        ids = [i for r in per_rank for i in r[e]]
        assert len(ids) == len(set(ids)) == 18


def test_pretrain_tokenizer_view_aligned_with_offline_tokenizer(demo):
    """Without jitter, the pre-training views are exactly the tokenizer's pixels."""
    tok = torch.cat([b["images"] for b in tokenizer_view_loader(demo / "train.txt", size=24, batch_size=20)])
    loader = pretrain_loader(demo / "train.txt", img_size=24, batch_size=4, shard_id=0, num_shards=1, seed=0,
                             color_jitter=0.0, tokenizer_view_size=24, device="cpu")
    b = next(loader)
    assert b["tok_images"].dtype == torch.uint8 and b["tok_images"].shape == (4, 3, 24, 24)
    assert torch.equal(b["tok_images"], tok[b["sample_ids"]])
    torch.testing.assert_close(_to_pixels(b["images"]), tok[b["sample_ids"]].float(), atol=1e-3, rtol=0)


def test_pretrain_jitter_and_rrc_views_share_geometry(demo):
    loader = pretrain_loader(demo / "train.txt", img_size=16, batch_size=4, shard_id=0, num_shards=1, seed=1,
                             tokenizer_view_size=16, random_resized_crop=True, device="cpu")
    b = next(loader)
    assert b["images"].shape == (4, 3, 16, 16) and "labels" not in b
    # Same crop, flip and jitter at the same size: the two views hold the same pixels.
    torch.testing.assert_close(_to_pixels(b["images"]), b["tok_images"].float(), atol=1e-3, rtol=0)


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("stop_after", [3, 5])  # mid-epoch, and exactly at the epoch boundary
def test_pretrain_resume_reproduces_following_batches(demo, stop_after):
    kw = dict(img_size=16, batch_size=4, shard_id=0, num_shards=1, seed=11, tokenizer_view_size=8, device="cpu")
    loader = pretrain_loader(demo / "train.txt", **kw)  # 5 steps per epoch
    for _ in range(stop_after):
        next(loader)
    state = loader.state()
    assert isinstance(json.loads(state), dict)
    expected = [next(loader) for _ in range(7)]  # crosses into the next epoch
    resumed = pretrain_loader(demo / "train.txt", checkpoint=state, **kw)
    assert (resumed.epoch, resumed.step_in_epoch) == divmod(stop_after, 5)
    _assert_same_batches([next(resumed) for _ in range(7)], expected)


def test_resume_with_other_settings_is_refused(demo):
    kw = dict(img_size=16, batch_size=4, shard_id=0, num_shards=1, seed=11, device="cpu")
    state = pretrain_loader(demo / "train.txt", **kw).state()
    with pytest.raises(ValueError, match="batch_size: saved 4, now 2"):
        pretrain_loader(demo / "train.txt", **{**kw, "batch_size": 2}, checkpoint=state)
    with pytest.raises(ValueError, match="not a mapet_ds.pipelines"):
        pretrain_loader(demo / "train.txt", **kw, checkpoint="{}")


# -- fine-tuning -------------------------------------------------------------------------------

def test_finetune_labels_follow_list_and_resume_exactly(demo):
    fl = read_filelist(demo / "train.txt")
    kw = dict(img_size=24, batch_size=6, shard_id=0, num_shards=1, seed=5, device="cpu",
              rand_augment="rand-m9-mstd0.5")
    loader = finetune_train_loader(fl, **kw)  # 3 steps per epoch
    first = [next(loader) for _ in range(2)]
    state = loader.state()
    expected = [next(loader) for _ in range(3)]
    for b in first + expected:
        assert b["images"].shape == (6, 3, 24, 24) and b["labels"].dtype == torch.int64
        assert b["labels"].tolist() == [fl.labels[i] for i in b["sample_ids"].tolist()]
    assert torch.isfinite(torch.stack([b["images"] for b in expected])).all()
    resumed = finetune_train_loader(fl, checkpoint=state, **kw)
    _assert_same_batches([next(resumed) for _ in range(3)], expected)


def _square_list(tmp_path, n=4, side=48):
    rng = np.random.default_rng(3)
    entries = []
    for i in range(n):
        a = np.clip(rng.normal(128, 60, (side // 4, side // 4, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).resize((side, side), Image.NEAREST).save(tmp_path / f"sq{i}.png")  # sharp edges
        entries.append((f"sq{i}.png", i % 2))
    return write_filelist(tmp_path / "sq.txt", entries)


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_finetune_crop_resize_follows_interpolation(tmp_path, interp):
    """With the crop pinned to the whole (square) image, the fine-tune view is the eval view
    (crop_pct 1) resized with the same kernel, and differs from the other kernel's."""
    fl = read_filelist(_square_list(tmp_path))
    kw = dict(img_size=20, batch_size=4, shard_id=0, num_shards=1, device="cpu")
    ft = next(finetune_train_loader(fl, seed=0, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, rand_augment=None,
                                    interpolation=interp, **kw))
    order = ft["sample_ids"].argsort()
    ref = {k: next(iter(eval_loader(fl, crop_pct=1.0, interpolation=k, **kw)))["images"]
           for k in ("bicubic", "bilinear")}
    other = "bilinear" if interp == "bicubic" else "bicubic"
    same = (_to_pixels(ft["images"][order]) - _to_pixels(ref[interp])).abs()
    diff = (_to_pixels(ft["images"][order]) - _to_pixels(ref[other])).abs()
    assert same.max() < 0.01 and diff.max() > 5, (same.max(), diff.max())


def test_parse_rand_augment():
    ra = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.magnitude_std, ra.increasing, ra.prob) == (9.0, 2, 0.5, True, 0.5)
    assert parse_rand_augment("rand-m7-n3-p0.8").num_ops == 3
    with pytest.raises(ValueError, match="unsupported part 'x0.5'"):
        parse_rand_augment("rand-m9-x0.5")
    with pytest.raises(ValueError, match="timm RandAugment string"):
        parse_rand_augment("auto-m9")


# -- errors ------------------------------------------------------------------------------------

def test_clear_errors_for_bad_lists(tmp_path, demo):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(FileListError, match="empty.txt.*empty"):
        tokenizer_view_loader(empty, size=16, batch_size=2)

    with pytest.raises(FileListError, match="does not exist"):
        eval_loader(tmp_path / "nope.txt", img_size=16, batch_size=2, shard_id=0, num_shards=1)

    copy = tmp_path / "copy"
    shutil.copytree(demo / "val", copy / "val")
    fl = read_filelist(demo / "val.txt")
    write_filelist(copy / "val.txt", zip(fl.paths, fl.labels))
    gone = copy / fl.paths[3]
    gone.unlink()
    with pytest.raises(FileListError, match=f"{fl.paths[3]}.*do not exist|do not exist.*{fl.paths[3]}"):
        pretrain_loader(copy / "val.txt", img_size=16, batch_size=2, shard_id=0, num_shards=1, seed=0)

    shutil.rmtree(copy / "val")  # the whole image root of the list is gone
    (copy / "val.txt").rename(tmp_path / "val.txt")
    shutil.rmtree(copy)
    with pytest.raises(FileListError, match="val.txt"):
        eval_loader(tmp_path / "val.txt", img_size=16, batch_size=2, shard_id=0, num_shards=1)

    with pytest.raises(ValueError, match="device='tpu'|device=.tpu."):
        eval_loader(demo / "val.txt", img_size=16, batch_size=2, shard_id=0, num_shards=1, device="tpu")
    with pytest.raises(ValueError, match="no full batch"):
        pretrain_loader(demo / "val.txt", img_size=16, batch_size=8, shard_id=0, num_shards=2, seed=0)


def test_unscanned_list_errors_name_the_file_line_and_the_scan(tmp_path):
    from mapet_ds.pipelines import PipelineRunError
    from mapet_ds.pipelines.common import locate_failure

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"ok{i}.jpg")
    (tmp_path / "text.jpg").write_text("not an image\n" * 20)
    (tmp_path / "empty.jpg").write_bytes(b"")
    hint = "(run data/scan.py {} --out <dir> to drop or repair broken files, then use its clean list)"
    lst = tmp_path / "a.txt"
    lst.write_text("# comment lines do not count as samples\n" + "".join(f"ok{i}.jpg\t0\n" for i in range(3))
                   + "text.jpg\t0\n" + "".join(f"ok{i}.jpg\t0\n" for i in range(3, 6)))
    with pytest.raises(PipelineRunError) as e:
        for _ in eval_loader(lst, img_size=16, batch_size=2, shard_id=0, num_shards=1, device="cpu"):
            pass
    assert str(e.value) == (f"DALI pipeline over {lst} failed: nvImageCodec failure: '#4'; {lst}:5: text.jpg: "
                            f"not an image {hint.format(lst)}")
    with pytest.raises(PipelineRunError, match=rf"; {lst}:5: text.jpg: not an image \(run data/scan.py"):
        loader = pretrain_loader(lst, img_size=16, batch_size=2, shard_id=0, num_shards=1, seed=3, device="cpu")
        for _ in range(8):
            next(loader)

    lst.write_text("".join(f"ok{i}.jpg\t0\n" for i in range(3)) + "empty.jpg\t1\n")
    with pytest.raises(FileListError) as e:
        tokenizer_view_loader(lst, size=16, batch_size=2)
    assert str(e.value) == f"{lst}:4: empty.jpg is an empty file (0 bytes): {hint.format(lst)[1:-1]}"
    # a file emptied after the list was loaded: DALI's reader names it, we name its line
    fl = read_filelist(lst)  # (reading alone does not stat the images)
    assert locate_failure(fl, f"File mapping failed: {tmp_path}/empty.jpg", None) == f"{lst}:4: empty.jpg: empty file"


def test_colour_jitter_contrast_pivots_on_the_image_mean():
    """torchvision/PIL contrast: out = (x - M) * c + M with M the image's mean grey level."""
    from nvidia.dali import fn, pipeline_def, types

    from mapet_ds.pipelines.common import color_jitter

    img = np.full((8, 8, 3), 200, np.uint8)
    img[:, :4] = 40  # mean grey level M = 120
    from torchvision.transforms import functional as TF

    ref = TF.adjust_contrast(torch.from_numpy(img).permute(2, 0, 1), 0.5).permute(1, 2, 0).numpy()

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(lambda: [img], batch=True, layout="HWC")
        one = types.Constant(1.0)
        return color_jitter(x, brightness=one, contrast=types.Constant(0.5), saturation=one)

    p = pipe()
    p.build()
    out = np.asarray(p.run()[0][0])
    assert out[0, 0].tolist() == [80, 80, 80] and out[0, 7].tolist() == [160, 160, 160]  # DALI color_twist: 84, 164
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
