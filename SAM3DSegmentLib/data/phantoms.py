"""Synthetic CT phantoms as :class:`~SAM3DSegmentLib.core.geometry.Volume` objects (tests, benchmarks, training).

Conventions (as everywhere in the library):

* ``Volume.array`` is ``[k, j, i]``; ``shape_ijk`` arguments are ``(n_i, n_j, n_k)`` — the reverse.
* Geometry is given as ``spacing`` (mm along i, j, k), ``directions`` (3x3, the unit i, j, k axis
  directions in RAS as COLUMNS) and ``origin`` (RAS mm of voxel (0, 0, 0)); see
  :func:`SAM3DSegmentLib.core.geometry.make_ijk_to_ras`.
* Objects are defined in physical space (RAS mm): a voxel belongs to an object when its CENTRE lies
  inside it. So the same physical phantom can be sampled on any grid (oblique, flipped, anisotropic)
  and the masks agree in physical space.
* Images are HU (int16 by default); masks are uint8 {0, 1} on the image grid.

Everything is vectorised: each object is evaluated only inside its own ijk bounding box, with the
RAS coordinates built separably (``x = x_i[i] + x_j[j] + x_k[k]``), so a 512x512x300 body phantom takes
a few seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import Volume, make_ijk_to_ras

__all__ = [
    "Ellipsoid", "oblique_rotation", "make_volume_grid", "sphere_phantom", "ellipsoid_mask",
    "ct_body_phantom", "flip_axes", "lps_flipped", "synthetic_case",
]


# ----------------------------------------------------------------------------------- geometry
def oblique_rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles (degrees) about the R, A, S axes.

    Use it as ``directions`` for an oblique volume (its columns are the rotated i, j, k axes).
    """
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64).reshape(3))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_volume_grid(shape_ijk: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                     directions: Optional[np.ndarray] = None,
                     origin: Optional[Sequence[float]] = None,
                     centre_ras: Optional[Sequence[float]] = None) -> np.ndarray:
    """ijk->RAS for a grid; give either ``origin`` (voxel (0,0,0)) or ``centre_ras`` (grid centre).

    With neither, the grid is centred on RAS (0, 0, 0).
    """
    shape = np.asarray(shape_ijk, dtype=np.float64).reshape(3)
    m = make_ijk_to_ras(spacing, directions, (0.0, 0.0, 0.0))
    if origin is not None:
        m[:3, 3] = np.asarray(origin, dtype=np.float64).reshape(3)
    else:
        c = np.zeros(3) if centre_ras is None else np.asarray(centre_ras, dtype=np.float64).reshape(3)
        m[:3, 3] = c - m[:3, :3] @ ((shape - 1.0) / 2.0)
    return m


@dataclass
class Ellipsoid:
    """A solid ellipsoid in RAS: ``centre`` (mm), ``semi_axes`` (mm, along the columns of ``rotation``)."""

    centre: Sequence[float]
    semi_axes: Sequence[float]
    rotation: Optional[np.ndarray] = None  # 3x3, columns = the ellipsoid's axes in RAS

    def matrix(self) -> np.ndarray:
        """``Q`` with ``|Q (x - c)|^2 <= 1`` inside."""
        rot = np.eye(3) if self.rotation is None else np.asarray(self.rotation, dtype=np.float64)
        return (rot / np.asarray(self.semi_axes, dtype=np.float64)[None, :]).T

    def ras_half_extent(self) -> np.ndarray:
        """Half size of the axis-aligned RAS bounding box."""
        rot = np.eye(3) if self.rotation is None else np.asarray(self.rotation, dtype=np.float64)
        return np.sqrt(((rot * np.asarray(self.semi_axes, dtype=np.float64)[None, :]) ** 2).sum(axis=1))


def _ijk_box(ijk_to_ras: np.ndarray, shape_kji: Tuple[int, int, int], lo_ras: np.ndarray,
             hi_ras: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
    """(k, j, i) slices of the voxels whose centres may lie in the RAS box [lo, hi]; None if empty."""
    corners = np.array([[x, y, z] for x in (lo_ras[0], hi_ras[0]) for y in (lo_ras[1], hi_ras[1])
                        for z in (lo_ras[2], hi_ras[2])])
    ijk = (corners - ijk_to_ras[:3, 3]) @ np.linalg.inv(ijk_to_ras[:3, :3]).T
    lo = np.maximum(np.floor(ijk.min(axis=0)).astype(int) - 1, 0)
    n_ijk = np.array(shape_kji[::-1])
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 2, n_ijk)
    if np.any(hi <= lo):
        return None
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _quadratic_inside(ijk_to_ras: np.ndarray, box: Tuple[slice, slice, slice], q: np.ndarray,
                      centre: np.ndarray, dims: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """Boolean ``[k, j, i]`` array over ``box``: ``sum_r (Q (x - c))_r^2 <= 1`` at voxel centres.

    ``dims`` restricts the sum to some rows of ``Q`` (e.g. an infinite cylinder uses two).
    Built separably: row r of ``Q (x - c)`` is ``a_i[i] + a_j[j] + a_k[k] + b``.
    """
    ks, js, is_ = box
    i = np.arange(is_.start, is_.stop, dtype=np.float32)
    j = np.arange(js.start, js.stop, dtype=np.float32)
    k = np.arange(ks.start, ks.stop, dtype=np.float32)
    m = q @ ijk_to_ras[:3, :3]  # rows: ellipsoid axes; columns: i, j, k
    b = q @ (ijk_to_ras[:3, 3] - centre)
    acc = None
    for r in dims:
        u = (np.float32(m[r, 2]) * k[:, None, None] + np.float32(m[r, 1]) * j[None, :, None]
             + (np.float32(m[r, 0]) * i + np.float32(b[r]))[None, None, :])
        u *= u
        if acc is None:
            acc = u
        else:
            acc += u
    return acc <= 1.0


def ellipsoid_mask(ijk_to_ras: np.ndarray, shape_kji: Tuple[int, int, int], ellipsoid: Ellipsoid,
                   out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 ``[k, j, i]`` mask of the voxels whose centres lie in ``ellipsoid`` (or OR it into ``out``)."""
    if out is None:
        out = np.zeros(shape_kji, dtype=np.uint8)
    c = np.asarray(ellipsoid.centre, dtype=np.float64)
    h = ellipsoid.ras_half_extent()
    box = _ijk_box(ijk_to_ras, shape_kji, c - h, c + h)
    if box is not None:
        inside = _quadratic_inside(ijk_to_ras, box, ellipsoid.matrix(), c)
        out[box] |= inside.astype(np.uint8)
    return out


def _fov_ras(ijk_to_ras: np.ndarray, shape_ijk: Sequence[int]) -> np.ndarray:
    """Size (mm) of the axis-aligned RAS box around the voxel corners."""
    n = np.asarray(shape_ijk, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5)
                        for c in (-0.5, n[2] - 0.5)])
    ras = corners @ ijk_to_ras[:3, :3].T
    return ras.max(axis=0) - ras.min(axis=0)


def _noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(sigma)


def _to_dtype(image: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(image), info.min, info.max).astype(dtype)
    return image.astype(dtype)


# ----------------------------------------------------------------------------------- phantoms
def sphere_phantom(shape_ijk: Sequence[int] = (64, 64, 48), spacing: Sequence[float] = (1.0, 1.0, 1.0),
                   directions: Optional[np.ndarray] = None, origin: Optional[Sequence[float]] = None,
                   centre_ras: Optional[Sequence[float]] = None, radius_mm: float = 10.0,
                   hu_inside: float = 60.0, hu_background: float = -100.0, noise: float = 0.0,
                   seed: int = 0, dtype=np.int16) -> Tuple[Volume, Volume]:
    """One sphere in a uniform background: returns ``(image, mask)`` on the same grid.

    Without ``origin`` the grid is centred on RAS (0, 0, 0); without ``centre_ras`` the sphere sits at
    the grid centre. ``noise`` is the standard deviation (HU) of added Gaussian noise.
    """
    m = make_volume_grid(shape_ijk, spacing, directions, origin)
    shape_kji = tuple(int(v) for v in np.asarray(shape_ijk)[::-1])
    if centre_ras is None:
        centre_ras = m[:3, :3] @ ((np.asarray(shape_ijk, dtype=np.float64) - 1) / 2) + m[:3, 3]
    sphere = Ellipsoid(np.asarray(centre_ras, dtype=np.float64), (radius_mm,) * 3)
    mask = ellipsoid_mask(m, shape_kji, sphere)
    image = np.where(mask.astype(bool), np.float32(hu_inside), np.float32(hu_background))
    if noise > 0:
        image += _noise(np.random.default_rng(seed), shape_kji, noise)
    meta = {"source": "phantom:sphere", "centre_ras": np.asarray(centre_ras, float).tolist(),
            "radius_mm": float(radius_mm)}
    return Volume(_to_dtype(image, dtype), m, dict(meta)), Volume(mask, m.copy(), dict(meta))


def _paint(image: np.ndarray, m: np.ndarray, shape_kji, shape: Ellipsoid, hu: float,
           masks: Dict[str, np.ndarray], name: Optional[str], exclusive: bool = True,
           keep: Sequence[str] = ("body",)) -> None:
    """Paint ``shape`` with ``hu`` into ``image`` and record its mask under ``name`` (if given)."""
    c = np.asarray(shape.centre, dtype=np.float64)
    h = shape.ras_half_extent()
    box = _ijk_box(m, shape_kji, c - h, c + h)
    if box is None:
        if name is not None:
            masks[name] = np.zeros(shape_kji, dtype=np.uint8)
        return
    inside = _quadratic_inside(m, box, shape.matrix(), c)
    image[box][inside] = np.float32(hu)
    if exclusive:  # the new object hides what it covers: earlier masks lose those voxels
        for other, arr in masks.items():
            if other not in keep:
                arr[box][inside] = 0
    if name is not None:
        full = np.zeros(shape_kji, dtype=np.uint8)
        full[box] = inside
        masks[name] = full


def ct_body_phantom(shape_ijk: Sequence[int] = (512, 512, 300),
                    spacing: Sequence[float] = (0.8, 0.8, 1.5),
                    directions: Optional[np.ndarray] = None, origin: Optional[Sequence[float]] = None,
                    large_object: bool = True, noise: float = 10.0, seed: int = 0,
                    dtype=np.int16) -> Tuple[Volume, Dict[str, Volume]]:
    """A CT-like torso for benchmarks: returns ``(image, {name: mask})``.

    Air (-1000 HU) around a body cylinder (elliptic cross-section in R-A, 0 HU fat/water mix at ~ -20 HU)
    that runs along S, with two lungs (-850 HU), a spine column (700 HU), a right kidney (30 HU), a left
    kidney (35 HU), a bright lesion sphere (120 HU), a low-contrast sphere (60 HU) and, when
    ``large_object``, a liver-like ellipsoid (55 HU) larger than the model's 192 mm crop in R and S (for
    region-extension tests). Masks are what is visible: a later object removes its voxels from the
    earlier ones (except ``body``, which holds every object). Sizes scale with the field of view so small grids still hold every object.
    The grid is centred on RAS (0, 0, 0) unless ``origin`` is given.
    """
    m = make_volume_grid(shape_ijk, spacing, directions, origin)
    shape_kji = tuple(int(v) for v in np.asarray(shape_ijk)[::-1])
    centre = m[:3, :3] @ ((np.asarray(shape_ijk, dtype=np.float64) - 1) / 2) + m[:3, 3]
    ext = np.maximum(_fov_ras(m, shape_ijk), 1.0)  # extent of the grid along R, A, S
    rx, ry, rz = 0.42 * ext[0], 0.32 * ext[1], 0.5 * ext[2]
    image = np.full(shape_kji, -1000.0, dtype=np.float32)
    masks: Dict[str, np.ndarray] = {}
    c = centre

    def at(dx, dy, dz):
        return c + np.array([dx, dy, dz], dtype=np.float64)

    # Body: elliptic cylinder along S (two rows of the quadratic form only).
    body = Ellipsoid(c, (rx, ry, 1e9))
    box = (slice(0, shape_kji[0]), slice(0, shape_kji[1]), slice(0, shape_kji[2]))
    inside = _quadratic_inside(m, box, body.matrix(), c, dims=(0, 1))
    image[inside] = -20.0
    masks["body"] = inside.astype(np.uint8)
    del inside
    _paint(image, m, shape_kji, Ellipsoid(at(0.45 * rx, 0.05 * ry, 0.15 * rz),
                                          (0.35 * rx, 0.6 * ry, 0.55 * rz)), -850.0, masks, "right_lung")
    _paint(image, m, shape_kji, Ellipsoid(at(-0.45 * rx, 0.05 * ry, 0.15 * rz),
                                          (0.33 * rx, 0.6 * ry, 0.55 * rz)), -850.0, masks, "left_lung")
    if large_object:
        # Under the right lung dome (it replaces the lung's base); > 192 mm in R and S at full size
        # (rx ~ 172 mm, rz ~ 225 mm); clear of the kidneys.
        _paint(image, m, shape_kji, Ellipsoid(at(0.3 * rx, 0.1 * ry, -0.3 * rz), (0.62 * rx, 0.7 * ry, 0.45 * rz),
                                              oblique_rotation((0, 0, 10))), 55.0, masks, "liver")
    _paint(image, m, shape_kji, Ellipsoid(at(0.0, -0.7 * ry, 0.0), (0.07 * rx, 0.12 * ry, 0.98 * rz)),
           700.0, masks, "spine")
    _paint(image, m, shape_kji, Ellipsoid(at(0.45 * rx, -0.45 * ry, -0.75 * rz), (0.1 * rx, 0.16 * ry, 0.12 * rz),
                                          oblique_rotation((10, 0, 20))), 30.0, masks, "right_kidney")
    _paint(image, m, shape_kji, Ellipsoid(at(-0.45 * rx, -0.45 * ry, -0.7 * rz), (0.1 * rx, 0.16 * ry, 0.12 * rz),
                                          oblique_rotation((-10, 0, -20))), 35.0, masks, "left_kidney")
    r_small = 0.06 * min(rx, ry, rz)
    _paint(image, m, shape_kji, Ellipsoid(at(-0.4 * rx, 0.2 * ry, 0.3 * rz), (r_small,) * 3), 120.0,
           masks, "lesion")
    _paint(image, m, shape_kji, Ellipsoid(at(-0.3 * rx, 0.4 * ry, -0.5 * rz), (1.5 * r_small,) * 3), 60.0,
           masks, "low_contrast_sphere")
    if noise > 0:
        image += _noise(np.random.default_rng(seed), shape_kji, noise)
    meta = {"source": "phantom:ct_body"}
    vol = Volume(_to_dtype(image, dtype), m, dict(meta))
    return vol, {name: Volume(arr, m.copy(), {"source": "phantom:ct_body", "label": name})
                 for name, arr in masks.items()}


# ------------------------------------------------------------------------------ re-storing
def flip_axes(volume: Volume, axes: str = "ij") -> Volume:
    """The SAME physical image stored with the named index axes reversed (``"i"``, ``"j"``, ``"k"``).

    ``array`` is flipped along those axes and ``ijk_to_ras`` adjusted so that every voxel keeps its RAS
    position: ``ijk_old = F @ ijk_new`` with ``F`` reversing each flipped axis.
    """
    n = volume.shape_ijk
    f = np.eye(4)
    arr = volume.array
    for name, axis in (("i", 0), ("j", 1), ("k", 2)):
        if name in axes:
            f[axis, axis] = -1.0
            f[axis, 3] = n[axis] - 1.0
            arr = np.flip(arr, axis=2 - axis)
    return Volume(np.ascontiguousarray(arr), volume.ijk_to_ras @ f, dict(volume.meta))


def lps_flipped(volume: Volume) -> Volume:
    """The same physical image stored the way LPS files usually are: i and j reversed.

    (An RAS-stored axial volume has i -> R, j -> A; after the flip i -> L, j -> P, as in DICOM.)
    """
    return flip_axes(volume, "ij")


# ------------------------------------------------------------------------- training dataset
def synthetic_case(seed: int, shape_ijk: Optional[Sequence[int]] = None,
                   spacing: Optional[Sequence[float]] = None, oblique: bool = False,
                   n_objects: int = 3, noise: float = 15.0,
                   dtype=np.int16) -> Tuple[Volume, Dict[str, Volume]]:
    """A random labelled CT-like case: ``(image, {label_name: mask})``, reproducible from ``seed``.

    A body ellipsoid (~0 HU) in air with ``n_objects`` randomly placed, sized, rotated ellipsoids of
    different HU (labels ``object_1`` ... ``object_N``), placed apart when the body leaves room (else
    later objects overwrite earlier ones in the image and the masks are made exclusive accordingly). Without ``spacing``, it is drawn anisotropic
    (in-plane 0.6..1.2 mm, slices 1..3 mm); without ``shape_ijk``, the field of view is ~ 150-200 mm.
    ``oblique`` rotates the grid by a few degrees about each axis.
    """
    rng = np.random.default_rng(seed)
    if spacing is None:
        ip = rng.uniform(0.6, 1.2)
        spacing = (ip, ip, rng.uniform(1.0, 3.0))
    spacing = np.asarray(spacing, dtype=np.float64)
    if shape_ijk is None:
        fov = rng.uniform(150, 200, size=3)
        shape_ijk = tuple(int(v) for v in np.maximum(np.round(fov / spacing), 8))
    directions = oblique_rotation(rng.uniform(-15, 15, size=3)) if oblique else None
    m = make_volume_grid(shape_ijk, spacing, directions, centre_ras=rng.uniform(-50, 50, size=3))
    shape_kji = tuple(int(v) for v in np.asarray(shape_ijk)[::-1])
    centre = m[:3, :3] @ ((np.asarray(shape_ijk, dtype=np.float64) - 1) / 2) + m[:3, 3]
    half = 0.5 * np.asarray(shape_ijk) * spacing  # half field of view along the grid axes
    r_body = 0.9 * half
    image = np.full(shape_kji, -1000.0, dtype=np.float32)
    scratch: Dict[str, np.ndarray] = {}
    body_rot = m[:3, :3] / spacing[None, :]
    _paint(image, m, shape_kji, Ellipsoid(centre, r_body, body_rot), float(rng.uniform(-30, 10)),
           scratch, None)
    masks: Dict[str, np.ndarray] = {}
    hus = rng.permutation(np.array([-600.0, -150.0, 45.0, 80.0, 150.0, 300.0, 700.0]))
    placed = []  # (centre, bounding radius) of the objects so far
    for n in range(n_objects):
        semi = rng.uniform(0.08, 0.25, size=3) * half.min()
        semi = np.maximum(semi, 2.5 * spacing.max())
        for _ in range(30):  # prefer a place that does not overlap earlier objects
            off = rng.uniform(-1, 1, size=3) * np.maximum(0.55 * r_body - semi.max(), 0.0)
            ctr = centre + body_rot @ off
            if all(np.linalg.norm(ctr - c) >= semi.max() + r for c, r in placed):
                break
        placed.append((ctr, semi.max()))
        rot = oblique_rotation(rng.uniform(-60, 60, size=3))
        name = f"object_{n + 1}"
        _paint(image, m, shape_kji, Ellipsoid(ctr, semi, rot), float(hus[n % len(hus)]), masks, name)
    if noise > 0:
        image += _noise(rng, shape_kji, noise)
    meta = {"source": f"phantom:synthetic_case:{seed}"}
    vol = Volume(_to_dtype(image, dtype), m, dict(meta))
    return vol, {k: Volume(v, m.copy(), {**meta, "label": k}) for k, v in masks.items()}
