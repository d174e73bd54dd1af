"""``sam3d evaluate --protocol segfm``: the CVPR 2025 interactive 3D segmentation challenge's protocol (SegFM).

Per case, every class present in the ground truth is one object of one :class:`~SAM3DSegmentLib.inference.
session.Session` (so the image embeddings are shared between the classes), and all classes advance together:

0. optional box step (``box``: "auto" uses the case's ``boxes`` when it has them, "none" never, "gt" derives
   them from the ground truth as the challenge did). Our models take no box prompt, so the box places the
   model's first region: ONE include click at the centre of the box's 2D rectangle on its slice ``z_mid``
   (a new object's first click opens a region centred on it). The box is not used otherwise.
1. ``clicks`` (5) click steps: for every class, the challenge's click
   (:func:`~SAM3DSegmentLib.eval.segfm_clicks.segfm_click`) from the label map of the previous step, then
   every class's click is added to its object. Clicks accumulate and each object keeps its previous
   prediction (the session's region logits, fed back with every click).

After each step the objects are combined into one label map (ascending label order: where two objects claim a
voxel the higher label gets it, and the voxels claimed twice are counted) and scored with
:func:`~SAM3DSegmentLib.eval.metrics.multiclass_scores` (Dice per class averaged over the classes; surface
Dice at ``nsd_tolerance_mm`` only when that mean Dice is above 0.2, else 0). DSC_AUC and NSD_AUC are the
trapezoid over the click steps (unit spacing: at most 4.0 for 5 clicks; the box step is not in them), final
Dice/NSD those after the last click. The running time of a step is the time of the session's updates alone
(click simulation and scoring excluded, as the challenge times only the model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.boxes import box_union
from ..core.click_protocols import NEWEST_CLICK, click_protocol
from ..core.geometry import Volume
from .metrics import click_auc, multiclass_scores
from .segfm_clicks import SEED, segfm_click

__all__ = ["BOX_MODES", "SegFMConfig", "SegFMTask", "CaseResult", "box_click_index", "run_case",
           "TIME_BUDGET_S_PER_CLASS"]

#: ``box``: "auto" (the case's boxes when it has them), "none", "gt" (boxes derived from the ground truth).
BOX_MODES = ("auto", "none", "gt")
#: The challenge's time limit per class and case (whole run), in seconds.
TIME_BUDGET_S_PER_CLASS = 90.0

Log = Callable[[str], None]


@dataclass
class SegFMConfig:
    clicks: int = 5
    box: str = "auto"
    prompt_mode: str = NEWEST_CLICK  # the engine's click protocol (core/click_protocols.py; older spellings accepted)
    spacing_mm: float = 1.5
    clamp_hu: Optional[Tuple[float, float]] = None
    extend: bool = True
    max_regions: int = 8
    nsd_tolerance_mm: float = 2.0
    seed: int = SEED
    model: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.clicks) < 2:
            raise ValueError(f"the SegFM protocol needs at least 2 clicks for its AUC, got {self.clicks}")
        self.prompt_mode = click_protocol(self.prompt_mode, "--prompt-mode")
        if self.box not in BOX_MODES:
            raise ValueError(f"box must be one of {BOX_MODES}, got {self.box!r}")
        if not self.nsd_tolerance_mm >= 0:
            raise ValueError("the NSD tolerance must be >= 0 mm")


@dataclass
class SegFMTask:
    """One case to score: ``image`` (its array is ``[k, j, i]``), ``gts`` the integer label map on the same grid,
    ``classes`` the labels scored (ascending), ``boxes`` ``{label: box dict}`` or None, ``names`` per label."""

    name: str
    image: Volume
    gts: np.ndarray
    classes: List[int]
    boxes: Optional[Dict[int, Dict[str, int]]] = None
    names: Dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_npz(cls, case, classes: Optional[Sequence[int]] = None,
                 window: Optional[Sequence[float]] = None) -> "SegFMTask":
        """From a :class:`~SAM3DSegmentLib.data.segfm_npz.SegFMCase` (all its classes unless ``classes``; the
        image mapped back onto ``window``, see :meth:`~SAM3DSegmentLib.data.segfm_npz.SegFMCase.volume`)."""
        chosen = case.classes if classes is None else [c for c in case.classes if c in set(classes)]
        return cls(case.name, case.volume(window), case.gts, chosen, case.boxes, {c: f"label_{c}" for c in chosen})

    @classmethod
    def from_volumes(cls, name: str, image: Volume, label: np.ndarray, names: Optional[Dict[int, str]] = None,
                     classes: Optional[Sequence[int]] = None) -> "SegFMTask":
        """From an image and its label map (an nnU-Net case): the labels present (or ``classes`` among them)."""
        lab = np.asarray(label)
        present = [int(v) for v in np.flatnonzero(np.bincount(lab.ravel())) if v != 0]
        chosen = present if classes is None else [c for c in present if c in set(classes)]
        names = names or {}
        return cls(name, image, lab, chosen, None, {c: names.get(c, f"label_{c}") for c in chosen})


@dataclass
class CaseResult:
    """``steps``: one dict per step (``step`` "box" or 1..N, ``dice``, ``nsd``, ``seconds``, ``overlap_voxels``);
    ``clicks``: one dict per class and step (the click and that class's scores)."""

    name: str
    classes: List[int]
    box_step: bool
    steps: List[Dict[str, Any]]
    clicks: List[Dict[str, Any]]
    dsc_auc: float
    nsd_auc: float
    dsc_final: float
    nsd_final: float
    total_seconds: float


def box_click_index(box: Dict[str, int]) -> Tuple[int, int, int]:
    """The (z, y, x) voxel our models are given for a challenge box: the centre of its rectangle on ``z_mid``
    (halves rounded down)."""
    return (int(box["z_mid"]), (int(box["z_mid_y_min"]) + int(box["z_mid_y_max"])) // 2,
            (int(box["z_mid_x_min"]) + int(box["z_mid_x_max"])) // 2)


def _boxes_for(task: SegFMTask, mode: str) -> Optional[Dict[int, Dict[str, int]]]:
    if mode == "none":
        return None
    if mode == "gt":
        from ..data.segfm_npz import boxes_from_gt

        return boxes_from_gt(task.gts)
    return task.boxes


def _compose(session, objects: Dict[int, str], shape, dtype) -> Tuple[np.ndarray, int]:
    """The objects' masks as one label map (ascending labels, a higher label wins) and the voxels claimed twice."""
    seg = np.zeros(shape, dtype=dtype)
    overlap = 0
    for cls in sorted(objects):
        box, m = session.mask_cropped(objects[cls])
        if m.size == 0:
            continue
        view = seg[box]
        on = m != 0
        overlap += int(np.count_nonzero(on & (view != 0)))
        view[on] = cls
    return seg, overlap


def _class_click(gts: np.ndarray, seg: np.ndarray, cls: int, gt_box, seg_box, seed: int):
    """The challenge's click for ``cls``, computed on the box where its ground truth or prediction lies
    (the error cannot lie elsewhere; the click and its tie-break are the same as on the whole array)."""
    box = box_union(gt_box, seg_box)
    click = segfm_click(gts[box] == cls, seg[box] == cls, seed=seed)
    if click is None:
        return None
    index = tuple(b.start + v for b, v in zip(box, click.index))
    return click._replace(index=index)


def run_case(backend, task: SegFMTask, config: SegFMConfig, log: Log = lambda m: None,
             on_step: Optional[Callable[[Any, np.ndarray], None]] = None) -> CaseResult:
    """The protocol on one case (see the module docstring). ``on_step(step, label_map)`` (optional) is called
    with each step's combined prediction ("box" or the click number); the next step's clicks are computed from
    that array, so the callback must not change it (copy it to keep it)."""
    from scipy import ndimage

    from ..inference.session import Session, SessionOptions

    if not task.classes:
        raise ValueError(f"{task.name}: no class to score (the ground truth holds no foreground)")
    t_case = time.perf_counter()
    opts = SessionOptions(prompt_mode=config.prompt_mode, region_size=int(backend.image_size),
                          spacing_mm=float(config.spacing_mm), extend=bool(config.extend),
                          max_regions=int(config.max_regions), clamp_hu=config.clamp_hu, history_limit=1)
    session = Session(backend, opts)
    session.set_volume(task.image)
    gts = np.asarray(task.gts)
    spacing_kji = np.asarray(task.image.spacing, dtype=np.float64)[::-1]
    classes = sorted(task.classes)
    top = max(classes)
    gt_boxes = ndimage.find_objects(gts, max_label=top)
    dtype = np.uint8 if top < 256 else np.uint16
    objects = {c: session.new_object(name=task.names.get(c, f"label_{c}")) for c in classes}
    boxes = _boxes_for(task, config.box)
    steps: List[Dict[str, Any]] = []
    clicks: List[Dict[str, Any]] = []

    def apply(step, planned: Dict[int, Any]) -> np.ndarray:
        seconds = {}
        for cls, click in planned.items():
            if click is None:
                continue
            index, positive = click
            t0 = time.perf_counter()
            session.select_object(objects[cls])
            session.add_click(ijk=tuple(int(v) for v in index[::-1]), positive=bool(positive))
            seconds[cls] = time.perf_counter() - t0
        seg, overlap = _compose(session, objects, gts.shape, dtype)
        scores = multiclass_scores(gts, seg, classes, spacing_kji, config.nsd_tolerance_mm)
        steps.append({"step": step, "dice": scores.dice, "nsd": scores.nsd, "seconds": float(sum(seconds.values())),
                      "overlap_voxels": overlap})
        if on_step is not None:
            on_step(step, seg)
        for cls in classes:
            click = planned.get(cls)
            d, n = scores.per_class[cls]
            clicks.append({"case": task.name, "class": cls, "name": task.names.get(cls, f"label_{cls}"),
                           "step": step, "positive": "" if click is None else int(bool(click[1])),
                           "index_zyx": "" if click is None else " ".join(str(int(v)) for v in click[0]),
                           "dice": d, "nsd": n, "seconds": seconds.get(cls, 0.0)})
        return seg

    if boxes:
        missing = [c for c in classes if c not in boxes]
        if missing:
            raise ValueError(f"{task.name}: no box for class(es) {missing}; use box mode 'none' or 'gt'")
        seg = apply("box", {c: (box_click_index(boxes[c]), True) for c in classes})
    else:
        seg = np.zeros(gts.shape, dtype=dtype)
    for n in range(1, int(config.clicks) + 1):
        seg_boxes = ndimage.find_objects(seg, max_label=top)
        planned = {}
        for c in classes:
            click = _class_click(gts, seg, c, gt_boxes[c - 1], seg_boxes[c - 1], config.seed)
            planned[c] = None if click is None else (click.index, click.positive)
        seg = apply(n, planned)
    click_steps = [s for s in steps if s["step"] != "box"]
    dice_curve = [s["dice"] for s in click_steps]
    nsd_curve = [s["nsd"] for s in click_steps]
    for oid in objects.values():
        session.remove_object(oid)
    result = CaseResult(name=task.name, classes=classes, box_step=bool(boxes), steps=steps, clicks=clicks,
                        dsc_auc=click_auc(dice_curve), nsd_auc=click_auc(nsd_curve), dsc_final=dice_curve[-1],
                        nsd_final=nsd_curve[-1], total_seconds=float(sum(s["seconds"] for s in steps)))
    log(f"  segfm {task.name}: {len(classes)} class(es){', box step' if boxes else ''}; Dice "
        + " ".join(f"{v:.3f}" for v in dice_curve) + f"; DSC_AUC {result.dsc_auc:.3f} NSD_AUC {result.nsd_auc:.3f}"
        f" ({time.perf_counter() - t_case:.1f} s)")
    return result
