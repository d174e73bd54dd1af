"""Settings of the automatic mask generator (:mod:`.automatic`), checked once with one message per problem."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

import numpy as np

__all__ = ["AutoOptions", "RANK_BY", "PRESETS", "preset"]

#: How instances are ranked for suppression: the stability score alone (default: the released SAM-Med3D
#: checkpoints never trained their IoU head, so its prediction carries no information), the decoder's
#: predicted IoU, or their product (SAM's automatic generator filters on both).
RANK_BY = ("stability", "predicted_iou", "product")

#: Named starting points (any option can still be changed): ``nodules`` prompts at bright blobs of 4 to 30 mm
#: and keeps objects up to 20 ml (a 34 mm ball) that no region cut (a cut mask is part of something larger);
#: ``everything`` prompts on a 20 mm grid and keeps any size.
PRESETS = {
    "nodules": {"grid_spacing_mm": None, "blob_diameters_mm": (4.0, 8.0, 16.0, 30.0), "max_volume_ml": 20.0,
                "drop_cut": True, "label": "nodules"},
    "everything": {"grid_spacing_mm": 20.0, "label": "everything"},
}


def preset(name: str, **changes) -> dict:
    """The options of preset ``name`` updated with ``changes`` (a dict for :class:`AutoOptions`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    out = dict(PRESETS[name])
    out.update(changes)
    return out


@dataclass
class AutoOptions:
    #: Prompt grid: one point every this many mm along the region axes, inside the search area (None: no grid).
    grid_spacing_mm: Optional[float] = 20.0
    #: Blob prompts: Laplacian-of-Gaussian detectors tuned to these diameters (mm); empty: none.
    blob_diameters_mm: Tuple[float, ...] = ()
    #: Smallest blob response kept, in HU of contrast against the surroundings (see inference/candidates.py).
    blob_min_response: float = 150.0
    #: At most this many blob prompts per diameter (the strongest).
    blob_max_per_diameter: int = 300
    #: The body is the voxels above this (HU), largest component, holes filled; None: search the whole volume.
    body_threshold_hu: Optional[float] = -500.0
    #: Prompts per decoder call.
    points_per_batch: int = 32
    #: Mask threshold on the logits (0: sigmoid 0.5) and the stability score's offset (logits).
    threshold: float = 0.0
    stability_offset: float = 1.0
    #: Keep instances whose stability score is at least this.
    min_stability: float = 0.8
    #: Keep instances whose predicted IoU is at least this (None: no filter; needs a backend that predicts it).
    min_predicted_iou: Optional[float] = None
    rank_by: str = "stability"
    #: Volume filter on the input grid (ml = cm^3); None: no upper limit.
    min_volume_ml: float = 0.0
    max_volume_ml: Optional[float] = None
    #: Non-maximum suppression: a mask whose IoU with a better kept one exceeds this is dropped.
    nms_iou: float = 0.5
    #: Neighbouring regions overlap by this much (mm; None: a quarter of the region, 48 mm for SAM-Med3D's 192 mm);
    #: every prompt lies at least about half of it inside its region, so objects up to about this diameter are
    #: seen whole.
    region_overlap_mm: Optional[float] = None
    #: Drop instances the region cut (they touch a region face where the volume continues: the region saw only part
    #: of a larger object).
    drop_cut: bool = False
    #: Skip a prompt that lies in a mask already accepted in its region, or in the low-res cells of one rejected
    #: as too large (the same object again: no new decode). Blob prompts are decoded before grid points.
    skip_covered: bool = True
    #: Keep at most this many instances (best first); None: all.
    max_instances: Optional[int] = None
    #: The model's region (as SessionOptions): size (voxels), spacing (mm), HU clamp before normalising.
    region_size: int = 128
    spacing_mm: float = 1.5
    clamp_hu: Optional[Tuple[float, float]] = None
    #: A name for these settings, recorded in reports (free text).
    label: str = field(default="")

    def __post_init__(self) -> None:
        p = []
        if self.grid_spacing_mm is not None and not float(self.grid_spacing_mm) > 0:
            p.append(f"grid_spacing_mm must be > 0 mm (or None for no grid), got {self.grid_spacing_mm}")
        self.blob_diameters_mm = tuple(float(d) for d in (self.blob_diameters_mm or ()))
        if any(not d > 0 for d in self.blob_diameters_mm):
            p.append(f"blob_diameters_mm must be positive mm, got {list(self.blob_diameters_mm)}")
        if self.grid_spacing_mm is None and not self.blob_diameters_mm:
            p.append("no prompts: give grid_spacing_mm, blob_diameters_mm or both")
        if int(self.points_per_batch) < 1:
            p.append(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if not float(self.stability_offset) > 0:
            p.append(f"stability_offset must be > 0 logits, got {self.stability_offset}")
        if not 0.0 <= float(self.min_stability) <= 1.0:
            p.append(f"min_stability must be in [0, 1], got {self.min_stability}")
        if self.min_predicted_iou is not None and not 0.0 <= float(self.min_predicted_iou) <= 1.0:
            p.append(f"min_predicted_iou must be in [0, 1] or None, got {self.min_predicted_iou}")
        if self.rank_by not in RANK_BY:
            p.append(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if float(self.min_volume_ml) < 0:
            p.append(f"min_volume_ml must be >= 0, got {self.min_volume_ml}")
        if self.max_volume_ml is not None and not float(self.max_volume_ml) > float(self.min_volume_ml):
            p.append(f"max_volume_ml must exceed min_volume_ml ({self.min_volume_ml}), got {self.max_volume_ml}")
        if not 0.0 <= float(self.nms_iou) <= 1.0:
            p.append(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        region_mm = int(self.region_size) * float(self.spacing_mm)
        if self.region_overlap_mm is None:
            self.region_overlap_mm = 0.25 * region_mm
        if not 0.0 <= float(self.region_overlap_mm) < region_mm:
            p.append(f"region_overlap_mm must be in [0, {region_mm:g}) (the region is {region_mm:g} mm), got "
                     f"{self.region_overlap_mm}")
        if self.max_instances is not None and int(self.max_instances) < 1:
            p.append(f"max_instances must be >= 1 or None, got {self.max_instances}")
        if self.clamp_hu is not None:
            lo, hi = (float(v) for v in self.clamp_hu)
            if not lo < hi:
                p.append(f"clamp_hu must be (low, high) with low < high, got {self.clamp_hu}")
        for name in ("threshold", "blob_min_response"):
            if not np.isfinite(float(getattr(self, name))):
                p.append(f"{name} must be a finite number")
        if p:
            raise ValueError("invalid AutoOptions: " + "; ".join(p))
        self.region_size = int(self.region_size)
        self.spacing_mm = float(self.spacing_mm)
        self.points_per_batch = int(self.points_per_batch)

    @property
    def uses_predicted_iou(self) -> bool:
        return self.min_predicted_iou is not None or self.rank_by != "stability"

    @classmethod
    def for_session(cls, session_options, **changes) -> "AutoOptions":
        """Options whose region (size, spacing, HU clamp) is the interactive session's, so that both share the
        embedding cache's keys; ``changes`` set the rest."""
        base = dict(region_size=session_options.region_size, spacing_mm=session_options.spacing_mm,
                    clamp_hu=session_options.clamp_hu)
        base.update(changes)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blob_diameters_mm"] = list(self.blob_diameters_mm)
        d["clamp_hu"] = None if self.clamp_hu is None else [float(v) for v in self.clamp_hu]
        return d
