"""Synthetic batches for throughput and MFU measurement without a dataset.

``data.synthetic=true`` replaces the DALI pipeline and the token store by fixed random
tensors already on the training device, so the figures measure the model, DeepSpeed
and the device, not the input pipeline (as ``--synthetic`` does in most trainers).
"""

from __future__ import annotations

import json

import torch


class SyntheticLoader:
    """Endless batches of one fixed random batch; same interface as the DALI TrainLoader.

    images: float32 [B, 3, S, S] on ``device``; sample_ids: int64 [B] cycling over
    ``num_samples`` (rows of the synthetic token table).
    """

    def __init__(self, *, batch_size: int, img_size: int, num_samples: int, device: torch.device, seed: int,
                 rank: int, checkpoint: str | None = None):
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        self.images = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(device)
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.steps_per_epoch = max(1, num_samples // batch_size)
        self._taken = json.loads(checkpoint)["taken"] if checkpoint else 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = (self._taken * self.batch_size) % self.num_samples
        ids = (torch.arange(self.batch_size) + start) % self.num_samples
        self._taken += 1
        return {"images": self.images, "sample_ids": ids}

    def state(self) -> str:
        return json.dumps({"taken": self._taken})


def synthetic_token_table(num_samples: int, grid: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    """int16 [num_samples, grid*grid] random token ids (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_samples, grid * grid), generator=g, dtype=torch.int16).to(device)
