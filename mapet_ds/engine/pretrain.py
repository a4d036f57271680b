"""Pre-training: DALI batch -> token rows by sample id -> plan on the device -> model.

    deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json \
        --config launch/recipes/vit_base_in1k_mapet.yaml [section.key=value ...]
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from mapet_ds.config import ConfigError, RunConfig, load_config
from mapet_ds.engine.cli import check_run_dir, job_parser, run_job
from mapet_ds.engine.dist import DistInfo, all_reduce_sum, init_distributed
from mapet_ds.engine.synthetic import SyntheticLoader, synthetic_token_table
from mapet_ds.engine.trainer import Trainer
from mapet_ds.filelist import read_filelist
from mapet_ds.models.flops import pretrain_forward_flops
from mapet_ds.models.objectives import plan_generator
from mapet_ds.models.pretrain import PretrainModel
from mapet_ds.transfer import to_device


def build_online_tokenizer(cfg: RunConfig, device: torch.device):
    """VQ-KD / dVAE encoders, or a k-means codebook with its extractor (``tokenizer.online=true``:
    the tokens then see the augmented view, random resized crop included), run in the step
    (frozen, outside the DeepSpeed engine)."""
    tk = cfg.tokenizer
    if tk.kind in ("pixel_kmeans", "kclip"):
        if tk.codebook is None:
            raise ConfigError(f"tokenizer.kind={tk.kind!r} with online=true needs tokenizer.codebook=<file> "
                              f"(launch/tokens.py fit)")
        from mapet_ds.tokenizers import Codebook, KMeansTokenizer, build_extractor

        codebook = Codebook.load(tk.codebook)
        # tokenizer.weights: a new location of the CLIP weights the codebook was fitted with
        extractor = build_extractor(codebook.meta["extractor"], clip_weights=tk.weights, device=str(device))
        enc = KMeansTokenizer(extractor, codebook, tk.codebook)
    elif tk.weights is None:
        raise ConfigError(f"tokenizer.kind={tk.kind!r} runs online and needs tokenizer.weights=<local weight file>")
    elif tk.kind == "vqkd":
        from mapet_ds.tokenizers.vqkd import VQKDEncoder

        enc = VQKDEncoder.load(tk.weights, device=str(device), amp=device.type == "cuda")
    elif tk.kind == "dvae":
        from mapet_ds.tokenizers.dvae import DVAEEncoder

        enc = DVAEEncoder.load(tk.weights, device=str(device), input_size=tk.input_size or 112,
                               amp=device.type == "cuda")
    else:  # pragma: no cover - the config's Literal allows only the kinds above
        raise ConfigError(f"tokenizer.kind={tk.kind!r} cannot run online")
    src = tk.codebook if tk.kind in ("pixel_kmeans", "kclip") else tk.weights
    if enc.grid != cfg.model.grid:
        raise ConfigError(f"tokenizer {src} has a {enc.grid}x{enc.grid} grid but the ViT has "
                          f"{cfg.model.grid}x{cfg.model.grid} patches (model.img_size / model.patch_size)")
    if enc.vocab_size > cfg.tokenizer.vocab_size:
        raise ConfigError(f"tokenizer {src} has {enc.vocab_size} codes > tokenizer.vocab_size="
                          f"{tk.vocab_size}; set tokenizer.vocab_size={enc.vocab_size}")
    return enc


class PretrainStep:
    """One micro step: returns {"loss", "acc"} scalars; keeps target-code counts for logging."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, token_table: Optional[torch.Tensor], online_tokenizer,
                 filelist=None):
        self.cfg = cfg
        self.dist = dist
        self.token_table = token_table  # int16 [N_images, grid*grid] on the device
        self.online_tokenizer = online_tokenizer
        self.code_counts = torch.zeros(cfg.tokenizer.vocab_size, dtype=torch.long, device=dist.device)
        n = cfg.model.num_patches
        # per-position hits / predictions of the training batches since the last picture
        self.pos_hits = torch.zeros(n, dtype=torch.long, device=dist.device)
        self.pos_seen = torch.zeros(n, dtype=torch.long, device=dist.device)
        self._vis_batch: Optional[dict] = None
        self._usage_counts = self.code_counts  # replaced by the all-reduced counts at each log
        self.filelist = filelist  # None with synthetic data: no fixed images to draw
        self.trainer: Optional[Trainer] = None
        self._fault_nan_from = _fault_step("nan_loss")

    def __call__(self, engine, batch: dict) -> dict[str, torch.Tensor]:
        device = self.dist.device
        images = to_device(batch["images"], device)
        if self.online_tokenizer is not None:
            with torch.no_grad():
                tokens = self.online_tokenizer.tokenize(to_device(batch["tok_images"], device))
        elif "tokens" in batch:  # shards: the token rows travel with the images
            tokens = to_device(batch["tokens"], device).long()
        else:
            tokens = self.token_table[to_device(batch["sample_ids"], device)].long()
        images = images.to(self.trainer.dtype)
        plan = engine.module.sample_plan(images.shape[0], device, self.trainer.plan_generator)
        out = engine(images, tokens, plan)
        # index_add_, not bincount: CUDA bincount reads the max id back to the host every step
        targets = out["targets"].flatten()
        self.code_counts.index_add_(0, targets, torch.ones_like(targets))
        if self.cfg.pretrain.vis_every:
            hits = out["hits"].long()
            self.pos_hits.scatter_add_(0, plan.predicted.flatten(), hits.flatten())
            self.pos_seen.scatter_add_(0, plan.predicted.flatten(), torch.ones_like(hits).flatten())
        loss = out["loss"]
        if self._fault_nan_from is not None and self.trainer.state.step + 1 >= self._fault_nan_from:
            loss = loss * float("nan")  # fault injection for the non-finite tests
        return {"loss": loss, "acc": out["acc"]}

    def log_hook(self, trainer: Trainer, means: dict) -> dict:
        counts = all_reduce_sum(self.code_counts).double()
        self._usage_counts = counts
        self.code_counts.zero_()
        total = counts.sum().clamp(min=1)
        p = counts / total
        ent = -(p[p > 0] * p[p > 0].log()).sum()
        return {"tokenizer/codes_used": float((counts > 0).sum()),
                "tokenizer/code_perplexity": float(ent.exp())}


    # -- pictures (rank 0, every pretrain.vis_every steps) -------------------------------
    def vis_hook(self, trainer: Trainer) -> None:
        """Rank 0 alone runs a forward on fixed images: fine with ZeRO <= 2 (full weights on every rank)."""
        every = self.cfg.pretrain.vis_every
        if not every or trainer.state.step % every or not self.dist.is_main or self.filelist is None:
            return
        from mapet_ds.analysis import figures as F
        from mapet_ds.analysis import visualize as V

        cfg, device = self.cfg, self.dist.device
        grid = cfg.model.grid
        if self._vis_batch is None:
            self._vis_batch = self._fixed_images(trainer)
        vb = self._vis_batch
        module = trainer.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            plan = module.sample_plan(vb["uint8"].shape[0], device, plan_generator(module.objective, device, 0))
            out = module(vb["images"].to(trainer.dtype), vb["tokens"], plan)
        module.train(was_training)
        step, x = trainer.state.step, trainer.state.samples_seen
        run, vocab = trainer.run_dir.name, cfg.tokenizer.vocab_size
        acc = torch.where(self.pos_seen > 0, self.pos_hits.float() / self.pos_seen.clamp(min=1), float("nan"))
        # One picture per tag, the same array to TensorBoard and to the PNG file.
        pictures = {
            "pretrain/plan": F.plan_figure(vb["uint8"], plan.rank, plan.predicted, out["targets"],
                                           out["logits"].argmax(-1), vocab, grid, objective=cfg.objective.name,
                                           run=run, step=step),
            "pretrain/position_accuracy": F.position_accuracy_figure(
                acc.cpu(), grid, run=run, step=step, source="(training batches since the last picture)"),
            "tokenizer/token_maps": F.token_maps_figure(vb["uint8"], vb["tokens"], vocab,
                                                        title=f"tokenizer {cfg.tokenizer.kind}", run=run, step=step),
            "tokenizer/code_usage": V.code_usage_histogram(
                self._usage_counts.cpu(), title=f"training targets, run {run}, step {step:,}: code usage"),
        }
        self.pos_hits.zero_()
        self.pos_seen.zero_()
        for tag, img in pictures.items():
            trainer.logger.image(tag, img, x)
            V.save_png(img, trainer.run_dir / "vis" / f"step{step:08d}_{tag.replace('/', '_')}.png")
        trainer.logger.flush()

    def _fixed_images(self, trainer: Trainer, count: int = 4) -> dict:
        """``count`` images spread over the list (so over classes), as the tokenizer saw them."""
        from mapet_ds.pipelines import tokenizer_view_loader

        cfg, device, fl = self.cfg, self.dist.device, self.filelist
        picks = torch.linspace(0, len(fl) - 1, min(count, len(fl))).round().long().unique()
        sub = type(fl)(fl.list_path, fl.root, [fl.paths[i] for i in picks], [fl.labels[i] for i in picks], fl.classes)
        batch = next(iter(tokenizer_view_loader(sub, size=cfg.model.img_size, batch_size=len(picks),
                                                device=cfg.data.decode)))
        u8 = batch["images"].to(device)
        mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)
        images = (u8.float() / 255.0 - mean) / std
        if self.online_tokenizer is not None:
            with torch.no_grad():
                tokens = self.online_tokenizer.tokenize(u8)
        else:  # the sub-list's sample ids index ``picks``: map them back to the full list
            tokens = self.token_table[picks[batch["sample_ids"]].to(device)].long()
        return {"uint8": u8, "images": images, "tokens": tokens}


def _fault_step(kind: str) -> Optional[int]:
    spec = os.environ.get("MAPET_FAULT", "")
    if spec.startswith(kind + ":"):
        return int(spec.split(":", 1)[1])
    return None


def load_token_table(cfg: RunConfig, filelist, device: torch.device) -> torch.Tensor:
    from mapet_ds.tokenizers.store import TokenStore

    tk = cfg.tokenizer
    if tk.token_store is None:
        raise ConfigError(
            f"tokenizer.kind={tk.kind!r} is offline and needs tokenizer.token_store=<dir> "
            f"(make it with `python launch/tokens.py assign`)"
        )
    from mapet_ds.pipelines.graphs import pretrain_view_spec

    store = TokenStore.open(tk.token_store, filelist=filelist, grid=cfg.model.grid,
                            view=pretrain_view_spec(cfg.data.random_resized_crop), pixel_norm=tk.pixel_norm)
    if store.vocab > tk.vocab_size:
        raise ConfigError(f"token store {tk.token_store} has vocab {store.vocab} > tokenizer.vocab_size="
                          f"{tk.vocab_size}; set tokenizer.vocab_size={store.vocab}")
    return store.as_tensor(device)


def build_trainer(cfg: RunConfig, ds_config: str, dist: DistInfo) -> Trainer:
    from mapet_ds.pipelines import pretrain_loader

    d = cfg.data
    check_run_dir(cfg.pretrain.output_dir, [(d.train_list, "data.train_list"), (d.val_list, "data.val_list"),
                                            (d.train_shards, "data.train_shards"),
                                            (d.val_shards, "data.val_shards"),
                                            (cfg.tokenizer.token_store, "tokenizer.token_store"),
                                            (cfg.tokenizer.weights, "tokenizer.weights"),
                                            (cfg.tokenizer.codebook, "tokenizer.codebook")], "pretrain.output_dir")
    online = cfg.tokenizer.online or cfg.tokenizer.kind in ("vqkd", "dvae")
    if d.synthetic:
        if online:
            raise ConfigError("data.synthetic=true needs an offline tokenizer kind (pixel_kmeans or kclip)")
        fl, tokenizer = None, None
        table = synthetic_token_table(d.synthetic_samples, cfg.model.grid, cfg.tokenizer.vocab_size, dist.device,
                                      cfg.pretrain.seed)
    elif d.train_shards is not None:
        # no file list and no token table: labels and tokens come out of the shards
        from mapet_ds.pipelines.shards import check_tokens, open_shards

        shards = open_shards(d.train_shards)
        tokenizer = build_online_tokenizer(cfg, dist.device) if online else None
        if not online:
            tk = cfg.tokenizer
            from mapet_ds.pipelines.graphs import pretrain_view_spec

            check_tokens(shards, grid=cfg.model.grid, vocab=tk.vocab_size, kind=tk.kind, fingerprint=tk.fingerprint,
                         codebook=tk.codebook, token_store=tk.token_store,
                         view=pretrain_view_spec(d.random_resized_crop), pixel_norm=tk.pixel_norm)
        fl, table = None, None
    else:
        if d.train_list is None:
            raise ConfigError("data.train_list is not set: point it at a file list (data/make_filelist.py) "
                              "or data.train_shards at shards (data/make_shards.py)")
        fl = read_filelist(d.train_list, d.root)
        tokenizer = build_online_tokenizer(cfg, dist.device) if online else None
        table = None if online else load_token_table(cfg, fl, dist.device)
    torch.manual_seed(cfg.pretrain.seed)  # identical initial weights on every rank and every run
    model = PretrainModel(cfg.model, cfg.objective, cfg.tokenizer.vocab_size)
    step = PretrainStep(cfg, dist, table, tokenizer, fl)

    def build_loader(micro_batch: int, state: Optional[str]):
        if d.synthetic:
            return SyntheticLoader(batch_size=micro_batch, img_size=cfg.model.img_size,
                                   num_samples=d.synthetic_samples, device=dist.device, seed=cfg.pretrain.seed,
                                   rank=dist.rank, checkpoint=state)
        if d.train_shards is not None:
            from mapet_ds.pipelines.shards import pretrain_shard_loader

            return pretrain_shard_loader(
                shards, img_size=cfg.model.img_size, batch_size=micro_batch, shard_id=dist.rank,
                num_shards=dist.world_size, seed=cfg.pretrain.seed, num_threads=d.num_threads, device=d.decode,
                color_jitter=d.color_jitter, mean=d.mean, std=d.std,
                tokenizer_view_size=tokenizer.input_size if tokenizer is not None else None,
                random_resized_crop=d.random_resized_crop, tokens=tokenizer is None, checkpoint=state,
                prefetch_queue_depth=d.prefetch_queue_depth,
            )
        return pretrain_loader(
            fl, img_size=cfg.model.img_size, batch_size=micro_batch, shard_id=dist.rank,
            num_shards=dist.world_size, seed=cfg.pretrain.seed, num_threads=d.num_threads, device=d.decode,
            color_jitter=d.color_jitter, mean=d.mean, std=d.std,
            tokenizer_view_size=tokenizer.input_size if tokenizer is not None else None,
            random_resized_crop=d.random_resized_crop, checkpoint=state,
            prefetch_queue_depth=d.prefetch_queue_depth,
        )

    flops = pretrain_forward_flops(cfg.model, cfg.objective.name, model.num_predicted, cfg.tokenizer.vocab_size)
    trainer = Trainer(cfg, "pretrain", ds_config, model, dist, build_loader, step,
                      flops_per_image=flops.total, log_hook=step.log_hook, step_hook=step.vis_hook)
    step.trainer = trainer
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = job_parser("MaPeT / PeT / MIM pre-training with DeepSpeed").parse_args(argv)

    def job():
        cfg = load_config(args.config, args.overrides)
        trainer = build_trainer(cfg, args.ds_config, init_distributed(args.local_rank))
        trainer.fit()
        trainer.close()

    return run_job(job)
