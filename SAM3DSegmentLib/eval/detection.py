"""Instance detection scores: one-to-one matching of predicted masks to ground-truth objects by mask IoU.

Matching: every (prediction, object) pair with IoU >= ``iou_threshold`` is a possible match; pairs are taken
greedily by decreasing IoU, each prediction and each object at most once. A matched object is a true positive;
an unmatched object a miss; an unmatched prediction a false positive. Recall = matched objects / objects.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..core.geometry import Volume
from ..inference.nms import BoxMask, mask_iou

__all__ = ["objects_of", "match_instances"]


def objects_of(labels: Volume, ids: Optional[Sequence[int]] = None) -> Dict[int, BoxMask]:
    """``{label: BoxMask}`` of a label map's objects (all non-zero labels, or ``ids``)."""
    from scipy import ndimage

    arr = np.asarray(labels.array)
    out: Dict[int, BoxMask] = {}
    for n, sl in enumerate(ndimage.find_objects(arr.astype(np.int64, copy=False)), start=1):
        if sl is None or (ids is not None and n not in ids):
            continue
        bm = BoxMask.of(arr[sl] == n, offset=[s.start for s in sl])
        if bm is not None:
            out[n] = bm
    return out


def match_instances(predictions: Sequence[BoxMask], objects: Dict[int, BoxMask],
                    iou_threshold: float = 0.5) -> dict:
    """Match predictions to objects (both on the same grid). Returns ``recall``, ``tp``, ``fn``, ``fp``, per
    object ``best_iou`` (its best IoU with any prediction) and ``matched`` (object -> prediction index)."""
    pairs = []
    best: Dict[int, float] = {k: 0.0 for k in objects}
    for p, pm in enumerate(predictions):
        for k, om in objects.items():
            iou = mask_iou(pm, om)
            if iou > best[k]:
                best[k] = iou
            if iou >= iou_threshold and iou > 0:
                pairs.append((iou, p, k))
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    used_p, matched = set(), {}
    for iou, p, k in pairs:
        if p in used_p or k in matched:
            continue
        used_p.add(p)
        matched[k] = p
    tp = len(matched)
    n = len(objects)
    return {"objects": n, "predictions": len(predictions), "tp": tp, "fn": n - tp, "fp": len(predictions) - tp,
            "recall": (tp / n) if n else None, "iou_threshold": float(iou_threshold),
            "best_iou": {int(k): round(float(v), 4) for k, v in best.items()},
            "matched": {int(k): int(v) for k, v in matched.items()}}


def unmatched(result: dict, n_predictions: int) -> List[int]:
    """Indices of the predictions no object matched (the false positives)."""
    used = set(result["matched"].values())
    return [p for p in range(n_predictions) if p not in used]
