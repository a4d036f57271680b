"""The DeepSpeed training loop shared by pre-training and fine-tuning.

A task supplies the model, a loader factory and a micro-step function; the Trainer
owns everything else: DeepSpeed config resolution, AdamW + schedules, the loop,
logging, non-finite handling, checkpoints and exact auto-resume (elastic on another
world size or ZeRO stage: engine/elastic.py).

Per optimizer step: set lr/wd -> ``grad_accum`` x (next batch, forward, backward,
``engine.step``) -> DeepSpeed reduces, clips and steps at the accumulation boundary.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import deepspeed
import numpy as np
import torch

from mapet_ds.config import ConfigError, RunConfig, TrainConfig, config_to_dict, save_config
from mapet_ds.engine import checkpoint as ckpt
from mapet_ds.engine import elastic
from mapet_ds.engine.dist import DistInfo, all_reduce_mean, barrier
from mapet_ds.engine.ds_config import load_ds_json, resolve_ds_config, write_json
from mapet_ds.engine.metrics import MetricLogger, Throughput, detect_peak_tflops, format_eta, max_memory_gib
from mapet_ds.engine.optim import Schedule, build_optimizer
from mapet_ds.models.objectives import plan_generator

# micro_step(engine, batch) -> {"loss": scalar tensor, other scalar metrics...}
MicroStep = Callable[[Any, dict], dict[str, torch.Tensor]]
# build_loader(micro_batch_size, checkpoint_state_or_None) -> loader with steps_per_epoch and state()
LoaderFactory = Callable[[int, Optional[str]], Any]


class NonFiniteStop(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0
    skipped_steps: int = 0
    nonfinite_streak: int = 0
    extra: dict = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        section: str,
        ds_config_path: str | dict,
        model: torch.nn.Module,
        dist: DistInfo,
        build_loader: LoaderFactory,
        micro_step: MicroStep,
        *,
        flops_per_image: float,
        layer_decay: Optional[float] = None,
        log_hook: Optional[Callable[["Trainer", dict], dict]] = None,
        step_hook: Optional[Callable[["Trainer"], None]] = None,
        client_state_fn: Optional[Callable[[], dict]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ):
        """``ds_config_path``: a DeepSpeed JSON path, or its already-loaded dict (a job that
        must adjust it, e.g. linear probing's ZeRO-0). ``optimizer``: a client optimizer over
        ``model``'s trainable parameters instead of AdamW (linear probing's LARS); the
        schedule scales its groups' lr as for AdamW."""
        self.cfg = cfg
        self.section = section
        self.train: TrainConfig = getattr(cfg, section)
        self.dist = dist
        self.run_dir = Path(self.train.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.micro_step = micro_step
        self.log_hook = log_hook
        self.step_hook = step_hook
        self.flops_per_image = flops_per_image
        self.client_state_fn = client_state_fn

        # A checkpoint from another world size or ZeRO stage resumes elastically (engine/elastic.py)
        tag_dir = self._resume_target()
        if isinstance(ds_config_path, dict):
            ds_src = str(ds_config_path.get("_source", "ds_config"))  # the file it was read from, for messages
            ds_json = {k: v for k, v in ds_config_path.items() if k != "_source"}
        else:
            ds_json, ds_src = load_ds_json(ds_config_path), str(ds_config_path)
        self.elastic = elastic.ElasticResume.detect(tag_dir, ds_json, self.train, dist.world_size, section)
        ds = resolve_ds_config(ds_json, self.elastic.train if self.elastic else self.train, cfg.optim,
                               dist.world_size, dist.device, src=ds_src, section=section)
        self.precision = "bf16" if ds["bf16"]["enabled"] else ("fp16" if ds["fp16"]["enabled"] else "fp32")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        self.micro_batch = ds["train_micro_batch_size_per_gpu"]
        self.grad_accum = ds["gradient_accumulation_steps"]
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(ds, self.run_dir / "ds_config.json")
            save_config(cfg, self.run_dir / "config.yaml")

        # DeepSpeed checks gradients for inf/nan only in its ZeRO (>= 1) and bf16/fp16
        # optimizers; with ZeRO-0 fp32 the client AdamW would apply them. There we check,
        # skip and clip ourselves (DeepSpeed's clipping cannot run on a skipped step).
        self._own_nonfinite_check = ds["zero_optimization"].get("stage", 0) == 0 and self.precision == "fp32"
        self._own_clip = ds["gradient_clipping"] if self._own_nonfinite_check else 0.0
        self._own_skipped = 0
        self._own_grad_norm: Optional[float] = None
        if self._own_nonfinite_check:
            ds = {**ds, "gradient_clipping": 0.0}
        self.optimizer = optimizer if optimizer is not None else build_optimizer(model, cfg.optim, layer_decay)
        if self.elastic:
            ds = self.elastic.engine_config(ds, self.precision)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds)
        self.module = self.engine.module

        self.state = TrainState()
        # mim plans are drawn on the host (models/objectives.py), mapet/pet on the device
        self.plan_generator = plan_generator(cfg.objective.name, dist.device, self.train.seed * 1000 + dist.rank)
        # drop-path draws differ per rank; timm's Mixup/CutMix draw from numpy's global RNG and
        # RandomErasing from Python's, so those are seeded too (a new run repeats exactly)
        torch.manual_seed(self.train.seed * 1000 + dist.rank)
        random.seed(self.train.seed * 1000 + dist.rank)
        np.random.seed(self.train.seed * 1000 + dist.rank)

        loader_state, rng = None, None
        self.resumed_from: Optional[Path] = None
        self.resumed_client: Optional[dict] = None
        if tag_dir is not None:
            if self.elastic:
                client, loader_state = self.elastic.load(self.engine, dist.rank)
            else:
                client, rank_state = ckpt.load(self.engine, tag_dir, rank=dist.rank)
                loader_state, rng = rank_state["loader"], rank_state["rng"]
            self.resumed_client = client
            self.state.step = int(client["step"])
            self.state.samples_seen = int(client["samples_seen"])
            self.state.skipped_steps = int(client.get("skipped_steps", 0))
            self.state.extra = dict(client.get("extra", {}))
            if self.elastic:
                elastic.reseed(self.train.seed, dist.rank, self.state.step, self.plan_generator)
            self.resumed_from = tag_dir
        self.loader = build_loader(self.micro_batch, loader_state)
        if rng is not None:
            ckpt.set_rng_state(rng, self.plan_generator)
        self.steps_per_epoch = max(1, self.loader.steps_per_epoch // self.grad_accum)
        if self.elastic and "steps_per_epoch" in client:
            self.steps_per_epoch = int(client["steps_per_epoch"])  # the schedule continues by optimizer step
        if self.train.max_steps is not None:
            self.total_steps = self.train.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.train.epochs * self.steps_per_epoch))
        self.schedule = Schedule(self.optimizer, cfg.optim, self.total_steps, self.steps_per_epoch)
        self.logger = MetricLogger(self.run_dir, dist.is_main, resume_step=self.state.step)
        self.peak_tflops = detect_peak_tflops(dist.device, self.train.peak_tflops)
        self._ds_skipped_base = self.engine.skipped_steps
        if self.elastic and dist.is_main:
            note = self.elastic.summary(self.state.step, self.loader)
            print(f"[{section}] {note}", flush=True)
            self.logger.text("resume", note, self.state.samples_seen)
        debug = os.environ.get("MAPET_DEBUG_RESUME_STATE")
        if debug and tag_dir is not None:
            lr, _ = self.schedule.apply(self.state.step, self.engine.optimizer.param_groups)
            elastic.dump_state(self.engine, debug, self.state.step, lr, dist.rank)
        self._sample_log = None
        if os.environ.get("MAPET_DEBUG_SAMPLES"):  # tests: which sample ids each rank trained on
            self._sample_log = open(f"{os.environ['MAPET_DEBUG_SAMPLES']}.rank{dist.rank}", "a", encoding="utf-8")
        if dist.is_main:
            how = f"resumed from {tag_dir}" if tag_dir else "new run"
            print(f"[{section}] {how}: step {self.state.step}/{self.total_steps}, "
                  f"{self.steps_per_epoch} steps/epoch, micro batch {self.micro_batch} x accum "
                  f"{self.grad_accum} x {dist.world_size} rank(s), {self.precision}, ZeRO "
                  f"{self.engine.zero_optimization_stage()}, run dir {self.run_dir}", flush=True)

    # ----------------------------------------------------------------------------------
    def _resume_target(self) -> Optional[Path]:
        r = self.train.resume
        if r in ("none", "", None):
            return None
        if r == "auto":
            return ckpt.newest_complete(self.ckpt_dir)
        p = Path(r)
        if (p / ckpt.MARKER).is_file():
            return p
        found = ckpt.newest_complete(p / "checkpoints") or ckpt.newest_complete(p)
        if found is None:
            raise ConfigError(f"{self.section}.resume={r!r}: no complete checkpoint there (use 'auto' or 'none')")
        return found

    @property
    def epoch(self) -> float:
        return self.state.step / self.steps_per_epoch

    def save(self) -> Path:
        client = {"step": self.state.step, "samples_seen": self.state.samples_seen,
                  "skipped_steps": self.state.skipped_steps, "extra": self.state.extra,
                  "config": config_to_dict(self.cfg), "section": self.section,
                  "world_size": self.dist.world_size, "zero_stage": int(self.engine.zero_optimization_stage()),
                  "steps_per_epoch": self.steps_per_epoch}
        if self.client_state_fn is not None:
            client.update(self.client_state_fn())
        rank_state = {"loader": self.loader.state(), "rng": ckpt.rng_state(self.plan_generator)}
        return ckpt.save(self.engine, self.ckpt_dir, self.state.step, client, rank_state,
                         rank=self.dist.rank, keep_last=self.train.keep_last)

    # ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Run to ``total_steps``; returns the last logged metrics."""
        st = self.state
        self.engine.train()
        thr = Throughput()
        pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        last: dict = {}
        saved_at = st.step if self.resumed_from else -1
        t_start = time.perf_counter()
        start_step = st.step
        while st.step < self.total_steps:
            lr, wd = self.schedule.apply(st.step, self.engine.optimizer.param_groups)
            sums: dict[str, torch.Tensor] = {}
            for i in range(self.grad_accum):
                t0 = time.perf_counter()
                epoch_of_batch = getattr(self.loader, "epoch", 0)
                batch = next(self.loader)
                wait = time.perf_counter() - t0
                if self._sample_log is not None:
                    self._sample_log.write(json.dumps({"step": st.step + 1, "epoch": epoch_of_batch,
                                                       "ids": batch["sample_ids"].tolist()}) + "\n")
                    self._sample_log.flush()
                out = self.micro_step(self.engine, batch)
                self.engine.backward(out["loss"])
                if self._own_nonfinite_check and i == self.grad_accum - 1:
                    self._drop_nonfinite_grads()
                self.engine.step()
                n = int(batch["images"].shape[0])
                thr.add(n, wait)
                for k, v in out.items():
                    if v.dim() == 0:
                        sums[k] = sums.get(k, 0) + v.detach().float() / self.grad_accum
            st.step += 1
            st.samples_seen += self.micro_batch * self.grad_accum * self.dist.world_size
            pending.append((st.step, sums))
            skipped_now = self.engine.skipped_steps - self._ds_skipped_base + self._own_skipped
            if skipped_now > st.skipped_steps:  # DeepSpeed found inf/nan gradients and skipped
                st.skipped_steps = skipped_now
                st.nonfinite_streak += 1
                if self.dist.is_main:
                    print(f"[{self.section}] WARNING step {st.step}: non-finite loss or gradient norm, "
                          f"update skipped ({st.skipped_steps} skipped so far)", flush=True)
                if st.nonfinite_streak >= self.train.max_nonfinite:
                    self._flush(pending, lr, wd, thr, last)
                    self.logger.close()
                    raise NonFiniteStop(
                        f"{st.nonfinite_streak} consecutive non-finite steps (up to step {st.step}, "
                        f"{self.section}.max_nonfinite={self.train.max_nonfinite}): stopped; the last good "
                        f"checkpoint is kept in {self.ckpt_dir} (lower optim.lr or check the data)"
                    )
            else:
                st.nonfinite_streak = 0
            ckpt.fault_point("step", st.step)
            if self.step_hook is not None:
                self.step_hook(self)
            if st.step % self.train.log_every == 0 or st.step == self.total_steps:
                last = self._flush(pending, lr, wd, thr, last)
                if self.dist.is_main:
                    done = st.step - start_step
                    eta = (time.perf_counter() - t_start) / max(done, 1) * (self.total_steps - st.step)
                    print(f"[{self.section}] step {st.step}/{self.total_steps} epoch {self.epoch:.2f} "
                          f"loss {last.get('loss', float('nan')):.4f} "
                          + (f"acc {last['acc']:.4f} " if "acc" in last else "")
                          + f"lr {lr:.2e} {last.get('images_per_sec', 0):.1f} img/s ETA {format_eta(eta)}",
                          flush=True)
                thr.reset()
            if st.nonfinite_streak == 0 and (st.step % self.train.save_every == 0 or st.step == self.total_steps):
                self.save()
                saved_at = st.step
        if saved_at != st.step and st.nonfinite_streak == 0:
            self.save()
        self.logger.flush()
        return last

    def _drop_nonfinite_grads(self) -> None:
        """ZeRO-0 fp32, at the accumulation boundary (gradients already all-reduced, so the
        same on every rank): inf/nan -> drop every gradient, and AdamW leaves all parameters
        and their state untouched; else clip to optim.clip_grad as DeepSpeed would."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        self._own_grad_norm = float(norm)  # host sync, once per optimizer step
        if not math.isfinite(self._own_grad_norm):
            for p in params:
                p.grad = None
            self._own_skipped += 1
        elif self._own_clip:
            torch.nn.utils.clip_grad_norm_(params, self._own_clip)

    def _flush(self, pending, lr, wd, thr: Throughput, last: dict) -> dict:
        """One sync per log interval: per-step metrics averaged over ranks, then written."""
        if not pending:
            return last
        keys = sorted(pending[0][1])
        table = torch.stack([torch.stack([s[k] for k in keys]) for _, s in pending])  # [steps, keys]
        table = all_reduce_mean(table).cpu()
        dt, ips, wait = thr.read()
        grad_norm = self._own_grad_norm if self._own_nonfinite_check else self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        ips_global = ips * self.dist.world_size
        mfu = None
        if self.peak_tflops:
            mfu = 3 * self.flops_per_image * ips / (self.peak_tflops * 1e12)
        self.logger.records([{"step": step, **{k: float(v) for k, v in zip(keys, row)}}
                             for (step, _), row in zip(pending, table)])
        means = {k: float(table[:, i].mean()) for i, k in enumerate(keys)}
        x = self.state.samples_seen
        scalars = {f"train/{'token_acc' if k == 'acc' else k}": v for k, v in means.items()}
        scalars.update({
            "opt/lr": lr, "opt/weight_decay": wd, "opt/grad_norm": grad_norm,
            "opt/skipped_steps": float(self.state.skipped_steps),
            "throughput/images_per_sec": ips_global, "throughput/images_per_sec_per_device": ips,
            "throughput/mfu": mfu, "time/data_wait_fraction": wait,
            "memory/max_allocated_gib": max_memory_gib(self.dist.device),
            "train/epoch": self.epoch, "train/step": float(self.state.step),
        })
        if self.log_hook is not None:
            scalars.update(self.log_hook(self, means))
        self.logger.scalars(scalars, x)
        pending.clear()
        return {**means, "images_per_sec": ips_global, "grad_norm": grad_norm, "lr": lr, "mfu": mfu}

    def close(self) -> None:
        if self._sample_log is not None:
            self._sample_log.close()
        self.logger.close()
        barrier()
