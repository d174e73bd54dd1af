"""Which tensors train in the two published 3DSAM-adapter recipes (``requires_grad`` flags).

* ``original``: adapters, ``neck_3d``, ``rel_pos_d``, block norms, ``depth_embed``, ``slice_embed``, the
  prompt encoder and the decoder train; SAM's reused weights (patch embedding, pos_embed, qkv/proj, MLPs,
  rel_pos_h/w) and the ``lr`` scalars stay frozen.
* ``dualpath``: fine-tune of a trained model whose adapters were replaced by DualPath adapters
  (:func:`to_dualpath`); only ``depth_embed``, ``slice_embed``, block norms, adapters, ``rel_pos_d`` and
  ``neck_3d`` train; the prompt encoder and decoder are frozen too.

The prompt encoder's token-to-image cross-attention never reaches the output (see ``prompt_encoder.py``);
it belongs to the published trainable set (:func:`recipe_parameter_count`) but is flagged frozen here, so
every tensor that requires a gradient gets one (as DistributedDataParallel requires). With AdamW and
weight decay 0 an unused tensor never changes either way.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

from torch import nn

RECIPES = ("original", "dualpath")

_ENCODER_TRAINABLE = ("adapter.", "neck_3d.", "attn.rel_pos_d", "norm1.", "norm2.", "depth_embed",
                      "slice_embed.")


def _unused(name: str) -> bool:
    return name.startswith("prompt_encoder.") and ".cross_attn_token_to_image." in name


def in_recipe(name: str, recipe: str) -> bool:
    """Whether parameter ``name`` (a ``Sam3DAdapter.named_parameters()`` name) is in the recipe's trainable set."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown 3DSAM-adapter recipe {recipe!r}; use one of {RECIPES}")
    if name.startswith("image_encoder."):
        return any(part in name for part in _ENCODER_TRAINABLE)
    return recipe == "original" and name.startswith(("prompt_encoder.", "mask_decoder."))


def apply_recipe(model: nn.Module, recipe: str) -> List[str]:
    """Set ``requires_grad`` for ``recipe``; returns the names of the tensors that now train."""
    if recipe == "dualpath" and model.config.adapter != "dualpath":
        raise ValueError("the dualpath recipe fine-tunes DualPath adapters: convert the model first with "
                         "to_dualpath(model) (the original recipe trains the original adapters)")
    trained = []
    for name, p in model.named_parameters():
        flag = in_recipe(name, recipe) and not _unused(name)
        p.requires_grad_(flag)
        if flag:
            trained.append(name)
    return trained


def recipe_parameter_count(model: nn.Module, recipe: str) -> Dict[str, int]:
    """Parameter counts: ``total``, ``recipe`` (the published trainable set), ``trainable`` (requires_grad
    under :func:`apply_recipe`: the recipe less the unused cross-attention) and ``adapters``."""
    counts = {"total": 0, "recipe": 0, "trainable": 0, "adapters": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        counts["total"] += n
        if in_recipe(name, recipe):
            counts["recipe"] += n
            if not _unused(name):
                counts["trainable"] += n
        if ".adapter." in name:
            counts["adapters"] += n
    return counts


def adapter_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The adapters' parameters (the DualPath recipe clips the gradient norm on these only)."""
    return [p for name, p in model.named_parameters() if ".adapter." in name]


def to_dualpath(model: nn.Module, mid: int = 384) -> nn.Module:
    """Replace every block's adapter by a freshly initialised DualPath adapter of width ``mid`` (in place)."""
    from .adapters import DualPathAdapter3D

    config = dataclasses.replace(model.config, adapter="dualpath", adapter_dim=mid)
    ref = next(model.parameters())
    for blk in model.image_encoder.blocks:
        blk.adapter = DualPathAdapter3D(config.embed_dim, mid).to(device=ref.device, dtype=ref.dtype)
    model.config = config
    model.image_encoder.config = config
    return model
