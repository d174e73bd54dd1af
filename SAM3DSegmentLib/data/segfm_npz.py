"""Cases of the CVPR 2025 interactive 3D segmentation challenge ("SegFM"): one ``.npz`` file per case.

Keys of a case file (docs/evaluation.md, section "SegFM protocol"):

``imgs``     (D, H, W) image, scaled to 0..255 by the challenge (any numeric type is read).
``spacing``  3 voxel sizes in mm. The challenge wrote SimpleITK's ``GetSpacing()``, i.e. the (x, y, z) order,
             the REVERSE of the array axes; ``spacing_order="zyx"`` reads files that store them per array axis.
``gts``      (D, H, W) integer label map (0 = background), in the case file or in a separate file of the same
             name that holds only ``gts`` (the challenge's validation layout).
``boxes``    optional: one dict per class present in ``gts`` (ascending label order) with ``z_min``, ``z_max``,
             ``z_mid`` and the 2D box on slice ``z_mid``: ``z_mid_x_min``, ``z_mid_y_min``, ``z_mid_x_max``,
             ``z_mid_y_max`` (inclusive voxel indices; x is the W axis, y the H axis).

``boxes`` is stored as a pickled object array. Unpickling runs code named in the file, so it is never done with
``allow_pickle=True``: :func:`read_segfm_case` reads the other keys without pickle and ``boxes`` with an
unpickler that only rebuilds numpy arrays and numpy scalars (anything else is refused with a one-line error).

The case carries no orientation: :meth:`SegFMCase.volume` places the array as SimpleITK would read an image with
the identity direction (LPS axes, origin 0), i.e. the grid the challenge's files were made from up to its
direction.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..core.geometry import LPS_TO_RAS, Volume, make_ijk_to_ras
from .datasets import DataError

__all__ = ["SegFMDataError", "SegFMCase", "BOX_KEYS", "SPACING_ORDERS", "read_segfm_case", "list_segfm_cases",
           "boxes_from_gt", "write_segfm_case"]

#: The keys of one class's box, as the challenge writes them.
BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
#: ``spacing`` as stored: "xyz" (SimpleITK order, the challenge's files) or "zyx" (per array axis).
SPACING_ORDERS = ("xyz", "zyx")


class SegFMDataError(DataError):
    """A case file that cannot be used; the message names the file and the fix (a :class:`DataError`, the
    one error type of the dataset readers)."""


@dataclass
class SegFMCase:
    """One case: ``imgs`` and ``gts`` are (D, H, W) = ``[k, j, i]``; ``spacing_zyx`` is mm per array axis;
    ``boxes`` is ``{label value: box dict}`` (keys :data:`BOX_KEYS`) or None."""

    name: str
    imgs: np.ndarray
    gts: np.ndarray
    spacing_zyx: np.ndarray
    boxes: Optional[Dict[int, Dict[str, int]]] = None
    source: str = ""

    @property
    def classes(self) -> List[int]:
        """The label values present in ``gts`` (background 0 excluded), ascending."""
        counts = np.bincount(self.gts.ravel())
        return [int(v) for v in np.flatnonzero(counts) if v != 0]

    def volume(self, window: Optional[Sequence[float]] = None) -> Volume:
        """The image as a :class:`Volume` (identity LPS direction, origin 0; see the module docstring).

        ``window`` = (lo, hi): the intensity range the challenge scaled to 0..255 (e.g. a CT window in HU);
        the image is mapped back linearly (0 -> lo, 255 -> hi, float32). Values the scaling clipped stay at
        the window's ends. None: the 0..255 values as stored."""
        ijk_to_lps = make_ijk_to_ras(self.spacing_zyx[::-1])
        array = self.imgs
        if window is not None:
            lo, hi = (float(v) for v in window)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"window must be (low, high) with low < high, got {window!r}")
            array = self.imgs.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
        return Volume(array, LPS_TO_RAS @ ijk_to_lps, {"name": self.name, "source": self.source})


# ------------------------------------------------------------------------------------------ reading
_RECONSTRUCT = np.array(0).__reduce__()[0]     # numpy's array-unpickling helper, whatever its module is named
_SCALAR = np.int64(0).__reduce__()[0]          # numpy's scalar-unpickling helper
_SAFE = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _SAFE[(_mod, "_reconstruct")] = _RECONSTRUCT
    _SAFE[(_mod, "scalar")] = _SCALAR


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays/scalars and plain containers; refuses every other global (no code runs)."""

    def find_class(self, module, name):
        try:
            return _SAFE[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None


def _read_member(zf: zipfile.ZipFile, key: str, path: str):
    """Key ``key`` of an open ``.npz``: plain arrays with numpy's reader (no pickle), object arrays with
    :class:`_ArrayOnlyUnpickler`."""
    with zf.open(key + ".npy") as f:
        raw = f.read()
    buf = io.BytesIO(raw)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise SegFMDataError(f"{path}: key '{key}' is stored in .npy format {version}; re-save the case with "
                             "numpy.savez_compressed")
    if not dtype.hasobject:
        return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    try:
        value = _ArrayOnlyUnpickler(buf).load()
    except Exception as err:  # noqa: BLE001 - any failure of an untrusted pickle is a bad file
        raise SegFMDataError(f"{path}: key '{key}' is not a plain list of boxes ({err}); re-create the file "
                             "with boxes as a list of dicts of integers") from None
    return np.asarray(value, dtype=object).reshape(shape)


def _open_npz(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise SegFMDataError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise SegFMDataError(f"{path} is not a readable .npz file ({err}); give the challenge's .npz case") \
            from None


def _keys(zf: zipfile.ZipFile) -> List[str]:
    return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def _label_map(gts, path: str, shape) -> np.ndarray:
    gts = np.asarray(gts)
    if gts.shape != tuple(shape):
        raise SegFMDataError(f"{path}: 'gts' has shape {gts.shape} but 'imgs' has {tuple(shape)}; they must "
                             "be the same (D, H, W) grid")
    if gts.dtype.kind == "f":
        if not np.all(np.isfinite(gts)) or not np.array_equal(gts, np.round(gts)):
            raise SegFMDataError(f"{path}: 'gts' holds non-integer values; a label map (0 = background) is needed")
        gts = gts.astype(np.int64)
    elif gts.dtype.kind == "b":
        gts = gts.astype(np.uint8)
    elif gts.dtype.kind not in "iu":
        raise SegFMDataError(f"{path}: 'gts' has type {gts.dtype}; a label map of integers is needed")
    if gts.size and int(gts.min()) < 0:
        raise SegFMDataError(f"{path}: 'gts' holds negative labels; labels must be 0 (background) or positive")
    if gts.size and int(gts.max()) > 65535:
        raise SegFMDataError(f"{path}: 'gts' holds label {int(gts.max())}; labels above 65535 are not supported")
    return gts.astype(np.uint16 if gts.size and gts.max() > 255 else np.uint8, copy=False)


def _spacing(value, path: str, order: str) -> np.ndarray:
    sp = np.asarray(value, dtype=np.float64).reshape(-1) if np.asarray(value).dtype.kind in "iuf" else None
    if sp is None or sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise SegFMDataError(f"{path}: 'spacing' must be three positive numbers (mm), got {value!r}")
    return sp[::-1].copy() if order == "xyz" else sp.copy()


def _boxes(value, path: str, classes: Sequence[int], shape) -> Dict[int, Dict[str, int]]:
    items = list(np.asarray(value, dtype=object).reshape(-1))
    if len(items) != len(classes):
        raise SegFMDataError(f"{path}: 'boxes' has {len(items)} box(es) for {len(classes)} class(es) present in "
                             f"'gts' ({classes}); there must be one box per class, in ascending label order")
    d, h, w = shape
    out: Dict[int, Dict[str, int]] = {}
    for n, (cls, box) in enumerate(zip(classes, items)):
        if not isinstance(box, dict) or any(k not in box for k in BOX_KEYS):
            raise SegFMDataError(f"{path}: box {n} (class {cls}) must be a dict with the keys {', '.join(BOX_KEYS)}")
        try:
            b = {k: int(box[k]) for k in BOX_KEYS}
        except (TypeError, ValueError):
            raise SegFMDataError(f"{path}: box {n} (class {cls}) holds a value that is not an integer") from None
        ok = (0 <= b["z_min"] <= b["z_mid"] <= b["z_max"] < d
              and 0 <= b["z_mid_y_min"] <= b["z_mid_y_max"] < h and 0 <= b["z_mid_x_min"] <= b["z_mid_x_max"] < w)
        if not ok:
            raise SegFMDataError(f"{path}: box {n} (class {cls}) {b} is not an ordered box inside the "
                                 f"(D, H, W) = {tuple(shape)} grid")
        out[int(cls)] = b
    return out


def read_segfm_case(path: str, gts_path: Optional[str] = None, spacing_order: str = "xyz") -> SegFMCase:
    """Read one case file (``gts`` from ``gts_path`` when given, else from the case file itself)."""
    if spacing_order not in SPACING_ORDERS:
        raise SegFMDataError(f"spacing order must be one of {SPACING_ORDERS}, got {spacing_order!r}")
    path = os.fspath(path)
    with _open_npz(path) as zf:
        keys = _keys(zf)
        missing = [k for k in ("imgs", "spacing") if k not in keys]
        if missing:
            raise SegFMDataError(f"{path}: no {' or '.join(repr(k) for k in missing)} key; a SegFM case holds "
                                 "'imgs' (D, H, W), 'spacing' and 'gts' (or give the ground-truth folder)")
        imgs = np.asarray(_read_member(zf, "imgs", path))
        spacing_raw = _read_member(zf, "spacing", path)
        boxes_raw = _read_member(zf, "boxes", path) if "boxes" in keys else None
        gts_raw = _read_member(zf, "gts", path) if (gts_path is None and "gts" in keys) else None
    if gts_path is not None:
        with _open_npz(gts_path) as zf:
            if "gts" not in _keys(zf):
                raise SegFMDataError(f"{gts_path}: no 'gts' key; the ground-truth file of a case holds 'gts'")
            gts_raw = _read_member(zf, "gts", gts_path)
    if gts_raw is None:
        raise SegFMDataError(f"{path}: no 'gts' key; give the folder of ground-truth files (one .npz with "
                             "'gts' per case, same file names)")
    if imgs.ndim != 3 or imgs.dtype.kind not in "iufb" or min(imgs.shape) < 1:
        raise SegFMDataError(f"{path}: 'imgs' must be a numeric (D, H, W) array, got {imgs.dtype} {imgs.shape}")
    gts = _label_map(gts_raw, gts_path or path, imgs.shape)
    case = SegFMCase(name=os.path.basename(path)[: -len(".npz")] if path.endswith(".npz") else os.path.basename(path),
                     imgs=imgs, gts=gts, spacing_zyx=_spacing(spacing_raw, path, spacing_order), source=path)
    if boxes_raw is not None:
        case.boxes = _boxes(boxes_raw, path, case.classes, imgs.shape)
    return case


def list_segfm_cases(folder: str) -> List[str]:
    """The ``.npz`` files of ``folder`` (sorted by name; names starting with a dot are not data)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise SegFMDataError(f"{folder}: no such folder; give a folder of SegFM .npz cases")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".npz") and not f.startswith("."))
    if not files:
        raise SegFMDataError(f"{folder} holds no .npz files; give a folder of SegFM .npz cases")
    return [os.path.join(folder, f) for f in files]


# ------------------------------------------------------------------------------------ boxes, writing
def boxes_from_gt(gts: np.ndarray) -> Dict[int, Dict[str, int]]:
    """The challenge's box of every class of ``gts`` (without its random 0..5 voxel widening): ``z_min``/``z_max``
    the class's slice range; ``z_mid`` the slice of its median voxel in C order (the challenge takes
    ``z_indices[len // 2]`` of the voxel list); the 2D box its bounding box on slice ``z_mid``."""
    from scipy import ndimage

    gts = np.asarray(gts)
    out: Dict[int, Dict[str, int]] = {}
    for cls, sl in enumerate(ndimage.find_objects(gts), start=1):
        if sl is None:
            continue
        sub = gts[sl] == cls
        per_slice = np.count_nonzero(sub, axis=(1, 2))
        median = int(per_slice.sum()) // 2
        z_rel = int(np.searchsorted(np.cumsum(per_slice), median, side="right"))
        plane = sub[z_rel]
        ys, xs = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
        z0, y0, x0 = sl[0].start, sl[1].start, sl[2].start
        out[cls] = {"z_min": int(z0), "z_max": int(sl[0].stop - 1), "z_mid": int(z0 + z_rel),
                    "z_mid_x_min": int(x0 + xs[0]), "z_mid_y_min": int(y0 + ys[0]),
                    "z_mid_x_max": int(x0 + xs[-1]), "z_mid_y_max": int(y0 + ys[-1])}
    return out


def write_segfm_case(path: str, imgs: Optional[np.ndarray], gts: Optional[np.ndarray],
                     spacing_xyz: Optional[Sequence[float]], boxes: Optional[Dict[int, Dict[str, int]]] = None) -> str:
    """Write a case file in the challenge's layout (``boxes`` as its list of dicts, ascending label order;
    a None array is left out, e.g. everything but ``gts`` for a ground-truth file), atomically; returns the
    absolute path."""
    from ..core.atomic import atomic_write

    arrays = {}
    if imgs is not None:
        arrays["imgs"] = np.asarray(imgs)
    if spacing_xyz is not None:
        arrays["spacing"] = np.asarray(spacing_xyz, dtype=np.float64)
    if gts is not None:
        arrays["gts"] = np.asarray(gts)
    if boxes is not None:
        items = [{k: int(v) for k, v in boxes[c].items()} for c in sorted(boxes)]
        obj = np.empty(len(items), dtype=object)
        obj[:] = items
        arrays["boxes"] = obj

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)
