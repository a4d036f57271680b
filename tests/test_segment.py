"""Segmentation pieces without a launcher: metrics vs a hand-computed confusion matrix, the
model (shapes, layer decay groups, checkpoint loading), sliding windows, make_seglist checks,
mask/image alignment through the DALI training geometry, the cat_max_ratio crop choice, and
exact resume of the training loader."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO, run_py
from PIL import Image

from mapet_ds.config import ConfigError, ModelConfig, SegmentConfig
from mapet_ds.engine.seg_metrics import confusion_histogram, iou_table, seg_metrics


def test_metrics_match_a_hand_computed_confusion_matrix():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    hist = confusion_histogram(pred, label, num_classes=4, ignore_index=255)
    # rows = ground truth, cols = prediction; the ignored pixel is not counted; class 3 absent
    assert hist.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = seg_metrics(hist)
    # IoU: c0 1/(2+3-1)=1/4, c1 2/(3+3-2)=1/2, c2 1/(2+1-1)=1/2, c3 NaN (neither GT nor predicted)
    assert m["iou"][:3] == pytest.approx([0.25, 0.5, 0.5]) and math.isnan(m["iou"][3])
    assert m["acc"][:3] == pytest.approx([0.5, 2 / 3, 0.5]) and math.isnan(m["acc"][3])
    assert m["mIoU"] == pytest.approx(100 * (0.25 + 0.5 + 0.5) / 3)
    assert m["mAcc"] == pytest.approx(100 * (0.5 + 2 / 3 + 0.5) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 7)
    # a class predicted but absent from the ground truth counts with IoU 0 (mmseg)
    m2 = seg_metrics(confusion_histogram(torch.tensor([3]), torch.tensor([0]), 4))
    assert m2["iou"][3] == 0.0 and m2["mIoU"] == 0.0
    table = iou_table(m, ["a", "b", "c", "d"])
    assert table.splitlines()[1] == "0\ta\t25.00\t50.00\t2" and "3\td\tnan\tnan\t0" in table
    # summing histograms of shards == the histogram of the whole (what the all-reduce relies on)
    parts = confusion_histogram(pred[:1], label[:1], 4) + confusion_histogram(pred[1:], label[1:], 4)
    assert torch.equal(parts, hist)


def _seg(**kw):
    base = dict(num_classes=5, crop_size=32, eval_stride=21, out_indices=(0, 0, 1, 1), decoder_channels=16,
                aux_channels=8)
    return SegmentConfig(**{**base, **kw})


def test_model_shapes_layer_decay_and_checkpoint_loading():
    from timm.optim import param_groups_layer_decay

    from mapet_ds.models.classifier import build_classifier
    from mapet_ds.models.segmentation import build_segmenter, load_backbone_into_segmenter

    mc = ModelConfig(size=None, embed_dim=48, depth=3, num_heads=3, img_size=64, patch_size=8, drop_path=0.0)
    model = build_segmenter(mc, _seg())
    assert len(model.backbone.blocks) == 2  # blocks after the last tapped one are not built
    x = torch.randn(2, 3, 32, 32)
    levels = model.features(x)
    assert [tuple(f.shape[-2:]) for f in levels] == [(16, 16), (8, 8), (4, 4), (2, 2)]  # rescales 4, 2, 1, 0.5
    logits, aux = model(x)
    assert logits.shape == (2, 5, 16, 16) and aux.shape == (2, 5, 4, 4)
    model.eval()
    assert model(x)[1] is None
    groups = param_groups_layer_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["backbone.pos_embed"] == 0.5 ** 3 and scale["backbone.blocks.1.attn.qkv.weight"] == 0.5
    assert scale["decoder.fusion_block.0.weight"] == 1.0 and scale["aux.cls.weight"] == 1.0
    # a 64 px classifier (8x8 grid) -> the 32 px crop (4x4): pos_embed resampled, head/norm dropped
    clf = build_classifier(mc, 10)
    rep = load_backbone_into_segmenter(model, clf.state_dict())
    assert rep["resampled"] == ["pos_embed (1, 65, 48) -> (1, 17, 48)"]
    assert "blocks.2.attn.qkv.weight" in rep["dropped"] and "head.weight" in rep["dropped"]
    assert torch.equal(model.backbone.blocks[1].mlp.fc1.weight, clf.blocks[1].mlp.fc1.weight)
    wide = build_classifier(ModelConfig(size=None, embed_dim=96, depth=2, num_heads=3, img_size=64, patch_size=8), 10)
    with pytest.raises(ValueError, match="pos_embed has width 96 but the segmenter's backbone has 48"):
        load_backbone_into_segmenter(model, wide.state_dict())
    with pytest.raises(ConfigError, match="out_indices=\\[0, 0, 1, 5\\]: the backbone has only 3 blocks"):
        build_segmenter(mc, _seg(out_indices=(0, 0, 1, 5)))
    with pytest.raises(ValueError, match="eval_stride=40 > crop_size=32"):
        _seg(eval_stride=40)


def test_sliding_windows_cover_every_pixel():
    from mapet_ds.engine.seg_eval import slide_logits
    from mapet_ds.pipelines.segmentation import eval_windows

    assert eval_windows(512, 683, 512, 341) == [(0, 0), (0, 171)]
    assert eval_windows(20, 30, 32, 21) == [(0, 0)]  # smaller than a window: one padded window

    class Ones(torch.nn.Module):  # logits of 1 everywhere, at 1/4 resolution
        def forward(self, x):
            return torch.ones(x.shape[0], 2, x.shape[2] // 4, x.shape[3] // 4), None

    out = slide_logits(Ones(), torch.rand(1, 3, 32, 75), crop=32, stride=21, flip=True)
    assert out.shape == (1, 2, 32, 75)
    # every pixel is covered (no 0/0) and gets the mean over its windows (x2: the flip adds a pass)
    assert torch.equal(out, torch.full_like(out, 2.0))


def _palette_dataset(root, n=6, size=(72, 56), cell=8, k=6, seed=0):
    """PNG images of flat colour cells (k colours) and masks derived from the colours (1..k)."""
    rng = np.random.default_rng(seed)
    pal = rng.integers(0, 256, (k, 3)).astype(np.uint8)
    pal[:, 0] = np.arange(k) * 40 + 20  # well separated colours
    lines = []
    for i in range(n):
        w, h = size[0] + 8 * i, size[1]
        cells = rng.integers(0, k, (h // cell + 1, w // cell + 1))
        lab = np.kron(cells, np.ones((cell, cell), dtype=np.int64))[:h, :w]
        Image.fromarray(pal[lab]).save(root / f"im{i}.png")
        Image.fromarray((lab + 1).astype(np.uint8), mode="L").save(root / f"m{i}.png")
        lines.append(f"im{i}.png\tm{i}.png\n")
    (root / "list.txt").write_text("".join(lines))
    return pal


@pytest.mark.parametrize("cat_max_ratio", [1.0, 0.75])  # uniform crop; crop chosen among 11 by class shares
def test_mask_stays_aligned_with_the_image_through_rescale_crop_flip(tmp_path, cat_max_ratio):
    from mapet_ds.pipelines.segmentation import read_seglist, seg_train_loader

    pal = _palette_dataset(tmp_path)
    sl = read_seglist(tmp_path / "list.txt")
    loader = seg_train_loader(sl, crop=32, img_scale=(160, 40), ratio_range=(0.5, 2.0), hflip=0.5,
                              photometric=False, reduce_zero_label=True, ignore_index=255, batch_size=6,
                              shard_id=0, num_shards=1, seed=3, num_threads=1, device="cpu",
                              cat_max_ratio=cat_max_ratio)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    agree, labelled, padded = 0, 0, 0
    for _ in range(3):
        b = next(loader)
        img = (b["images"].permute(0, 2, 3, 1).numpy() * std + mean) * 255  # [B,S,S,3]
        masks = b["masks"].numpy()
        nearest = np.abs(img[..., None, :] - pal[None, None, None].astype(float)).sum(-1).argmin(-1)
        valid = masks != 255
        agree += int((nearest[valid] == masks[valid]).sum())
        labelled += int(valid.sum())
        # padding: the ignore label in the mask, the mean colour (0 after normalising) in the image
        pad = ~valid
        padded += int(pad.sum())
        assert np.allclose(b["images"].permute(0, 2, 3, 1).numpy()[pad], 0.0)
    assert labelled > 0 and padded > 0  # ratio 0.5 makes crops smaller than 32 px, so padding happened
    # only bilinear seams between cells may differ; a flip, shift or scale mismatch gives ~1/6
    assert agree / labelled > 0.9, agree / labelled


def _position_loader(root, mask, *, cat_max_ratio, n=32, seed=0):
    """n copies of a 64x64 image whose pixel (y, x) has colour (y, x, 0), with ``mask``; loaded
    unscaled (img_scale 64, ratio 1) as 32 px crops, so a crop's top-left colour is its anchor."""
    from mapet_ds.pipelines.segmentation import CAT_MAX_GRID, read_seglist, seg_train_loader

    assert CAT_MAX_GRID >= 32  # the crop is its own count grid: the pipeline's class shares are exact
    yx = np.stack([*np.meshgrid(np.arange(64), np.arange(64), indexing="ij"), np.zeros((64, 64), int)], -1)
    Image.fromarray(yx.astype(np.uint8)).save(root / "pos.png")
    Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "mask.png")
    (root / "list.txt").write_text("pos.png\tmask.png\n" * n)
    return seg_train_loader(read_seglist(root / "list.txt"), crop=32, img_scale=(64, 64), ratio_range=(1.0, 1.0),
                            hflip=0.0, photometric=False, reduce_zero_label=False, ignore_index=255,
                            batch_size=n, shard_id=0, num_shards=1, seed=seed, num_threads=1, device="cpu",
                            cat_max_ratio=cat_max_ratio)


def _crops_and_anchors(batch, mask):
    """-> mask crops int [B,32,32], anchors [(y, x)]; checks each image crop is the 32x32 window
    of the position image at its anchor and the mask crop the same window of ``mask``."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    img = np.rint((batch["images"].permute(0, 2, 3, 1).numpy() * std + mean) * 255).astype(int)
    anchors = []
    for im, m in zip(img, batch["masks"].numpy()):
        y, x = im[0, 0, :2]
        assert 0 <= y <= 32 and 0 <= x <= 32
        assert (im[..., 0] == np.arange(y, y + 32)[:, None]).all() and (im[..., 1] == np.arange(x, x + 32)).all()
        assert np.array_equal(m, mask[y:y + 32, x:x + 32])  # the mask was cut at the image's anchor
        anchors.append((int(y), int(x)))
    return batch["masks"].numpy(), anchors


def _passes_cat_max(crop, ratio=0.75, ignore=255):
    """mmseg's test on a mask crop: > 1 class and the largest under ``ratio`` of the labelled pixels."""
    _, counts = np.unique(crop[crop != ignore], return_counts=True)
    return len(counts) > 1 and counts.max() < ratio * counts.sum()


def test_cat_max_ratio_redraws_crops_one_class_dominates(tmp_path):
    # class 1 on a 36 px top-left block, ignore on the right 16 columns, class 0 elsewhere: a
    # uniform 32 px anchor passes mmseg's test with p ~ 0.56, so one of 32 crops fails all 11
    # tries with p ~ 0.004; counting the ignore label as a class would wrongly pass ~20% more
    # anchors. Shares are exact here (see _position_loader).
    mask = np.zeros((64, 64), np.uint8)
    mask[:36, :36] = 1
    mask[:, 48:] = 255
    crops, anchors = _crops_and_anchors(next(_position_loader(tmp_path, mask, cat_max_ratio=0.75)), mask)
    assert all(_passes_cat_max(c) for c in crops)
    assert len(set(anchors)) > 16  # still random crops
    crops, _ = _crops_and_anchors(next(_position_loader(tmp_path, mask, cat_max_ratio=1.0)), mask)
    failing = sum(not _passes_cat_max(c) for c in crops)
    assert failing >= 8, failing  # uniform crops: ~44% fail, so the check above can fail


def test_cat_max_ratio_falls_back_to_a_crop_on_a_one_class_mask(tmp_path):
    one = np.full((64, 64), 3, np.uint8)  # no anchor passes: the last draw is used
    crops, anchors = _crops_and_anchors(next(_position_loader(tmp_path, one, cat_max_ratio=0.75)), one)
    assert (crops == 3).all() and len(set(anchors)) > 16  # aligned (checked inside), still random


def test_cat_max_crop_takes_the_first_passing_draw_else_the_last(monkeypatch):
    # _cat_max_crop on its own, its 11 candidate anchors recorded (the roi_start of each count
    # grid), its choice vs mmseg's loop run on the exact crops (a crop of CAT_MAX_GRID px is its
    # own grid) of random rectangles, ignore stripes and an all-ignore mask
    from nvidia.dali import fn, math as dmath, pipeline_def

    from mapet_ds.pipelines.segmentation import CAT_MAX_GRID, CAT_MAX_REDRAWS, _cat_max_crop

    rng = np.random.default_rng(0)
    H, W, crop = 150, 170, CAT_MAX_GRID
    masks = []
    for i in range(16):
        m = np.zeros((H, W), np.uint8)
        for _ in range(i % 5):
            (y, x), (h, w) = rng.integers(0, 130, 2), rng.integers(10, 80, 2)
            m[y:y + h, x:x + w] = rng.integers(1, 6)
        m[:, :30 * (i % 3 == 0)] = 255
        masks.append(m if i < 15 else np.full((H, W), 255, np.uint8))
    rois, resize = [], fn.resize
    monkeypatch.setattr(fn, "resize", lambda *a, **k: rois.append(k["roi_start"]) or resize(*a, **k))

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=1)
    def pipe():
        msk = fn.external_source(source=lambda: [m[..., None] for m in masks], batch=True, layout="HWC")
        nh, nw = fn.constant(fdata=float(H), shape=[]), fn.constant(fdata=float(W), shape=[])
        start0 = dmath.floor(fn.random.uniform(range=[0.0, 1.0], shape=[2]) * (fn.stack(nh, nw) - crop + 1.0))
        return (_cat_max_crop(msk, start0, nh, nw, crop=crop, ratio=0.75, ignore_index=255), *rois)

    p = pipe()
    p.build()
    fallbacks = 0
    for _ in range(2):
        chosen, *cands = p.run()
        assert len(cands) == 1 + CAT_MAX_REDRAWS
        for i, m in enumerate(masks):
            starts = [tuple(np.array(c[i]).astype(int)) for c in cands]
            passing = [_passes_cat_max(m[y:y + crop, x:x + crop]) for y, x in starts]
            expect = starts[passing.index(True)] if any(passing) else starts[-1]
            assert tuple(np.array(chosen[i]).astype(int)) == expect, (i, starts, passing)
            fallbacks += not any(passing)
            assert (not any(passing)) or i < 15
    assert 2 <= fallbacks <= 24  # both branches taken (the all-ignore mask falls back twice)


@pytest.mark.parametrize("cat_max_ratio", [1.0, 0.75])
def test_seg_loader_resumes_exactly(tmp_path, cat_max_ratio):
    from mapet_ds.pipelines.segmentation import read_seglist, seg_train_loader

    _palette_dataset(tmp_path)
    kw = dict(crop=32, img_scale=(160, 40), ratio_range=(0.5, 2.0), hflip=0.5, photometric=True,
              reduce_zero_label=True, ignore_index=255, batch_size=2, shard_id=0, num_shards=1, seed=4,
              num_threads=1, device="cpu", cat_max_ratio=cat_max_ratio)
    sl = read_seglist(tmp_path / "list.txt")
    loader = seg_train_loader(sl, **kw)  # 3 steps per epoch
    for _ in range(2):
        next(loader)
    state = loader.state()
    assert json.loads(state)["cat_max_ratio"] == cat_max_ratio
    expected = [next(loader) for _ in range(4)]  # crosses into the next epoch
    resumed = seg_train_loader(sl, checkpoint=state, **kw)
    for a, b in zip([next(resumed) for _ in range(4)], expected):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="cat_max_ratio: saved"):
        seg_train_loader(sl, checkpoint=state, **{**kw, "cat_max_ratio": 1.75 - cat_max_ratio})


def test_make_seglist_checks_pairs(tmp_path):
    ade = tmp_path / "ADE"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 16), (i * 50, 0, 0)).save(ade / "images" / split / f"a{i}.jpg")
            Image.new("L", (20, 16), 150).save(ade / "annotations" / split / f"a{i}.png")
    ok = run_py([REPO / "data/make_seglist.py", ade, "--out", tmp_path / "lists", "--workers", "1"], cwd=tmp_path)
    assert "train:" in ok.stdout and (tmp_path / "lists/val.txt").read_text().splitlines()[0] == \
        "../ADE/images/validation/a0.jpg\t../ADE/annotations/validation/a0.png"
    from mapet_ds.pipelines.segmentation import read_seglist

    assert len(read_seglist(tmp_path / "lists/train.txt")) == 2
    (tmp_path / "afile").write_text("")
    p = run_py([REPO / "data/make_seglist.py", ade, "--out", tmp_path / "afile", "--workers", "1"], cwd=tmp_path,
               check=False)
    assert p.returncode == 2 and p.stderr == f"error: --out {tmp_path / 'afile'} is a file, not a folder: choose a folder\n"

    def err(setup):
        setup()
        p = run_py([REPO / "data/make_seglist.py", ade, "--out", tmp_path / "l2", "--workers", "1"], cwd=tmp_path,
                   check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        return p.stderr

    m = ade / "annotations/training/a1.png"
    assert "label 151 > 150" in err(lambda: Image.new("L", (20, 16), 151).save(m))
    assert "is 20x16 but its mask" in err(lambda: Image.new("L", (10, 16), 1).save(m))
    assert "has no mask" in err(lambda: m.unlink())


def test_seglist_refuses_a_classification_list(tmp_path):
    from mapet_ds.filelist import FileListError
    from mapet_ds.pipelines.segmentation import read_seglist

    (tmp_path / "train.txt").write_text("a/x.JPEG\t3\n")
    with pytest.raises(FileListError, match=r"train.txt:1: second column '3' is a class index, not a mask"):
        read_seglist(tmp_path / "train.txt")
    (tmp_path / "seg.txt").write_text("x.jpg\tx.png\n")
    with pytest.raises(FileListError, match="1 listed file\\(s\\) do not exist"):
        read_seglist(tmp_path / "seg.txt")


def test_poly_schedule_after_linear_warmup():
    from mapet_ds.config import OptimConfig
    from mapet_ds.engine.segment import PolySchedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    s = PolySchedule(opt, OptimConfig(lr=1e-3, min_lr=0.0, warmup_lr=0.0, warmup_steps=10), 110, 10)
    lrs = [s.apply(t)[0] for t in (0, 5, 10, 60, 109)]
    # warmup 0 -> lr over 10 steps, then lr * (1 - t / 100) (mmseg poly, power 1, min_lr 0)
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4, 1e-5])


def test_overlay_images_are_spread_over_the_eval_list():
    """The picture's images come from across the list (the demo's is sorted by class), not its top."""
    from mapet_ds.engine.seg_eval import evaluate_segmentation

    class Zeros(torch.nn.Module):
        def forward(self, x):  # [B,3,h,w] -> ([B,2,h,w],): class 0 everywhere
            return (torch.zeros(x.shape[0], 2, x.shape[2], x.shape[3]),)

    loader = [{"images": torch.zeros(1, 3, 8, 8), "masks": torch.full((1, 8, 8), i % 2, dtype=torch.int64)}
              for i in range(10)]
    for i, b in enumerate(loader):
        b["images"][0, 0, 0, 0] = i  # tags the image
    res = evaluate_segmentation(Zeros(), loader, torch.device("cpu"), num_classes=2, ignore_index=255, crop=8,
                                stride=8, keep=4)
    assert [int(img[0, 0, 0]) for img, _, _ in res["kept"]] == [0, 3, 6, 9]
    assert res["images"] == 10 and res["aAcc"] == pytest.approx(50.0)
    assert len(evaluate_segmentation(Zeros(), loader[:3], torch.device("cpu"), num_classes=2, ignore_index=255,
                                     crop=8, stride=8, keep=4)["kept"]) == 3
