"""Shard sets (data/make_shards.py): the manifest format, opening a shard folder, and the
check of its tokens against a recipe. The DALI loaders over them are in shards.py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mapet_ds.shards/1"
# image components a sample may carry (make_shards names them by the real format)
IMAGE_EXTS = ("jpg", "png", "bmp", "webp", "tif")
FIX = "make the shards again with data/make_shards.py"


class ShardSetError(ValueError):
    """A shard set is missing, damaged, or was made for another tokenizer/model."""


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


@dataclass
class ShardSet:
    """An opened shard folder: its manifest and the tar/index paths."""

    path: Path
    manifest: dict

    @property
    def list_path(self) -> Path:  # named like FileList's, for the loaders' messages
        return self.path

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def digest(self) -> str:
        """Identifies the samples and their order (loader checkpoints are checked against it)."""
        return self.manifest["digest"]

    @property
    def classes(self) -> list[str] | None:
        return self.manifest.get("classes")

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def tokenizer(self) -> dict | None:
        return self.manifest.get("tokenizer")

    @property
    def tars(self) -> list[str]:
        return [str(self.path / s["tar"]) for s in self.manifest["shards"]]

    @property
    def indexes(self) -> list[str]:
        return [str(self.path / s["idx"]) for s in self.manifest["shards"]]


def open_shards(path: str | os.PathLike | ShardSet) -> ShardSet:
    """Read and check a shard folder; one-line ShardSetError naming what is wrong."""
    if isinstance(path, ShardSet):
        return path
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ShardSetError(f"no shard set at {path} (no {MANIFEST}): make it with data/make_shards.py --out {path}"
                            f" (a killed run: rerun the same command to finish it)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardSetError(f"shard set {path}: {MANIFEST} is unreadable ({e}); {FIX}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardSetError(f"{mpath} is not a mapet_ds shard manifest (format {manifest.get('format')!r}); {FIX}")
    ss = ShardSet(path, manifest)
    missing = [p for p in ss.tars + ss.indexes if not os.path.isfile(p)]
    if missing:
        raise ShardSetError(f"shard set {path}: {len(missing)} file(s) of the manifest are missing, e.g. "
                            f"{os.path.basename(missing[0])}; {FIX}")
    return ss


def check_tokens(ss: ShardSet, *, grid: int, vocab: int, kind: str | None = None, fingerprint: str | None = None,
                 codebook: str | None = None, token_store: str | None = None, view: dict | None = None,
                 pixel_norm: str | None = None) -> None:
    """Refuse (one line) shards whose tokens were not made for this recipe.

    grid and vocab must equal the model's; ``kind`` (pixel_kmeans / kclip) must match the
    extractor; ``fingerprint`` (tokenizer.fingerprint, a prefix is enough), the codebook
    file and a token store named by the recipe must all name the shards' tokenizer; the
    tokenizer view the store recorded must be the training ``view``
    (``pipelines.graphs.pretrain_view_spec``); ``pixel_norm`` (tokenizer.pixel_norm) must
    be the pixel extractor's normalisation.
    """
    from mapet_ds.tokenizers.store import spec_fingerprint, view_mismatch

    tk = ss.tokenizer
    if tk is None:
        raise ShardSetError(f"shard set {ss.path} carries no tokens: make it with data/make_shards.py "
                            f"--token-store <store of this list>, or use an online tokenizer")
    where = f"shard set {ss.path} (tokenizer {tk['fingerprint'][:12]})"
    if tk["grid"] != grid:
        raise ShardSetError(f"{where} has a {tk['grid']}x{tk['grid']} token grid but the model's patch grid is "
                            f"{grid}x{grid}: set model.img_size/patch_size to match, or {FIX} from a matching store")
    if tk["vocab"] != vocab:
        raise ShardSetError(f"{where} has vocab {tk['vocab']} but tokenizer.vocab_size={vocab}: set "
                            f"tokenizer.vocab_size={tk['vocab']}, or {FIX} from a matching store")
    if view is not None:
        view_mismatch(where, tk, view, FIX + " from a token store of the training view", ShardSetError)
    spec = tk["spec"]
    extractor = (spec.get("extractor") or {}).get("kind")
    want = {"pixel_kmeans": "pixel", "kclip": "clip"}.get(kind or "")
    if want is not None and spec.get("kind") == "kmeans" and extractor != want:
        raise ShardSetError(f"{where} holds k-means tokens of a {extractor!r} extractor, but tokenizer.kind={kind}")
    if pixel_norm is not None:
        from mapet_ds.tokenizers.features import pixel_norm_of

        have = pixel_norm_of(spec.get("extractor") or {})
        if have != pixel_norm:
            made = f"pixel_norm={have}" if have else "a non-pixel tokenizer"
            raise ShardSetError(f"{where} holds tokens made with {made} but tokenizer.pixel_norm={pixel_norm}: "
                                f"{FIX} from a store of that normalisation")
    if fingerprint and not tk["fingerprint"].startswith(fingerprint.lower()):
        raise ShardSetError(f"{where} does not match tokenizer.fingerprint={fingerprint}: use the shards made for "
                            f"that tokenizer, or set tokenizer.fingerprint={tk['fingerprint'][:12]}")
    if codebook:
        from mapet_ds.tokenizers.codebook import Codebook

        have = (spec.get("codebook") or {}).get("centroids_sha256")
        if have != Codebook.load(codebook).fingerprint():
            raise ShardSetError(f"{where} was not made with tokenizer.codebook={codebook}: {FIX} from a store of "
                                f"that codebook, or drop tokenizer.codebook")
    if token_store:
        meta_path = os.path.join(token_store, "meta.json")
        try:
            with open(meta_path, encoding="utf-8") as f:
                store_fp = spec_fingerprint(json.load(f)["spec"])
        except (OSError, ValueError, KeyError) as e:
            raise ShardSetError(f"tokenizer.token_store={token_store}: cannot read {meta_path} ({e})") from None
        if store_fp != tk["fingerprint"]:
            raise ShardSetError(f"{where} was made with another tokenizer than tokenizer.token_store={token_store} "
                                f"({store_fp[:12]}): {FIX} from that store, or drop tokenizer.token_store")
