"""k-means codebooks over patch features: sample, fit (faiss), assign, save/load.

A k-means visual tokenizer (k-CLIP, or k-means on pixels) is an extractor plus a
codebook: a patch's token is the index of the centroid nearest (L2) to its feature.
Fitting follows the release: faiss k-means on a random sample of at most
``k * max_points_per_centroid`` patch features drawn from the training file list.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mapet_ds.filelist import FileList

MAX_VOCAB = 32767  # token stores hold int16 ids
FORMAT = "mapet_ds.codebook/1"


class CodebookError(ValueError):
    """A codebook cannot be fitted, loaded or used as asked."""


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise CodebookError("k-means tokenizers need faiss (pip install faiss-cpu, or faiss-gpu)") from e
    return faiss


def faiss_num_gpus() -> int:
    """GPUs that faiss itself can use (0 with faiss-cpu, even on a GPU machine)."""
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


FAISS_GPU_INSTALL = "pip uninstall -y faiss-cpu && pip install faiss-gpu (the .[gpu] extra)"


def faiss_cpu_fallback_note() -> str | None:
    """One line when torch sees a GPU that faiss cannot use (faiss-cpu installed), else None.

    use_gpu="auto" then runs k-means on the CPU: at the release's scale that takes hours,
    so say it before the fit starts, not in its summary.
    """
    if not torch.cuda.is_available() or faiss_num_gpus() > 0:
        return None
    return ("torch sees a CUDA GPU but this faiss build has no GPU support, so k-means runs on the CPU "
            f"(slow at the release's scale); for the GPU build: {FAISS_GPU_INSTALL}")


def _resolve_use_gpu(use_gpu: bool | str) -> bool:
    n = faiss_num_gpus()
    if use_gpu == "auto":
        note = faiss_cpu_fallback_note()
        if note is not None:
            warnings.warn(note, stacklevel=3)
        return n > 0
    if use_gpu and n == 0:
        raise CodebookError(
            "use_gpu=True but this faiss build sees no GPU (install the `gpu` extra: "
            "pip uninstall faiss-cpu && pip install faiss-gpu), or pass use_gpu='auto'"
        )
    return bool(use_gpu)


def check_k(k: int, num_points: int) -> None:
    if k < 1 or k > MAX_VOCAB:
        raise CodebookError(f"k = {k} is out of range: token stores are int16, so 1 <= k <= {MAX_VOCAB}")
    if k > num_points:
        raise CodebookError(
            f"k = {k} centroids but only {num_points} feature vectors were sampled: lower --k or sample more "
            f"(raise --images-fraction / --patches-per-image, or use a larger file list)"
        )


def fit_codebook(
    feats: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    nredo: int = 5,
    seed: int = 1234,
    max_points_per_centroid: int = 512,
    spherical: bool = False,
    use_gpu: bool | str = "auto",
    verbose: bool = False,
    return_stats: bool = False,
):
    """faiss k-means.  feats: float32 [N, D] -> centroids float32 [k, D].

    ``seed`` defaults to faiss's own (1234), which the release's k-means used.
    With ``return_stats`` also returns {"objective", "iterations": faiss per-iteration
    stats, "gpu", "seconds"}. faiss subsamples to ``k * max_points_per_centroid``
    points itself when given more.
    """
    if not isinstance(feats, np.ndarray) or feats.ndim != 2:
        raise CodebookError(f"features must be a 2-D float32 array [N, D], got {getattr(feats, 'shape', type(feats))}")
    check_k(k, feats.shape[0])
    # In row blocks: the release's sample is 4.2M x 4096 floats; one mask of it is 17 GB.
    if not all(np.isfinite(feats[i : i + 65536]).all() for i in range(0, feats.shape[0], 65536)):
        raise CodebookError("features contain NaN or inf (a fp16 overflow in the extractor?): refit with amp='none'")
    faiss = _faiss()
    gpu = _resolve_use_gpu(use_gpu)
    x = np.ascontiguousarray(feats, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        int(k),
        niter=int(niter),
        nredo=int(nredo),
        seed=int(seed),
        max_points_per_centroid=int(max_points_per_centroid),
        spherical=bool(spherical),
        verbose=bool(verbose),
        gpu=gpu,
    )
    t0 = time.perf_counter()
    obj = km.train(x)
    seconds = time.perf_counter() - t0
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    if not return_stats:
        return centroids
    return centroids, {"objective": float(obj), "iterations": km.iteration_stats, "gpu": gpu, "seconds": seconds}


@dataclass
class Codebook:
    """Centroids [k, D] float32 plus the metadata that says how they were made."""

    centroids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    _index: Any = field(default=None, repr=False)
    _torch_cache: dict = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def fingerprint(self) -> str:
        """sha256 of the centroids: the codebook's identity, wherever its file lives."""
        return hashlib.sha256(np.ascontiguousarray(self.centroids, dtype=np.float32).tobytes()).hexdigest()

    def _faiss_index(self):
        if self._index is None:
            faiss = _faiss()
            index = faiss.IndexFlatL2(self.dim)
            if faiss_num_gpus() > 0:  # one GPU per rank on a multi-GPU node
                gpu = int(os.environ.get("LOCAL_RANK", 0)) % faiss_num_gpus()
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
            index.add(np.ascontiguousarray(self.centroids, dtype=np.float32))
            self._index = index
        return self._index

    def assign(self, feats):
        """Nearest centroid (L2) per row.  feats: [M, D] -> int64 [M].

        numpy in -> numpy out (faiss IndexFlatL2; a GPU index when faiss has GPUs).
        A torch tensor on a CUDA device is assigned there with a matmul: with plain
        faiss-cpu, copying every CLIP feature to the host would dominate the run.
        """
        if isinstance(feats, torch.Tensor):
            if feats.dim() != 2 or feats.shape[1] != self.dim:
                raise CodebookError(f"features [M, {self.dim}] expected, got {tuple(feats.shape)}")
            if feats.is_cuda:
                return self._assign_torch(feats)
            return torch.from_numpy(self.assign(feats.float().numpy()))
        x = np.ascontiguousarray(feats, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise CodebookError(f"features [M, {self.dim}] expected, got {x.shape}")
        _, ids = self._faiss_index().search(x, 1)
        return ids[:, 0].astype(np.int64)

    def _assign_torch(self, feats: torch.Tensor, block: int = 8192) -> torch.Tensor:
        """feats: float [M, D] on a CUDA device -> int64 [M] there."""
        dev = feats.device
        if dev not in self._torch_cache:
            c = torch.from_numpy(self.centroids).to(dev)
            self._torch_cache[dev] = (c, (c * c).sum(1))
        c, c2 = self._torch_cache[dev]
        out = torch.empty(feats.shape[0], dtype=torch.int64, device=dev)
        for i in range(0, feats.shape[0], block):
            x = feats[i : i + block].float()
            # argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c): ||x||^2 is the same for all c.
            out[i : i + block] = (c2 - 2.0 * (x @ c.T)).argmin(1)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (tmp + rename) as a torch file {"centroids", "meta"}."""
        from mapet_ds.safe_io import atomic_write

        meta = dict(self.meta, format=FORMAT, k=self.k, dim=self.dim)
        atomic_write(path, lambda tmp: torch.save({"centroids": torch.from_numpy(self.centroids), "meta": meta}, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Codebook":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CodebookError(f"codebook {path} does not exist (make it with launch/tokens.py fit --out {path})")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CodebookError(f"codebook {path} could not be read ({type(e).__name__}): refit it with launch/tokens.py fit") from e
        if not isinstance(obj, dict) or obj.get("meta", {}).get("format") != FORMAT:
            raise CodebookError(f"{path} is not a mapet_ds codebook (no '{FORMAT}' metadata): refit it with launch/tokens.py fit")
        c = obj["centroids"].float().numpy()
        return cls(np.ascontiguousarray(c), dict(obj["meta"]))


class KMeansTokenizer:
    """Extractor + codebook behind the encoder interface that VQ-KD/dVAE share:
    ``input_size``, ``grid``, ``vocab_size``, ``device``, ``spec()``, ``tokenize(images)``.

    Offline it feeds ``assign_tokens``; online it can tokenise the augmented view.
    """

    def __init__(self, extractor, codebook: Codebook, codebook_path: str | os.PathLike | None = None):
        if codebook.dim != extractor.dim:
            raise CodebookError(
                f"codebook dim {codebook.dim} != extractor dim {extractor.dim}: use the extractor the codebook was "
                f"fitted with (build_extractor(codebook.meta['extractor']))"
            )
        self.extractor, self.codebook = extractor, codebook
        self.codebook_path = os.path.abspath(codebook_path) if codebook_path else None
        self.input_size, self.grid, self.device = extractor.input_size, extractor.grid, extractor.device
        self.vocab_size = codebook.k

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "kmeans",
            "codebook": {"centroids_sha256": self.codebook.fingerprint(), "path": self.codebook_path},
            "k": self.codebook.k,
            "extractor": self.extractor.spec(),
        }

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, 3, S, S] (S = input_size) -> int64 [B, grid*grid] on self.device."""
        feats = self.extractor.extract(images)  # [B, cells, D]
        ids = self.codebook.assign(feats.reshape(-1, feats.shape[-1]))
        ids = ids if isinstance(ids, torch.Tensor) else torch.from_numpy(ids)
        return ids.to(self.device).reshape(feats.shape[0], feats.shape[1])


def sample_plan(
    num_images: int,
    grid: int,
    k: int,
    *,
    max_points_per_centroid: int = 512,
    images_fraction: float = 1.0,
    patches_per_image: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Which images, and how many patches of each, make the fitting sample.

    Returns (sample ids int64 [n] sorted, patch counts int64 [n] >= 1). The total is
    ``min(k * max_points_per_centroid, images * patches_per_image)`` exactly (the
    release: 8192 * 512, about 4.2M), spread as evenly as possible over a seeded
    ``images_fraction`` of the list (every cell of an image at most), so the feature
    matrix is allocated once at its final size.
    """
    if not 0.0 < images_fraction <= 1.0:
        raise CodebookError(f"images_fraction must be in (0, 1], got {images_fraction}")
    if patches_per_image is not None and patches_per_image < 1:
        raise CodebookError(f"patches_per_image must be >= 1, got {patches_per_image}")
    cells = grid * grid
    cap = int(k) * int(max_points_per_centroid)
    n_img = max(1, min(num_images, int(round(images_fraction * num_images))))
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(num_images, size=n_img, replace=False)).astype(np.int64)
    per_image = min(int(patches_per_image or cells), cells)
    total = min(cap, n_img * per_image)
    check_k(k, total)
    base, extra = divmod(total, n_img)
    counts = np.full(n_img, base, dtype=np.int64)
    counts[rng.choice(n_img, size=extra, replace=False)] += 1
    keep = counts > 0  # with a small cap, images that would give no patch are not loaded
    return ids[keep], counts[keep]


def sample_features(
    extractor,
    filelist: FileList,
    k: int,
    *,
    max_points_per_centroid: int = 512,
    images_fraction: float = 1.0,
    patches_per_image: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_threads: int = 2,
    loader: Callable | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of a seeded random subset of patches -> (float32 [n, D], info dict).

    Deterministic from ``seed``: the images and counts come from ``sample_plan``, the
    cells of image ``i`` from a generator seeded by (seed, i), independent of batching.
    Rows are grouped by image in sample-id order.
    """
    from mapet_ds.tokenizers.store import iterate_images, loader_device  # the loader glue lives with assign

    ids, counts = sample_plan(
        len(filelist),
        extractor.grid,
        k,
        max_points_per_centroid=max_points_per_centroid,
        images_fraction=images_fraction,
        patches_per_image=patches_per_image,
        seed=seed,
    )
    cells = extractor.grid * extractor.grid
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = np.empty((int(starts[-1]), extractor.dim), dtype=np.float32)
    filled = np.zeros(len(ids), dtype=bool)
    stream = iterate_images(
        filelist, ids, extractor.input_size, batch_size=batch_size, num_threads=num_threads,
        device=loader_device(extractor), loader=loader, progress=progress, desc="fit: features",
    )
    for global_ids, images in stream:
        feats = extractor.extract(images)  # [B, cells, D]
        rows = np.searchsorted(ids, global_ids)
        # One gather per batch: flat indices b * cells + cell over the chosen cells.
        flat = np.concatenate([
            b * cells + np.random.default_rng([seed, int(g)]).permutation(cells)[: counts[r]]
            for b, (g, r) in enumerate(zip(global_ids, rows))
        ])
        sel = feats.reshape(-1, feats.shape[-1])[torch.from_numpy(flat).to(feats.device)].cpu().numpy()
        dest = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows])
        out[dest] = sel
        filled[rows] = True
    if not filled.all():
        raise CodebookError(f"the image loader skipped {int((~filled).sum())} of {len(ids)} sampled images")
    info = {
        "filelist": os.path.abspath(filelist.list_path),
        "digest": filelist.digest(),
        "num_images": len(filelist),
        "images_used": int(len(ids)),
        "patches_per_image": [int(counts.min()), int(counts.max())],
        "num_vectors": int(out.shape[0]),
        "images_fraction": float(images_fraction),
        "seed": int(seed),
    }
    return out, info


def codebook_meta(extractor_spec: dict, data_info: dict, kmeans: dict) -> dict[str, Any]:
    return {
        "extractor": extractor_spec,
        "data": data_info,
        "kmeans": kmeans,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
