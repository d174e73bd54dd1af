"""Accuracy of a checkpoint / of the interactive engine under simulated clicks (the library behind
``sam3d evaluate``, whose command line is :mod:`SAM3DSegmentLib.cli.evaluate`).

Two protocols (see docs/evaluation.md):

``engine`` (the honest number)
    The interactive engine end to end: :class:`~SAM3DSegmentLib.inference.session.Session` on the FULL volume
    (click-centred regions, region extension, paste-back onto the original grid), N clicks from the
    deterministic RITM-style simulator :func:`~SAM3DSegmentLib.eval.clicker.next_click`, Dice and NSD on the
    full volume after EACH of clicks 1..N.

``legacy`` (comparable with SAM-Med3D's published tables)
    :data:`LEGACY_LABEL`: the model alone on a 128^3 crop at 1.5 mm centred on the ground-truth bounding
    box, Dice inside the crop, first click at the deepest point, later clicks drawn at random from the
    error region, only the newest click fed with the previous low-res logits, and the per-case score is
    the BEST Dice over the click steps.

Outputs in ``--out`` (each written atomically; re-written after every case so an interrupted run keeps
what it finished): ``per_case.csv``, ``summary.json``, ``dice_vs_clicks.png``.

Axis conventions: volume arrays are ``[k, j, i]``; engine clicks are voxel ``(i, j, k)``; the legacy crop
is indexed ``[a, b, c]`` in the region's own (RAS-canonical) axis order and its clicks are ``(a, b, c)``
(the order the network takes).
"""
from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import sys
import time
import zlib
from collections import abc as _abc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .clicker import next_click, next_click_index, random_error_click
from ..core.geometry import Volume
from ..core.interp import resize
from .metrics import score

__all__ = ["LEGACY_LABEL", "ENGINE_LABEL", "EvalConfig", "Case", "CaseRef", "EvaluationError",
           "discover_dataset", "load_case", "sample_cases", "evaluate_engine", "evaluate_legacy",
           "run_evaluation", "summarize", "plot_dice_vs_clicks"]

LEGACY_LABEL = ("legacy: GT-centred 128³ crop, Dice inside the crop, first click deepest point, later "
                "clicks random in the error region, best Dice over click steps")
ENGINE_LABEL = ("engine: interactive engine end to end on the full volume (click-centred regions, "
                "extension, paste-back), deterministic deepest-point clicks in the larger error region, "
                "full-volume Dice/NSD after exactly N clicks")

CSV_NAME = "per_case.csv"
JSON_NAME = "summary.json"
PNG_NAME = "dice_vs_clicks.png"
CSV_FIELDS = ["protocol", "case", "target", "click", "positive", "index", "dice", "nsd", "hd95", "seconds",
              "encodes", "regions"]
PROTOCOLS = ("engine", "legacy")


class EvaluationError(ValueError):
    """Bad evaluation input (data layout, labels, options), with a message saying how to fix it."""


# ------------------------------------------------------------------------------------------ data
@dataclass
class Case:
    """One image and its targets: ``{target name: bool mask [k, j, i] on the image grid}`` (any mapping;
    :func:`load_case` gives a lazy one so a 100-label case does not hold 100 masks)."""

    name: str
    image: Volume
    targets: Mapping[str, np.ndarray]


class LabelTargets(_abc.Mapping):
    """``{name: label_map == value}``, computed on access (read-only mapping)."""

    def __init__(self, label_map: np.ndarray, values: Dict[str, int]):
        self._labels = label_map
        self._values = dict(values)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._labels == self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class CaseRef:
    """Files of one case of an on-disk dataset (loaded lazily by :func:`load_case`)."""

    name: str
    image_path: str
    label_path: str


def _read_dataset_json(root: str) -> Optional[dict]:
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"{path} is not valid JSON ({err}); fix or remove it") from err


def label_names(dataset_json: Optional[dict]) -> Optional[Dict[int, str]]:
    """``{label value: name}`` (background dropped) from an nnU-Net v2 (``name: value``) or v1/MSD
    (``"value": name``) ``dataset.json``; None without one."""
    if not dataset_json or "labels" not in dataset_json:
        return None
    labels = dataset_json["labels"]
    out: Dict[int, str] = {}
    if not isinstance(labels, dict):
        raise EvaluationError("dataset.json 'labels' must be a mapping of names to values (nnU-Net v2) or "
                              "of values to names (v1/MSD)")
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise EvaluationError(
                f"dataset.json label {key!r} is region-based ({value}); region-based nnU-Net labels are "
                "not supported: list each label value separately")
        if str(key).strip().lstrip("-").isdigit() and not str(value).strip().lstrip("-").isdigit():
            v, name = int(key), str(value)  # v1 / MSD: {"0": "background", "1": "liver"}
        else:
            try:
                v, name = int(value), str(key)  # v2: {"background": 0, "liver": 1}
            except (TypeError, ValueError):
                raise EvaluationError(f"dataset.json label {key!r}: {value!r} is not an integer label value") \
                    from None
        if v != 0:
            out[v] = name
    return out


_IMAGE_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")


def _strip_ext(name: str) -> Tuple[str, str]:
    for ext in _IMAGE_EXTS:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return name, ""


def discover_dataset(root: str, split: str = "Tr") -> Tuple[List[CaseRef], Optional[Dict[int, str]]]:
    """Pair ``images<split>/`` with ``labels<split>/`` of an nnU-Net raw dataset (or of a reference-style
    folder with binary labels and equal file names).

    For label ``X<ext>`` the image is ``X_0000<ext>`` (nnU-Net; channel 0 is used) or ``X<ext>``.
    Returns ``(cases sorted by name, {label value: name} from dataset.json or None)``.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise EvaluationError(f"--data {root}: no such folder; give an nnU-Net raw dataset folder "
                              f"(with images{split}/ and labels{split}/)")
    img_dir = os.path.join(root, f"images{split}")
    lab_dir = os.path.join(root, f"labels{split}")
    for d in (img_dir, lab_dir):
        if not os.path.isdir(d):
            raise EvaluationError(f"{root} has no {os.path.basename(d)}/ folder; expected the nnU-Net raw "
                                  f"layout images{split}/ + labels{split}/ (+ dataset.json)")
    meta = _read_dataset_json(root)
    names = label_names(meta)
    ending = (meta or {}).get("file_ending")
    images = {f for f in os.listdir(img_dir) if not f.startswith(".")}
    cases: List[CaseRef] = []
    for fname in sorted(os.listdir(lab_dir)):
        if fname.startswith("."):
            continue
        stem, ext = _strip_ext(fname)
        if not ext or (ending and not fname.endswith(ending)):
            continue
        for cand in (f"{stem}_0000{ext}", f"{stem}{ext}"):
            if cand in images:
                cases.append(CaseRef(stem, os.path.join(img_dir, cand), os.path.join(lab_dir, fname)))
                break
        else:
            raise EvaluationError(f"label {os.path.join(lab_dir, fname)} has no image: expected "
                                  f"{os.path.join(img_dir, stem + '_0000' + ext)} (nnU-Net) or "
                                  f"{os.path.join(img_dir, fname)}")
    if not cases:
        raise EvaluationError(f"{lab_dir} holds no label files ({', '.join(_IMAGE_EXTS)}); nothing to evaluate")
    return cases, names


def _select(available: Sequence[str], values: Dict[str, int], wanted: Optional[Sequence[str]]) -> List[str]:
    if not wanted:
        return list(available)
    out = []
    for w in wanted:
        hit = [n for n in available if n == w or n.lower() == str(w).lower() or str(values.get(n)) == str(w)]
        if not hit:
            raise EvaluationError(f"--labels: no target {w!r}; available: {', '.join(available)} "
                                  "(names, or label values for --data)")
        out.extend(h for h in hit if h not in out)
    return out


def load_case(ref: CaseRef, names: Optional[Dict[int, str]], wanted: Optional[Sequence[str]] = None) -> Case:
    """Read one case; every label value present (or in ``names``) becomes a binary target."""
    from ..io import read_volume, resample_like

    image = read_volume(ref.image_path)
    label = read_volume(ref.label_path)
    if not label.same_grid(image, atol=1e-3):
        label = resample_like(label, image, "nearest")
    lab = np.asarray(label.array)
    if lab.dtype.kind == "f":
        if not np.all(np.isclose(lab, np.round(lab))):
            raise EvaluationError(f"{ref.label_path} holds non-integer values; a label map is needed")
        lab = np.round(lab).astype(np.int64)
    present = [int(v) for v in np.unique(lab) if v != 0]
    mapping = dict(names) if names else {v: f"label_{v}" for v in present}
    values = {n: v for v, n in mapping.items()}
    chosen = _select(list(mapping.values()), values, wanted)
    return Case(ref.name, image, LabelTargets(lab, {n: values[n] for n in chosen}))


def sample_cases(name: str = "chest") -> List[Case]:
    """The bundled sample data (``--sample chest``: slicerio's chest CT with its 7 segments)."""
    if name != "chest":
        raise EvaluationError(f"--sample {name!r}: the only sample is 'chest'")
    from ..data import sample_data

    image = sample_data.chest_ct()
    segs = sample_data.chest_segments(image)
    return [Case(str(image.meta.get("name", "CTChest4")), image,
                 {n: np.asarray(v.array) != 0 for n, v in segs.items()})]


def _filter_targets(case: Case, wanted: Optional[Sequence[str]]) -> Case:
    chosen = _select(list(case.targets), {}, wanted)
    return Case(case.name, case.image, {n: case.targets[n] for n in chosen})


# ------------------------------------------------------------------------------------- options
@dataclass
class EvalConfig:
    clicks: int = 5
    protocols: Tuple[str, ...] = PROTOCOLS
    prompt_mode: str = "newest"
    spacing_mm: float = 1.5
    clamp_hu: Optional[Tuple[float, float]] = None
    extend: bool = True
    max_regions: int = 8
    nsd_tolerance_mm: float = 2.0
    seed: int = 0
    model: Dict[str, Any] = field(default_factory=dict)   # name, checkpoint, sha256, device ... for the JSON
    data: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.clicks) < 1:
            raise EvaluationError(f"--clicks must be >= 1, got {self.clicks}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise EvaluationError(f"unknown protocol(s) {bad}; choose from {PROTOCOLS}")
        if self.prompt_mode not in ("newest", "all"):
            raise EvaluationError(f"--prompt-mode must be 'newest' or 'all', got {self.prompt_mode!r}")
        if not self.nsd_tolerance_mm >= 0:
            raise EvaluationError("--nsd-tolerance must be >= 0 mm")
        if not self.spacing_mm > 0:
            raise EvaluationError("--spacing must be > 0 mm")


Row = Dict[str, Any]
Log = Callable[[str], None]


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
                          spacing_mm=float(config.spacing_mm), extend=bool(config.extend),
                          max_regions=int(config.max_regions), clamp_hu=config.clamp_hu)
    session = Session(backend, opts)
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
            click = next_click(gt, pred, spacing_kji, avoid_ijk=clicked)   # never the same voxel twice
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
    semantics (torch's ``F.interpolate(mode="trilinear")``), numpy only: :func:`SAM3DSegmentLib.core.interp.resize`."""
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


def _normalise_crop(crop: np.ndarray) -> np.ndarray:
    from .reference_pipeline import reference_znorm
    from ..inference.regions import normalize_like_reference

    try:
        return reference_znorm(crop.astype(np.float32))
    except RuntimeError:  # zero spread over the voxels > 0: the reference fails; shift only
        return normalize_like_reference(crop)


def _stable_seed(*parts: Any) -> int:
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8")) & 0x7FFFFFFF


def evaluate_legacy(backend, case: Case, config: EvalConfig, log: Log = lambda m: None) -> List[Row]:
    """Legacy protocol (:data:`LEGACY_LABEL`) for every target of ``case``, with the reference's own
    pre-processing (:mod:`SAM3DSegmentLib.eval.reference_pipeline`): image and label resampled to
    ``config.spacing_mm`` (linear / nearest) and reoriented RAS-canonical, a ``backend.image_size``^3
    crop (zero padding) centred the way torchio ``CropOrPad(mask_name=label)`` centres it, the image
    z-normalised over the crop's voxels > 0. Dice/NSD/HD95 are computed inside the crop."""
    from .reference_pipeline import reference_crop_or_pad, torchio_mask_centre

    size = int(backend.image_size)
    sp = float(config.spacing_mm)
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
        centre = torchio_mask_centre(label_abc)
        crop_gt = reference_crop_or_pad(label_abc, centre, size)[0] != 0
        image = _normalise_crop(reference_crop_or_pad(image_abc, centre, size)[0])
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


# -------------------------------------------------------------------------------------- summary
def _stats(rows: List[Row]) -> Dict[str, Any]:
    d = [r["dice"] for r in rows]
    s = [r["nsd"] for r in rows]
    h = [r["hd95"] for r in rows]
    return {"n": len(rows),
            "dice_mean": float(np.mean(d)) if d else None, "dice_median": float(np.median(d)) if d else None,
            "nsd_mean": float(np.mean(s)) if s else None, "nsd_median": float(np.median(s)) if s else None,
            # HD95 is inf when the prediction is empty; the median stays meaningful, the mean would not.
            "hd95_median_mm": (float(np.median(h)) if h and math.isfinite(float(np.median(h))) else None)}


def summarize(rows: List[Row], config: EvalConfig, timing: Optional[dict] = None) -> Dict[str, Any]:
    """The summary JSON object (see docs/evaluation.md)."""
    from .. import __version__

    out: Dict[str, Any] = {
        "tool": "sam3d evaluate", "version": __version__,
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": config.model, "data": config.data,
        "clicks": int(config.clicks), "prompt_mode": config.prompt_mode,
        "model_grid_spacing_mm": float(config.spacing_mm), "clamp_hu": config.clamp_hu,
        "nsd_tolerance_mm": float(config.nsd_tolerance_mm), "legacy_seed": int(config.seed),
        "protocols": {}, "timing": timing or {},
    }
    for protocol in config.protocols:
        pr = [r for r in rows if r["protocol"] == protocol]
        pairs = list(dict.fromkeys((r["case"], r["target"]) for r in pr))
        targets = list(dict.fromkeys(t for _, t in pairs))
        entry: Dict[str, Any] = {
            "label": ENGINE_LABEL if protocol == "engine" else LEGACY_LABEL,
            "cases": len({c for c, _ in pairs}), "case_targets": len(pairs),
            "per_click": [{"click": n, **_stats([r for r in pr if r["click"] == n])}
                          for n in range(1, config.clicks + 1)],
            "per_target": {t: [{"click": n, **_stats([r for r in pr if r["target"] == t and r["click"] == n])}
                               for n in range(1, config.clicks + 1)] for t in targets},
        }
        if protocol == "legacy":
            best = {}
            for c, t in pairs:
                best[(c, t)] = max(r["dice"] for r in pr if r["case"] == c and r["target"] == t)
            vals = list(best.values())
            entry["best_dice_mean"] = float(np.mean(vals)) if vals else None
            entry["best_dice_median"] = float(np.median(vals)) if vals else None
            entry["best_dice_per_target"] = {t: float(np.mean([v for (c, tt), v in best.items() if tt == t]))
                                             for t in targets}
            entry["note"] = ("Dice inside the crop; 'best_dice_*' is the number comparable with SAM-Med3D's "
                             "published tables (docs/reference/SAM_MED3D.md section 7), per_click is the crop "
                             "Dice after exactly N clicks")
        out["protocols"][protocol] = entry
    return out


# ----------------------------------------------------------------------------------------- plot
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> Tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _dashed(draw, p0, p1, fill, width, dash=8, gap=6) -> None:
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    t = 0.0
    while t < length:
        t1 = min(t + dash, length)
        draw.line([(x0 + (x1 - x0) * t / length, y0 + (y1 - y0) * t / length),
                   (x0 + (x1 - x0) * t1 / length, y0 + (y1 - y0) * t1 / length)], fill=fill, width=width)
        t = t1 + gap


def plot_dice_vs_clicks(series: Dict[str, Sequence[float]], path: str, title: str,
                        emphasis: Sequence[str] = (), dashed: Sequence[str] = (),
                        y_label: str = "Dice", x_label: str = "clicks") -> str:
    """Draw Dice (0..1) against click number 1..N with Pillow only; one line per series.

    ``series``: ``{legend text: [value after click 1, 2, ...]}``; names in ``emphasis`` are drawn black
    and thick (the mean), names in ``dashed`` dashed. Written atomically to ``path`` (PNG).
    """
    from PIL import Image, ImageDraw

    from ..core.atomic import atomic_write

    W, H = 960, 560
    left, right, top, bottom = 80, 300, 56, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f_title, f_axis, f_tick, f_leg = _font(18), _font(15), _font(13), _font(13)
    x0, x1, y0, y1 = left, W - right, top, H - bottom  # plot box (y0 top)
    n = max((len(v) for v in series.values()), default=1)
    n = max(n, 1)

    def px(click: float) -> float:  # half a click of margin on both sides
        return x0 + (x1 - x0) * (click - 0.5) / n

    def py(value: float) -> float:
        return y1 - (y1 - y0) * min(max(value, 0.0), 1.0)

    # grid + ticks
    for k in range(11):
        v = k / 10
        y = py(v)
        d.line([(x0, y), (x1, y)], fill=(225, 225, 225) if k % 2 else (200, 200, 200), width=1)
        if k % 2 == 0:
            label = f"{v:.1f}"
            tw, th = _text_size(d, label, f_tick)
            d.line([(x0 - 5, y), (x0, y)], fill="black", width=1)
            d.text((x0 - 9 - tw, y - th / 2 - 2), label, fill="black", font=f_tick)
    step = max(1, int(math.ceil(n / 12)))
    for c in range(1, n + 1, step):
        x = px(c)
        d.line([(x, y0), (x, y1)], fill=(235, 235, 235), width=1)
        d.line([(x, y1), (x, y1 + 5)], fill="black", width=1)
        tw, th = _text_size(d, str(c), f_tick)
        d.text((x - tw / 2, y1 + 8), str(c), fill="black", font=f_tick)
    d.rectangle([x0, y0, x1, y1], outline="black", width=1)
    # axis labels and title
    tw, th = _text_size(d, x_label, f_axis)
    d.text(((x0 + x1) / 2 - tw / 2, y1 + 32), x_label, fill="black", font=f_axis)
    tw, th = _text_size(d, y_label, f_axis)
    lab = Image.new("RGBA", (tw + 6, th + 10), (255, 255, 255, 0))
    ImageDraw.Draw(lab).text((3, 0), y_label, fill="black", font=f_axis)
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (12, int((y0 + y1) / 2 - lab.size[1] / 2)), lab)
    tw, th = _text_size(d, title, f_title)
    d.text((max(8, (W - tw) / 2), 16), title, fill="black", font=f_title)
    # lines
    legend = []
    colour_i = 0
    for name, values in series.items():
        vals = [float(v) for v in values]
        if name in emphasis:
            colour, width = (0, 0, 0), 4
        elif name in dashed:
            colour, width = (110, 110, 110), 2
        else:
            colour, width = _PALETTE[colour_i % len(_PALETTE)], 2
            colour_i += 1
        pts = [(px(i + 1), py(v)) for i, v in enumerate(vals) if math.isfinite(v)]
        if name in dashed:
            for a, b in zip(pts[:-1], pts[1:]):
                _dashed(d, a, b, colour, width)
        elif len(pts) > 1:
            d.line(pts, fill=colour, width=width, joint="curve")
        r = 3 if width < 4 else 4
        for x, y in pts:
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        legend.append((name, colour, width, name in dashed))
    # legend
    lx, ly = x1 + 18, y0
    for name, colour, width, is_dashed in legend:
        text = name if len(name) <= 34 else name[:33] + "…"
        if is_dashed:
            _dashed(d, (lx, ly + 8), (lx + 28, ly + 8), colour, width, dash=6, gap=4)
        else:
            d.line([(lx, ly + 8), (lx + 28, ly + 8)], fill=colour, width=width)
        d.text((lx + 36, ly), text, fill="black", font=f_leg)
        ly += 20
        if ly > y1:
            break

    def write(tmp: str) -> None:
        img.save(tmp, format="PNG")

    return atomic_write(path, write)


def _plot_from_summary(summary: Dict[str, Any], path: str) -> Optional[str]:
    series: Dict[str, List[float]] = {}
    emphasis, dashed = [], []
    engine = summary["protocols"].get("engine")
    legacy = summary["protocols"].get("legacy")
    main_p = engine or legacy
    if main_p is None:
        return None
    # The mean first, so the thinner per-target lines are drawn over it and stay visible.
    mean_name = "mean (full volume)" if engine else "mean (legacy crop Dice)"
    series[mean_name] = [p["dice_mean"] if p["dice_mean"] is not None else float("nan")
                         for p in main_p["per_click"]]
    emphasis.append(mean_name)
    for t, per in main_p["per_target"].items():
        series[t] = [p["dice_mean"] if p["dice_mean"] is not None else float("nan") for p in per]
    if engine and legacy:
        name = "legacy mean (crop Dice)"
        series[name] = [p["dice_mean"] if p["dice_mean"] is not None else float("nan") for p in legacy["per_click"]]
        dashed.append(name)
    model = summary.get("model", {}).get("name") or "model"
    which = "engine, full-volume Dice" if engine else "legacy crop Dice"
    title = f"Dice vs clicks - {model} ({which}, {summary['data'].get('name', '')})"
    return plot_dice_vs_clicks(series, path, title, emphasis=emphasis, dashed=dashed)


# ------------------------------------------------------------------------------------- writing
def _write_text(path: str, text: str) -> str:
    from ..core.atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def _csv_text(rows: List[Row]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})
    return buf.getvalue()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_outputs(out_dir: str, rows: List[Row], config: EvalConfig, timing: dict,
                   plot: bool = True) -> Dict[str, Any]:
    summary = summarize(rows, config, timing)
    _write_text(os.path.join(out_dir, CSV_NAME), _csv_text(rows))
    _write_text(os.path.join(out_dir, JSON_NAME), json.dumps(_json_safe(summary), indent=2) + "\n")
    if plot and rows:
        try:
            _plot_from_summary(summary, os.path.join(out_dir, PNG_NAME))
        except ImportError:
            sys.stderr.write("sam3d evaluate: Pillow is not installed; no plot written (pip install pillow)\n")
    return summary


def run_evaluation(cases: Iterable[Case], backend, config: EvalConfig, out_dir: str,
                   log: Log = lambda m: None) -> Dict[str, Any]:
    """Run the chosen protocols over ``cases`` with ``backend``; write CSV/JSON/PNG into ``out_dir``
    (created if missing) after every case; return the summary dict."""
    os.makedirs(out_dir, exist_ok=True)
    rows: List[Row] = []
    t_start = time.perf_counter()
    per_protocol_s = {p: 0.0 for p in config.protocols}
    n_cases = 0
    summary: Dict[str, Any] = {}
    for case in cases:
        n_cases += 1
        log(f"case {n_cases}: {case.name} ({len(case.targets)} target(s), grid {list(case.image.shape_ijk)} "
            f"i,j,k, spacing {np.round(case.image.spacing, 3).tolist()} mm)")
        for protocol in config.protocols:
            t0 = time.perf_counter()
            fn = evaluate_engine if protocol == "engine" else evaluate_legacy
            rows.extend(fn(backend, case, config, log))
            per_protocol_s[protocol] += time.perf_counter() - t0
        timing = {"total_s": time.perf_counter() - t_start, "per_protocol_s": dict(per_protocol_s),
                  "cases": n_cases}
        for p in config.protocols:
            clicks = [r["seconds"] for r in rows if r["protocol"] == p and r["positive"] != ""]
            timing[f"{p}_mean_click_s"] = float(np.mean(clicks)) if clicks else None
            timing[f"{p}_encodes"] = int(sum(r["encodes"] for r in rows if r["protocol"] == p))
        summary = _write_outputs(out_dir, rows, config, timing, plot=False)
    if n_cases == 0:
        raise EvaluationError("no cases to evaluate")
    summary = _write_outputs(out_dir, rows, config, summary.get("timing", {}), plot=True)
    return summary
