"""Reference mode: SAM-Med3D's inference code (``validate_paired_img_gt``) reproduced on our volumes.

``validate_paired_img_gt`` (``utils/infer_utils.py`` of github.com/uni-medical/SAM-Med3D, run with
torchio 0.20) segments every label value of a labelled image with simulated clicks. Here, with the grid
steps of :mod:`SAM3DSegmentLib.eval.reference_pipeline` (resample, canonical, crop/pad, z-normalise,
paste-back) and the network behind a backend (:class:`~SAM3DSegmentLib.inference.backends.Backend`):

* per label value, in ascending order: the label decides the 128^3 crop (:func:`reference_preprocess`);
* clicks (the reference's random sampler): numpy's global random state is seeded once per image
  (``seed``, 233 by default); per step one voxel is drawn uniformly (``randint`` over the error voxels
  ``FN | FP`` of the current 128^3 prediction in C order; over the label when there is no error),
  positive when it is a false negative (:func:`reference_random_click`);
* ALL clicks so far are fed, with the previous 32^3 logits (zeros at the first step): the ``all-clicks``
  click protocol (:func:`reference_interact`); a label that vanishes from the crop gets an empty mask and
  consumes no random draw;
* the last mask is pasted back onto the original grid; label values are written in ascending order, a
  later label overwriting an earlier one (:func:`reference_validate`).

Checked against torchio 0.20.23 and torch doing the same steps (``Testing/test_reference_torchio.py``).
Clicks are crop indices ``(a, b, c)`` (the network's axis order); masks on the volume grid are
``[k, j, i]``. No torch here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import Volume
from ..core.interp import resize
from .reference_pipeline import (reference_crop_or_pad, reference_grid, reference_paste_mask, reference_roi_affine,
                                 reference_upsampled_mask, reference_znorm, torchio_crop_begin)

__all__ = ["REFERENCE_SEED", "ReferenceROI", "reference_preprocess", "reference_random_click",
           "ReferenceObject", "reference_interact", "ReferenceResult", "reference_validate"]

#: ``validate_paired_img_gt``'s default seed of the numpy global random state.
REFERENCE_SEED = 233


@dataclass
class ReferenceROI:
    """One target's model input as the reference builds it (reference_pipeline steps 1-4)."""

    image: np.ndarray          # float32 (S, S, S) [a, b, c], z-normalised
    label: np.ndarray          # uint8 (S, S, S) [a, b, c], the target inside the crop (0 padding)
    roi_to_ras: np.ndarray     # (a, b, c, 1) -> RAS
    begin: np.ndarray          # crop start in the canonical resampled grid (negative: padding)
    grid_shape: Tuple[int, int, int]  # the canonical resampled grid (a, b, c)


def reference_preprocess(image: Volume, target: np.ndarray, size: int = 128, spacing: float = 1.5,
                         image_abc: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> ReferenceROI:
    """reference_pipeline steps 1-4 for one binary ``target`` (``[k, j, i]`` on ``image``'s grid): the
    label decides the crop (torchio ``CropOrPad(mask_name="label")``). ``image_abc``: the image's canonical resampled
    ``(array [a, b, c], ijk_to_ras)`` when already computed (it does not depend on the target).
    Raises RuntimeError where the reference fails (no spread in the crop's voxels > 0)."""
    arr, affine = image_abc if image_abc is not None else reference_grid(image, spacing, "linear")
    label_abc, _ = reference_grid(image.with_array((np.asarray(target) != 0).astype(np.uint8)), spacing,
                                  "nearest")
    begin = torchio_crop_begin(arr.shape, size, label_abc)
    return ReferenceROI(image=reference_znorm(reference_crop_or_pad(arr, size=size, begin=begin)[0]),
                        label=reference_crop_or_pad(label_abc, size=size, begin=begin)[0], begin=begin,
                        roi_to_ras=reference_roi_affine(affine, arr.shape, begin, size),
                        grid_shape=tuple(int(v) for v in arr.shape))


def reference_random_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.RandomState
                           ) -> Tuple[np.ndarray, bool]:
    """The reference's random click (module docstring): ``((a, b, c) int64, positive)``."""
    gt = np.asarray(gt) != 0
    pred = np.asarray(pred) != 0
    fn = gt & ~pred
    error = fn | (pred & ~gt)
    if not error.any():
        points = np.argwhere(gt)
        return points[rng.randint(len(points))], True
    points = np.argwhere(error)
    p = points[rng.randint(len(points))]
    return p, bool(fn[tuple(p)])


@dataclass
class ReferenceObject:
    """One label value's reference run: clicks (a, b, c), the low-res logits after each click and the
    seconds each click took (the image encoding counted in the first)."""

    value: int
    roi: ReferenceROI
    points: List[Tuple[int, int, int]] = field(default_factory=list)
    positive: List[bool] = field(default_factory=list)
    logits: List[np.ndarray] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)

    def mask_abc(self, step: int = -1) -> np.ndarray:
        """uint8 ``[a, b, c]`` ROI mask after click ``step`` (0-based; -1 = last); empty without clicks."""
        if not self.logits:
            return np.zeros(self.roi.label.shape, np.uint8)
        return reference_upsampled_mask(self.logits[step], self.roi.label.shape[0])

    def mask(self, volume: Volume, step: int = -1) -> np.ndarray:
        """uint8 ``[k, j, i]`` mask on ``volume``'s grid after click ``step`` (the reference's paste-back)."""
        return reference_paste_mask(self.mask_abc(step), self.roi.roi_to_ras, volume)


def reference_interact(backend, roi: ReferenceROI, num_clicks: int, rng: np.random.RandomState,
                       value: int = 1) -> ReferenceObject:
    """The clicks on one ROI: encode once, then ``num_clicks`` random clicks, ALL clicks so far fed with
    the previous low-res logits (zeros at the first step). An empty crop label: no click, no random draw."""
    obj = ReferenceObject(value=int(value), roi=roi)
    gt = roi.label != 0
    if not gt.any():
        return obj
    size = roi.label.shape[0]
    t0 = time.perf_counter()
    embedding = backend.encode(roi.image)
    pred = np.zeros(gt.shape, bool)
    prev: Optional[np.ndarray] = None
    for _ in range(int(num_clicks)):
        p, positive = reference_random_click(pred, gt, rng)
        obj.points.append(tuple(int(v) for v in p))
        obj.positive.append(positive)
        prev = np.asarray(backend.decode(embedding, np.asarray(obj.points, dtype=np.float32),
                                         np.asarray(obj.positive, dtype=np.int64), prev), dtype=np.float32)
        obj.logits.append(prev)
        pred = resize(prev, size) > 0  # sigmoid > 0.5, rounded as torch rounds
        t1 = time.perf_counter()
        obj.seconds.append(t1 - t0)
        t0 = t1
    return obj


@dataclass
class ReferenceResult:
    """What :func:`reference_validate` returns: the merged label map ``[k, j, i]`` on the image grid (as
    the reference writes it) and each label value's run."""

    label_map: np.ndarray
    objects: Dict[int, ReferenceObject]


def reference_validate(backend, image: Volume, label_map: np.ndarray, num_clicks: int = 1,
                       spacing: float = 1.5, seed: int = REFERENCE_SEED,
                       values: Optional[Sequence[int]] = None) -> ReferenceResult:
    """Reference mode: SAM-Med3D's ``validate_paired_img_gt`` on ``image`` and its ``label_map``
    (``[k, j, i]`` on the image grid), every step as in the module docstring.

    ``values``: the label values to run, in this order (default: every non-zero value present,
    ascending, as the reference does; another choice changes which random draws each target gets).
    The output label map is uint8 (as the reference writes it) when every value fits, else int32 (the
    reference's uint8 map cannot hold larger values).
    """
    labels = np.asarray(label_map)
    if labels.shape != image.array.shape:
        raise ValueError(f"label map shape {labels.shape} differs from the image {image.array.shape} (k, j, i); "
                         "resample the labels onto the image grid first")
    if values is None:
        values = [int(v) for v in np.unique(labels) if v != 0]
    size = int(backend.image_size)
    rng = np.random.RandomState(int(seed))
    out = np.zeros(labels.shape, np.uint8 if max(list(values) + [0]) <= 255 else np.int32)
    image_abc = reference_grid(image, spacing, "linear")
    objects: Dict[int, ReferenceObject] = {}
    for value in values:
        roi = reference_preprocess(image, labels == value, size, spacing, image_abc=image_abc)
        obj = reference_interact(backend, roi, num_clicks, rng, value)
        objects[int(value)] = obj
        if obj.logits:
            out[obj.mask(image) == 1] = value
    return ReferenceResult(out, objects)
