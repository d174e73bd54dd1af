"""Training data: dataset discovery, a one-time preprocessing cache, the split and the sampled crops.

Layouts:

* nnU-Net raw: ``dataset.json`` (``labels``: ``{"background": 0, "liver": 1, ...}`` (v2) or
  ``{"0": "background", "1": "liver"}`` (v1); optional ``file_ending``), ``imagesTr/<case>_0000<ext>``,
  ``labelsTr/<case><ext>``. Multi-label maps give one binary target per class.
* binary: ``imagesTr/<name>`` and ``labelsTr/<name>`` with equal names; every label > 0 is the target.

Preprocessing (cached once per case, see :func:`preprocess_case`): read with
``SAM3DSegmentLib.io.volumes.read_volume``, check the label is on the image grid, reorient to the closest RAS
canonical axes (a pure permutation/flip; any residual rotation stays in the matrix), resample to
``spacing`` mm isotropic (linear for the image, nearest for the label; same field of view), store the
image (int16 rounded HU or float32), the label map and the ijk->RAS matrix. The cache key hashes the
source files' paths, sizes and modification times and the preprocessing parameters; files are written
atomically, so an interrupted run never leaves a half-written entry.

Crops are in the network's axis order (a, b, c) = RAS-canonical (i, j, k), i.e. the TRANSPOSE of
``Volume.array`` ([k, j, i]).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..core.atomic import atomic_write, write_json
from ..core.geometry import GeometryError, Volume, closest_canonical_axes, mask_bounds

__all__ = [
    "DataError", "CaseSpec", "CachedCase", "Target", "discover_cases", "preprocess_case",
    "canonical_reorient", "resample_isotropic", "prepare_dataset", "split_cases", "normalize_ct",
    "crop_centered", "TrainTargets", "ValTargets", "EpochTagged", "PreparedData", "CACHE_VERSION",
]

CACHE_VERSION = 1


class DataError(ValueError):
    """A dataset problem (the message names the case/file and the fix)."""


@dataclass
class CaseSpec:
    case_id: str
    image_path: str
    label_path: str
    #: label value -> class name (background excluded)
    classes: Dict[int, str]


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


# ------------------------------------------------------------------------------------ discovery
def _image_exts() -> Tuple[str, ...]:
    return (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _strip_ext(name: str) -> Tuple[str, str]:
    for ext in _image_exts():
        if name.lower().endswith(ext):
            return name[: -len(ext)], ext
    return os.path.splitext(name)[0], os.path.splitext(name)[1]


def _read_labels_json(root: str) -> Tuple[Dict[int, str], str]:
    path = os.path.join(root, "dataset.json")
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({err}); fix or regenerate dataset.json") from err
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path} has no 'labels' object; nnU-Net datasets map label names to values, "
                        "e.g. \"labels\": {\"background\": 0, \"liver\": 1}")
    classes: Dict[int, str] = {}
    for k, v in labels.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # v2: name -> value
            value, name = int(v), str(k)
        elif isinstance(v, (list, tuple)):  # v2 region-based labels: not supported
            raise DataError(f"{path}: region-based label {k!r} -> {v} is not supported; give one value "
                            "per class")
        else:  # v1: "value" -> name
            try:
                value, name = int(k), str(v)
            except ValueError as err:
                raise DataError(f"{path}: cannot interpret label entry {k!r}: {v!r}") from err
        if value != 0:
            classes[value] = name
    return classes, str(meta.get("file_ending", ".nii.gz"))


def discover_cases(root: str, layout: str = "auto") -> List[CaseSpec]:
    """List the (image, label) pairs of one dataset folder; raises :class:`DataError` when malformed."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root} does not exist; set data.roots to an nnU-Net raw dataset "
                        "or a folder with imagesTr/ and labelsTr/ (for the demo data set run "
                        f"`sam3d train make-demo-data {root}` first, or set data.make_demo_data=true)")
    img_dir, lab_dir = os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr")
    if not (os.path.isdir(img_dir) and os.path.isdir(lab_dir)):
        raise DataError(f"{root} has no imagesTr/ and labelsTr/ folders; expected the nnU-Net raw layout "
                        "or the binary imagesTr/labelsTr layout")
    if layout == "auto":
        layout = "nnunet" if os.path.isfile(os.path.join(root, "dataset.json")) else "binary"
    cases: List[CaseSpec] = []
    problems: List[str] = []
    if layout == "nnunet":
        classes, ending = _read_labels_json(root)
        names = sorted(n for n in os.listdir(img_dir) if n.endswith(ending))
        ids = sorted({n[: -len(ending)][:-5] for n in names if n[: -len(ending)].endswith("_0000")})
        extra_channels = [n for n in names if not n[: -len(ending)].endswith("_0000")]
        if extra_channels:
            warnings.warn(f"{root}: only channel _0000 is used (CT); ignoring {len(extra_channels)} other "
                          "channel files")
        for cid in ids:
            lab = os.path.join(lab_dir, cid + ending)
            if not os.path.isfile(lab):
                problems.append(f"case {cid}: label file {lab} is missing")
                continue
            cases.append(CaseSpec(cid, os.path.join(img_dir, f"{cid}_0000{ending}"), lab, dict(classes)))
    elif layout == "binary":
        names = sorted(n for n in os.listdir(img_dir) if n.lower().endswith(_image_exts()))
        for n in names:
            lab = os.path.join(lab_dir, n)
            cid = _strip_ext(n)[0]
            if not os.path.isfile(lab):
                problems.append(f"case {cid}: no label {lab} with the same name as the image")
                continue
            cases.append(CaseSpec(cid, os.path.join(img_dir, n), lab, {1: "foreground"}))
    else:
        raise DataError(f"unknown data layout {layout!r}; use auto, nnunet or binary")
    if problems:
        raise DataError(f"dataset {root}: " + "; ".join(problems) + ". Add the missing files or remove the "
                        "images without labels")
    if not cases:
        raise DataError(f"dataset {root}: no images found in imagesTr/ (nnU-Net names end in "
                        "_0000.nii.gz)")
    return cases


# ------------------------------------------------------------------------------ preprocessing
def canonical_reorient(vol: Volume) -> Volume:
    """Permute/flip the voxel axes so i, j, k point (most nearly) along +R, +A, +S. No interpolation."""
    perm, signs = closest_canonical_axes(vol.directions)
    arr_ijk = np.transpose(vol.array, (2, 1, 0))  # (i, j, k)
    arr = np.transpose(arr_ijk, tuple(int(p) for p in perm))
    m = vol.ijk_to_ras
    new = np.eye(4)
    origin = m[:3, 3].copy()
    n_ijk = vol.shape_ijk
    for r in range(3):
        col = m[:3, perm[r]] * signs[r]
        new[:3, r] = col
        if signs[r] < 0:
            arr = np.flip(arr, axis=r)
            origin = origin + m[:3, perm[r]] * (n_ijk[perm[r]] - 1)
    new[:3, 3] = origin
    return Volume(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))), new, dict(vol.meta))


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
    payload = json.dumps({"v": CACHE_VERSION, "img": _file_sig(spec.image_path),
                          "lab": _file_sig(spec.label_path), "spacing": float(spacing),
                          "dtype": image_dtype, "classes": sorted(spec.classes)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _atomic_savez(path: str, **arrays) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def _read(path: str, what: str, case_id: str) -> Volume:
    from ..io import read_volume

    try:
        return read_volume(path)
    except (ValueError, OSError, RuntimeError) as err:
        raise DataError(f"case {case_id}: cannot read the {what} {path}: {err}. Replace or remove the file"
                        ) from err


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
    image = _read(spec.image_path, "image", spec.case_id)
    label = _read(spec.label_path, "label", spec.case_id)
    if not image.same_grid(label, atol=1e-3):
        raise DataError(
            f"case {spec.case_id}: the label {spec.label_path} is not on the image grid (image {image.shape_ijk} "
            f"voxels, spacing {np.round(image.spacing, 3).tolist()}, origin {np.round(image.origin, 2).tolist()}; "
            f"label {label.shape_ijk}, spacing {np.round(label.spacing, 3).tolist()}, origin "
            f"{np.round(label.origin, 2).tolist()}). Resample the label onto its image (nearest neighbour) "
            "or fix the file pairing")
    lab_arr = np.asarray(label.array)
    if not np.issubdtype(lab_arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(lab_arr, 1), 0)):
            raise DataError(f"case {spec.case_id}: the label {spec.label_path} has non-integer values; "
                            "labels must be integer class maps")
    lab_arr = lab_arr.astype(np.int64)
    if lab_arr.min() < 0 or lab_arr.max() > 65535:
        raise DataError(f"case {spec.case_id}: label values must be in 0..65535")
    label = label.with_array(lab_arr.astype(np.uint16))
    image = canonical_reorient(image)
    label = canonical_reorient(label)
    dtype = np.int16 if image_dtype == "int16" else np.float32
    image = resample_isotropic(image, spacing, "linear", dtype)
    label = resample_isotropic(label, spacing, "nearest", np.uint16)
    img_abc = np.ascontiguousarray(np.transpose(image.array, (2, 1, 0)))
    lab_abc = np.ascontiguousarray(np.transpose(label.array, (2, 1, 0)))
    if spec.classes == {1: "foreground"}:  # binary layout: any label > 0
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


# ------------------------------------------------------------------------------------ samples
def normalize_ct(crop: np.ndarray, clamp: Sequence[float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Per-sample: clamp (CT), then z-normalise with mean/std over the voxels > 0 (all voxels if < 2)."""
    x = crop.astype(np.float32, copy=True)
    if clamp:
        np.clip(x, float(clamp[0]), float(clamp[1]), out=x)
    m = x > 0
    sel = x[m] if int(m.sum()) >= 2 else x.reshape(-1)
    mean = float(sel.mean(dtype=np.float64))
    std = float(sel.std(dtype=np.float64))
    return ((x - mean) / max(std, 1e-8)).astype(np.float32)


def crop_centered(arr: np.ndarray, center: Sequence[int], size: int, pad_value: float) -> np.ndarray:
    """A ``size``^3 crop of ``arr`` (any 3D axis order) whose voxel ``size // 2`` is ``center``; padded."""
    out = np.full((size,) * 3, pad_value, dtype=arr.dtype)
    src, dst = [], []
    for ax in range(3):
        lo = int(center[ax]) - size // 2
        s0, s1 = max(lo, 0), min(lo + size, arr.shape[ax])
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo, s1 - lo))
    out[tuple(dst)] = arr[tuple(src)]
    return out


class _CaseStore:
    """Loads cached cases (kept in memory after first use, per process)."""

    def __init__(self, cases: Sequence[CachedCase], max_items: int = 64):
        self.cases = list(cases)
        self.max_items = max_items
        self._mem: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def get(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if i not in self._mem:
            with np.load(self.cases[i].path) as z:
                item = (z["image"], z["label"])
            if len(self._mem) >= self.max_items:
                self._mem.pop(next(iter(self._mem)))
            self._mem[i] = item
        return self._mem[i]


class EpochTagged:
    """Wrap an index sampler so it yields ``(epoch, index)``: per-sample randomness is keyed by
    ``(seed, epoch, index)``, independent of worker processes, ranks and resumption."""

    def __init__(self, sampler, epoch: int = 0, skip: int = 0):
        self.sampler = sampler
        self.epoch = epoch
        self.skip = skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for n, i in enumerate(self.sampler):
            if n >= self.skip:
                yield (self.epoch, int(i))

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class TrainTargets:
    """Map-style dataset of training samples, indexed by ``(epoch, index)`` (see :class:`EpochTagged`).

    Sample ``index`` starts with target ``index % len(targets)``; the crop (``size``^3, centred on the
    target's label box, optional jitter) must hold more than ``min_label_voxels`` label voxels, else
    another target is drawn (up to ``max_tries``, then the best seen is used). Random flips on 3 axes,
    CT clamp and per-sample z-normalisation. Returns float32 ``image``/``label`` ``(1, S, S, S)`` in (a, b, c).
    """

    def __init__(self, cases: Sequence[CachedCase], targets: Sequence[Target], size: int, seed: int = 0,
                 jitter: int = 0, flip: bool = True, min_label_voxels: int = 1000, max_tries: int = 20,
                 clamp: Sequence[float] = (-1000.0, 1000.0), pad_value: float = 0.0,
                 samples_per_epoch: int = 0):
        if not targets:
            raise DataError("the training split has no targets; add cases or lower data.val_fraction")
        self.store = _CaseStore(cases)
        self.targets = list(targets)
        self.size, self.seed, self.jitter, self.flip = int(size), int(seed), int(jitter), bool(flip)
        self.min_label_voxels, self.max_tries = int(min_label_voxels), int(max_tries)
        self.clamp, self.pad_value = list(clamp or []), float(pad_value)
        self.samples_per_epoch = int(samples_per_epoch) or len(self.targets)
        self.warned = False

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _crop(self, t: Target, rng: Optional[np.random.Generator]):
        image, label = self.store.get(t.case_index)
        center = [(lo + hi - 1) // 2 for lo, hi in t.bbox]
        if self.jitter and rng is not None:
            center = [c + int(rng.integers(-self.jitter, self.jitter + 1)) for c in center]
        lab = crop_centered(label, center, self.size, 0) == t.value
        return image, center, lab

    def __getitem__(self, key) -> Dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        ti = int(index) % len(self.targets)
        best = None
        for attempt in range(max(1, self.max_tries)):
            t = self.targets[ti]
            image, center, lab = self._crop(t, rng)
            n = int(lab.sum())
            if best is None or n > best[3]:
                best = (t, image, center, n, lab, ti)
            if n > self.min_label_voxels:
                break
            ti = int(rng.integers(len(self.targets)))
        t, image, center, n, lab, ti = best
        if n <= self.min_label_voxels and not self.warned:
            warnings.warn(f"no target gave a crop with more than {self.min_label_voxels} label voxels after "
                          f"{self.max_tries} tries (best {n}); using it anyway. Lower "
                          "data.min_crop_label_voxels for small structures or small crops")
            self.warned = True
        img = normalize_ct(crop_centered(image, center, self.size, self.pad_value), self.clamp)
        lab = lab.astype(np.float32)
        if self.flip:
            for ax in range(3):
                if rng.random() < 0.5:
                    img = np.flip(img, ax)
                    lab = np.flip(lab, ax)
        return {"image": np.ascontiguousarray(img)[None], "label": np.ascontiguousarray(lab)[None],
                "index": int(index), "epoch": int(epoch), "target": ti}


class ValTargets:
    """Deterministic validation samples: one centred crop per validation target, no flips."""

    def __init__(self, cases: Sequence[CachedCase], targets: Sequence[Target], size: int,
                 clamp: Sequence[float] = (-1000.0, 1000.0), pad_value: float = 0.0, max_targets: int = 0):
        self.store = _CaseStore(cases)
        self.targets = list(targets)[: max_targets or None]
        self.size, self.clamp, self.pad_value = int(size), list(clamp or []), float(pad_value)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        t = self.targets[index]
        image, label = self.store.get(t.case_index)
        center = [(lo + hi - 1) // 2 for lo, hi in t.bbox]
        img = normalize_ct(crop_centered(image, center, self.size, self.pad_value), self.clamp)
        lab = (crop_centered(label, center, self.size, 0) == t.value).astype(np.float32)
        return {"image": img[None], "label": lab[None], "index": int(index), "epoch": 0, "target": index}
