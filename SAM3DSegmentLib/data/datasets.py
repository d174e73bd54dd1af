"""The one reader of labelled datasets on disk (nnU-Net raw layout), shared by training and evaluation.

Layout (``split`` is ``Tr`` or ``Ts``)::

    ROOT/dataset.json            optional: "labels" (v2 {"name": value} or v1/MSD {"value": "name"}),
                                 optional "file_ending" (e.g. ".nii.gz")
    ROOT/images<split>/X_0000<ext>   nnU-Net (channel 0 is used; other channels are ignored with a warning)
    ROOT/images<split>/X<ext>        or equal names (reference-style per-class folders with binary labels)
    ROOT/labels<split>/X<ext>        the label map of case X

``<ext>`` is any volume format :func:`SAM3DSegmentLib.io.volumes.read_volume` reads
(:data:`~SAM3DSegmentLib.io.volumes.READ_EXTENSIONS`), matched without regard to case; files whose names
start with a dot (``.DS_Store``, macOS ``._X.nii.gz``) are not data. Every label needs its image and every
image its label: all unpaired files are reported in one :class:`DataError`.

:func:`read_case` reads one pair and checks it: the label on the image grid (or on a crop of it, which is
placed onto the image grid), integer values in 0..65535.
What the label values mean (one target per class, or "any value > 0") is the caller's choice.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..core.geometry import Volume
from ..io.volumes import READ_EXTENSIONS, file_extension

__all__ = ["DataError", "CaseFiles", "Dataset", "read_nnunet_dataset", "read_dataset_json", "label_names",
           "split_extension", "read_case"]

_CHANNEL = re.compile(r"(.+)_(\d{4})")


class DataError(ValueError):
    """A dataset problem; the message names the file or case and the fix."""


@dataclass
class CaseFiles:
    """The files of one case: ``name`` is the label file's name without its extension."""

    name: str
    image_path: str
    label_path: str


@dataclass
class Dataset:
    root: str
    split: str
    #: Cases sorted by name.
    cases: List[CaseFiles]
    #: ``{label value: name}`` from dataset.json (background dropped); None when there is no dataset.json
    #: or it has no "labels".
    labels: Optional[Dict[int, str]]
    #: Whether ``root`` holds a dataset.json.
    has_json: bool


def split_extension(name: str) -> Tuple[str, str]:
    """``(stem, ext)`` of a volume file name (``ext`` as spelled in the name), ``(name, "")`` if it is no
    volume format that can be read."""
    ext = file_extension(name)
    if ext not in READ_EXTENSIONS:
        return name, ""
    return name[: len(name) - len(ext)], name[len(name) - len(ext):]


def read_dataset_json(root: str) -> Optional[dict]:
    """``root/dataset.json`` as a dict; None when there is none."""
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read as JSON ({err}); fix or regenerate dataset.json") from err
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object (with \"labels\"); fix or regenerate dataset.json")
    return meta


def _integer(value: Any) -> Optional[int]:
    """``value`` as an integer label value (int, integral float or digit string); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def label_names(meta: Optional[dict], where: str = "dataset.json") -> Optional[Dict[int, str]]:
    """``{label value: name}`` (background dropped) from an nnU-Net v2 (``"name": value``) or v1/MSD
    (``"value": "name"``) ``labels`` object; None when ``meta`` has no ``labels``."""
    if not meta or "labels" not in meta:
        return None
    labels = meta["labels"]
    example = "e.g. \"labels\": {\"background\": 0, \"liver\": 1}"
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: 'labels' must be a non-empty object mapping names to values (nnU-Net v2, "
                        f"{example}) or values to names (v1/MSD)")
    out: Dict[int, str] = {}
    seen: Dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DataError(f"{where}: label {key!r} is region-based ({value}); region-based nnU-Net labels are "
                            "not supported: list each label value separately")
        if _integer(key) is not None and _integer(value) is None:
            v, name = _integer(key), str(value)  # v1 / MSD: {"1": "liver"}
        else:
            v, name = _integer(value), str(key)  # v2: {"liver": 1}
            if v is None:
                raise DataError(f"{where}: label {key!r}: {value!r} is not an integer label value ({example})")
        if not 0 <= v <= 65535:
            raise DataError(f"{where}: label {name!r} has the value {v}; label values are 0..65535")
        if v in seen:
            raise DataError(f"{where}: labels {seen[v]!r} and {name!r} both have the value {v}; give each "
                            "class its own value")
        seen[v] = name
        if v != 0:
            out[v] = name
    return out


def _files(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))


def read_nnunet_dataset(root: str, split: str = "Tr", source: str = "dataset", hint: str = "") -> Dataset:
    """Pair ``labels<split>/`` with ``images<split>/`` under ``root`` (see the module docstring).

    ``source`` names where the folder came from in messages (``--data``, ``data.roots``); ``hint`` is
    appended to the message for a folder that does not exist. Raises :class:`DataError`.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    layout = f"images{split}/ + labels{split}/ (+ dataset.json)"
    if not os.path.isdir(root):
        raise DataError(f"{source}: dataset folder {root} does not exist; give an nnU-Net raw dataset folder "
                        f"({layout}){hint}")
    img_dir, lab_dir = os.path.join(root, f"images{split}"), os.path.join(root, f"labels{split}")
    for d in (img_dir, lab_dir):
        if not os.path.isdir(d):
            raise DataError(f"{root} has no {os.path.basename(d)}/ folder; expected the nnU-Net raw layout {layout}")
    meta = read_dataset_json(root)
    names = label_names(meta, os.path.join(root, "dataset.json"))
    ending = (meta or {}).get("file_ending")
    if ending is not None and (not isinstance(ending, str) or file_extension("x" + ending) not in READ_EXTENSIONS):
        raise DataError(f"{os.path.join(root, 'dataset.json')}: file_ending {ending!r} is not a volume format "
                        f"that can be read ({', '.join(READ_EXTENSIONS)})")

    def usable(name: str) -> Tuple[str, str]:
        stem, ext = split_extension(name)
        if ext and ending and ext.lower() != ending.lower():
            return name, ""
        return stem, ext

    images: Dict[Tuple[str, str], str] = {}
    for n in _files(img_dir):
        stem, ext = usable(n)
        if ext:
            images[(stem, ext.lower())] = n
    cases: List[CaseFiles] = []
    problems: List[str] = []
    paired = set()
    for n in _files(lab_dir):
        stem, ext = usable(n)
        if not ext:
            continue
        image = images.get((f"{stem}_0000", ext.lower())) or images.get((stem, ext.lower()))
        if any(c.name == stem for c in cases):
            problems.append(f"case {stem} has two label files in {lab_dir}; keep one")
            continue
        if image is None:
            problems.append(f"label {os.path.join(lab_dir, n)} has no image: expected "
                            f"{os.path.join(img_dir, stem + '_0000' + ext)} (nnU-Net) or {os.path.join(img_dir, n)}")
            continue
        paired.add(image)
        cases.append(CaseFiles(stem, os.path.join(img_dir, image), os.path.join(lab_dir, n)))
    case_images = {c.name: os.path.basename(c.image_path) for c in cases}
    other_channels = []
    for (stem, ext), n in sorted(images.items()):
        if n in paired:
            continue
        m = _CHANNEL.fullmatch(stem)
        if m and m.group(2) != "0000":  # channel 1+ of case m.group(1)
            if m.group(1) in case_images:
                other_channels.append(n)
            if m.group(1) in case_images or (f"{m.group(1)}_0000", ext) in images:
                continue  # used through its channel 0, or reported through it
        base = m.group(1) if m and m.group(2) == "0000" else stem
        if base in case_images:
            problems.append(f"case {base} has two images in {img_dir}, {case_images[base]} and {n}; keep one")
        else:
            problems.append(f"case {base}: label file {os.path.join(lab_dir, base + n[len(stem):])} is missing")
    if problems:
        raise DataError(f"dataset {root}: " + "; ".join(problems) + ". Add the missing files or remove the "
                        "unpaired ones")
    if not cases:
        want = f"file_ending {ending}" if ending else ", ".join(READ_EXTENSIONS)
        raise DataError(f"{lab_dir} holds no label files ({want}); nothing to read")
    if other_channels:
        warnings.warn(f"{root}: only channel _0000 is used (CT); ignoring {len(other_channels)} other channel "
                      "file(s)")
    return Dataset(root, split, sorted(cases, key=lambda c: c.name), names, meta is not None)


def _is_subgrid(label: Volume, image: Volume, tol: float = 1e-3) -> bool:
    """Whether ``label``'s grid is a crop or padding of ``image``'s: the same voxel axes and spacing, its first
    voxel on a voxel of ``image`` (what Slicer writes for a segmentation cropped to its extent)."""
    if not np.allclose(label.ijk_to_ras[:3, :3], image.ijk_to_ras[:3, :3], atol=tol):
        return False
    offset = image.ras_to_ijk_points(np.asarray(label.origin, dtype=np.float64).reshape(1, 3))[0]
    return bool(np.all(np.abs(offset - np.round(offset)) < tol))


def read_case(case: CaseFiles) -> Tuple[Volume, Volume]:
    """``(image, label)`` of one case; the label holds integers 0..65535 (uint8 or uint16) on the image grid.

    A label on a crop or padding of the image grid (:func:`_is_subgrid`) is placed onto the image grid (image
    voxels outside the label are 0; a labelled voxel outside the image is an error); any other grid is refused.
    """
    from ..io.volumes import read_volume

    vols = []
    for what, path in (("image", case.image_path), ("label", case.label_path)):
        try:
            vols.append(read_volume(path))
        except (ValueError, OSError, RuntimeError) as err:
            raise DataError(f"case {case.name}: cannot read the {what} {path}: {err}. Replace or remove the file"
                            ) from err
    image, label = vols
    if not image.same_grid(label, atol=1e-3):
        if not _is_subgrid(label, image):
            def grid(v: Volume) -> str:
                return (f"{v.shape_ijk} voxels, spacing {np.round(v.spacing, 3).tolist()}, origin "
                        f"{np.round(v.origin, 2).tolist()}")
            raise DataError(f"case {case.name}: the label {case.label_path} is not on the image grid (image "
                            f"{grid(image)}; label {grid(label)}). Resample the label onto its image (nearest "
                            "neighbour) or fix the file pairing")
        from ..io.volumes import resample_like

        labelled = int(np.count_nonzero(label.array))
        label = resample_like(label, image, "nearest")  # whole-voxel shift: every voxel lands on a voxel
        outside = labelled - int(np.count_nonzero(label.array))
        if outside:
            raise DataError(f"case {case.name}: the label {case.label_path} has {outside} labelled voxel(s) "
                            "outside its image; fix the file pairing or crop the label to the image")
    lab = np.asarray(label.array)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise DataError(f"case {case.name}: the label {case.label_path} has non-integer values; labels "
                            "must be integer class maps")
    elif lab.dtype.kind not in "iub":
        raise DataError(f"case {case.name}: the label {case.label_path} has {lab.dtype} voxels; labels must be "
                        "integer class maps")
    lo, hi = (float(lab.min()), float(lab.max())) if lab.size else (0.0, 0.0)
    if lo < 0 or hi > 65535:
        raise DataError(f"case {case.name}: the label {case.label_path} holds values {lo:g}..{hi:g}; label values "
                        "must be in 0..65535")
    return image, label.with_array(lab.astype(np.uint8 if hi <= 255 else np.uint16, copy=False))
