"""Training a 3DSAM-adapter (``model.family: 3dsam_adapter``) with one of the two published recipes.

One process, batch 1 (the recipes'), one pass of the model per sample (points in, 2-class logits out; no click
loop: the family has no previous-mask input). Per optimiser step: loss = ``dice_weight`` x Dice loss (softmax
foreground) + ``ce_weight`` x cross-entropy, gradient-norm clip (original: every trained tensor; dualpath: the
adapters' only), AdamW. LinearLR from 1.0 to ``lr_end_factor`` over ``loop.epochs``, stepped after each epoch.
Validation (``val.every_epochs``): the Dice loss (and hard Dice) on the validation crops; ``best.pt`` is the
model with the lowest validation Dice loss, ``latest.pt`` the last epoch's (resumable with ``--resume auto``; a
run stopped inside an epoch by ``loop.max_steps``/``max_minutes`` resumes at that epoch's start),
``final.pt`` the model at the end. All three are 3DSAM-adapter files (published layout plus the run's
normalisation, :mod:`SAM3DSegmentLib.models.sam3d_adapter.files`), loadable by ``sam3d segment --checkpoint``.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

from .adapter_model import build_adapter_model
from .adapter_samples import AdapterSamples, dataset_intensity
from .config import ConfigError, TrainConfig, config_to_dict
from .device import autocast, memory_report, resolve_amp, resolve_device, seed_everything
from .runlog import MetricsLog

__all__ = ["AdapterTrainer", "train_adapter", "adapter_loss"]


def adapter_loss(logits, label, dice_weight: float = 0.5, ce_weight: float = 0.5, smooth: float = 1e-5):
    """``(loss, dice_loss)`` of 2-class logits (B, 2, D, H, W) against a 0/1 label (B, 1, D, H, W): soft Dice of
    the softmax foreground (per sample, averaged) and the mean voxel cross-entropy."""
    import torch.nn.functional as F

    logits = logits.float()
    p = F.softmax(logits, dim=1)[:, 1].flatten(1)
    g = label.float().flatten(1)
    dice = (1.0 - (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)).mean()
    ce = F.cross_entropy(logits, label[:, 0].long())
    return dice_weight * dice + ce_weight * ce, dice


class AdapterTrainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg, self.log = cfg, log
        self.resumed_from: Optional[str] = None

    # ------------------------------------------------------------------ setup
    def _check_config(self) -> None:
        cfg = self.cfg
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("the 3DSAM-adapter trainer runs in one process (batch 1): start it without "
                              "torchrun / --nproc")
        if "batch_size" in cfg.loop.model_fields_set and cfg.loop.batch_size != 1:
            raise ConfigError(f"loop.batch_size {cfg.loop.batch_size}: the 3DSAM-adapter recipes train with "
                              "batch 1 (leave loop.batch_size out)")
        if "spacing" in cfg.data.model_fields_set and cfg.data.spacing != 1.0:
            raise ConfigError(f"data.spacing {cfg.data.spacing}: the 3DSAM-adapter works on 1 mm crops (leave "
                              "data.spacing out)")

    def setup(self) -> None:
        import torch

        from ..models.sam3d_adapter.recipes import adapter_parameters
        from .data import prepare_dataset

        cfg, s = self.cfg, self.cfg.sam3d_adapter
        self._check_config()
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed, cfg.threads, cfg.deterministic)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.model, self.init = build_adapter_model(cfg, self.log)
        counts = self.init["counts"]
        self.log(f"3DSAM-adapter recipe {cfg.model.recipe}: {counts['trainable']:,} of {counts['total']:,} "
                 f"parameters trainable ({100.0 * counts['trainable'] / counts['total']:.2f} %; the recipe's set "
                 f"is {counts['recipe']:,})")
        self.model.to(self.device)
        d = cfg.data
        if d.make_demo_data:
            from ..data.demo_data import ensure_demo_dataset

            for root in d.roots:
                ensure_demo_dataset(root, log=self.log)
        cache = d.cache_dir or os.path.join(cfg.output_dir, "cache")
        self.data = prepare_dataset(d.roots, cache, layout=d.layout, spacing=1.0, image_dtype=d.image_dtype,
                                    min_target_mm3=d.min_target_mm3, val_fraction=d.val_fraction,
                                    val_cases=d.val_cases, split_seed=d.split_seed, log=self.log)
        self.intensity = dataset_intensity(self.data.cases, self.data.train_targets, s, self.init["intensity"],
                                           cfg.seed)
        self.log(f"data: {len(self.data.train_ids)} training / {len(self.data.val_ids)} validation cases at 1 mm; "
                 f"input {self.intensity.describe()}")
        size = self.model.config.image_size
        self.train_ds = AdapterSamples(self.data.cases, self.data.train_targets, size, s, self.intensity, cfg.seed,
                                       samples_per_epoch=cfg.loop.samples_per_epoch)
        self.val_ds = (AdapterSamples(self.data.cases, self.data.val_targets, size, s, self.intensity, cfg.seed,
                                      train=False, max_targets=cfg.val.max_targets)
                       if self.data.val_targets and cfg.val.every_epochs > 0 else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clipped = (self.params if cfg.model.recipe == "original"
                        else [p for p in adapter_parameters(self.model) if p.requires_grad])
        self.optimizer = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=1.0, end_factor=s.lr_end_factor,
                                                          total_iters=max(1, cfg.loop.epochs))
        self.state = {"epoch": 0, "step": 0, "best_val_dice_loss": math.inf}
        from .checkpointing import resume_path

        path = resume_path(cfg.checkpoint.resume, cfg.output_dir)
        if path is not None:
            self._resume(path)

    # ------------------------------------------------------------------ files
    def save(self, name: str, with_state: bool = False) -> str:
        from ..models.sam3d_adapter.files import save_model_file

        state = None
        if with_state:
            state = {**self.state, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                     "train_config": config_to_dict(self.cfg)}
        path = os.path.join(self.cfg.output_dir, name)
        save_model_file(self.model, path, intensity=self.intensity, recipe=self.cfg.model.recipe,
                        epoch=int(self.state["epoch"]), name=f"{os.path.basename(self.cfg.output_dir)}/{name}",
                        overwrite=True, training_state=state)
        return path

    def _resume(self, path: str) -> None:
        from ..models.checkpoint import read_checkpoint
        from ..models.sam3d_adapter.files import TRAINING_KEY, load_model_file

        obj = read_checkpoint(path)
        state = obj.get(TRAINING_KEY) if isinstance(obj, dict) else None
        if not state:
            raise ConfigError(f"checkpoint.resume: {path} holds no training state (it is a model file: give it "
                              "as model.init to start a new run from it)")
        loaded = load_model_file(obj)
        if loaded.config != self.model.config:
            raise ConfigError(f"checkpoint.resume: {path} was trained with another architecture or adapter "
                              f"({loaded.config.name}, {loaded.config.adapter}); start a new run")
        self.model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        for k in self.state:
            self.state[k] = state.get(k, self.state[k])
        self.resumed_from = path
        self.log(f"resumed from {path}: epoch {self.state['epoch']}, step {self.state['step']}")
        old = state.get("train_config", {}).get("loop", {}).get("epochs")
        if old is not None and old != self.cfg.loop.epochs:
            self.log(f"note: loop.epochs changed from {old} to {self.cfg.loop.epochs}; the learning-rate schedule "
                     f"keeps the run's own length ({old} epochs)")

    # ------------------------------------------------------------------ loop
    def _batch(self, item: Dict[str, Any]):
        import torch

        return (torch.from_numpy(item["image"])[None].to(self.device), torch.from_numpy(item["label"])[None]
                .to(self.device), torch.from_numpy(item["points"])[None].to(self.device))

    def step(self, item: Dict[str, Any]) -> float:
        """One optimiser step on one sample; returns its loss."""
        import torch

        s = self.cfg.sam3d_adapter
        image, label, points = self._batch(item)
        self.model.train()
        with autocast(self.device, self.amp_dtype):
            logits = self.model(image, points)
        loss, _ = adapter_loss(logits, label, s.dice_weight, s.ce_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0 and self.clipped:
            torch.nn.utils.clip_grad_norm_(self.clipped, s.grad_clip)
        self.optimizer.step()
        self.state["step"] += 1
        return float(loss.detach())

    def validate(self) -> Optional[Dict[str, float]]:
        """Mean Dice loss and hard Dice (foreground softmax > 0.5) over the validation crops."""
        import torch

        if self.val_ds is None:
            return None
        self.model.eval()
        losses, dices = [], []
        with torch.no_grad():
            for i in range(len(self.val_ds)):
                image, label, points = self._batch(self.val_ds[i])
                with autocast(self.device, self.amp_dtype):
                    logits = self.model(image, points)
                losses.append(float(adapter_loss(logits, label)[1]))
                pred, gt = logits[0, 1] > logits[0, 0], label[0, 0] > 0
                denom = float(pred.sum() + gt.sum())
                dices.append(2.0 * float((pred & gt).sum()) / denom if denom else 1.0)
        return {"dice_loss": float(np.mean(losses)), "dice": float(np.mean(dices)), "n": len(losses)}

    def run(self) -> Dict[str, Any]:
        cfg, lc = self.cfg, self.cfg.loop
        start = time.time()
        metrics = MetricsLog(cfg, True, self.state["step"] if self.resumed_from else None, self.log,
                             group_names=["all"])
        losses: List[float] = []
        history: List[Dict[str, float]] = []
        stop = "epochs"
        while self.state["epoch"] < lc.epochs and stop == "epochs":
            epoch = int(self.state["epoch"])
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.train_ds))
            for n, index in enumerate(order):
                loss = self.step(self.train_ds[(epoch, int(index))])
                losses.append(loss)
                metrics.write(kind="train", epoch=epoch, step=self.state["step"], loss=loss,
                              seconds=round(time.time() - start, 3), lr_all=self.optimizer.param_groups[0]["lr"])
                if cfg.log.print_every and self.state["step"] % cfg.log.print_every == 0:
                    self.log(f"epoch {epoch} step {self.state['step']}: loss {loss:.4f} "
                             f"({time.time() - start:.0f} s)")
                if lc.max_steps and self.state["step"] >= lc.max_steps:
                    stop = "max_steps"
                elif lc.max_minutes and (time.time() - start) / 60.0 >= lc.max_minutes:
                    stop = "max_minutes"
                if stop != "epochs":
                    break
            if n + 1 < len(order):   # stopped inside the epoch: it is not complete (a resume redoes it)
                break
            self.schedule.step()
            self.state["epoch"] = epoch + 1
            if cfg.val.every_epochs and (epoch + 1) % cfg.val.every_epochs == 0:
                res = self.validate()
                if res is not None:
                    history.append(res)
                    metrics.write(kind="val", epoch=epoch, step=self.state["step"], loss=res["dice_loss"],
                                  dice=res["dice"])
                    self.log(f"epoch {epoch}: validation Dice loss {res['dice_loss']:.4f}, Dice {res['dice']:.4f} "
                             f"on {res['n']} targets")
                    if res["dice_loss"] < self.state["best_val_dice_loss"]:
                        self.state["best_val_dice_loss"] = res["dice_loss"]
                        self.save("best.pt")
            self.save("latest.pt", with_state=True)
        metrics.close()
        self.save("latest.pt", with_state=True)
        final = self.save("final.pt")
        out = {"losses": losses, "steps": int(self.state["step"]), "epoch": int(self.state["epoch"]),
               "stopped": stop, "val": history, "best_val_dice_loss": self.state["best_val_dice_loss"],
               "trainable": self.init["counts"]["trainable"], "total": self.init["counts"]["total"],
               "intensity": self.intensity.to_dict(), "final": final, "seconds": time.time() - start,
               "output_dir": cfg.output_dir, "memory": memory_report(self.device)}
        self.log(f"done ({stop}): {out['steps']} steps in {out['seconds']:.0f} s; last loss "
                 f"{losses[-1] if losses else float('nan'):.4f}; {out['memory']}; model {final}")
        return out


def train_adapter(cfg: TrainConfig, log=print) -> Dict[str, Any]:
    """Train a 3DSAM-adapter as configured (see the module docstring)."""
    trainer = AdapterTrainer(cfg, log=log)
    trainer.setup()
    return trainer.run()
