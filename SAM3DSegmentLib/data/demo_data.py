"""The demo model's training set: the slicerio chest CT (7 segments) plus synthetic CT phantoms.

``make_demo_dataset(out)`` (CLI: ``sam3d train make-demo-data OUT``) writes an nnU-Net raw dataset:

* ``chest000``: ``SAM3DSegmentLib.data.sample_data.chest_ct()`` with ``chest_segments()`` (ribs, cervical /
  thoracic / lumbar vertebral column, right lung, left lung, tissue; labels 1..7);
* ``body000..`` : ``phantoms.ct_body_phantom`` torsos with varied field of view and spacing (body, lungs,
  liver, spine, kidneys, lesion, low-contrast sphere);
* ``synth000..``: ``phantoms.synthetic_case`` random ellipsoid objects (anisotropic, some oblique).

Everything is generated offline and deterministically (fixed seeds), so ``sam3d train configs/demo.json``
after ``make-demo-data`` reproduces the demo model's data exactly.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from ..core.atomic import write_json

__all__ = ["make_demo_dataset", "ensure_demo_dataset", "DEMO_VAL_CASES"]

#: Cases held out for validation in configs/demo.json.
DEMO_VAL_CASES = ["body003", "synth007"]

_BODY_ORDER = ["body", "right_lung", "left_lung", "liver", "spine", "right_kidney", "left_kidney", "lesion",
               "low_contrast_sphere"]


def _cases(n_phantoms: int):
    from .phantoms import ct_body_phantom, synthetic_case
    from .sample_data import CHEST_SEGMENT_NAMES, chest_ct, chest_segments

    ct = chest_ct()
    segs = chest_segments(ct)
    yield "chest000", ct, [(name, segs[name]) for name in CHEST_SEGMENT_NAMES if name in segs]
    body_grids = [((150, 150, 80), (1.6, 1.6, 2.5)), ((180, 160, 70), (1.3, 1.3, 3.0)),
                  ((128, 128, 100), (2.0, 2.0, 2.0)), ((170, 170, 60), (1.5, 1.5, 3.5))]
    for n in range(max(1, n_phantoms // 2 + n_phantoms % 2)):
        shape, spacing = body_grids[n % len(body_grids)]
        img, masks = ct_body_phantom(shape_ijk=shape, spacing=spacing, seed=100 + n, large_object=True)
        yield f"body{n:03d}", img, [(k, masks[k]) for k in _BODY_ORDER if k in masks]
    for n in range(max(1, n_phantoms)):
        img, masks = synthetic_case(200 + n, n_objects=3, oblique=bool(n % 2))
        yield f"synth{n:03d}", img, sorted(masks.items())


def make_demo_dataset(out: str, n_phantoms: int = 8) -> str:
    """Write the dataset to ``out`` (nnU-Net raw layout); returns ``out``."""
    from ..io import write_volume

    os.makedirs(os.path.join(out, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(out, "labelsTr"), exist_ok=True)
    labels: Dict[str, int] = {"background": 0}
    n_cases = 0
    for case_id, image, masks in _cases(n_phantoms):
        lab = np.zeros(image.array.shape, dtype=np.uint8)
        prefix = "chest " if case_id.startswith("chest") else ("phantom " if case_id.startswith("body")
                                                               else "synthetic ")
        for name, mask in masks:  # later (smaller, inner) structures overwrite earlier ones
            key = prefix + name.replace("_", " ")
            if key not in labels:
                labels[key] = len(labels)
            if not mask.same_grid(image):
                raise ValueError(f"{case_id}: mask {name} is not on the image grid")
            lab[np.asarray(mask.array) > 0] = labels[key]
        arr = np.asarray(image.array)
        if arr.dtype != np.int16:
            arr = np.clip(arr, -32768, 32767).astype(np.int16)
        write_volume(image.with_array(arr), os.path.join(out, "imagesTr", f"{case_id}_0000.nii.gz"))
        write_volume(image.with_array(lab), os.path.join(out, "labelsTr", f"{case_id}.nii.gz"))
        n_cases += 1
    meta = {"name": "SAM3DSegmentDemo", "description": "slicerio chest CT + synthetic CT phantoms (demo only)",
            "channel_names": {"0": "CT"}, "labels": labels, "numTraining": n_cases, "file_ending": ".nii.gz"}
    write_json(os.path.join(out, "dataset.json"), meta)
    return out


def ensure_demo_dataset(root: str, log=print) -> bool:
    """Write the demo dataset to ``root`` unless that folder exists; True when it was written.

    The set is built in a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a half-written ``root`` behind (a left-over temporary is replaced on the next call).
    """
    import shutil

    root = os.path.abspath(os.path.expanduser(root))
    if os.path.exists(root):
        return False
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, "." + os.path.basename(root) + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: {root} does not exist; writing the demo training set there (sam3d train make-demo-data)")
    try:
        make_demo_dataset(tmp)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True
