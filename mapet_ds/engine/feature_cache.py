"""Cached-feature linear probing: features extracted once over ranks, then in-memory loaders.

``linprobe.cache_features=true`` runs the frozen backbone once over each list with the
eval view (no augmentation), gathers the per-rank features onto every rank and trains
the head on them: per step a [B, D] matmul instead of a ViT forward. The cache is saved
in the run dir (``features.pt``, keyed by a signature of everything that shapes it) so a
resumed run does not extract again.

The loaders mimic the image loaders' contracts (mapet_ds.pipelines) so the Trainer and
``evaluate`` take them unchanged; the features travel under the key ``"images"``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from mapet_ds.filelist import shard_indices
from mapet_ds.safe_io import atomic_write
from mapet_ds.transfer import to_device

# /2: caches written before 096e4e1 hold [CLS] features under pool "mean" (the pooling bug); never reuse them
CACHE_FORMAT = "mapet_ds.linprobe_features/2"


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """[R, ...] on every rank (same R everywhere) -> [world x R, ...] in rank order."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def extract_all(feature_fn, loader: Iterable[dict], num_samples: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every sample of a list, sharded over ranks, the full set on every rank.

    ``feature_fn(images [B,3,S,S]) -> [B, D]``; ``loader`` is an eval loader (every rank the
    same number of batches, padding rows valid=False). Returns (feats [N, D] float32,
    labels [N] int64) on CPU, row i = sample id i. Raises if a sample is missing.
    """
    feats, labels, ids, valid = [], [], [], []
    for batch in loader:
        images = to_device(batch["images"], device)
        feats.append(feature_fn(images).float())
        labels.append(batch["labels"].to(device).long().reshape(-1))
        ids.append(torch.as_tensor(batch["sample_ids"]).to(device).long().reshape(-1))
        valid.append(batch["valid"].to(device).bool().reshape(-1))
    f, y, i, v = (_gather_rows(torch.cat(x)) for x in (feats, labels, ids, valid))
    f, y, i = f[v].cpu(), y[v].cpu(), i[v].cpu()
    out_f = torch.zeros(num_samples, f.shape[1])
    out_y = torch.full((num_samples,), -1, dtype=torch.int64)
    out_f[i], out_y[i] = f, y
    seen = torch.zeros(num_samples, dtype=torch.bool)
    seen[i] = True
    if not bool(seen.all()):
        raise RuntimeError(f"feature extraction missed {int((~seen).sum())} of {num_samples} samples")
    return out_f, out_y


def load_cache(path: Path, signature: dict) -> Optional[dict]:
    """The saved cache when it was made with this exact signature, else None."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a foreign or damaged file: extract again (it is ours to overwrite, see save_cache)
        return None
    if data.get("format") != CACHE_FORMAT or data.get("signature") != json.dumps(signature, sort_keys=True):
        return None
    return data


def save_cache(path: Path, signature: dict, splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    data = {"format": CACHE_FORMAT, "signature": json.dumps(signature, sort_keys=True)}
    for name, (f, y) in splits.items():
        data[f"{name}_feats"], data[f"{name}_labels"] = f, y
    atomic_write(path, lambda tmp: torch.save(data, tmp))


class FeatureTrainLoader:
    """Endless shuffled batches of cached features, the Trainer's loader contract.

    Epoch e: a permutation of the N rows drawn from (seed, e); rank r takes every
    world-th row from r, ``steps_per_epoch = (N // world) // B`` full batches (the rest
    dropped, as the image loaders do). ``state()`` is the (epoch, step) position, so a
    loader built with ``checkpoint=state`` yields exactly the batches that would follow.
    Each batch: {"images": features float32 [B, D], "labels" [B], "sample_ids" [B]}.
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, *, batch_size: int, shard_id: int,
                 num_shards: int, seed: int, device: torch.device, checkpoint: Optional[str] = None):
        self.feats, self.labels = feats, labels
        self.batch_size, self.shard_id, self.num_shards, self.seed = batch_size, shard_id, num_shards, seed
        self.device = device
        n = feats.shape[0]
        self.steps_per_epoch = (n // num_shards) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} cached training samples over {num_shards} rank(s) give no full batch of "
                             f"{batch_size} per rank: lower linprobe.global_batch_size")
        self.epoch, self._step = 0, 0
        if checkpoint is not None:
            st = json.loads(checkpoint)
            if st.get("kind") != "linprobe_features" or st.get("num_samples") != n:
                raise ValueError("the checkpoint's loader state is not a cached-feature state of this list "
                                 "(resume with the same linprobe.cache_features and data lists, or resume=none)")
            self.epoch, self._step = int(st["epoch"]), int(st["step"])
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.feats.shape[0], generator=g)
        return perm[self.shard_id::self.num_shards][: self.steps_per_epoch * self.batch_size]

    def state(self) -> str:
        return json.dumps({"kind": "linprobe_features", "num_samples": int(self.feats.shape[0]),
                           "epoch": self.epoch, "step": self._step})

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._step >= self.steps_per_epoch:
            self.epoch, self._step = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self._step * self.batch_size:(self._step + 1) * self.batch_size]
        self._step += 1
        return {"images": self.feats[idx].to(self.device), "labels": self.labels[idx].to(self.device),
                "sample_ids": idx}


class FeatureEvalLoader:
    """One pass over cached features per ``iter()``, sharded like EvalLoader: every rank
    ``ceil(ceil(N / world) / B)`` batches, padding rows valid=False (so each sample counts once).
    Each batch: {"images": features [B, D], "labels" [B], "sample_ids" [B], "valid" bool [B]}."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, *, batch_size: int, shard_id: int,
                 num_shards: int, device: torch.device):
        self.feats, self.labels, self.batch_size, self.device = feats, labels, batch_size, device
        n = feats.shape[0]
        self.ids = torch.tensor(list(shard_indices(n, shard_id, num_shards)), dtype=torch.int64)
        self.num_batches = math.ceil(math.ceil(n / num_shards) / batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        B = self.batch_size
        for i in range(self.num_batches):
            pos = torch.arange(i * B, (i + 1) * B)
            valid = pos < len(self.ids)
            # padding rows repeat a real row (or row 0 on an empty shard): safe to index, never counted
            if len(self.ids):
                idx = self.ids[pos.clamp(max=len(self.ids) - 1)]
            else:
                idx = torch.zeros(B, dtype=torch.int64)
            yield {"images": self.feats[idx].to(self.device), "labels": self.labels[idx].to(self.device),
                   "sample_ids": idx, "valid": valid.to(self.device)}
