"""The training loop: the reference interaction loop per sample, optimisation machinery, validation.

Interaction loop (per micro-batch, :class:`InteractiveLoss`): the image encoder runs once; then
``num_click_steps`` decoder steps. Step 0 clicks inside the object (the error region of an empty
prediction); every later step samples one click from the error region of the CURRENT prediction
(``logits > 0`` on the 128^3-upsampled logits), except one random step in ``mask_only_range`` and the
last step, which run with no points (mask only). The previous low-res logits are fed back (not detached,
as the reference, unless ``loop.detach_feedback``). Loss = sum over steps of Dice (sigmoid, squared
denominators) + BCE-with-logits on the upsampled logits.

Determinism: every random choice is keyed, not drawn from global state: a sample's clicks by
``(seed, epoch, dataset index)``, the mask-only step by ``(seed, global micro-batch number)``, the crop
and flips by ``(seed, epoch, index)`` (see data.py), the sampler order by ``(seed, epoch)``. Resuming
from a checkpoint therefore continues the same sequence exactly, and a DDP run draws the same clicks as
one process with the same global batch.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import TrainConfig, config_to_dict
from .distributed import DistInfo

__all__ = ["InteractiveLoss", "interact", "build_model", "make_param_groups", "LRSchedule", "evaluate",
           "Trainer", "train", "system_check", "resolve_device", "resolve_amp"]

PEFT_MODES = ("adapter3d", "dualpath")


# -------------------------------------------------------------------------------- device / AMP
def resolve_device(name: str, info: Optional[DistInfo] = None):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank if info else 0)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} asked for but CUDA is not available; use device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", info.local_rank if info else 0)
    return dev


def resolve_amp(amp: str, device) -> Optional[Any]:
    """The autocast dtype (None = full float32). AMP is disabled on CPU."""
    import torch

    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _autocast(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- interaction loop
def _mask_only_steps(n_steps: int, lo_hi: Sequence[int], rng: np.random.Generator) -> set:
    """The steps run without points: one random step in [lo, hi] (kept inside 1..n-2) and the last one."""
    out = set()
    if n_steps >= 2:
        out.add(n_steps - 1)
    lo, hi = max(1, int(lo_hi[0])), min(n_steps - 2, int(lo_hi[1]))
    if hi >= lo:
        out.add(int(rng.integers(lo, hi + 1)))
    return out


def interact(model, emb, label, n_steps: int, mask_only: set, click_mode: str, rngs, feed: str = "newest",
             detach_feedback: bool = False, compute_loss: bool = True):
    """Run the click loop on one batch. ``emb`` from ``model.image_encoder``; ``label`` (B,1,S,S,S) 0/1.

    Returns ``(loss_sum or None, final boolean prediction (B,S,S,S), first-step prediction)``.
    """
    import torch
    import torch.nn.functional as F

    from .clicks import sample_clicks
    from .losses import seg_loss

    b = label.shape[0]
    size = label.shape[-1]
    low_size = size // 4
    gt = label[:, 0] > 0.5
    pred = torch.zeros_like(gt)
    first = None
    low = torch.zeros((b, 1, low_size, low_size, low_size), device=label.device, dtype=emb.dtype)
    hist_p: List[np.ndarray] = []
    hist_l: List[np.ndarray] = []
    total = None
    for t in range(n_steps):
        if t in mask_only:
            points = labels = None
        else:
            p, l = sample_clicks(gt, pred, click_mode, rngs)
            hist_p.append(p)
            hist_l.append(l)
            if feed == "all":
                p, l = np.stack(hist_p, 1), np.stack(hist_l, 1)
            else:
                p, l = p[:, None], l[:, None]
            points = torch.as_tensor(p, device=label.device, dtype=torch.float32)
            labels = torch.as_tensor(l, device=label.device, dtype=torch.long)
        prev = low.detach() if detach_feedback else low
        low = model.predict_low_res(emb, points, labels, prev)
        up = F.interpolate(low.float(), size=(size, size, size), mode="trilinear", align_corners=False)
        if compute_loss:
            step_loss = seg_loss(up, label)
            total = step_loss if total is None else total + step_loss
        pred = (up.detach() > 0)[:, 0]  # sigmoid > 0.5 (NOT logits > 0.5, the reference's defect)
        if first is None:
            first = pred
    return total, pred, first


class _Interactive:  # lazily created nn.Module subclass (torch is imported lazily)
    cls = None


def InteractiveLoss(model, cfg: TrainConfig, encoder_frozen: bool):
    """An ``nn.Module`` wrapping ``model`` whose forward runs the whole interaction loop and returns the
    summed loss; DDP wraps this module (its forward must contain every use of the parameters)."""
    import torch
    from torch import nn

    if _Interactive.cls is None:
        class _InteractiveLoss(nn.Module):
            def __init__(self, model, cfg, encoder_frozen):
                super().__init__()
                self.model = model
                self.cfg = cfg
                self.encoder_frozen = encoder_frozen

            def forward(self, image, label, epochs, indices, micro_key: int):
                lc = self.cfg.loop
                if self.encoder_frozen:
                    with torch.no_grad():
                        emb = self.model.image_encoder(image)
                else:
                    emb = self.model.image_encoder(image)
                seed = int(self.cfg.seed)
                rngs = [np.random.default_rng([seed, int(e), int(i), 17]) for e, i in zip(epochs, indices)]
                mask_only = _mask_only_steps(lc.num_click_steps, lc.mask_only_range,
                                             np.random.default_rng([seed, 1000003, int(micro_key)]))
                loss, pred, _ = interact(self.model, emb, label, lc.num_click_steps, mask_only, lc.click_mode,
                                         rngs, lc.feed, lc.detach_feedback)
                return loss
        _Interactive.cls = _InteractiveLoss
    return _Interactive.cls(model, cfg, encoder_frozen)


def evaluate(model, loader, n_steps: int, click_mode: str, seed: int, device, amp_dtype=None,
             feed: str = "newest") -> Dict[str, float]:
    """Mean Dice (inside the crop) after the first click and after ``n_steps`` click steps (clicks at
    every step, no mask-only steps)."""
    import torch

    from .losses import dice_score

    was_training = model.training
    model.eval()
    finals: List[float] = []
    firsts: List[float] = []
    with torch.no_grad(), _autocast(device, amp_dtype):
        for batch in loader:
            image = batch["image"].to(device)
            label = batch["label"].to(device)
            rngs = [np.random.default_rng([seed, 999, int(i)]) for i in batch["index"]]
            emb = model.image_encoder(image)
            _, pred, first = interact(model, emb, label, n_steps, set(), click_mode, rngs, feed,
                                      compute_loss=False)
            gt = label[:, 0] > 0.5
            finals += dice_score(pred, gt).tolist()
            firsts += dice_score(first, gt).tolist()
    model.train(was_training)
    return {"dice": float(np.mean(finals)) if finals else float("nan"),
            "dice_first_click": float(np.mean(firsts)) if firsts else float("nan"), "n": len(finals)}


# ------------------------------------------------------------------------------ model + optim
def build_model(cfg: TrainConfig, log=print):
    """The model to train, with adapters/trainable flags applied. Returns ``(model, base_info or None)``."""
    from ..models import SamMed3DConfig, build_sam_med3d, load_checkpoint
    from ..models.adapters import apply_adapters, mark_trainable
    from .checkpointing import file_sha256
    from .config import ConfigError

    base = None
    if cfg.model.checkpoint:
        path = os.path.abspath(os.path.expanduser(cfg.model.checkpoint))
        model = load_checkpoint(path, map_location="cpu")
        base = {"path": path, "sha256": file_sha256(path), "size": os.path.getsize(path)}
        if cfg.model.arch_overrides:
            log("note: model.arch_overrides are ignored when model.checkpoint is given (its architecture wins)")
    else:
        preset = getattr(SamMed3DConfig, cfg.model.arch, None)
        if cfg.model.arch.startswith("_") or preset is None or not callable(preset):
            raise ConfigError(f"model.arch {cfg.model.arch!r} is not a SamMed3DConfig preset; use vit_b_ori, "
                              "small or tiny")
        try:
            mcfg = preset(**cfg.model.arch_overrides)
        except TypeError as err:
            raise ConfigError(f"model.arch_overrides: {err}") from err
        model = build_sam_med3d(mcfg)
    if cfg.mode in PEFT_MODES:
        if model.config.adapter:
            raise ConfigError("the base model already has adapters; train it in mode 'full'/'decoder' or start "
                              "from the checkpoint without adapters")
        a = cfg.adapter
        acfg = {"kind": cfg.mode, "bottleneck_ratio": a.bottleneck_ratio, "kernel_size": a.kernel_size,
                "init_seed": a.init_seed, "activation": a.activation}
        model.config.adapter = acfg
        apply_adapters(model, acfg)
    flags = {k: getattr(cfg.adapter, k) for k in ("train_norms", "train_pos_embed", "train_neck",
                                                  "train_prompt_decoder")}
    n_train, n_total = mark_trainable(model, cfg.mode, flags)
    model.train()
    return model, base, (n_train, n_total)


def _no_decay(name: str, p) -> bool:
    return (p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "rel_pos" in name
            or ".norm" in name or "norm1" in name or "norm2" in name)


def make_param_groups(model, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """AdamW groups: encoder at lr, prompt encoder/decoder at lr*decoder_lr_scale; no decay on
    norms, biases and position embeddings."""
    groups: Dict[Tuple[str, bool], List] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "encoder" if name.startswith("image_encoder.") else "decoder"
        groups.setdefault((part, _no_decay(name, p)), []).append(p)
    out = []
    for (part, nd), params in sorted(groups.items()):
        lr = cfg.optim.lr * (1.0 if part == "encoder" else cfg.optim.decoder_lr_scale)
        out.append({"params": params, "lr": lr, "initial_lr": lr, "weight_decay": 0.0 if nd else
                    cfg.optim.weight_decay, "name": f"{part}{'/no_decay' if nd else ''}"})
    return out


class LRSchedule:
    """lr = initial_lr * warm-up(step) * main(step) * plateau_scale, set on every optimiser step.

    ``main``: multistep (milestones in epochs), step, cosine / linear (to ``min_lr_factor`` at the end of
    training), plateau (a factor cut after ``plateau_patience`` validations without improvement), constant.
    """

    def __init__(self, optimizer, cfg: TrainConfig, steps_per_epoch: int):
        self.opt = optimizer
        self.cfg = cfg.schedule
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = max(1, cfg.loop.epochs * self.steps_per_epoch)
        self.plateau_scale = 1.0
        self.plateau_best = -math.inf
        self.plateau_bad = 0

    def factor(self, step: int) -> float:
        c = self.cfg
        f = 1.0
        if c.warmup_steps > 0 and step < c.warmup_steps:
            f *= c.warmup_start_factor + (1.0 - c.warmup_start_factor) * step / c.warmup_steps
        epoch = step / self.steps_per_epoch
        if c.name == "multistep":
            f *= c.gamma ** sum(1 for m in c.milestones if epoch >= m)
        elif c.name == "step":
            f *= c.gamma ** int(epoch // max(1, c.step_epochs))
        elif c.name in ("cosine", "linear"):
            t0 = c.warmup_steps
            prog = min(1.0, max(0.0, (step - t0) / max(1, self.total - t0)))
            shape = 0.5 * (1 + math.cos(math.pi * prog)) if c.name == "cosine" else 1.0 - prog
            f *= c.min_lr_factor + (1.0 - c.min_lr_factor) * shape
        elif c.name == "plateau":
            f *= self.plateau_scale
        return f

    def apply(self, step: int) -> Dict[str, float]:
        """Set every group's lr for ``step``; returns ``{group name: lr}`` (groups differ: the prompt
        encoder/decoder run at ``optim.decoder_lr_scale`` times the encoder's rate)."""
        f = self.factor(step)
        rates = {}
        for n, g in enumerate(self.opt.param_groups):
            g["lr"] = g["initial_lr"] * f
            rates[str(g.get("name", f"group{n}"))] = float(g["lr"])
        return rates

    def on_validation(self, metric: float) -> None:
        if self.cfg.name != "plateau" or not math.isfinite(metric):
            return
        if metric > self.plateau_best:
            self.plateau_best, self.plateau_bad = metric, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.cfg.plateau_patience:
                self.plateau_scale *= self.cfg.plateau_factor
                self.plateau_bad = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best,
                "plateau_bad": self.plateau_bad}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.plateau_scale = float(d.get("plateau_scale", 1.0))
        self.plateau_best = float(d.get("plateau_best", -math.inf))
        self.plateau_bad = int(d.get("plateau_bad", 0))


def lr_column(group_name: str) -> str:
    """The metrics.csv column of one parameter group's learning rate, e.g. ``lr_decoder_no_decay``."""
    return "lr_" + group_name.replace("/", "_")


def format_rates(rates: Dict[str, float]) -> str:
    """``"encoder 0.003, decoder 0.0003"``: every group by name (a ``/no_decay`` twin with the same rate is
    folded into its group's entry)."""
    parts = []
    for name, lr in rates.items():
        base = name[:-len("/no_decay")] if name.endswith("/no_decay") else name
        if base != name and base in rates and rates[base] == lr:
            continue
        parts.append(f"{name} {lr:.3g}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------- logging
class _Metrics:
    FIELDS = ["kind", "epoch", "step", "loss", "dice", "dice_first_click", "seconds"]

    def __init__(self, cfg: TrainConfig, enabled: bool, resume_step: Optional[int], log=print,
                 group_names: Sequence[str] = ()):
        self.enabled = enabled
        # one learning-rate column per optimiser group, named after it (lr_encoder, lr_decoder, ...)
        self.FIELDS = self.FIELDS[:4] + [lr_column(n) for n in group_names] + self.FIELDS[4:]
        self.path = os.path.join(cfg.output_dir, "metrics.csv")
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if cfg.log.csv:
            rows = []
            if resume_step is not None and os.path.isfile(self.path):
                with open(self.path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        else:
            self.path = None
        tb = str(cfg.log.tensorboard).lower()
        if tb in ("auto", "true"):
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
            except ImportError:
                if tb == "true":
                    log("warning: log.tensorboard=true but tensorboard is not installed; "
                        "`pip install tensorboard` (CSV logging continues)")
        if cfg.log.wandb:
            try:
                import wandb  # type: ignore

                self.wandb = wandb.init(project=cfg.log.wandb_project, config=config_to_dict(cfg),
                                        dir=cfg.output_dir)
            except ImportError:
                log("warning: log.wandb=true but wandb is not installed; `pip install wandb`")

    def write(self, **row) -> None:
        if not self.enabled:
            return
        if self.path:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})
        step = int(row.get("step", 0))
        scalars = {f"{row['kind']}/{k}": v for k, v in row.items()
                   if (k in ("loss", "dice", "dice_first_click") or k.startswith("lr_")) and v not in ("", None)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _memory_report(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB peak CUDA memory"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"{rss / 1024:.0f} MiB peak process memory"
    except (ImportError, AttributeError):
        return "memory unknown"


# ------------------------------------------------------------------------------------- trainer
def _print(msg: str) -> None:
    print(msg, flush=True)


class Trainer:
    """Runs one configured training (single process or one DDP rank). ``run()`` returns a summary."""

    def __init__(self, cfg: TrainConfig, info: Optional[DistInfo] = None, log=_print):
        self.cfg = cfg
        self.info = info or DistInfo()
        self._log = log

    def log(self, msg: str) -> None:
        if self.info.is_main:
            self._log(msg)

    # ------------------------------------------------------------------ setup
    def _seed(self) -> None:
        import random

        import torch

        cfg = self.cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

    def _data(self, image_size: int):
        import torch
        from torch.utils.data import DataLoader, DistributedSampler

        from .data import EpochTagged, TrainTargets, ValTargets, prepare_dataset
        from .distributed import barrier

        cfg = self.cfg
        d = cfg.data
        size = d.crop_size or image_size
        if size != image_size:
            from .config import ConfigError

            raise ConfigError(f"data.crop_size {size} differs from the model's image_size {image_size}; the "
                              "encoder takes exactly image_size^3 crops (leave data.crop_size at 0)")
        cache = d.cache_dir or os.path.join(cfg.output_dir, "cache")
        kwargs = dict(layout=d.layout, spacing=d.spacing, image_dtype=d.image_dtype,
                      min_target_mm3=d.min_target_mm3, val_fraction=d.val_fraction, val_cases=d.val_cases,
                      split_seed=d.split_seed, log=self.log)
        if self.info.is_main:
            if d.make_demo_data:
                from ..data.demo_data import ensure_demo_dataset

                for root in d.roots:
                    ensure_demo_dataset(root, log=self.log)
            prepared = prepare_dataset(d.roots, cache, **kwargs)
        barrier(self.info)
        if not self.info.is_main:
            prepared = prepare_dataset(d.roots, cache, **kwargs)
        self.prepared = prepared
        self.log(f"data: {len(prepared.cases)} cases ({len(prepared.train_ids)} train, {len(prepared.val_ids)} "
                 f"validation), {len(prepared.train_targets)} training targets, {len(prepared.val_targets)} "
                 f"validation targets; cache {cache}")
        train_ds = TrainTargets(prepared.cases, prepared.train_targets, size, seed=cfg.seed, jitter=d.crop_jitter,
                                flip=d.flip, min_label_voxels=d.min_crop_label_voxels,
                                max_tries=d.max_resample_tries, clamp=d.ct_clamp, pad_value=d.pad_value,
                                samples_per_epoch=cfg.loop.samples_per_epoch)
        sampler = DistributedSampler(train_ds, num_replicas=self.info.world_size, rank=self.info.rank,
                                     shuffle=True, seed=cfg.seed, drop_last=False)
        self.sampler = EpochTagged(sampler)
        self.train_loader = DataLoader(train_ds, batch_size=cfg.loop.batch_size, sampler=self.sampler,
                                       num_workers=d.num_workers, drop_last=False,
                                       pin_memory=self.device.type == "cuda")
        self.val_loader = None
        if prepared.val_targets and cfg.val.every_epochs > 0:
            val_ds = ValTargets(prepared.cases, prepared.val_targets, size, clamp=d.ct_clamp,
                                pad_value=d.pad_value, max_targets=cfg.val.max_targets)
            self.val_loader = DataLoader(val_ds, batch_size=max(1, cfg.loop.batch_size), shuffle=False,
                                         num_workers=d.num_workers)
        self.micro_per_epoch = len(self.train_loader)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.loop.accumulate)
        _ = torch

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
        self._seed()
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
        self._data(self.model.config.image_size)
        groups = make_param_groups(self.model, cfg)
        if not groups:
            from .config import ConfigError

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
        resume = cfg.checkpoint.resume
        if resume:
            path = os.path.join(cfg.output_dir, "latest.pt") if resume == "auto" else resume
            if os.path.isfile(path):
                self._resume(path)
            elif resume != "auto":
                raise FileNotFoundError(f"checkpoint.resume: {path} does not exist")
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
        import torch

        from .checkpointing import (FULL_FORMAT, PARTIAL_FORMAT, load_partial_into, read_training_checkpoint, set_rng_state, strip_prefixes)

        payload = read_training_checkpoint(path)
        fmt = payload.get("format")
        if "training" not in payload:
            raise ValueError(f"{path} holds no training state (a plain model file?); start a new run from it "
                             "with model.checkpoint instead of checkpoint.resume")
        if fmt == PARTIAL_FORMAT:
            if not self.partial:
                raise ValueError(f"{path} is a partial checkpoint but this run trains mode {self.cfg.mode} "
                                 "without a base checkpoint")
            if self.base and payload["base"].get("sha256") != self.base["sha256"]:
                raise ValueError(f"{path} was trained on another base checkpoint than model.checkpoint")
            load_partial_into(self.model, payload)
        elif fmt == FULL_FORMAT:
            self.model.load_state_dict(strip_prefixes(payload["model_state_dict"]), strict=True)
        else:
            raise ValueError(f"{path}: unknown checkpoint format {fmt!r}")
        tr = payload["training"]
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
        _ = torch

    # -------------------------------------------------------------------- loop
    def _validate(self, epoch: int, metrics: "_Metrics") -> Optional[Dict[str, float]]:
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

    def run(self) -> Dict[str, Any]:
        import torch

        from .distributed import all_reduce_mean

        cfg = self.cfg
        lc = cfg.loop
        start = time.time()
        metrics = _Metrics(cfg, self.info.is_main,
                           self.state["global_step"] if getattr(self, "resumed_from", None) else None, self.log,
                           group_names=[str(g["name"]) for g in self.optimizer.param_groups])
        losses: List[float] = []
        val_history: List[Dict[str, float]] = []
        stop_reason = "epochs"
        self.log(f"device {self.device} ({'AMP ' + str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else 'float32'}), "
                 f"{self.info.world_size} process(es), batch {lc.batch_size} x accumulate {lc.accumulate}, "
                 f"{self.steps_per_epoch} optimiser steps per epoch")
        stop = False
        tqdm = None
        if cfg.log.progress and self.info.is_main and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # type: ignore
            except ImportError:
                tqdm = None
        epoch = int(self.state["epoch"])
        while epoch < lc.epochs and not stop:
            skip_micro = int(self.state["micro_in_epoch"]) if epoch == self.state["epoch"] else 0
            self.sampler.set_epoch(epoch, skip=skip_micro * lc.batch_size)
            it = iter(self.train_loader)
            n_micro = self.micro_per_epoch - skip_micro
            bar = tqdm(total=n_micro, desc=f"epoch {epoch}", leave=False) if tqdm else None
            acc_loss, acc_n = 0.0, 0
            self.optimizer.zero_grad(set_to_none=True)
            for m in range(n_micro):
                batch = next(it)
                micro_index = skip_micro + m  # within the epoch
                last_of_step = ((micro_index + 1) % lc.accumulate == 0) or (micro_index + 1 == self.micro_per_epoch)
                image = batch["image"].to(self.device, non_blocking=True)
                label = batch["label"].to(self.device, non_blocking=True)
                sync = contextlib.nullcontext() if (last_of_step or not self.info.enabled) else self.ddp.no_sync()
                with sync:
                    with _autocast(self.device, self.amp_dtype):
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
                rates = self.schedule.apply(int(self.state["global_step"]))
                if cfg.optim.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["global_step"] += 1
                step_loss = all_reduce_mean(acc_loss / acc_n, self.info)
                acc_loss, acc_n = 0.0, 0
                losses.append(step_loss)
                step = int(self.state["global_step"])
                metrics.write(kind="train", epoch=epoch, step=step, loss=step_loss,
                              seconds=round(time.time() - start, 3),
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
                    stop, stop_reason = True, "max_steps"
                elif lc.max_minutes and (time.time() - start) / 60.0 >= lc.max_minutes:
                    stop, stop_reason = True, "max_minutes"
                if stop:
                    break
            if bar is not None:
                bar.close()
            epoch_done = self.state["epoch"] == epoch + 1 and self.state["micro_in_epoch"] == 0
            if epoch_done:
                if cfg.val.every_epochs and (epoch + 1) % cfg.val.every_epochs == 0:
                    res = self._validate(epoch, metrics)
                    if res is not None:
                        val_history.append(res)
                        self.schedule.on_validation(res["dice"])
                        if res["dice"] > self.state["best_metric"] + cfg.val.early_stopping_min_delta:
                            self.state["best_metric"], self.state["bad_validations"] = res["dice"], 0
                            self.save("best.pt", extra={"val": res}, with_state=False)
                        else:
                            self.state["bad_validations"] += 1
                        if (cfg.val.early_stopping_patience
                                and self.state["bad_validations"] >= cfg.val.early_stopping_patience):
                            stop, stop_reason = True, "early_stopping"
                            self.log(f"early stopping: no improvement in {self.state['bad_validations']} "
                                     "validations")
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
               "memory": _memory_report(self.device)}
        if cfg.checkpoint.export_encoder and self.info.is_main:
            from .checkpointing import ENCODER_FORMAT, atomic_save

            out["encoder"] = atomic_save({"format": ENCODER_FORMAT, "config": self.model.config.to_dict(),
                                          "image_encoder_state_dict": self.model.image_encoder.state_dict()},
                                         os.path.join(cfg.output_dir, "encoder.pt"))
        self.log(f"done ({stop_reason}): {out['steps']} steps in {out['seconds']:.0f} s; "
                 f"last loss {losses[-1] if losses else float('nan'):.4f}; {out['memory']}")
        return out


def train(cfg: TrainConfig, log=_print) -> Dict[str, Any]:
    """Train as configured (joins the torchrun process group when launched by torchrun)."""
    from .distributed import cleanup

    trainer = Trainer(cfg, log=log)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        if trainer.info.enabled:
            cleanup()


# -------------------------------------------------------------------------------- system check
def system_check(device: str = "auto", amp: str = "auto", log=print, image_size: int = 0) -> int:
    """Build a tiny model, run 2 training steps on a synthetic batch, print device/AMP/memory; 0 if OK."""
    import platform

    import torch

    from ..models import SamMed3DConfig, build_sam_med3d
    from .config import TrainConfig

    t0 = time.time()
    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    cfg = TrainConfig(device=str(dev), amp=amp)
    cfg.loop.num_click_steps = 3
    cfg.loop.mask_only_range = [1, 1]
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
        with _autocast(dev, amp_dtype):
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
    log(f"memory: {_memory_report(dev)}")
    log(f"check OK in {time.time() - t0:.1f} s (tiny model, 2 steps, 3 click steps)")
    return 0
