"""Where the automatic mask generator prompts the model: the search area and the candidate points in it.

* :class:`RoiBox` — a box in RAS (centre, size along its own axes, optional rotation), as a Slicer ROI markup.
* :class:`SearchArea` — the part of the volume searched: inside the volume, inside the body (optional) and
  inside the ROI (optional). The body is found on a coarse copy of the image (about ``step_mm`` per voxel):
  voxels above ``body_threshold_hu``, their largest 26-connected component, holes filled slice by slice
  across the axis nearest to S (so the lungs, which the trachea opens to the outside in 3D, count as body).
* :func:`grid_candidates` — a physical-space point grid with a spacing in mm, laid along the region axes
  (the volume's axes permuted/flipped to RAS order), kept where it lies in the search area.
* :func:`blob_candidates` — the local maxima of a scale-normalised Laplacian-of-Gaussian response (scipy.ndimage),
  one scale per requested blob diameter ``d`` (sigma = d / (2 sqrt 3), the scale at which a ball of diameter d
  responds most), kept where the body extends at least the blob's radius (plus half a coarse body voxel) around
  them along each axis: the skin against air is the strongest "blob" of a CT and never a nodule. The response is ``-sigma^2 * Laplacian`` of the (clipped) HU image: a bright ball of the
  matching size and contrast C gives ``sqrt(2/pi) * 3^1.5 * exp(-3/2) * C = 0.925 C``, so ``min_response``
  reads in HU of contrast. Each scale runs on a block-averaged copy whose voxels are at most ``sigma`` wide,
  in slabs along the array's first axis (bounded memory on a 512x512x300 CT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import Volume

__all__ = ["Candidate", "RoiBox", "SearchArea", "grid_candidates", "blob_candidates", "dedupe_candidates"]

#: A ball of the detector's diameter and contrast C responds with this times C at its centre.
BALL_RESPONSE = float(np.sqrt(2.0 / np.pi) * 3.0 ** 1.5 * np.exp(-1.5))


@dataclass(frozen=True)
class Candidate:
    """One prompt: a RAS point, how it was found (``"grid"`` or ``"blob"``) and, for blobs, the detector's
    diameter (mm) and its response (HU of contrast)."""

    ras: Tuple[float, float, float]
    kind: str = "grid"
    diameter_mm: Optional[float] = None
    response: Optional[float] = None

    def to_dict(self) -> dict:
        return {"ras": [round(float(v), 3) for v in self.ras], "kind": self.kind,
                "diameter_mm": self.diameter_mm,
                "response": None if self.response is None else round(float(self.response), 2)}


@dataclass(frozen=True)
class RoiBox:
    """A box in RAS mm: ``centre``, ``size`` (full edge lengths along its axes) and ``axes`` (3x3, the box
    axes as unit columns in RAS; None = aligned with R, A, S). A Slicer ROI markup is such a box."""

    centre: Tuple[float, float, float]
    size: Tuple[float, float, float]
    axes: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        c = np.asarray(self.centre, dtype=np.float64).reshape(-1)
        s = np.asarray(self.size, dtype=np.float64).reshape(-1)
        if c.size != 3 or s.size != 3 or not np.all(np.isfinite(c)) or not np.all(np.isfinite(s)):
            raise ValueError(f"an ROI needs a centre and a size of three finite numbers each, got "
                             f"centre={self.centre}, size={self.size}")
        if np.any(s <= 0):
            raise ValueError(f"ROI size must be positive along every axis (mm), got {s.tolist()}")
        if self.axes is not None:
            a = np.asarray(self.axes, dtype=np.float64)
            if a.shape != (3, 3) or not np.allclose(a.T @ a, np.eye(3), atol=1e-4):
                raise ValueError("ROI axes must be a 3x3 rotation (orthonormal columns)")

    @classmethod
    def from_bounds(cls, lo: Sequence[float], hi: Sequence[float]) -> "RoiBox":
        """The RAS-aligned box between two corners (mm)."""
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        return cls(tuple(((lo + hi) / 2).tolist()), tuple(np.abs(hi - lo).tolist()))

    @property
    def rotation(self) -> np.ndarray:
        return np.eye(3) if self.axes is None else np.asarray(self.axes, dtype=np.float64)

    def contains(self, ras: np.ndarray) -> np.ndarray:
        """True for the (N, 3) RAS points inside the box (faces inclusive)."""
        local = (np.asarray(ras, dtype=np.float64).reshape(-1, 3) - np.asarray(self.centre)) @ self.rotation
        return np.all(np.abs(local) <= np.asarray(self.size) / 2.0 + 1e-9, axis=1)

    def corners(self) -> np.ndarray:
        h = np.asarray(self.size) / 2.0
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
        return np.asarray(self.centre) + (signs * h) @ self.rotation.T

    def to_dict(self) -> dict:
        return {"centre": [float(v) for v in self.centre], "size": [float(v) for v in self.size],
                "axes": None if self.axes is None else np.asarray(self.axes).tolist()}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


class SearchArea:
    """Inside the volume, the body (``body_threshold_hu``; None: no body restriction) and the ROI (optional).

    :meth:`contains` answers for RAS points; :meth:`bounds_ras` is the area's bounding box (the body's on the
    coarse grid, intersected with the ROI's)."""

    def __init__(self, volume: Volume, roi: Optional[RoiBox] = None, body_threshold_hu: Optional[float] = -500.0,
                 step_mm: float = 4.0):
        from scipy import ndimage

        self.volume = volume
        self.roi = roi
        self.note = ""
        sp = volume.spacing[::-1]                              # mm along the array axes (k, j, i)
        self.steps = np.maximum(1, np.floor(float(step_mm) / sp)).astype(int)
        if body_threshold_hu is None:
            self.body = None
        else:
            coarse = volume.array[::self.steps[0], ::self.steps[1], ::self.steps[2]] > float(body_threshold_hu)
            if not coarse.any():
                self.body = None
                self.note = (f"no voxel above {body_threshold_hu} HU: the body could not be found, the whole "
                             "volume is searched (is this a CT in HU?)")
            else:
                body = _largest_component(coarse)
                s_axis = 2 - int(np.argmax(np.abs(volume.directions[2])))   # array axis nearest to S
                body = np.moveaxis(body, s_axis, 0)
                for n in range(body.shape[0]):
                    body[n] = ndimage.binary_fill_holes(body[n])
                self.body = np.ascontiguousarray(np.moveaxis(body, 0, s_axis))
        if roi is not None:
            lo, hi = volume.bounds_ras()
            if not _boxes_overlap(roi, lo, hi):
                raise ValueError(f"the ROI (centre {np.round(roi.centre, 1).tolist()} mm, size "
                                 f"{np.round(roi.size, 1).tolist()} mm) does not overlap the volume "
                                 f"(RAS {np.round(lo, 1).tolist()} .. {np.round(hi, 1).tolist()} mm); move the ROI "
                                 "onto the image")

    def contains(self, ras: np.ndarray) -> np.ndarray:
        ras = np.asarray(ras, dtype=np.float64).reshape(-1, 3)
        ok = self.in_body(ras)
        if self.roi is not None and ok.any():
            ok &= self.roi.contains(ras)
        return ok

    def in_body(self, ras: np.ndarray) -> np.ndarray:
        """True for the (N, 3) RAS points inside the volume and the body (the ROI not considered)."""
        ras = np.asarray(ras, dtype=np.float64).reshape(-1, 3)
        ijk = self.volume.ras_to_ijk_points(ras)
        ok = self.volume.contains_ijk(ijk)
        if self.body is not None and ok.any():
            kji = np.floor(ijk[:, ::-1] + 0.5).astype(int)
            c = np.clip(np.floor(kji / self.steps + 0.5).astype(int), 0, np.asarray(self.body.shape) - 1)
            ok &= self.body[c[:, 0], c[:, 1], c[:, 2]]
        return ok

    def bounds_ras(self) -> Tuple[np.ndarray, np.ndarray]:
        """RAS bounding box of the area (body box on the coarse grid, clipped to the ROI's box)."""
        v = self.volume
        if self.body is None:
            lo, hi = v.bounds_ras()
        else:
            nz = [np.flatnonzero(self.body.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
            kji_lo = np.array([n[0] for n in nz]) * self.steps - self.steps
            kji_hi = np.array([n[-1] for n in nz]) * self.steps + self.steps
            corners = np.array([[i, j, k] for i in (kji_lo[2], kji_hi[2]) for j in (kji_lo[1], kji_hi[1])
                                for k in (kji_lo[0], kji_hi[0])], dtype=np.float64)
            ras = v.ijk_to_ras_points(corners)
            lo, hi = ras.min(axis=0), ras.max(axis=0)
        if self.roi is not None:
            c = self.roi.corners()
            lo, hi = np.maximum(lo, c.min(axis=0)), np.minimum(hi, c.max(axis=0))
        return lo, hi


def _boxes_overlap(roi: RoiBox, lo: np.ndarray, hi: np.ndarray) -> bool:
    c = roi.corners()
    return bool(np.all(c.max(axis=0) >= lo) and np.all(c.min(axis=0) <= hi))


def grid_candidates(area: SearchArea, spacing_mm: float, axes: np.ndarray) -> List[Candidate]:
    """Points every ``spacing_mm`` along the unit columns of ``axes`` (RAS), centred on the area's bounding
    box, that lie in the area."""
    if not spacing_mm > 0:
        raise ValueError(f"grid spacing must be a positive number of mm, got {spacing_mm}")
    lo, hi = area.bounds_ras()
    if np.any(hi < lo):
        return []
    u = np.asarray(axes, dtype=np.float64)
    centre = (lo + hi) / 2.0
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    q = (corners - centre) @ u                                  # extent along the grid axes
    half = np.abs(q).max(axis=0)
    ticks = [np.arange(-np.floor(h / spacing_mm), np.floor(h / spacing_mm) + 1) * spacing_mm for h in half]
    g = np.stack(np.meshgrid(*ticks, indexing="ij"), axis=-1).reshape(-1, 3)
    ras = centre + g @ u.T
    keep = area.contains(ras)
    return [Candidate(tuple(float(v) for v in p), "grid") for p in ras[keep]]


def _block_mean(arr: np.ndarray, f: Sequence[int]) -> np.ndarray:
    """Mean over blocks of ``f`` voxels per axis (the array trimmed to whole blocks)."""
    f = [int(v) for v in f]
    if f == [1, 1, 1]:
        return arr
    n = [(s // b) * b for s, b in zip(arr.shape, f)]
    a = arr[:n[0], :n[1], :n[2]]
    return a.reshape(n[0] // f[0], f[0], n[1] // f[1], f[1], n[2] // f[2], f[2]).mean(axis=(1, 3, 5),
                                                                                        dtype=np.float32)


def _log_response(work: np.ndarray, sigma_vox: np.ndarray, voxel_mm: np.ndarray, sigma_mm: float) -> np.ndarray:
    """``-sigma^2 * Laplacian`` (physical units) of the Gaussian-smoothed ``work``."""
    from scipy import ndimage

    out = np.zeros(work.shape, dtype=np.float32)
    for axis in range(3):
        order = [0, 0, 0]
        order[axis] = 2
        d2 = ndimage.gaussian_filter(work, sigma_vox, order=order, mode="nearest", truncate=3.0)
        out -= d2 * np.float32(sigma_mm ** 2 / voxel_mm[axis] ** 2)
    return out


def blob_candidates(volume: Volume, area: SearchArea, diameters_mm: Sequence[float], min_response: float = 150.0,
                    max_per_diameter: int = 300, clip_hu: Tuple[float, float] = (-1000.0, 400.0),
                    slab_voxels: int = 48) -> List[Candidate]:
    """Bright blobs of the given diameters (mm) in the search area, strongest first per diameter (at most
    ``max_per_diameter`` each). See the module docstring for the response and its units."""
    from scipy import ndimage

    out: List[Candidate] = []
    sp = volume.spacing[::-1]                                   # (k, j, i) mm
    for d in sorted(float(v) for v in diameters_mm):
        if not d > 0:
            raise ValueError(f"blob diameters must be positive (mm), got {d}")
        sigma_mm = d / (2.0 * np.sqrt(3.0))
        f = np.maximum(1, np.floor(sigma_mm / sp)).astype(int)   # work voxels at most sigma wide
        vox = sp * f
        sig = sigma_mm / vox
        radius = np.maximum(1, np.round(0.5 * d / 2.0 / vox)).astype(int)   # local-maximum neighbourhood
        margin = int(np.ceil(3.0 * sig[0])) + int(radius[0]) + 1
        n0 = volume.array.shape[0] // f[0]
        pts, vals = [], []
        step = max(1, int(slab_voxels))
        for z0 in range(0, n0, step):
            z1 = min(n0, z0 + step)
            a0, a1 = max(0, z0 - margin), min(n0, z1 + margin)
            slab = volume.array[a0 * f[0]:a1 * f[0]].astype(np.float32)
            np.clip(slab, clip_hu[0], clip_hu[1], out=slab)
            work = _block_mean(slab, f)
            del slab
            resp = _log_response(work, sig, vox, sigma_mm)
            del work
            peak = ndimage.maximum_filter(resp, size=tuple(2 * radius + 1), mode="nearest")
            hit = (resp >= peak) & (resp > float(min_response) * BALL_RESPONSE)
            hit[: z0 - a0] = False
            hit[z0 - a0 + (z1 - z0):] = False
            idx = np.argwhere(hit)
            if idx.size:
                vals.append(resp[hit])
                idx = idx.astype(np.float64)
                idx[:, 0] += a0
                pts.append(idx * f + (f - 1) / 2.0)               # block centre in original (k, j, i)
        if not pts:
            continue
        kji = np.concatenate(pts)
        v = np.concatenate(vals) / BALL_RESPONSE
        ras = volume.ijk_to_ras_points(kji[:, ::-1])
        keep = area.contains(ras)
        reach = 0.5 * d + 0.5 * float((area.steps * sp).max())      # the radius + half a coarse body voxel
        for off in np.vstack([np.eye(3), -np.eye(3)]) * reach:   # the body surface (skin against air) is no blob
            keep &= area.in_body(ras + off)
        ras, v = ras[keep], v[keep]
        order = np.argsort(-v, kind="stable")[:int(max_per_diameter)]
        out.extend(Candidate(tuple(float(x) for x in ras[n]), "blob", d, float(v[n])) for n in order)
    return out


def dedupe_candidates(cands: Sequence[Candidate], min_distance_mm: float) -> List[Candidate]:
    """Drop candidates closer than ``min_distance_mm`` (or half the smaller blob diameter, if larger) to an
    earlier kept one; the order given is the priority."""
    from scipy.spatial import cKDTree

    kept: List[Candidate] = []
    if not cands:
        return kept
    pts = np.asarray([c.ras for c in cands], dtype=np.float64)
    tree = cKDTree(pts)
    reach = max([min_distance_mm] + [0.5 * c.diameter_mm for c in cands if c.diameter_mm])
    taken = np.zeros(len(cands), dtype=bool)
    dropped = np.zeros(len(cands), dtype=bool)
    for n, c in enumerate(cands):
        if dropped[n]:
            continue
        taken[n] = True
        kept.append(c)
        for m in tree.query_ball_point(pts[n], reach):
            if m == n or taken[m] or dropped[m]:
                continue
            o = cands[m]
            lim = max(min_distance_mm, 0.5 * min(c.diameter_mm or 0.0, o.diameter_mm or 0.0))
            if np.linalg.norm(pts[m] - pts[n]) < lim:
                dropped[m] = True
    return kept
