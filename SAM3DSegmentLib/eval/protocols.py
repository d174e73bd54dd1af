"""The engine, legacy and reference evaluation protocols (see docs/evaluation.md), each scoring every target of
one case (the 3DSAM-adapter's own protocol, ``3dsam``, is in :mod:`.points_protocol`).

``engine`` (the honest number)
    The interactive engine end to end: :class:`~SAM3DSegmentLib.inference.session.Session` on the FULL volume
    (click-centred regions, region extension, paste-back onto the original grid), N clicks from the
    deterministic RITM-style simulator :func:`~SAM3DSegmentLib.eval.clicker.next_click`, Dice and NSD on the
    full volume after EACH of clicks 1..N; ``--prompt-mode`` chooses its click protocol. A model without
    exclude clicks (the 3DSAM-adapter) gets include clicks only: the simulator then corrects the missed parts
    (false negatives) alone.

``legacy`` (comparable with SAM-Med3D's published tables)
    :data:`LEGACY_LABEL`: the model alone on a 128^3 crop at 1.5 mm centred on the ground-truth bounding
    box, Dice inside the crop, first click at the deepest point, later clicks drawn at random from the
    error region, the ``newest-click`` protocol, and the per-case score is the BEST Dice over the click
    steps.

``reference`` (SAM-Med3D's inference code)
    :data:`REFERENCE_LABEL`: ``validate_paired_img_gt`` reproduced step by step
    (:mod:`SAM3DSegmentLib.eval.reference_mode`): torchio 0.20 resampling, GT-centred crop, random clicks
    from numpy's state seeded per case, the ``all-clicks`` protocol, paste-back onto the original grid,
    Dice on the full volume after each click.

Click protocols (:data:`CLICK_PROTOCOLS`, :mod:`SAM3DSegmentLib.core.click_protocols`): which clicks the
decoder sees at each step. ``newest-click``: only the newest click with the previous low-res logits
(SAM-Med3D's training and its published evaluation). ``all-clicks``: every click so far with the previous
low-res logits (its inference code, ``validate_paired_img_gt``).

Each returns one row per (target, click) (:data:`Row`, the columns of ``per_case.csv``).

Axis conventions: volume arrays are ``[k, j, i]``; engine clicks are voxel ``(i, j, k)``; the legacy and
reference crops are indexed ``[a, b, c]`` in the region's own (RAS-canonical) axis order and their clicks
are ``(a, b, c)`` (the order the network takes).
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..core.click_protocols import ALL_CLICKS, CLICK_PROTOCOLS, NEWEST_CLICK, click_protocol
from ..core.geometry import Volume
from .cases import Case, EvaluationError, LabelTargets
from .clicker import next_click, next_click_index, random_error_click
from .metrics import score
from ..core.interp import resize

__all__ = ["LEGACY_LABEL", "ENGINE_LABEL", "REFERENCE_LABEL", "POINTS_LABEL", "PROTOCOLS", "DEFAULT_PROTOCOLS",
           "FAMILY_PROTOCOLS", "CLICK_PROTOCOLS", "PROTOCOL_LABELS", "click_protocol_of", "EvalConfig", "Row",
           "evaluate_engine", "evaluate_legacy", "evaluate_reference", "upsample_logits"]

LEGACY_LABEL = ("legacy: GT-centred 128³ crop, Dice inside the crop, first click deepest point, later "
                "clicks random in the error region, newest-click protocol, best Dice over click steps")
REFERENCE_LABEL = ("reference: SAM-Med3D's validate_paired_img_gt (torchio 0.20 resampling, GT-centred 128³ "
                   "crop, random clicks seeded per case, all-clicks protocol, paste-back), full-volume "
                   "Dice/NSD after each click")
ENGINE_LABEL = ("engine: interactive engine end to end on the full volume (click-centred regions, "
                "extension, paste-back), deterministic deepest-point clicks in the larger error region, "
                "full-volume Dice/NSD after exactly N clicks")
POINTS_LABEL = ("3dsam: the 3DSAM-adapter's protocol: N points uniform in the ground truth at 1 mm, 128³ crop "
                "at 1 mm centred on their bounding box, one pass with the first n points for n = 1..N, Dice and "
                "NSD (5 mm) inside the crop")
#: Every protocol ``--protocol`` names; ``3dsam`` is in :mod:`.points_protocol` (the 3DSAM-adapter's own).
PROTOCOLS = ("engine", "legacy", "reference", "3dsam")
#: What ``--protocol both`` (the default) runs for a SAM-Med3D model.
DEFAULT_PROTOCOLS = ("engine", "legacy")
#: The protocols besides ``engine`` that apply to each model family: ``both`` runs engine + the first,
#: ``all`` engine + all of them.
FAMILY_PROTOCOLS = {"sam_med3d": ("legacy", "reference"), "3dsam_adapter": ("3dsam",)}
PROTOCOL_LABELS = {"engine": ENGINE_LABEL, "legacy": LEGACY_LABEL, "reference": REFERENCE_LABEL,
                   "3dsam": POINTS_LABEL}


@dataclass
class EvalConfig:
    """Options of one evaluation (the ``sam3d evaluate`` flags); ``model``/``data`` describe the run for the
    summary JSON."""

    clicks: int = 5
    protocols: Tuple[str, ...] = DEFAULT_PROTOCOLS
    prompt_mode: str = NEWEST_CLICK  # the engine's click protocol (CLICK_PROTOCOLS; older spellings accepted)
    spacing_mm: Optional[float] = None   # None: the model's own (1.5 mm for SAM-Med3D)
    clamp_hu: Optional[Tuple[float, float]] = None
    extend: bool = True
    max_regions: int = 8
    honour_clicks: bool = True
    nsd_tolerance_mm: float = 2.0
    seed: int = 0
    reference_seed: int = 233  # validate_paired_img_gt's default seed
    #: the engine protocol's SessionOptions.upsampling; legacy and reference always interpolate trilinearly
    upsampling: str = "trilinear"
    model: Dict[str, Any] = field(default_factory=dict)   # name, checkpoint, sha256, device ... for the JSON
    data: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.clicks) < 1:
            raise EvaluationError(f"--clicks must be >= 1, got {self.clicks}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise EvaluationError(f"unknown protocol(s) {bad}; choose from {PROTOCOLS}")
        try:
            self.prompt_mode = click_protocol(self.prompt_mode, "--prompt-mode")
        except ValueError as err:
            raise EvaluationError(str(err)) from None
        if not self.nsd_tolerance_mm >= 0:
            raise EvaluationError("--nsd-tolerance must be >= 0 mm")
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise EvaluationError("--spacing-mm must be > 0")
        if self.upsampling not in ("trilinear", "guided"):
            raise EvaluationError(f"--upsampling must be trilinear or guided, got {self.upsampling!r}")


Row = Dict[str, Any]
Log = Callable[[str], None]


def click_protocol_of(protocol: str, config: EvalConfig) -> str:
    """The click protocol an evaluation protocol runs: legacy ``newest-click``, reference and 3dsam ``all-clicks``, the
    engine ``config.prompt_mode``."""
    return {"legacy": NEWEST_CLICK, "reference": ALL_CLICKS, "3dsam": ALL_CLICKS}.get(protocol, config.prompt_mode)


def _row(protocol: str, case: str, target: str, click: int, positive: Optional[bool], index, s,
         seconds: float, encodes: int, regions: int) -> Row:
    return {"protocol": protocol, "case": case, "target": target, "click": int(click),
            "positive": "" if positive is None else int(bool(positive)),
            "index": "" if index is None else " ".join(str(int(v)) for v in index),
            "dice": float(s.dice), "nsd": float(s.nsd), "hd95": float(s.hd95), "seconds": float(seconds),
            "encodes": int(encodes), "regions": int(regions)}


# ------------------------------------------------------------------------------ engine protocol
def evaluate_engine(backend, case: Case, config: EvalConfig, log: Log = lambda m: None) -> List[Row]:
    """Engine protocol for every target of ``case``: one Session (so the embedding cache is shared
    between the targets of a case), one object per target, ``config.clicks`` simulated clicks each."""
    from ..inference.session import Session, SessionOptions

    opts = SessionOptions(prompt_mode=config.prompt_mode, region_size=int(backend.image_size),
                          spacing_mm=config.spacing_mm, extend=bool(config.extend),
                          max_regions=int(config.max_regions), clamp_hu=config.clamp_hu,
                          honour_clicks=bool(config.honour_clicks), upsampling=config.upsampling)
    session = Session(backend, opts)
    exclude_ok = getattr(backend, "supports_exclude", True)
    session.set_volume(case.image)
    spacing_kji = np.asarray(case.image.spacing, dtype=np.float64)[::-1]
    rows: List[Row] = []
    for target, gt in case.targets.items():
        gt = np.asarray(gt, dtype=bool)
        if not gt.any():
            log(f"  {case.name} / {target}: empty ground truth, skipped")
            continue
        oid = session.new_object(name=target)
        pred = np.zeros_like(gt)
        clicked = []
        for n in range(1, config.clicks + 1):
            # a model without exclude clicks (3DSAM-adapter): the clicks correct the missed parts only
            click = next_click(gt, pred if exclude_ok else pred & gt, spacing_kji, avoid_ijk=clicked)   # never twice
            t0 = time.perf_counter()
            encodes = 0
            if click is not None:  # None: perfect (or every error voxel clicked): the score stays
                clicked.append(click.ijk)
                update = session.add_click(ijk=tuple(int(v) for v in click.ijk), positive=bool(click.positive))
                encodes = int(getattr(update, "encoded_regions", 0))
                pred = np.asarray(session.mask(oid)) != 0
            dt = time.perf_counter() - t0
            s = score(pred, gt, spacing_kji, config.nsd_tolerance_mm)
            rows.append(_row("engine", case.name, target, n, None if click is None else click.positive,
                             None if click is None else click.ijk, s, dt, encodes, session.region_count(oid)))
        session.remove_object(oid)  # one full-volume mask per object: do not keep them all
        log(f"  engine  {case.name} / {target}: Dice " +
            " ".join(f"{r['dice']:.3f}" for r in rows[-config.clicks:]))
    return rows


# ------------------------------------------------------------------------------ legacy protocol
def upsample_logits(logits: np.ndarray, size: int) -> np.ndarray:
    """Trilinear upsampling of a cubic (s, s, s) array to (size,)*3 with ``align_corners=False``
    semantics, rounded as torch's CPU ``F.interpolate(mode="trilinear")`` rounds, numpy only:
    :func:`SAM3DSegmentLib.core.interp.resize`."""
    return resize(logits, size)


def _reference_grid(volume: Volume, spacing: float, interpolation: str,
                    clamp_hu: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """The reference's resampled, RAS-canonical array, indexed ``[a, b, c]`` (torchio ``Resample`` with
    its integer-truncation quirk, then ``ToCanonical``; optional clamp of the original voxels first)."""
    from .reference_pipeline import reference_canonical, reference_resample

    vol = volume
    if clamp_hu is not None:
        vol = volume.with_array(np.clip(volume.array, clamp_hu[0], clamp_hu[1]).astype(volume.array.dtype))
    canon = reference_canonical(reference_resample(vol, spacing, interpolation, keep_integer_type=True))
    return canon.array.transpose(2, 1, 0)


def _stable_seed(*parts: Any) -> int:
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8")) & 0x7FFFFFFF


def evaluate_legacy(backend, case: Case, config: EvalConfig, log: Log = lambda m: None) -> List[Row]:
    """Legacy protocol (:data:`LEGACY_LABEL`) for every target of ``case``, with the reference's own
    pre-processing (:mod:`SAM3DSegmentLib.eval.reference_pipeline`): image and label resampled to
    ``config.spacing_mm`` (linear / nearest) and reoriented RAS-canonical, a ``backend.image_size``^3
    crop (zero padding) centred the way torchio ``CropOrPad(mask_name=label)`` centres it, the image
    z-normalised over the crop's voxels > 0. Dice/NSD/HD95 are computed inside the crop."""
    from ..inference.regions import normalize_like_reference
    from .reference_pipeline import reference_crop_or_pad, torchio_crop_begin

    if not getattr(backend, "supports_mask_prompt", True):
        raise EvaluationError("--protocol legacy is SAM-Med3D's crop protocol (previous low-res logits, exclude "
                              "clicks); this model has neither: use --protocol engine or 3dsam")
    size = int(backend.image_size)
    sp = float(config.spacing_mm or 1.5)
    spacing = (sp, sp, sp)
    rows: List[Row] = []
    image_abc: Optional[np.ndarray] = None
    for target, gt in case.targets.items():
        gt = np.asarray(gt, dtype=bool)
        if not gt.any():
            log(f"  {case.name} / {target}: empty ground truth, skipped")
            continue
        label_abc = _reference_grid(case.image.with_array(gt.astype(np.uint8)), sp, "nearest")
        if not label_abc.any():
            log(f"  legacy  {case.name} / {target}: the object vanishes when resampled to {sp} mm; skipped")
            continue
        if image_abc is None:  # once per case
            image_abc = _reference_grid(case.image, sp, "linear", config.clamp_hu)
        begin = torchio_crop_begin(label_abc.shape, size, label_abc)  # torchio's rule, odd sizes too
        crop_gt = reference_crop_or_pad(label_abc, size=size, begin=begin)[0] != 0
        # the reference's z-normalisation (reference_znorm), without its failure on a crop with no spread
        image = normalize_like_reference(reference_crop_or_pad(image_abc, size=size, begin=begin)[0])
        rng = np.random.default_rng(_stable_seed(config.seed, case.name, target))
        t0 = time.perf_counter()
        embedding = backend.encode(image)
        encode_s = time.perf_counter() - t0
        prev: Optional[np.ndarray] = None
        pred = np.zeros_like(crop_gt)
        for n in range(1, config.clicks + 1):
            click = next_click_index(crop_gt, pred, spacing) if n == 1 else random_error_click(crop_gt, pred, rng)
            t0 = time.perf_counter()
            if click is not None:
                pts = np.asarray([click.ijk], dtype=np.float32)  # (a, b, c) crop index = network order
                labels = np.asarray([1 if click.positive else 0], dtype=np.int64)
                prev = np.asarray(backend.decode(embedding, pts, labels, prev), dtype=np.float32)
                pred = upsample_logits(prev, size) > 0.0  # sigmoid > 0.5
            dt = time.perf_counter() - t0 + (encode_s if n == 1 else 0.0)
            s = score(pred, crop_gt, spacing, config.nsd_tolerance_mm)
            rows.append(_row("legacy", case.name, target, n, None if click is None else click.positive,
                             None if click is None else click.ijk, s, dt, int(n == 1), 1))
        recent = rows[-config.clicks:]
        log(f"  legacy  {case.name} / {target}: crop Dice " + " ".join(f"{r['dice']:.3f}" for r in recent)
            + f" (best {max(r['dice'] for r in recent):.3f})")
    return rows


# --------------------------------------------------------------------------- reference protocol
def _target_order(case: Case) -> List[str]:
    """Targets in ascending label value where known (the order validate_paired_img_gt runs them)."""
    names = list(case.targets)
    if isinstance(case.targets, LabelTargets):
        return sorted(names, key=case.targets.label_value)
    return names


def evaluate_reference(backend, case: Case, config: EvalConfig, log: Log = lambda m: None) -> List[Row]:
    """Reference protocol (:data:`REFERENCE_LABEL`) for every target of ``case``: SAM-Med3D's
    ``validate_paired_img_gt`` (:mod:`SAM3DSegmentLib.eval.reference_mode`) with ``config.clicks`` clicks,
    one numpy random state per case seeded with ``config.reference_seed``, targets in ascending label
    value. Each click's ROI mask is pasted back onto the original grid and scored there. The mask after
    the last click is what the reference computes for ``num_clicks = config.clicks`` before merging the
    targets into one label map (the same clicks and masks as long as every label of the case is
    evaluated: the targets share the random stream)."""
    from .reference_mode import reference_interact, reference_preprocess
    from .reference_pipeline import reference_grid

    size = int(backend.image_size)
    sp = float(config.spacing_mm or 1.5)
    spacing_kji = np.asarray(case.image.spacing, dtype=np.float64)[::-1]
    image = case.image
    if config.clamp_hu is not None:
        image = image.with_array(np.clip(image.array, config.clamp_hu[0], config.clamp_hu[1])
                                 .astype(image.array.dtype))
    image_abc = reference_grid(image, sp, "linear")  # once per case
    rng = np.random.RandomState(int(config.reference_seed))
    rows: List[Row] = []
    for target in _target_order(case):
        gt = np.asarray(case.targets[target], dtype=bool)
        if not gt.any():
            log(f"  {case.name} / {target}: empty ground truth, skipped")
            continue
        try:
            roi = reference_preprocess(image, gt, size, sp, image_abc=image_abc)
        except RuntimeError as err:  # no intensity spread in the crop: the reference stops here
            log(f"  reference {case.name} / {target}: {err}; skipped")
            continue
        obj = reference_interact(backend, roi, config.clicks, rng)
        if not obj.logits:
            log(f"  reference {case.name} / {target}: the object vanishes when resampled to {sp} mm "
                "(empty prediction, as the reference gives)")
        for n in range(1, config.clicks + 1):
            clicked = n <= len(obj.logits)
            pred = obj.mask(case.image, n - 1) != 0 if clicked else np.zeros_like(gt)
            s = score(pred, gt, spacing_kji, config.nsd_tolerance_mm)
            rows.append(_row("reference", case.name, target, n, obj.positive[n - 1] if clicked else None,
                             obj.points[n - 1] if clicked else None, s,
                             obj.seconds[n - 1] if clicked else 0.0, int(n == 1 and clicked), 1))
        log(f"  reference {case.name} / {target}: Dice " +
            " ".join(f"{r['dice']:.3f}" for r in rows[-config.clicks:]))
    return rows
