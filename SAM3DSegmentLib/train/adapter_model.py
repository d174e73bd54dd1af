"""The model a 3DSAM-adapter training run trains (``model.family: 3dsam_adapter``): architecture, start point,
recipe.

``model.init`` is the start point, recognised from the file (:func:`SAM3DSegmentLib.models.families.checkpoint_family`):

* segment-anything's 2D ViT-B (``sam_vit_b_01ec64.pth``): the reused encoder parts load strictly
  (:func:`~SAM3DSegmentLib.models.sam3d_adapter.checkpoint.load_sam_vit_b`), the new parts keep their
  initialisation; recipe ``original`` only (the DualPath fine-tune starts from a trained 3DSAM-adapter);
* a 3DSAM-adapter file (published format, or written by ``sam3d train``): loaded strictly with its own
  architecture; for recipe ``dualpath`` its original adapters are replaced by new DualPath adapters;
* "" (empty): random initialisation (tests and smoke runs).

Anything else (a SAM-Med3D checkpoint, ...) is refused with what it is.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

from .config import ConfigError, TrainConfig

__all__ = ["build_adapter_model"]


def _architecture(cfg: TrainConfig):
    from ..models.sam3d_adapter import Sam3DAdapterConfig

    arch = cfg.model.arch
    preset = {"vit_b_ori": Sam3DAdapterConfig.vit_b, "vit_b": Sam3DAdapterConfig.vit_b,
              "tiny": Sam3DAdapterConfig.tiny}.get(arch)
    if preset is None:
        raise ConfigError(f"model.arch {arch!r} is not a 3DSAM-adapter preset; use vit_b (the published model) "
                          "or tiny")
    try:
        return preset(**cfg.model.arch_overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.arch_overrides: {err}") from err


def build_adapter_model(cfg: TrainConfig, log=print) -> Tuple[Any, Dict[str, Any]]:
    """``(model, info)``: the model with its recipe's trainable flags set; ``info`` has ``init`` (path or
    None), ``init_kind``, ``intensity`` (the start file's :class:`~SAM3DSegmentLib.core.intensity.WindowZNorm` or
    None), ``trained`` (parameter names), ``counts`` (:func:`~SAM3DSegmentLib.models.sam3d_adapter.recipes.
    recipe_parameter_count`)."""
    from ..models.checkpoint_file import CheckpointError
    from ..models.families import SAM3D_ADAPTER, SAM_2D, checkpoint_family
    from ..models.sam3d_adapter import Sam3DAdapter, apply_recipe, load_sam_vit_b, recipe_parameter_count
    from ..models.sam3d_adapter.files import load_model_file
    from ..models.sam3d_adapter.recipes import to_dualpath

    m, recipe = cfg.model, cfg.model.recipe
    if m.checkpoint:
        raise ConfigError("model.checkpoint is the SAM-Med3D start point; a 3DSAM-adapter run starts from "
                          "model.init (a sam_vit_b .pth or a 3DSAM-adapter file)")
    if cfg.mode != "full":
        raise ConfigError(f"mode {cfg.mode!r} is a SAM-Med3D training mode; for model.family 3dsam_adapter "
                          "model.recipe (original or dualpath) decides what trains: leave mode at full")
    info: Dict[str, Any] = {"init": None, "init_kind": "random", "intensity": None}
    if not m.init:
        model = Sam3DAdapter(_architecture(cfg))
        log(f"3DSAM-adapter {model.config.name}: random initialisation (model.init is empty)")
    else:
        path = os.path.abspath(os.path.expanduser(m.init))
        try:
            kind = checkpoint_family(path)
        except (CheckpointError, OSError) as err:
            raise ConfigError(f"model.init {path}: {err}") from err
        info.update(init=path, init_kind=kind)
        if kind == SAM_2D:
            if recipe == "dualpath":
                raise ConfigError(f"model.init {path} is the 2D segment-anything start point; the dualpath recipe "
                                  "fine-tunes a TRAINED 3DSAM-adapter: train with recipe original first and give "
                                  "its best.pt as model.init")
            model = Sam3DAdapter(_architecture(cfg))
            try:
                report = load_sam_vit_b(model, path)
            except CheckpointError as err:
                raise ConfigError(f"model.init {path}: {err}") from err
            log(f"model.init: 2D SAM {os.path.basename(path)}: {len(report['loaded'])} tensors loaded; new parts "
                f"initialised: {len(report['missing'])} ({', '.join(sorted({k.split('.')[0] for k in report['missing']}))})")
        elif kind == SAM3D_ADAPTER:
            try:
                model = load_model_file(path)
            except (CheckpointError, ValueError) as err:
                raise ConfigError(f"model.init {path}: {err}") from err
            info["intensity"] = model.intensity
            if m.arch_overrides:
                log("note: model.arch_overrides are ignored when model.init is a 3DSAM-adapter file (its "
                    "architecture wins)")
            log(f"model.init: 3DSAM-adapter {os.path.basename(path)} ({model.config.name}, "
                f"{model.config.adapter} adapters)")
        else:
            raise ConfigError(f"model.init {path} is not a 3DSAM-adapter start point: it looks like a SAM-Med3D "
                              "checkpoint. Give segment-anything's sam_vit_b_01ec64.pth (recipe original) or a "
                              "3DSAM-adapter file")
    if recipe == "dualpath" and model.config.adapter != "dualpath":
        to_dualpath(model, mid=cfg.sam3d_adapter.dualpath_dim)
        log(f"recipe dualpath: the adapters are replaced by DualPath adapters (width {cfg.sam3d_adapter.dualpath_dim})")
    elif recipe == "original" and model.config.adapter != "original":
        raise ConfigError("recipe original trains the original adapters, but model.init has DualPath adapters; "
                          "use recipe dualpath to continue it")
    info["trained"] = apply_recipe(model, recipe)
    info["counts"] = recipe_parameter_count(model, recipe)
    model.train()
    return model, info
