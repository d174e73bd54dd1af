"""The optimiser's parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

from .config import TrainConfig

__all__ = ["make_param_groups", "LRSchedule", "lr_column", "format_rates"]


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
