"""Options of an interactive :class:`~SAM3DSegmentLib.inference.session.Session` (validated on creation)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import numpy as np

from ..core.click_protocols import CLICK_PROTOCOLS, click_protocol
from .guided import UPSAMPLING_MODES

__all__ = ["SessionOptions", "PROMPT_MODES", "INIT_PROMPTS", "DEFAULT_SPACING_MM", "model_options", "model_spacing",
           "refuse_exclude", "refuse_mask_prompt"]

#: Region voxel size when neither the options nor the backend give one (SAM-Med3D's).
DEFAULT_SPACING_MM = 1.5

#: The click protocols (:mod:`SAM3DSegmentLib.core.click_protocols`): ``"newest-click"``: each decode sees
#: only the newest click (+ the region's previous logits), as the model was trained and published tables were
#: evaluated; ``"all-clicks"``: every point of the object inside the region so far (+ the previous logits), as
#: the reference's inference code feeds them. The older spellings ``"newest"`` / ``"all"`` are accepted.
PROMPT_MODES = tuple(CLICK_PROTOCOLS)
#: How an initial mask (``Session.set_initial_mask``) prompts the model: :mod:`~SAM3DSegmentLib.inference.prior`.
INIT_PROMPTS = ("binary", "occupancy", "distance", "zeros")


@dataclass
class SessionOptions:
    """``prompt_mode``: one of :data:`PROMPT_MODES` (an older spelling is stored under its new name; a model
    without previous-mask input, such as the 3DSAM-adapter, always gets ``"all-clicks"``). ``region_size``,
    ``spacing_mm``: side (voxels) and voxel size (mm) of the model-input regions; ``spacing_mm`` None: the
    model's own (``backend.spacing_mm``: 1.0 mm for the 3DSAM-adapter; 1.5 mm, SAM-Med3D's, when the backend
    does not say). ``extend``: add neighbouring regions while the object's mask touches a region face
    (:mod:`~SAM3DSegmentLib.inference.growth`), up to ``max_regions`` per object. ``clamp_hu``: (low, high) clip
    of the original voxels before normalising (None: no clip; for a model with its own HU window,
    ``backend.intensity``, it replaces that window). ``cache_size``: embeddings kept
    (:class:`~SAM3DSegmentLib.inference.cache.EmbeddingCache`), and at most ``cache_mb`` MiB of them (at least
    one is always kept; a 3DSAM-adapter region's features take 264 MB).
    ``threshold``: the logit above which a voxel is in the mask (0: sigmoid > 0.5)."""

    prompt_mode: str = "newest-click"
    region_size: int = 128
    spacing_mm: Optional[float] = None
    extend: bool = True
    max_regions: int = 8
    clamp_hu: Optional[Tuple[float, float]] = None
    cache_size: int = 8
    cache_mb: float = 1024.0
    threshold: float = 0.0
    #: Leak guard of the extension: a face whose in-volume part is positive over more than this fraction
    #: is not treated as an object's cross-section (the mask fills the region: a leak), so no neighbour is
    #: added across it. 1.0 disables the guard.
    extend_max_face_fill: float = 0.75
    #: Undo entries kept per object (oldest dropped first) ...
    history_limit: int = 100
    #: ... and the most memory their mask patches may take per object, in MiB (at least one entry is kept).
    history_mb: float = 512.0
    #: Honour the clicks: the voxel under each include click is always in the mask, the voxel under each
    #: exclude click never (the later click wins where two share a voxel), even where the model disagrees.
    #: Cleanup that implies: the parts of the mask that forcing an exclude voxel off cuts off from every
    #: include click are dropped, and so is a model island (a part touching no include click) that an
    #: exclude click lies on: the user said "not this". Parts no exclude click touches stay as the model
    #: predicted them, islands included (they may be real parts of the object). Components are
    #: 6-connected (face neighbours), on the volume grid. False is the reference mode: the mask is the
    #: merged, thresholded model output and nothing else, as the reference pipeline produces it.
    honour_clicks: bool = True
    #: How the low-res logits reach the original voxels (:mod:`~SAM3DSegmentLib.inference.guided`):
    #: ``"trilinear"`` (the reference's way, the default) or ``"guided"`` (refined near the boundary with the CT).
    upsampling: str = "trilinear"
    #: An initial mask's previous-mask prompt (:data:`INIT_PROMPTS`, :mod:`~SAM3DSegmentLib.inference.prior`):
    #: the encoding, its logit magnitude and (``"distance"``) the signed distance in mm that reaches it.
    init_prompt: str = "binary"
    init_logit: float = 8.0
    init_width_mm: float = 6.0
    #: Region extension (``extend``) for objects started from an initial mask. Off by default: the mask already
    #: holds the object beyond the clicked region, and re-predicting the neighbouring regions lowered the Dice
    #: of refined masks (docs/refine.md).
    init_extend: bool = False

    def __post_init__(self) -> None:
        problems = []
        try:
            self.prompt_mode = click_protocol(self.prompt_mode, "prompt_mode")
        except ValueError as err:
            problems.append(str(err))
        if int(self.region_size) < 8 or int(self.region_size) % 4:
            problems.append(f"region_size must be a multiple of 4 and >= 8, got {self.region_size}")
        if self.spacing_mm is not None and not (float(self.spacing_mm) > 0 and np.isfinite(float(self.spacing_mm))):
            problems.append(f"spacing_mm must be a positive number of millimetres, got {self.spacing_mm}")
        if int(self.max_regions) < 1:
            problems.append(f"max_regions must be >= 1, got {self.max_regions}")
        if not 0.0 < float(self.extend_max_face_fill) <= 1.0:
            problems.append(f"extend_max_face_fill must be in (0, 1], got {self.extend_max_face_fill}")
        if int(self.history_limit) < 1 or not float(self.history_mb) > 0:
            problems.append("history_limit must be >= 1 and history_mb > 0")
        if self.upsampling not in UPSAMPLING_MODES:
            problems.append(f"upsampling must be one of {UPSAMPLING_MODES}, got {self.upsampling!r}")
        if int(self.cache_size) < 1:
            problems.append(f"cache_size must be >= 1, got {self.cache_size}")
        if not float(self.cache_mb) > 0:
            problems.append(f"cache_mb must be > 0, got {self.cache_mb}")
        if self.init_prompt not in INIT_PROMPTS:
            problems.append(f"init_prompt must be one of {INIT_PROMPTS}, got {self.init_prompt!r}")
        if not (float(self.init_logit) > 0 and float(self.init_width_mm) > 0):
            problems.append("init_logit and init_width_mm must be > 0")
        if self.clamp_hu is not None:
            lo, hi = (float(v) for v in self.clamp_hu)
            if not lo < hi:
                problems.append(f"clamp_hu must be (low, high) with low < high, got {self.clamp_hu}")
        if problems:
            raise ValueError("invalid SessionOptions: " + "; ".join(problems))
        self.region_size = int(self.region_size)
        self.spacing_mm = None if self.spacing_mm is None else float(self.spacing_mm)
        self.cache_mb = float(self.cache_mb)
        self.max_regions = int(self.max_regions)
        self.cache_size = int(self.cache_size)
        self.honour_clicks = bool(self.honour_clicks)
        self.init_extend = bool(self.init_extend)


def model_spacing(backend, spacing_mm: Optional[float] = None) -> float:
    """``spacing_mm``, or when None the model's own (``backend.spacing_mm``, else :data:`DEFAULT_SPACING_MM`)."""
    if spacing_mm is not None:
        return float(spacing_mm)
    return float(getattr(backend, "spacing_mm", None) or DEFAULT_SPACING_MM)


def model_options(backend, options: SessionOptions) -> SessionOptions:
    """``options`` resolved for ``backend``: ``spacing_mm`` None becomes the model's own (``backend.spacing_mm``,
    else :data:`DEFAULT_SPACING_MM`); a model without previous-mask input (``backend.supports_mask_prompt``
    False) gets ``prompt_mode="all-clicks"`` (the newest click alone would forget the earlier ones)."""
    spacing = model_spacing(backend, options.spacing_mm)
    mode = options.prompt_mode if getattr(backend, "supports_mask_prompt", True) else "all-clicks"
    if spacing == options.spacing_mm and mode == options.prompt_mode:
        return options
    return replace(options, spacing_mm=spacing, prompt_mode=mode)


def refuse_exclude(backend, clicks: Sequence) -> None:
    """ValueError (nothing changes) when ``clicks`` hold an exclude click and the model has none
    (``backend.supports_exclude`` False)."""
    if getattr(backend, "supports_exclude", True) or all(c.positive for c in clicks):
        return
    n = sum(1 for c in clicks if not c.positive)
    raise ValueError(f"{n} exclude click(s) refused: the model {getattr(backend, 'name', '')!s} has no exclude "
                     "clicks (its points carry no include/exclude label); use include clicks only, or a SAM-Med3D "
                     "model for exclude clicks")


def refuse_mask_prompt(backend) -> None:
    """ValueError (nothing changes) when the model has no previous-mask input (``backend.supports_mask_prompt``
    False): it cannot refine an existing mask (``Session.set_initial_mask``)."""
    if getattr(backend, "supports_mask_prompt", True):
        return
    raise ValueError(f"the model {getattr(backend, 'name', '')!s} has no previous-mask input, so it cannot refine an "
                     "existing mask (no previous-mask refinement in this model family); segment with include clicks "
                     "from scratch, or load a SAM-Med3D model to refine the mask")
