"""k-means visual tokenizers: faiss fit, extractors (pixels, tiny open_clip towers),
fit -> assign -> token store end to end, resumable and sharded assign."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mapet_ds.filelist import read_filelist, write_filelist
from mapet_ds.tokenizers import (
    ClipExtractor,
    Codebook,
    CodebookError,
    FeatureError,
    KMeansTokenizer,
    PixelPatchExtractor,
    TokenStore,
    TokenStoreError,
    assign_tokens,
    build_extractor,
    fit_codebook,
    sample_features,
    sample_plan,
)
from mapet_ds.tokenizers.store import iterate_images

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "launch" / "tokens.py"


def _cli():
    spec = importlib.util.spec_from_file_location("mapet_tokenize_cli", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- faiss k-means


def test_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16)).astype(np.float32) * 4
    labels = np.repeat(np.arange(8), 100)
    x = centers[labels] + rng.normal(scale=0.1, size=(800, 16)).astype(np.float32)
    cent = fit_codebook(x, 8, niter=25, nredo=3, seed=1, use_gpu="auto")
    assert cent.shape == (8, 16) and cent.dtype == np.float32
    d = ((cent[:, None] - centers[None]) ** 2).sum(-1)  # [found, planted]
    match = d.argmin(1)
    assert sorted(match.tolist()) == list(range(8))  # one centroid per planted cluster
    assert np.sqrt(d.min(1)).max() < 0.1  # each within noise of its planted centre
    ids = Codebook(cent).assign(x)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(match[ids], labels)  # every point goes to its own cluster
    # torch input (CPU) gives the same ids as numpy input
    np.testing.assert_array_equal(Codebook(cent).assign(torch.from_numpy(x)).numpy(), ids)


def test_fit_refuses_bad_k():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(CodebookError, match=r"k = 11 centroids but only 10 feature vectors"):
        fit_codebook(x, 11)
    with pytest.raises(CodebookError, match=r"int16, so 1 <= k <= 32767"):
        fit_codebook(np.zeros((40000, 2), np.float32), 32768)
    with pytest.raises(CodebookError, match="NaN or inf"):
        fit_codebook(np.full((10, 4), np.nan, np.float32), 2)


def test_fit_cli_defaults_are_the_release(monkeypatch):
    cli = _cli()
    seen = []
    monkeypatch.setattr(cli, "cmd_fit", seen.append)
    cli.main(["fit", "--filelist", "train.txt", "--out", "cb.pt"])
    a = seen[0]
    assert (a.k, a.niter, a.nredo, a.max_points_per_centroid) == (8192, 20, 5, 512)
    import inspect
    kw = inspect.signature(fit_codebook).parameters
    assert (kw["niter"].default, kw["nredo"].default, kw["max_points_per_centroid"].default) == (20, 5, 512)


def test_auto_says_cpu_fallback_before_the_fit(monkeypatch, capsys, tmp_path):
    """A GPU machine with faiss-cpu: the note (with the install command) comes first."""
    import mapet_ds.tokenizers as T
    from mapet_ds.tokenizers.codebook import faiss_num_gpus

    assert faiss_num_gpus() == 0  # faiss-cpu in the test environment
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"faiss build has no GPU support, so k-means runs on the CPU .*"
                                         r"pip uninstall -y faiss-cpu && pip install faiss-gpu \(the .*gpu.* extra\)"):
        fit_codebook(x, 4, niter=2, nredo=1, use_gpu="auto")

    class Stop(Exception):
        pass

    def no_sampling(*a, **k):
        raise Stop

    monkeypatch.setattr(T, "sample_features", no_sampling)
    monkeypatch.setenv("MAPET_DEBUG", "1")  # re-raise the test's own exception instead of a traceback file
    monkeypatch.setattr(T, "PixelPatchExtractor", lambda *a, **k: type("E", (), {"spec": lambda self: {}})())
    with pytest.raises(Stop):
        _cli().main(["fit", "--filelist", str(write_filelist(tmp_path / "l.txt", [("a.jpg", 0)])), "--out", "cb.pt"])
    out = capsys.readouterr().out
    assert out.startswith("[fit] note: torch sees a CUDA GPU but this faiss build has no GPU support")
    assert "pip install faiss-gpu (the .[gpu] extra)" in out


def test_codebook_save_load(tmp_path):
    cent = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    Codebook(cent, {"extractor": {"kind": "pixel"}, "kmeans": {"seed": 3}}).save(tmp_path / "cb.pt")
    assert os.listdir(tmp_path) == ["cb.pt"]  # no temporary left behind
    cb = Codebook.load(tmp_path / "cb.pt")
    np.testing.assert_array_equal(cb.centroids, cent)
    assert cb.k == 5 and cb.dim == 3 and cb.meta["kmeans"]["seed"] == 3 and cb.meta["format"].startswith("mapet_ds")
    with pytest.raises(CodebookError, match=r"does not exist \(make it with launch/tokens.py fit"):
        Codebook.load(tmp_path / "missing.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(CodebookError, match="not a mapet_ds codebook"):
        Codebook.load(tmp_path / "other.pt")


def test_sample_plan_is_seeded_and_capped():
    ids, counts = sample_plan(1000, 14, k=4, max_points_per_centroid=100, images_fraction=0.5, seed=7)
    assert len(ids) == 400 and counts.tolist() == [1] * 400  # the cap (400) spread one patch per image
    assert (np.diff(ids) > 0).all() and ids.max() < 1000
    again, _ = sample_plan(1000, 14, k=4, max_points_per_centroid=100, images_fraction=0.5, seed=7)
    np.testing.assert_array_equal(ids, again)
    ids, counts = sample_plan(10, 4, k=4, max_points_per_centroid=512)
    assert len(ids) == 10 and counts.tolist() == [16] * 10  # every cell of every image, under the cap
    ids, counts = sample_plan(10, 4, k=5, max_points_per_centroid=5, seed=1)
    assert counts.sum() == 25 and sorted(set(counts.tolist())) == [2, 3]  # exact total, even spread
    with pytest.raises(CodebookError, match="k = 200 centroids but only 160"):
        sample_plan(10, 4, k=200)


# ---------------------------------------------------------------- extractors


def test_pixel_extractor_row_major_and_normalised():
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ext = PixelPatchExtractor(patch_size=8, img_size=32, device="cpu")
    f = ext.extract(img)
    assert f.shape == (2, 16, 192) and f.dtype == torch.float32 and (ext.grid, ext.dim) == (4, 192)
    j = 6  # row 1, column 2
    patch = img[1, :, 8:16, 16:24].float().div(255).reshape(-1)  # channel-major like unfold
    expect = (patch - patch.mean()) / (patch.var(unbiased=False) + ext.eps).sqrt()
    torch.testing.assert_close(f[1, j], expect)
    with pytest.raises(FeatureError, match="takes 32x32"):
        ext.extract(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(FeatureError, match="multiple of patch_size"):
        PixelPatchExtractor(patch_size=7, img_size=32)
    assert build_extractor(ext.spec()).spec() == ext.spec()


@pytest.mark.parametrize("norm", ["luma", "channel", "patch"])
def test_pixel_norm_modes_flat_colour_and_spec_round_trip(norm):
    # flat patches of different colours, then a luma edge
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[0, :, :8, :8] = torch.tensor([200, 30, 30], dtype=torch.uint8).view(3, 1, 1)
    img[0, :, :8, 8:] = torch.tensor([20, 60, 220], dtype=torch.uint8).view(3, 1, 1)
    img[0, :, 8:, :8] = torch.tensor([90, 200, 40], dtype=torch.uint8).view(3, 1, 1)
    img[0, :, 8:, 12:] = 255
    ext = PixelPatchExtractor(patch_size=8, img_size=16, norm=norm, device="cpu")
    f = ext.extract(img)
    assert f.shape == (1, 4, ext.dim) and ext.dim == (64 if norm == "luma" else 192)
    flat = f[0, :3].abs().amax().item()
    if norm == "patch":
        assert flat > 1.0  # the hue survives: the old behaviour, kept for old codebooks
    else:
        assert flat < 1e-5  # a flat patch of any colour is the zero vector
    assert f[0, 3].abs().amax() > 0.5  # the edge patch keeps its structure
    if norm == "luma":
        luma = (0.299 * img[0, 0, 8:, 8:].float() + 0.587 * img[0, 1, 8:, 8:].float()
                + 0.114 * img[0, 2, 8:, 8:].float()).div(255).reshape(-1)
        torch.testing.assert_close(f[0, 3], (luma - luma.mean()) / (luma.var(unbiased=False) + ext.eps).sqrt())
    spec = ext.spec()
    assert spec.get("pixel_norm", "patch") == norm and ("pixel_norm" in spec) == (norm != "patch")
    again = build_extractor(spec, device="cpu")
    assert again.norm == norm and again.spec() == spec
    torch.testing.assert_close(again.extract(img), f)
    with pytest.raises(FeatureError, match="pixel_norm 'hsv'"):
        build_extractor({**spec, "pixel_norm": "hsv"})
    with pytest.raises(FeatureError, match="not one of patch, channel, luma"):
        PixelPatchExtractor(8, 16, norm="rgb")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Tiny open_clip configs (ResNet and ViT towers) with random weights saved to files."""
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    cfgs = {
        "mapet-tiny-rn": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "mapet-tiny-vit": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    }
    for name, vision in cfgs.items():
        (d / f"{name}.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(d)
    files = {}
    for name in cfgs:
        torch.manual_seed(0)
        files[name] = str(d / f"{name}.pt")
        torch.save(open_clip.create_model(name).state_dict(), files[name])
    torch.manual_seed(1)
    files["other-vit"] = str(d / "other-vit.pt")
    torch.save(open_clip.create_model("mapet-tiny-vit").state_dict(), files["other-vit"])
    return files


def test_clip_resnet_layer4_grid_and_features(tiny_clip):
    import open_clip

    ext = ClipExtractor("mapet-tiny-rn", tiny_clip["mapet-tiny-rn"], grid=2, device="cpu")
    assert (ext.input_size, ext.grid, ext.dim) == (64, 2, 256)  # 64 px / 32 = 2 cells, width 8 * 32 channels
    imgs = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    f = ext.extract(imgs)
    assert f.shape == (2, 4, 256) and f.dtype == torch.float32
    # Independent check: the layer4 map during open_clip's own full forward (before attnpool).
    model = open_clip.create_model("mapet-tiny-rn", pretrained=tiny_clip["mapet-tiny-rn"]).eval()
    seen = {}
    model.visual.layer4.register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        model.encode_image((imgs.float() / 255 - mean) / std)
    torch.testing.assert_close(f, seen["y"].flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    # The conv trunk takes a larger input: 128 px gives the 4x4 grid.
    assert ClipExtractor("mapet-tiny-rn", tiny_clip["mapet-tiny-rn"], 128, grid=4, device="cpu").grid == 4


def test_clip_vit_tokens_and_errors(tiny_clip):
    ext = ClipExtractor("mapet-tiny-vit", tiny_clip["mapet-tiny-vit"], grid=4, device="cpu")
    f = ext.extract(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert f.shape == (3, 16, 32) and torch.isfinite(f).all()
    assert ext.spec()["weights"]["sha256"] and ext.spec()["layer"] == "patch_tokens"
    with pytest.raises(FeatureError, match=r"gives a 4x4 feature grid .* patch grid is 14x14: set the CLIP input size to 112"):
        ClipExtractor("mapet-tiny-vit", tiny_clip["mapet-tiny-vit"], grid=14, device="cpu")
    with pytest.raises(FeatureError, match=r"could not build open_clip 'mapet-tiny-vit'.*belongs to this model"):
        ClipExtractor("mapet-tiny-vit", tiny_clip["mapet-tiny-rn"], grid=4, device="cpu")
    with pytest.raises(FeatureError, match=r"weights file /nope/w.pt does not exist"):
        ClipExtractor("mapet-tiny-vit", "/nope/w.pt", grid=4)
    with pytest.raises(FeatureError, match="unknown open_clip model 'no-such-model'"):
        ClipExtractor("no-such-model", None, grid=4)
    with pytest.raises(FeatureError, match="not the weights the codebook was fitted with"):
        build_extractor(ext.spec(), clip_weights=tiny_clip["other-vit"], device="cpu")


def test_clip_tokens_in_range(tiny_clip):
    ext = ClipExtractor("mapet-tiny-rn", tiny_clip["mapet-tiny-rn"], 128, grid=4, device="cpu")
    f = ext.extract(torch.randint(0, 256, (8, 3, 128, 128), dtype=torch.uint8)).reshape(-1, ext.dim)
    cb = Codebook(fit_codebook(f.numpy(), 10, niter=5, nredo=1))
    ids = cb.assign(f)
    assert ids.shape == (128,) and 0 <= int(ids.min()) and int(ids.max()) < 10


# ---------------------------------------------------------------- end to end (DALI loader)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """30 small JPEGs of random rectangles (varied sizes/aspects) and their file list."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(30):
        h, w = int(rng.integers(36, 56)), int(rng.integers(36, 56))
        a = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            a[y : y + int(rng.integers(4, 20)), x : x + int(rng.integers(4, 20))] = rng.integers(0, 256, 3)
        a = np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)
        rel = f"c{i % 2}/img_{i:03d}.jpg"
        (root / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(a).save(root / rel, quality=92)
        entries.append((rel, i % 2))
    write_filelist(root / "train.txt", entries)
    return root / "train.txt"


def _fit_pixel(tmp_path, image_set, k=12, norm="patch", name="cb.pt"):
    out = tmp_path / name
    _cli().main(["fit", "--filelist", str(image_set), "--extractor", "pixel", "--img-size", "32", "--patch-size", "8",
                 "--pixel-norm", norm, "--k", str(k), "--niter", "10", "--nredo", "1", "--batch-size", "8", "--num-threads", "1", "--device", "cpu",
                 "--out", str(out)])
    return out


def _assign(codebook, image_set, out, *extra):
    _cli().main(["assign", "--filelist", str(image_set), "--codebook", str(codebook), "--out", str(out),
                 "--batch-size", "8", "--num-threads", "1", "--device", "cpu", "--chunk-size", "8", *extra])


def test_pixel_fit_assign_store_rows_line_up(tmp_path, image_set, capsys):
    cb_path = _fit_pixel(tmp_path, image_set)
    cb = Codebook.load(cb_path)
    fl = read_filelist(image_set)
    assert cb.k == 12 and cb.meta["data"]["digest"] == fl.digest() and cb.meta["data"]["num_vectors"] == 30 * 16
    assert cb.meta["extractor"]["kind"] == "pixel" and cb.meta["kmeans"]["niter"] == 10
    # sampling is deterministic from the seed
    ext = build_extractor(cb.meta["extractor"], device="cpu")
    a, _ = sample_features(ext, fl, 12, images_fraction=0.5, patches_per_image=3, seed=5, progress=False)
    b, _ = sample_features(ext, fl, 12, images_fraction=0.5, patches_per_image=3, seed=5, progress=False)
    assert a.shape == (45, 192)
    np.testing.assert_array_equal(a, b)
    # the first image's rows are its features at the cells its seeded generator picked
    first = sample_plan(30, 4, 12, images_fraction=0.5, patches_per_image=3, seed=5)[0][0]
    (_, img), = list(iterate_images(fl, np.array([first]), 32, batch_size=1, device="cpu", progress=False))
    cells = np.random.default_rng([5, int(first)]).permutation(16)[:3]
    np.testing.assert_allclose(a[:3], ext.extract(img)[0, cells].numpy(), rtol=1e-6)

    _assign(cb_path, image_set, tmp_path / "tok")
    printed = capsys.readouterr().out
    assert "codes used" in printed and "perplexity" in printed
    store = TokenStore.open(tmp_path / "tok", filelist=fl, grid=4, vocab=12)
    assert store.complete and store.num_images == 30 and store.spec["k"] == 12
    assert store.spec["codebook"]["centroids_sha256"] == cb.fingerprint()
    # resuming into this store with another codebook of the same size is refused
    other = KMeansTokenizer(ext, Codebook(cb.centroids[::-1].copy(), cb.meta))
    with pytest.raises(TokenStoreError,
                       match=rf"written with another tokenizer \(kmeans, pixel_norm=patch, {cb.fingerprint()[:12]}\)"):
        assign_tokens(fl, other, tmp_path / "tok", progress=False)
    # a store made with one pixel normalisation is refused for another, in one line
    assert TokenStore.open(tmp_path / "tok", pixel_norm="patch").complete
    with pytest.raises(TokenStoreError, match=r"made with pixel_norm=patch but tokenizer.pixel_norm=luma: .*"
                                              r"--pixel-norm luma") as err:
        TokenStore.open(tmp_path / "tok", filelist=fl, pixel_norm="luma")
    assert "\n" not in str(err.value)
    luma = Codebook.load(_fit_pixel(tmp_path, image_set, norm="luma", name="luma.pt"))
    assert luma.meta["extractor"]["pixel_norm"] == "luma" and luma.dim == 64
    with pytest.raises(TokenStoreError, match=r"another tokenizer \(kmeans, pixel_norm=patch, .*pixel_norm=luma"):
        assign_tokens(fl, KMeansTokenizer(build_extractor(luma.meta["extractor"], device="cpu"), luma),
                      tmp_path / "tok", progress=False)
    table = store.rows(torch.arange(30))
    assert table.min() >= 0 and table.max() < 12
    assert len({tuple(r) for r in table.tolist()}) > 20  # images differ, so the check below means something
    for i in (0, 13, 29):  # a sample's row = the tokens of that image computed on its own
        (gids, img), = list(iterate_images(fl, np.array([i]), 32, batch_size=1, num_threads=1, device="cpu",
                                            progress=False))
        assert gids.tolist() == [i]
        direct = cb.assign(ext.extract(img).reshape(-1, ext.dim))
        np.testing.assert_array_equal(store.rows([i])[0].numpy(), direct)
    # a store made for these images refuses to open against another list
    other = tmp_path / "other.txt"
    write_filelist(other, [(p, y) for p, y in zip(fl.paths[::-1], fl.labels[::-1])])
    with pytest.raises(TokenStoreError, match="other images"):
        TokenStore.open(tmp_path / "tok", filelist=read_filelist(other, root=fl.root))

    # sharded over two ranks (run one after the other): the same table
    tokenizer = KMeansTokenizer(build_extractor(cb.meta["extractor"], device="cpu"), cb, cb_path)
    np.testing.assert_array_equal(tokenizer.tokenize(img).numpy()[0], direct)  # the online form agrees
    for rank in (0, 1):
        st = assign_tokens(fl, tokenizer, tmp_path / "tok2", chunk_size=4, rank=rank, world_size=2, batch_size=8,
                           num_threads=1, progress=False)
        assert st.complete == (rank == 1)
    np.testing.assert_array_equal(TokenStore.open(tmp_path / "tok2").rows(torch.arange(30)), table)


def test_killed_assign_resumes_identically(tmp_path, image_set, monkeypatch):
    cb_path = _fit_pixel(tmp_path, image_set)
    _assign(cb_path, image_set, tmp_path / "clean")
    # SIGKILL the CLI right after chunk 1's rows are written and before it is marked done.
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, runpy, signal, sys\n"
        "import mapet_ds.tokenizers.store as S\n"
        "orig, calls = S._write_marker, []\n"
        "def marker(store, c, record):\n"
        "    calls.append(c)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    orig(store, c, record)\n"
        "S._write_marker = marker\n"
        f"sys.argv = [{str(CLI)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(CLI)!r}, run_name='__main__')\n"
    )
    args = ["assign", "--filelist", str(image_set), "--codebook", str(cb_path), "--out", str(tmp_path / "tok"),
            "--batch-size", "8", "--num-threads", "1", "--device", "cpu", "--chunk-size", "8"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(driver), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    part = TokenStore.open(tmp_path / "tok", allow_incomplete=True)
    assert part.done_chunks() == {0} and not part.complete
    with pytest.raises(TokenStoreError, match="incomplete"):
        TokenStore.open(tmp_path / "tok")

    # Rerun the same command: only the 22 images of the unfinished chunks are loaded again.
    import mapet_ds.pipelines as P

    loaded = []
    real = P.tokenizer_view_loader

    def counting(*a, **kw):
        for batch in real(*a, **kw):
            loaded.append(len(batch["sample_ids"]))
            yield batch

    monkeypatch.setattr(P, "tokenizer_view_loader", counting)
    _assign(cb_path, image_set, tmp_path / "tok")
    assert sum(loaded) == 30 - 8
    done = TokenStore.open(tmp_path / "tok")
    np.testing.assert_array_equal(np.asarray(done.tokens), np.asarray(TokenStore.open(tmp_path / "clean").tokens))


def test_clip_cli_fit_assign(tmp_path, image_set, tiny_clip, capsys):
    cli = _cli()
    cli.main(["fit", "--filelist", str(image_set), "--extractor", "clip", "--clip-model", "mapet-tiny-vit",
              "--clip-weights", tiny_clip["mapet-tiny-vit"], "--img-size", "64", "--patch-size", "16", "--k", "8",
              "--niter", "5", "--nredo", "1", "--batch-size", "8", "--num-threads", "1", "--device", "cpu",
              "--out", str(tmp_path / "kclip.pt")])
    cb = Codebook.load(tmp_path / "kclip.pt")
    assert cb.meta["extractor"]["grid"] == 4 and cb.dim == 32
    _assign(tmp_path / "kclip.pt", image_set, tmp_path / "tok")
    store = TokenStore.open(tmp_path / "tok", grid=4, vocab=8)
    t = store.rows(torch.arange(30))
    assert t.shape == (30, 16) and t.min() >= 0 and t.max() < 8
    # a ViT grid the tower cannot give fails clearly, through the CLI as a one-line exit
    with pytest.raises(SystemExit) as stop:
        cli.main(["fit", "--filelist", str(image_set), "--extractor", "clip", "--clip-model", "mapet-tiny-vit",
                  "--clip-weights", tiny_clip["mapet-tiny-vit"], "--img-size", "224", "--patch-size", "16",
                  "--k", "8", "--device", "cpu", "--out", str(tmp_path / "bad.pt")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]  # (tqdm bars aside)
    assert stop.value.code == 2 and len(err) == 1 and "patch grid is 14x14" in err[0]


@pytest.mark.parametrize("folder", ["launch", "bench", "data"])
def test_script_folders_do_not_shadow_the_standard_library(folder):
    # `python launch/x.py` puts launch/ first on sys.path: a script named like a standard
    # module (tokenize.py did) would be imported by torch/inspect in its place.
    clashes = sorted(p.name for p in (REPO / folder).glob("*.py") if p.stem in sys.stdlib_module_names)
    assert not clashes, f"{folder}/ scripts shadow standard-library modules: {clashes}"
