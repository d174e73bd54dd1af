"""Training data: the cases of the dataset folders, a one-time preprocessing cache, the split.

The folders are read by :func:`SAM3DSegmentLib.data.datasets.read_nnunet_dataset` (the reader evaluation uses
too). ``data.layout`` decides what a label map means:

* ``nnunet`` (``auto`` when the folder has a dataset.json): one binary target per class named in
  ``dataset.json`` ``labels``;
* ``binary`` (``auto`` without dataset.json): every label > 0 is the one target, named ``foreground``.

Preprocessing (cached once per case, see :func:`preprocess_case`): read and checked with
:func:`~SAM3DSegmentLib.data.datasets.read_case` (label on the image grid, integer values), reorient to the
closest RAS canonical axes (:func:`~SAM3DSegmentLib.eval.reference_pipeline.reference_canonical`: a pure
permutation/flip; any residual rotation stays in the matrix), resample to ``spacing`` mm isotropic (linear for
the image, nearest for the label; same field of view), store the image (int16 rounded HU or float32), the
label map and the ijk->RAS matrix. The cache key hashes the source files' paths, sizes and modification times
and the preprocessing parameters; files are written atomically, so an interrupted run never leaves a
half-written entry.

Cached arrays are in the network's axis order (a, b, c) = RAS-canonical (i, j, k), i.e. the TRANSPOSE of
``Volume.array`` ([k, j, i]). The crops and loaders are in :mod:`.samples`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..core.atomic import atomic_write, write_json
from ..core.geometry import GeometryError, Volume, mask_bounds
from ..data.datasets import CaseFiles, DataError, read_case, read_nnunet_dataset
from ..eval.reference_pipeline import reference_canonical

__all__ = [
    "DataError", "CaseSpec", "CachedCase", "Target", "discover_cases", "preprocess_case", "resample_isotropic",
    "cache_key", "prepare_dataset", "split_cases", "PreparedData", "CACHE_VERSION", "LAYOUTS",
]

CACHE_VERSION = 1
LAYOUTS = ("auto", "nnunet", "binary")


@dataclass
class CaseSpec:
    case_id: str
    image_path: str
    label_path: str
    #: label value -> class name (background excluded)
    classes: Dict[int, str]
    #: binary layout: every label value > 0 is the target ``classes[1]``
    binary: bool = False


@dataclass
class CachedCase:
    case_id: str
    path: str
    #: class value -> {"name", "voxels", "bbox": [[lo, hi) per axis in (a, b, c)]}
    targets: Dict[int, Dict[str, Any]]
    shape_abc: Tuple[int, int, int]


@dataclass
class Target:
    case_index: int
    value: int
    name: str
    voxels: int
    bbox: List[List[int]]


def discover_cases(root: str, layout: str = "auto") -> List[CaseSpec]:
    """The (image, label) pairs of one dataset folder with their classes; raises :class:`DataError`."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown data layout {layout!r}; use auto, nnunet or binary")
    root = os.path.abspath(os.path.expanduser(root))
    hint = (f" (for the demo data set run `sam3d train make-demo-data {root}` first, or set "
            "data.make_demo_data=true)")
    ds = read_nnunet_dataset(root, "Tr", source="data.roots", hint=hint)
    if layout == "auto":
        layout = "nnunet" if ds.has_json else "binary"
    if layout == "binary":
        return [CaseSpec(c.name, c.image_path, c.label_path, {1: "foreground"}, binary=True) for c in ds.cases]
    if ds.labels is None:
        raise DataError(f"{os.path.join(root, 'dataset.json')} is missing or has no 'labels' object; nnU-Net "
                        "datasets map label names to values, e.g. \"labels\": {\"background\": 0, \"liver\": 1} "
                        "(or set data.layout=binary: every label > 0 is the target)")
    return [CaseSpec(c.name, c.image_path, c.label_path, dict(ds.labels)) for c in ds.cases]


# ------------------------------------------------------------------------------ preprocessing
def resample_isotropic(vol: Volume, spacing: float, interpolation: str, out_dtype) -> Volume:
    """Resample to ``spacing`` mm along each (kept) axis direction over the same field of view."""
    from ..io import resample_like

    sp = vol.spacing
    n = np.asarray(vol.shape_ijk, dtype=np.float64)
    n_new = np.maximum(1, np.round(n * sp / spacing)).astype(int)
    d = vol.directions
    origin = vol.origin + d @ ((-0.5 * sp) + 0.5 * spacing)
    m = np.eye(4)
    m[:3, :3] = d * spacing
    m[:3, 3] = origin
    ref = Volume(np.zeros(tuple(n_new[::-1]), dtype=np.uint8), m)
    pad = float(np.min(vol.array)) if interpolation == "linear" else 0.0
    arr = resample_like(vol, ref, interpolation, default_value=pad).array
    if np.issubdtype(np.dtype(out_dtype), np.integer) and interpolation == "linear":
        info = np.iinfo(out_dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    return Volume(arr.astype(out_dtype), m, dict(vol.meta))


def _file_sig(path: str) -> List[Any]:
    st = os.stat(path)
    return [os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns)]


def cache_key(spec: CaseSpec, spacing: float, image_dtype: str) -> str:
    entry = {"v": CACHE_VERSION, "img": _file_sig(spec.image_path), "lab": _file_sig(spec.label_path),
             "spacing": float(spacing), "dtype": image_dtype, "classes": sorted(spec.classes)}
    if spec.binary:  # the same files and classes mean another label map in the binary layout
        entry["binary"] = True
    payload = json.dumps(entry, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _files_of(spec: CaseSpec) -> CaseFiles:
    return CaseFiles(spec.case_id, spec.image_path, spec.label_path)


def _atomic_savez(path: str, **arrays) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def preprocess_case(spec: CaseSpec, cache_dir: str, spacing: float = 1.5, image_dtype: str = "int16",
                    min_target_mm3: float = 10.0) -> CachedCase:
    """Preprocess one case into ``cache_dir`` (or reuse the valid cached entry)."""
    os.makedirs(cache_dir, exist_ok=True)
    key = cache_key(spec, spacing, image_dtype)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.case_id)
    path = os.path.join(cache_dir, f"{safe}-{key}.npz")
    meta_path = path[:-4] + ".json"
    if os.path.isfile(path) and os.path.isfile(meta_path):
        try:
            with open(meta_path, "r", encoding="utf-8") as f:
                meta = json.load(f)
            return CachedCase(spec.case_id, path, {int(k): v for k, v in meta["targets"].items()},
                              tuple(meta["shape_abc"]))
        except (OSError, ValueError, KeyError):
            pass  # rebuild a damaged entry
    image, label = read_case(_files_of(spec))
    label = label.with_array(np.asarray(label.array).astype(np.uint16))
    image = reference_canonical(image)
    label = reference_canonical(label)
    dtype = np.int16 if image_dtype == "int16" else np.float32
    image = resample_isotropic(image, spacing, "linear", dtype)
    label = resample_isotropic(label, spacing, "nearest", np.uint16)
    img_abc = np.ascontiguousarray(np.transpose(image.array, (2, 1, 0)))
    lab_abc = np.ascontiguousarray(np.transpose(label.array, (2, 1, 0)))
    if spec.binary:  # any label > 0
        lab_abc = (lab_abc > 0).astype(np.uint16)
    targets: Dict[int, Dict[str, Any]] = {}
    voxel_mm3 = float(spacing) ** 3
    for value, name in sorted(spec.classes.items()):
        mask = lab_abc == value
        count = int(mask.sum())
        if count == 0 or count * voxel_mm3 < min_target_mm3:
            continue
        box = [[b.start, b.stop] for b in mask_bounds(mask)]
        targets[int(value)] = {"name": name, "voxels": count, "bbox": box}
    _atomic_savez(path, image=img_abc, label=lab_abc.astype(np.uint16 if lab_abc.max() > 255 else np.uint8),
                  ijk_to_ras=image.ijk_to_ras)
    meta = {"case_id": spec.case_id, "image": spec.image_path, "label": spec.label_path,
            "spacing": spacing, "shape_abc": list(img_abc.shape), "ijk_to_ras": image.ijk_to_ras.tolist(),
            "targets": {str(k): v for k, v in targets.items()}, "version": CACHE_VERSION}
    write_json(meta_path, meta, indent=None)
    return CachedCase(spec.case_id, path, targets, tuple(img_abc.shape))


# ----------------------------------------------------------------------------------- the split
def split_cases(case_ids: Sequence[str], val_fraction: float, val_cases: Sequence[str] = (),
                seed: int = 0) -> Tuple[List[str], List[str]]:
    """``(train_ids, val_ids)``: the explicit list when given, else a seeded fraction of the cases."""
    ids = sorted(case_ids)
    if val_cases:
        missing = sorted(set(val_cases) - set(ids))
        if missing:
            raise DataError(f"data.val_cases names cases that are not in the dataset: {missing}")
        val = sorted(set(val_cases))
    else:
        n_val = int(round(val_fraction * len(ids)))
        if val_fraction > 0 and n_val == 0 and len(ids) > 1:
            n_val = 1
        n_val = min(n_val, max(0, len(ids) - 1))
        order = np.random.default_rng(seed).permutation(len(ids))
        val = sorted(ids[i] for i in order[:n_val])
    train = [c for c in ids if c not in set(val)]
    return train, val


@dataclass
class PreparedData:
    cases: List[CachedCase]
    train_targets: List[Target]
    val_targets: List[Target]
    train_ids: List[str]
    val_ids: List[str]
    skipped: List[str] = field(default_factory=list)


def prepare_dataset(roots: Sequence[str], cache_dir: str, layout: str = "auto", spacing: float = 1.5,
                    image_dtype: str = "int16", min_target_mm3: float = 10.0, val_fraction: float = 0.1,
                    val_cases: Sequence[str] = (), split_seed: int = 0, log=print) -> PreparedData:
    """Discover, preprocess (cached) and split. Bad cases raise one :class:`DataError` listing them all;
    cases without any target are reported and skipped."""
    if not roots:
        raise DataError("no dataset given: set data.roots to one or more dataset folders")
    specs: List[CaseSpec] = []
    for root in roots:
        for s in discover_cases(root, layout):
            if len(roots) > 1:
                s.case_id = f"{os.path.basename(os.path.normpath(root))}/{s.case_id}"
            specs.append(s)
    ids = [s.case_id for s in specs]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate case ids across the dataset folders")
    cases: List[CachedCase] = []
    problems: List[str] = []
    skipped: List[str] = []
    for s in specs:
        try:
            c = preprocess_case(s, cache_dir, spacing, image_dtype, min_target_mm3)
        except (DataError, GeometryError) as err:
            problems.append(str(err))
            continue
        if not c.targets:
            msg = (f"case {s.case_id}: the label {s.label_path} holds no target of at least "
                   f"{min_target_mm3} mm^3 (empty label?); skipped")
            log(f"warning: {msg}")
            skipped.append(s.case_id)
            continue
        cases.append(c)
    if problems:
        raise DataError(f"{len(problems)} bad case(s):\n  " + "\n  ".join(problems))
    if not cases:
        raise DataError("no usable training targets: every label is empty (or below data.min_target_mm3)")
    train_ids, val_ids = split_cases([c.case_id for c in cases], val_fraction, val_cases, split_seed)
    tr, va = [], []
    for ci, c in enumerate(cases):
        for value, t in sorted(c.targets.items()):
            tgt = Target(ci, value, t["name"], int(t["voxels"]), t["bbox"])
            (va if c.case_id in set(val_ids) else tr).append(tgt)
    return PreparedData(cases, tr, va, train_ids, val_ids, skipped)


