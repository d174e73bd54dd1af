"""The model a training run trains: a preset or a base checkpoint, adapters for the PEFT modes, trainable flags."""
from __future__ import annotations

import os

from .config import ConfigError, TrainConfig

__all__ = ["PEFT_MODES", "build_model"]

PEFT_MODES = ("adapter3d", "dualpath")


def build_model(cfg: TrainConfig, log=print):
    """The model to train, with adapters and trainable flags applied.

    Returns ``(model, base, (trainable parameters, all parameters))``; ``base`` is ``{path, sha256, size}``
    of ``model.checkpoint``, None for a random initialisation.
    """
    from ..models import SamMed3DConfig, build_sam_med3d, load_checkpoint
    from ..models.adapters import apply_adapters, mark_trainable
    from .checkpointing import file_sha256

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
