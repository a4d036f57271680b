"""Benchmark the k-means tokenizers: assign throughput and faiss k-means speed.

    python bench/tokens.py [--images 256] [--kmeans-n 50000 --kmeans-d 256 --kmeans-k 1024]

- assign: generated JPEGs (--image-px, random shapes) -> DALI tokenizer view ->
  extractor -> nearest centroid -> token store, end to end (``assign_tokens``), for
  the pixel extractor (224 px, patch 16) and two tiny random-weight open_clip towers
  with the ViT's 14x14 grid: a ResNet at 448 px (RN50x64's geometry, narrow) and a
  ViT at 224 px / patch 16. Images/s, best of --repeats.
- kmeans: fit_codebook on N x d Gaussian data to k centroids; seconds per iteration.

Runs on the GPU when torch sees one (DALI mixed decode, CUDA extractor), else the CPU.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time


def make_images(root: str, n: int, px: int) -> str:
    import numpy as np
    from PIL import Image

    from mapet_ds.filelist import write_filelist

    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        h, w = px, int(px * rng.uniform(1.0, 1.33))
        a = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(12):
            y, x = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
            a[y : y + int(rng.integers(8, h // 2)), x : x + int(rng.integers(8, w // 2))] = rng.integers(0, 256, 3)
        a = np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
        rel = f"img_{i:05d}.jpg"
        Image.fromarray(a).save(os.path.join(root, rel), quality=90)
        entries.append((rel, 0))
    return str(write_filelist(os.path.join(root, "list.txt"), entries))


def tiny_clip_configs(d: str) -> dict[str, str]:
    import open_clip
    import torch

    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    cfgs = {
        "bench-tiny-rn448": {"image_size": 448, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
        "bench-tiny-vit224": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    }
    for name, vision in cfgs.items():
        with open(os.path.join(d, f"{name}.json"), "w") as f:
            json.dump({"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}, f)
    open_clip.add_model_config(d)
    files = {}
    for name in cfgs:
        files[name] = os.path.join(d, f"{name}.pt")
        torch.save(open_clip.create_model(name).state_dict(), files[name])
    return files


def bench_assign(name, extractor, filelist, workdir, k, batch_size, num_threads, repeats) -> dict:
    import torch

    from mapet_ds.tokenizers import (
        Codebook,
        KMeansTokenizer,
        assign_tokens,
        fit_codebook,
        sample_features,
    )

    feats, _ = sample_features(extractor, filelist, k, max_points_per_centroid=64, batch_size=batch_size,
                               num_threads=num_threads, progress=False)
    tokenizer = KMeansTokenizer(extractor, Codebook(fit_codebook(feats, k, niter=5, nredo=1)))
    best = float("inf")
    for r in range(repeats):
        out = os.path.join(workdir, f"tok_{name}_{r}")
        t0 = time.perf_counter()
        assign_tokens(filelist, tokenizer, out, batch_size=batch_size, chunk_size=1024,
                              num_threads=num_threads, progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        shutil.rmtree(out)
    n = len(filelist)
    return {"extractor": name, "input_px": extractor.input_size, "grid": extractor.grid, "dim": extractor.dim,
            "k": k, "images": n, "seconds": round(best, 3), "images_per_s": round(n / best, 1)}


def bench_kmeans(n, d, k, niter, seed=0) -> dict:
    import numpy as np

    from mapet_ds.tokenizers import fit_codebook

    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    _, stats = fit_codebook(x, k, niter=niter, nredo=1, seed=seed, max_points_per_centroid=max(1, -(-n // k)), return_stats=True)
    per_iter = [s["time"] for s in stats["iterations"]]
    # faiss reports cumulative wall time per iteration: the last one / niter is the mean.
    return {"n": n, "d": d, "k": k, "niter": niter, "gpu": stats["gpu"], "seconds": round(stats["seconds"], 3),
            "seconds_per_iter": round(per_iter[-1] / len(per_iter) if per_iter else stats["seconds"] / niter, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-px", type=int, default=256, help="height of the generated JPEGs")
    p.add_argument("--k", type=int, default=256, help="codebook size for the assign runs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kmeans-n", type=int, default=50000)
    p.add_argument("--kmeans-d", type=int, default=256)
    p.add_argument("--kmeans-k", type=int, default=1024)
    p.add_argument("--kmeans-niter", type=int, default=5)
    p.add_argument("--skip-clip", action="store_true")
    a = p.parse_args()
    import torch

    from mapet_ds.filelist import read_filelist
    from mapet_ds.tokenizers import ClipExtractor, PixelPatchExtractor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"bench": "tokenize", "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               "torch_threads": torch.get_num_threads(), "assign": [], "kmeans": None}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        filelist = read_filelist(make_images(tmp, a.images, a.image_px))
        print(f"made {a.images} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
        runs = [("pixel224_p16", lambda: PixelPatchExtractor(16, 224))]
        if not a.skip_clip:
            files = tiny_clip_configs(tmp)
            runs += [
                ("tinyclip_rn448", lambda: ClipExtractor("bench-tiny-rn448", files["bench-tiny-rn448"], grid=14)),
                ("tinyclip_vit224", lambda: ClipExtractor("bench-tiny-vit224", files["bench-tiny-vit224"], grid=14)),
            ]
        for name, make in runs:
            r = bench_assign(name, make(), filelist, tmp, a.k, a.batch_size, a.num_threads, a.repeats)
            print(f"assign {name}: {r['images_per_s']} images/s ({r['images']} images, {r['seconds']}s)", flush=True)
            results["assign"].append(r)
    km = bench_kmeans(a.kmeans_n, a.kmeans_d, a.kmeans_k, a.kmeans_niter)
    print(f"kmeans {km['n']}x{km['d']} -> k={km['k']}: {km['seconds_per_iter']}s/iter (faiss {'GPU' if km['gpu'] else 'CPU'})")
    results["kmeans"] = km
    print(json.dumps(results))


if __name__ == "__main__":
    main()
