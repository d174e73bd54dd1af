"""The training loop: :class:`Trainer` (set-up, optimiser steps with gradient accumulation, validation,
early stopping, checkpoints, exact resume) and :func:`train`; :func:`system_check` for ``sam3d train --check``.

The pieces: the interaction loop of one batch in :mod:`.interaction`, the model in :mod:`.model`, the data in
:mod:`.data` / :mod:`.samples`, parameter groups and schedules in :mod:`.optim`, metrics in :mod:`.runlog`,
checkpoint files in :mod:`.checkpointing`, processes in :mod:`.distributed`.

Determinism: every random choice is keyed, not drawn from global state (see :mod:`.interaction` and
:mod:`.samples`); the sampler order is keyed by ``(seed, epoch)``. Resuming from a checkpoint therefore
continues the same sequence exactly.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from .config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from .device import autocast, memory_report, resolve_amp, resolve_device, seed_everything
from .distributed import DistInfo
from .interaction import InteractiveLoss, evaluate
from .model import build_model
from .optim import LRSchedule, format_rates, lr_column, make_param_groups
from .runlog import MetricsLog
from .samples import make_loaders

__all__ = ["Trainer", "train", "system_check"]


def _print(msg: str) -> None:
    print(msg, flush=True)


class Trainer:
    """Runs one configured training (single process or one DDP rank). ``run()`` returns a summary."""

    def __init__(self, cfg: TrainConfig, info: Optional[DistInfo] = None, log=_print):
        self.cfg = cfg
        self.info = info or DistInfo()
        self._log = log
        self.resumed_from: Optional[str] = None

    def log(self, msg: str) -> None:
        if self.info.is_main:
            self._log(msg)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch

        from .distributed import init_distributed

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if self.info.world_size == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.info = init_distributed("cuda" if want_cuda else "cpu")
        self.device = resolve_device(cfg.device, self.info)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.info.is_main:
            from .checkpointing import remove_stale_temporaries

            stale = remove_stale_temporaries(cfg.output_dir)
            if stale:
                self.log(f"removed {len(stale)} temporary checkpoint file(s) left by an interrupted run: "
                         + ", ".join(os.path.basename(p) for p in stale))
        seed_everything(cfg.seed, cfg.threads, cfg.deterministic)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        if cfg.amp in ("bf16", "fp16") and self.amp_dtype is None:
            self.log(f"note: amp={cfg.amp} ignored on {self.device.type} (AMP runs on CUDA only)")
        self.model, self.base, (n_train, n_total) = build_model(cfg, self.log)
        self.trainable = (n_train, n_total)
        self.log(f"mode {cfg.mode}: {n_train:,} of {n_total:,} parameters trainable "
                 f"({100.0 * n_train / max(1, n_total):.3f} %)")
        if cfg.grad_checkpointing:
            self.model.image_encoder.grad_checkpointing = True
        self.model.to(self.device)
        self.partial = cfg.mode != "full" and self.base is not None
        data = make_loaders(cfg, self.info, self.model.config.image_size, self.device.type == "cuda", self.log)
        self.sampler, self.train_loader, self.val_loader = data.sampler, data.train, data.val
        self.micro_per_epoch = len(self.train_loader)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.loop.accumulate)
        groups = make_param_groups(self.model, cfg)
        if not groups:
            raise ConfigError(f"mode {cfg.mode} leaves no parameter trainable")
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           eps=cfg.optim.eps)
        self.schedule = LRSchedule(self.optimizer, cfg, self.steps_per_epoch)
        self.log(f"optimiser AdamW, learning rate by parameter group: "
                 f"{format_rates({str(g['name']): float(g['initial_lr']) for g in groups})} "
                 f"(optim.lr {cfg.optim.lr:g}; prompt encoder/decoder x optim.decoder_lr_scale "
                 f"{cfg.optim.decoder_lr_scale:g}; before the schedule)")
        self.scaler = torch.amp.GradScaler(self.device.type if self.device.type == "cuda" else "cpu",
                                           enabled=self.amp_dtype == torch.float16)
        encoder_frozen = not any(p.requires_grad for p in self.model.image_encoder.parameters())
        self.net = InteractiveLoss(self.model, cfg, encoder_frozen)
        self.state = {"epoch": 0, "micro_in_epoch": 0, "global_step": 0, "global_micro": 0,
                      "best_metric": -math.inf, "bad_validations": 0, "finished": False}
        from .checkpointing import resume_path

        path = resume_path(cfg.checkpoint.resume, cfg.output_dir)
        if path is not None:
            self._resume(path)
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=True)
        else:
            self.ddp = self.net

    # ------------------------------------------------------------- checkpoints
    def _training_state(self) -> Dict[str, Any]:
        from .checkpointing import rng_state

        return {**self.state, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "rng": rng_state(),
                "train_config": config_to_dict(self.cfg), "trainable": list(self.trainable),
                "world_size": self.info.world_size}

    def save(self, name: str, extra: Optional[Dict[str, Any]] = None, with_state: bool = True) -> Optional[str]:
        """Write ``output_dir/name`` on rank 0: with the training state (resumable) or the model only."""
        from .checkpointing import save_training_checkpoint
        from .distributed import barrier

        path = None
        if self.info.is_main:
            path = os.path.join(self.cfg.output_dir, name)
            extra = {"epoch": int(self.state["epoch"]), "step": int(self.state["global_step"]), **(extra or {})}
            save_training_checkpoint(path, self.model, self._training_state() if with_state else None,
                                     partial_base=self.base if self.partial else None, mode=self.cfg.mode,
                                     extra=extra)
        barrier(self.info)
        return path

    def _resume(self, path: str) -> None:
        from .checkpointing import load_for_resume, set_rng_state

        tr = load_for_resume(path, self.model, self.base if self.partial else None, self.cfg.mode)
        self.optimizer.load_state_dict(tr["optimizer"])
        self.schedule.load_state_dict(tr.get("schedule", {}))
        if tr.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(tr["scaler"])
        for k in self.state:
            if k in tr:
                self.state[k] = tr[k]
        set_rng_state(tr.get("rng"))
        if tr.get("world_size", 1) != self.info.world_size:
            self.log(f"note: resuming a run made with {tr.get('world_size')} processes on "
                     f"{self.info.world_size}; the sample order changes")
        self.resumed_from = path
        self.log(f"resumed from {path}: epoch {self.state['epoch']}, step {self.state['global_step']}")

    # -------------------------------------------------------------------- loop
    def _validate(self, epoch: int, metrics: MetricsLog) -> Optional[Dict[str, float]]:
        from .distributed import barrier, broadcast_object

        if self.val_loader is None:
            return None
        result = None
        if self.info.is_main:
            n = self.cfg.val.click_steps or self.cfg.loop.num_click_steps
            result = evaluate(self.model, self.val_loader, n, self.cfg.val.click_mode, self.cfg.seed,
                              self.device, self.amp_dtype, self.cfg.loop.feed)
        result = broadcast_object(result, self.info)
        barrier(self.info)
        metrics.write(kind="val", epoch=epoch, step=self.state["global_step"], dice=result["dice"],
                      dice_first_click=result["dice_first_click"])
        self.log(f"epoch {epoch}: validation Dice {result['dice']:.4f} after "
                 f"{self.cfg.val.click_steps or self.cfg.loop.num_click_steps} clicks "
                 f"({result['dice_first_click']:.4f} after 1) on {result['n']} targets")
        return result

    def _optimizer_step(self) -> Dict[str, float]:
        """One optimiser step on the accumulated gradients; returns the learning rate of every group."""
        import torch

        rates = self.schedule.apply(int(self.state["global_step"]))
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["global_step"] += 1
        return rates

    def _train_epoch(self, epoch: int, metrics: MetricsLog, losses: List[float], start: float,
                     tqdm=None) -> Optional[str]:
        """The (rest of the) micro-batches of ``epoch``; returns why training stops early, else None."""
        from .distributed import all_reduce_mean

        cfg, lc = self.cfg, self.cfg.loop
        skip_micro = int(self.state["micro_in_epoch"]) if epoch == self.state["epoch"] else 0
        self.sampler.set_epoch(epoch, skip=skip_micro * lc.batch_size)
        it = iter(self.train_loader)
        n_micro = self.micro_per_epoch - skip_micro
        bar = tqdm(total=n_micro, desc=f"epoch {epoch}", leave=False) if tqdm else None
        acc_loss, acc_n = 0.0, 0
        stop = None
        self.optimizer.zero_grad(set_to_none=True)
        for m in range(n_micro):
            batch = next(it)
            micro_index = skip_micro + m  # within the epoch
            last_of_step = ((micro_index + 1) % lc.accumulate == 0) or (micro_index + 1 == self.micro_per_epoch)
            image = batch["image"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            sync = contextlib.nullcontext() if (last_of_step or not self.info.enabled) else self.ddp.no_sync()
            with sync:
                with autocast(self.device, self.amp_dtype):
                    loss = self.ddp(image, label, batch["epoch"].tolist(), batch["index"].tolist(),
                                    int(self.state["global_micro"]))
                self.scaler.scale(loss / lc.accumulate).backward()
            acc_loss += float(loss.detach())
            acc_n += 1
            self.state["global_micro"] += 1
            self.state["micro_in_epoch"] = micro_index + 1
            if bar is not None:
                bar.update(1)
            if not last_of_step:
                continue
            rates = self._optimizer_step()
            step_loss = all_reduce_mean(acc_loss / acc_n, self.info)
            acc_loss, acc_n = 0.0, 0
            losses.append(step_loss)
            step = int(self.state["global_step"])
            metrics.write(kind="train", epoch=epoch, step=step, loss=step_loss, seconds=round(time.time() - start, 3),
                          **{lr_column(name): float(f"{lr:.8g}") for name, lr in rates.items()})
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}")
            if cfg.log.print_every and step % cfg.log.print_every == 0:
                self.log(f"epoch {epoch} step {step}: loss {step_loss:.4f} lr {format_rates(rates)} "
                         f"({time.time() - start:.0f} s)")
            if self.state["micro_in_epoch"] == self.micro_per_epoch:
                self.state["epoch"], self.state["micro_in_epoch"] = epoch + 1, 0
            else:
                self.state["epoch"] = epoch
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                self.save("latest.pt")
            if lc.max_steps and step >= lc.max_steps:
                stop = "max_steps"
            elif lc.max_minutes and (time.time() - start) / 60.0 >= lc.max_minutes:
                stop = "max_minutes"
            if stop:
                break
        if bar is not None:
            bar.close()
        return stop

    def _after_epoch(self, epoch: int, metrics: MetricsLog, val_history: List[Dict[str, float]]) -> bool:
        """Validation when due: schedule, best checkpoint, early stopping. True when training should stop."""
        val = self.cfg.val
        if not (val.every_epochs and (epoch + 1) % val.every_epochs == 0):
            return False
        res = self._validate(epoch, metrics)
        if res is None:
            return False
        val_history.append(res)
        self.schedule.on_validation(res["dice"])
        if res["dice"] > self.state["best_metric"] + val.early_stopping_min_delta:
            self.state["best_metric"], self.state["bad_validations"] = res["dice"], 0
            self.save("best.pt", extra={"val": res}, with_state=False)
        else:
            self.state["bad_validations"] += 1
        if val.early_stopping_patience and self.state["bad_validations"] >= val.early_stopping_patience:
            self.log(f"early stopping: no improvement in {self.state['bad_validations']} validations")
            return True
        return False

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        lc = cfg.loop
        start = time.time()
        metrics = MetricsLog(cfg, self.info.is_main, self.state["global_step"] if self.resumed_from else None,
                             self.log, group_names=[str(g["name"]) for g in self.optimizer.param_groups])
        losses: List[float] = []
        val_history: List[Dict[str, float]] = []
        stop_reason = "epochs"
        self.log(f"device {self.device} ({'AMP ' + str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else 'float32'}), "
                 f"{self.info.world_size} process(es), batch {lc.batch_size} x accumulate {lc.accumulate}, "
                 f"{self.steps_per_epoch} optimiser steps per epoch")
        tqdm = None
        if cfg.log.progress and self.info.is_main and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # type: ignore
            except ImportError:
                tqdm = None
        epoch = int(self.state["epoch"])
        while epoch < lc.epochs and stop_reason == "epochs":
            stop_reason = self._train_epoch(epoch, metrics, losses, start, tqdm) or stop_reason
            if self.state["epoch"] == epoch + 1 and self.state["micro_in_epoch"] == 0:  # the epoch is complete
                if self._after_epoch(epoch, metrics, val_history):
                    stop_reason = "early_stopping"
                epoch += 1
            self.state["finished"] = epoch >= lc.epochs or stop_reason == "early_stopping"
            self.save("latest.pt")
        metrics.close()
        self.save("final.pt", with_state=False)
        out = {"losses": losses, "steps": int(self.state["global_step"]), "epoch": int(self.state["epoch"]),
               "stopped": stop_reason, "val": val_history, "best_dice": self.state["best_metric"],
               "trainable": self.trainable[0], "total": self.trainable[1],
               "trainable_fraction": self.trainable[0] / max(1, self.trainable[1]),
               "seconds": time.time() - start, "output_dir": cfg.output_dir,
               "memory": memory_report(self.device)}
        if cfg.checkpoint.export_encoder and self.info.is_main:
            from .checkpointing import ENCODER_FORMAT, atomic_save

            out["encoder"] = atomic_save({"format": ENCODER_FORMAT, "config": self.model.config.to_dict(),
                                          "image_encoder_state_dict": self.model.image_encoder.state_dict()},
                                         os.path.join(cfg.output_dir, "encoder.pt"))
        self.log(f"done ({stop_reason}): {out['steps']} steps in {out['seconds']:.0f} s; "
                 f"last loss {losses[-1] if losses else float('nan'):.4f}; {out['memory']}")
        return out


def train(cfg: TrainConfig, log=_print) -> Dict[str, Any]:
    """Train as configured (joins the torchrun process group when launched by torchrun). A 3DSAM-adapter
    (``model.family: 3dsam_adapter``) is trained by :func:`~SAM3DSegmentLib.train.adapter_loop.train_adapter`."""
    from .distributed import cleanup

    if cfg.model.family == "3dsam_adapter":
        from .adapter_loop import train_adapter

        return train_adapter(cfg, log=log)

    trainer = Trainer(cfg, log=log)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        if trainer.info.enabled:
            cleanup()


def system_check(device: str = "auto", amp: str = "auto", log=print, image_size: int = 0) -> int:
    """Build a tiny model, run 2 training steps on a synthetic batch, print device/AMP/memory; 0 if OK."""
    cfg = config_from_dict({"device": device, "amp": amp, "loop": {"num_click_steps": 3, "mask_only_range": [1, 1]}})
    import platform

    import torch

    from ..models import SamMed3DConfig, build_sam_med3d

    t0 = time.time()
    dev = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, dev)
    torch.manual_seed(0)
    tiny = SamMed3DConfig.tiny(image_size=image_size) if image_size else SamMed3DConfig.tiny()
    model = build_sam_med3d(tiny).to(dev).train()
    size = model.config.image_size
    g = np.mgrid[:size, :size, :size].astype(np.float32)
    r2 = ((g - size / 2) ** 2).sum(0)
    label = (r2 < (size / 6) ** 2).astype(np.float32)
    image = np.where(label > 0, 1.0, -0.5) + 0.1 * np.random.default_rng(0).standard_normal(label.shape)
    image_t = torch.as_tensor(image, dtype=torch.float32, device=dev)[None, None]
    label_t = torch.as_tensor(label, device=dev)[None, None]
    net = InteractiveLoss(model, cfg, encoder_frozen=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type if dev.type == "cuda" else "cpu",
                                  enabled=amp_dtype == torch.float16)
    losses = []
    for step in range(2):
        ts = time.time()
        with autocast(dev, amp_dtype):
            loss = net(image_t, label_t, [0], [0], step)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            log(f"check FAILED: non-finite loss {float(loss)} at step {step}")
            return 1
        losses.append(float(loss.detach()))
        log(f"step {step}: loss {losses[-1]:.4f} ({time.time() - ts:.2f} s)")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    log(f"device: {dev} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    log(f"AMP: {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off (float32)'}")
    log(f"memory: {memory_report(dev)}")
    log(f"check OK in {time.time() - t0:.1f} s (tiny model, 2 steps, 3 click steps)")
    return 0
