"""The training run's metrics: ``metrics.csv`` in ``output_dir`` and, when enabled, TensorBoard and wandb."""
from __future__ import annotations

import csv
import os
from typing import Optional, Sequence

from .config import TrainConfig, config_to_dict
from .optim import lr_column

__all__ = ["MetricsLog"]


class MetricsLog:
    """metrics.csv (one learning-rate column per optimiser group), TensorBoard and wandb, on rank 0 only.

    A resumed run keeps the rows up to its step (``resume_step``) and continues the file.
    """

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
