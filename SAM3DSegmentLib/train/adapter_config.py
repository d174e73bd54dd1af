"""The ``sam3d_adapter`` section of a training config: the settings of the two published 3DSAM-adapter recipes.

Used when ``model.family`` is ``3dsam_adapter`` (``model.recipe`` original | dualpath, ``model.init`` the start
point); the trainer is :mod:`SAM3DSegmentLib.train.adapter_loop`. The defaults are the published recipes
(docs/training.md, "3DSAM-adapter"):

* original: AdamW lr 4e-4, weight decay 0 (encoder, prompt encoder, decoder alike), LinearLR 1.0 -> 0.01 over
  the epochs stepped per epoch, batch 1, gradient-norm clip 1.0 on the trained parameters, loss Dice + CE
  (0.5 / 0.5), best checkpoint by validation Dice loss plus the last;
* dualpath: the same optimiser and schedule on its smaller trainable set, the gradient clip on the adapters'
  parameters only, Dice + CE to train and Dice to validate;
* samples (both): 128³ crops at 1 mm, positive : negative = 2 : 1, flips, rot90 in the axial plane, zoom
  0.85-1.25 (p 0.8), intensity shift of +-20 HU; 10 points in the foreground + 20 anywhere in the crop;
* input: CT clipped to ``window`` and z-normalised with the training set's foreground ``mean``/``std``; left
  empty, they are computed from the training split (the 0.5 / 99.5 percentiles of its foreground voxels, then
  their mean and std after clipping) and stored in the model files.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from .config_types import Flag, Floats, Int, Section

__all__ = ["Sam3DAdapterTrainConfig", "FAMILIES", "RECIPES"]

#: ``model.family`` values.
FAMILIES = ("sam_med3d", "3dsam_adapter")
#: ``model.recipe`` values (3DSAM-adapter).
RECIPES = ("original", "dualpath")


class Sam3DAdapterTrainConfig(Section):
    #: AdamW learning rate and weight decay (both recipes).
    lr: float = Field(4e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    #: LinearLR from 1.0 to this factor over ``loop.epochs``, stepped once per epoch.
    lr_end_factor: float = Field(0.01, gt=0, le=1)
    #: Gradient-norm clip (original: all trained parameters; dualpath: the adapters only); 0 disables it.
    grad_clip: float = Field(1.0, ge=0)
    #: Loss = dice_weight * Dice loss + ce_weight * cross-entropy (softmax over the 2 classes).
    dice_weight: float = Field(0.5, ge=0)
    ce_weight: float = Field(0.5, ge=0)
    #: Width of the DualPath adapters that replace the original ones (recipe dualpath).
    dualpath_dim: Int = Field(384, ge=1)
    #: Training points per sample: in the target's foreground, and anywhere in the crop.
    fg_points: Int = Field(10, ge=1)
    any_points: Int = Field(20, ge=0)
    #: Fraction of crops centred on a foreground voxel (the others anywhere in the volume): 2:1.
    positive_fraction: float = Field(2.0 / 3.0, ge=0, le=1)
    #: Augmentation: flips on each axis, rot90 in the axial plane, zoom range and probability, HU shift.
    flip: Flag = True
    rot90: Flag = True
    zoom: Floats = [0.85, 1.25]
    zoom_p: float = Field(0.8, ge=0, le=1)
    hu_shift: float = Field(20.0, ge=0)
    #: Input normalisation: HU window [lo, hi] and foreground mean/std; [] / null: from the training split.
    window: Floats = []
    mean: Optional[float] = None
    std: Optional[float] = Field(None, gt=0)

    @field_validator("window")
    @classmethod
    def _window(cls, v):
        if v and (len(v) != 2 or not v[0] < v[1]):
            raise ValueError("must be [lo, hi] with lo < hi, or [] (from the training data)")
        return v

    @field_validator("zoom")
    @classmethod
    def _zoom(cls, v):
        if len(v) != 2 or not 0 < v[0] <= v[1]:
            raise ValueError("must be [lo, hi] with 0 < lo <= hi")
        return v
