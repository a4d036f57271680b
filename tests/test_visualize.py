"""Pictures: stable code colours, grid geometry, plan panels, per-position accuracy,
confusion matrix, PNG round trip and the token-store CLI."""

import numpy as np
import pytest
import torch
from conftest import run_py
from PIL import Image

from mapet_ds.analysis import figures as F
from mapet_ds.analysis import visualize as V
from mapet_ds.models.objectives import plan_from_rank, sample_plan


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_code_colors_are_a_pure_function_of_the_id():
    c = V.code_colors(4096)
    assert c.shape == (4096, 3) and c.dtype == np.uint8
    assert np.array_equal(V.code_colors(10), c[:10])  # independent of the vocabulary size and call order
    assert np.array_equal(V.code_colors(4096), c)
    assert len(np.unique(c, axis=0)) > 0.98 * 4096
    assert np.abs(c[1:].astype(int) - c[:-1].astype(int)).sum(1).min() > 0  # neighbours differ


def test_token_map_grid_geometry_and_content(tmp_path):
    b, h, w, g, vocab = 5, 32, 40, 4, 50
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (b, 3, h, w), dtype=np.uint8)
    tokens = torch.from_numpy(rng.integers(0, vocab, (b, g * g)))
    out = V.token_map_grid(torch.from_numpy(images), tokens, vocab, cols=2)
    rows, gap, pad = 3, V.GAP, V.PAD
    assert out.shape == (rows * h + (rows + 1) * gap, 2 * (2 * w + pad) + 3 * gap, 3) and out.dtype == np.uint8
    # tile 3 (row 1, column 1): the image, then its token map
    y, x = gap + (h + gap), gap + (2 * w + pad + gap)
    assert np.array_equal(out[y:y + h, x:x + w], images[3].transpose(1, 2, 0))
    colours = V.code_colors(vocab)
    tmap = out[y:y + h, x + w + pad:x + 2 * w + pad]
    for cell in (0, 6, 15):
        r, c = divmod(cell, g)
        assert np.array_equal(tmap[r * h // g + 1, c * w // g + 1], colours[int(tokens[3, cell])])
    p = V.save_png(out, tmp_path / "sub" / "grid.png")
    assert np.array_equal(_png(p), out)
    with pytest.raises(ValueError, match="token ids must be in"):
        V.token_map(np.array([0, 1, 2, vocab]), vocab, 8, 8)


def test_code_usage_histogram_size():
    counts = np.bincount(np.random.default_rng(0).zipf(1.5, 5000) % 256, minlength=256)
    img = V.code_usage_histogram(counts, width=500, height=250)
    assert img.shape == (250, 500, 3) and img.dtype == np.uint8 and img.std() > 10


def test_plan_panel_frames_and_sizes():
    g, h, w, vocab = 4, 64, 64, 32
    n = g * g
    rank = torch.randperm(n).view(1, n) + 1
    plan = plan_from_rank("mapet", rank, 12)
    image = np.full((3, h, w), 90, np.uint8)
    target = np.arange(12) % vocab
    pred = target.copy()
    pred[:4] = (pred[:4] + 1) % vocab  # 4 wrong, 8 right
    panel = V.plan_panel(image, rank[0], plan.predicted[0], target, pred, vocab, g)
    assert panel.shape == (V.HEADER + h, 4 * w + 3 * V.PAD, 3)
    row = panel[V.HEADER:]
    cell = h // g
    heat, out = row[:, w + V.PAD:2 * w + V.PAD], row[:, 3 * (w + V.PAD):]
    context = sorted(set(range(n)) - set(plan.predicted[0].tolist()))
    for k, idx in enumerate(plan.predicted[0].tolist()):
        r, c = divmod(idx, g)
        assert np.array_equal(heat[r * cell, c * cell + cell // 2], V.WHITE)  # predicted cells are framed
        frame = out[r * cell, c * cell + cell // 2]
        assert np.array_equal(frame, V.RED if k < 4 else V.GREEN)
        assert np.array_equal(out[r * cell + cell // 2, c * cell + cell // 2], V.code_colors(vocab)[pred[k]])
    r, c = divmod(context[0], g)
    assert not np.array_equal(heat[r * cell, c * cell + cell // 2], V.WHITE)
    # without a caption, and a batch of MIM panels (no rank: mask only)
    assert V.plan_panel(image, rank[0], plan.predicted[0], target, pred, vocab, g, caption=False).shape == (h, 4 * w + 6, 3)
    mim = sample_plan("mim", 3, g, 5, min_block=2)
    imgs = np.zeros((3, 3, h, w), np.uint8)
    tok = np.zeros((3, 5), np.int64)
    many = V.plan_panels(imgs, None, mim.predicted, tok, tok, vocab, g)
    assert many.shape == (V.HEADER + 3 * h + 2 * V.PAD, 4 * w + 3 * V.PAD, 3)
    with pytest.raises(ValueError, match="same length m"):
        V.plan_panel(image, rank[0], plan.predicted[0], target[:3], pred, vocab, g)


@pytest.mark.parametrize("as_torch", [False, True])
def test_position_accuracy_accumulates_over_batches(as_torch):
    conv = torch.as_tensor if as_torch else np.asarray
    acc = V.PositionAccuracy(9)
    V.position_accuracy(conv([[True, False], [True, True]]), conv([[0, 1], [0, 2]]), 9, acc)
    res = V.position_accuracy(conv([[False, True]]), conv([[0, 2]]), 9, acc)
    np.testing.assert_allclose(res, [2 / 3, 0.0, 1.0] + [np.nan] * 6)
    single = V.position_accuracy(np.array([[1, 0]]), np.array([[8, 4]]), 9)
    np.testing.assert_allclose(single, [np.nan] * 4 + [0.0] + [np.nan] * 3 + [1.0])
    img = V.position_accuracy_map(res, grid=3, size=60)
    assert img.shape == (60, 60, 3) and img.dtype == np.uint8
    assert np.array_equal(img[50, 50], V.NAN_GREY)  # never predicted
    assert not np.array_equal(img[5, 5], img[5, 25])  # 2/3 and 0 differ
    with pytest.raises(ValueError, match="grid 4x4 has 16"):
        V.position_accuracy_map(res, grid=4)
    acc.reset()
    assert np.isnan(acc.value()).all()


def test_confusion_matrix_image(tmp_path):
    conf = np.diag([5, 4, 3]) + 1
    img = V.confusion_matrix_image(conf, ["circle", "ring", "star"], title="run ft, step 10")
    assert img.shape == (800, 800, 3) and img.dtype == np.uint8  # legible on its own: >= 800 px
    assert V.confusion_matrix_image(torch.ones(100, 100, dtype=torch.long), size=400).shape == (400, 400, 3)
    V.save_png(img, tmp_path / "c.png")
    assert _png(tmp_path / "c.png").shape == img.shape
    with pytest.raises(ValueError, match="2 class names for a 3x3"):
        V.confusion_matrix_image(conf, ["a", "b"])


def test_denormalize_round_trip():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8)).astype(np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = (x / 255.0 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    assert np.array_equal(V.denormalize(torch.from_numpy(norm).float(), mean, std), x)
    assert np.abs(V.denormalize(torch.from_numpy(norm).bfloat16(), mean, std).astype(int) - x).max() <= 3


def test_tokens_cli_writes_pngs(demo_workspace):
    ws = demo_workspace
    proc = run_py(["-m", "mapet_ds.analysis.visualize", "tokens", "--store", "tokens", "--filelist", "data/train.txt",
                   "--num", "6", "--cols", "3", "--out", "vis"], cwd=ws)
    assert "token_maps: vis/token_maps.png" in proc.stdout
    grid = _png(ws / "vis/token_maps.png")
    assert grid.shape[1] == 1200 and grid.shape[0] > 2 * 1200 / 6  # 2 rows of 3 (image, token map) pairs
    assert _png(ws / "vis/code_usage.png").shape == (420, 900, 3)
    bad = run_py(["-m", "mapet_ds.analysis.visualize", "tokens", "--store", "nowhere", "--filelist", "data/train.txt"],
                 cwd=ws, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: no token store at nowhere")


# -- figures: the pictures the pre-training writes -------------------------------------------

def _count(img, colour) -> int:
    return int((img.reshape(-1, 3) == np.asarray(colour, np.uint8)).all(1).sum())


def _has(img, colour) -> bool:
    return _count(img, colour) > 0


def test_plan_figure_is_legible_and_marks_right_and_wrong():
    g, vocab, b = 4, 32, 3
    n = g * g
    rng = np.random.default_rng(0)
    images = np.full((b, 3, 64, 64), 90, np.uint8)
    rank = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) + 1 for i in range(b)])
    plan = plan_from_rank("mapet", rank, 12)
    target = rng.integers(0, vocab, (b, 12))
    fig = F.plan_figure(images, rank, plan.predicted, target, target, vocab, g, objective="mapet", run="pt", step=7)
    assert fig.shape[1] == 1200 and fig.dtype == np.uint8
    assert fig.shape[0] == int(110 + b * ((1200 - 160) / 4 + 30))
    legend_red = _count(fig, V.RED)  # all right: red only in the legend's "wrong" swatch
    assert _count(fig, V.GREEN) > 12 * b * 20 and legend_red < 200
    wrong = target.copy()
    wrong[:, 0] = (wrong[:, 0] + 1) % vocab
    fig2 = F.plan_figure(images, rank, plan.predicted, target, wrong, vocab, g, run="pt", step=7)
    assert _count(fig2, V.RED) > legend_red + b * 20  # one red frame per image row
    assert np.array_equal(fig2, F.plan_figure(images, rank, plan.predicted, target, wrong, vocab, g, run="pt", step=7))
    mim = sample_plan("mim", b, g, 5, min_block=2)
    assert F.plan_figure(images, None, mim.predicted, target[:, :5], target[:, :5], vocab, g).shape[1] == 1200


def test_position_accuracy_figure_and_token_maps_figure():
    acc = np.linspace(0, 1, 16)
    acc[5] = np.nan
    img = F.position_accuracy_figure(acc, 4, run="pt", step=3)
    assert img.shape == (800, 900, 3)
    assert _has(img, (153, 153, 153))  # the never-predicted cell is grey (0.6)
    with pytest.raises(ValueError, match="grid 4x4 has 16"):
        F.position_accuracy_figure(acc[:9], 4)
    tok = F.token_maps_figure(np.zeros((5, 3, 32, 32), np.uint8), np.arange(80).reshape(5, 16) % 50, 50, cols=3)
    assert tok.shape[1] == 1200 and tok.shape[0] == int(70 + 2 * ((1200 - 40) / 6 + 24))
