"""Synthetic chest CTs with known lung nodules (automatic-mask benchmarks and tests).

:class:`ChestPhantom` builds a torso on any grid (RAS, HU): air outside; an elliptic body (soft tissue 40 HU
under a 10 mm fat layer of -100 HU); two lungs (-850 HU); a heart (45 HU) that carves the lungs' medial side;
a spine (600 HU); in each lung two vessel trees (40 HU; tapered tubes, 4 generations of branching, radius 4.5 ->
1.4 mm), clipped to the lung. Nodules are then added with :meth:`ChestPhantom.case`:

* kinds: ``solid`` (30 HU) and ``part_solid`` (ground glass of -550 HU with a solid core of 20 HU and half the
  diameter); slightly elongated, randomly rotated ellipsoids of the given diameter (the largest axis);
* sites: ``free`` (in the parenchyma, clear of walls, vessels and other nodules), ``juxta_pleural`` (touching
  the chest wall: its centre 0.55 radii inside the lung surface), ``juxta_vascular`` (touching a vessel), and
  ``region_border`` (at given points, e.g. where the generator's regions meet).

A nodule's ground truth is the part of its ellipsoid inside the lungs (the visible part: the wall and the heart
hide the rest), painted over vessels. :class:`ChestCase` holds the image, the nodule label map (1..N, uint16),
the map of every structure (the model-free oracle's truth: body 1, right lung 2, left lung 3, heart 4, spine 5,
vessel trees 10.., nodules 100..) and a table of the nodules. Everything is reproducible from ``seed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import Volume
from .phantoms import Ellipsoid, _ijk_box, _quadratic_inside, make_volume_grid, oblique_rotation

__all__ = ["Nodule", "ChestCase", "ChestPhantom", "NODULE_KINDS", "NODULE_SITES"]

NODULE_KINDS = ("solid", "part_solid")
NODULE_SITES = ("free", "juxta_pleural", "juxta_vascular", "region_border")
BODY, RIGHT_LUNG, LEFT_LUNG, HEART, SPINE, VESSEL0, NODULE0 = 1, 2, 3, 4, 5, 10, 100


@dataclass
class Nodule:
    centre: Tuple[float, float, float]
    diameter_mm: float
    kind: str = "solid"
    site: str = "free"
    axes_ratio: Tuple[float, float] = (1.0, 1.0)
    rotation: Optional[np.ndarray] = None

    def ellipsoid(self, scale: float = 1.0) -> Ellipsoid:
        r = 0.5 * self.diameter_mm * scale
        return Ellipsoid(np.asarray(self.centre, dtype=np.float64),
                         (r, r * self.axes_ratio[0], r * self.axes_ratio[1]), self.rotation)


@dataclass
class ChestCase:
    image: Volume
    nodules: Volume
    structures: Volume
    table: List[dict] = field(default_factory=list)


@dataclass
class _Tube:
    p0: np.ndarray
    p1: np.ndarray
    radius: float
    label: int


class ChestPhantom:
    """A torso without nodules on a grid (see the module docstring); :meth:`case` adds nodules."""

    def __init__(self, seed: int = 0, shape_ijk: Sequence[int] = (256, 256, 200),
                 spacing: Sequence[float] = (1.2, 1.2, 1.5), noise: float = 15.0, blur_voxels: float = 0.6):
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.noise, self.blur = float(noise), float(blur_voxels)
        m = make_volume_grid(shape_ijk, spacing)
        self.ijk_to_ras = m
        self.shape_kji = tuple(int(v) for v in np.asarray(shape_ijk)[::-1])
        ext = np.asarray(shape_ijk, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
        self.c = m[:3, :3] @ ((np.asarray(shape_ijk, dtype=np.float64) - 1) / 2) + m[:3, 3]
        rx, ry, hs = 0.45 * ext[0], 0.34 * ext[1], ext[2]
        self.image = np.full(self.shape_kji, -1000.0, dtype=np.float32)
        self.labels = np.zeros(self.shape_kji, dtype=np.uint16)
        full = tuple(slice(0, n) for n in self.shape_kji)
        for sx, sy, hu in ((rx, ry, -100.0), (rx - 10.0, ry - 10.0, 40.0)):     # fat layer, then soft tissue
            inside = _quadratic_inside(m, full, Ellipsoid(self.c, (sx, sy, 1e9)).matrix(), self.c, dims=(0, 1))
            self.image[inside] = hu
            self.labels[inside] = BODY
        self.lungs = {
            RIGHT_LUNG: Ellipsoid(self.c + [0.46 * rx, 0.05 * ry, 0.05 * hs], (0.35 * rx, 0.66 * ry, 0.38 * hs)),
            LEFT_LUNG: Ellipsoid(self.c + [-0.46 * rx, 0.05 * ry, 0.05 * hs], (0.33 * rx, 0.66 * ry, 0.38 * hs)),
        }
        for lab, e in self.lungs.items():
            self._paint(e, -850.0, lab)
        self._paint(Ellipsoid(self.c + [-0.08 * rx, 0.3 * ry, -0.12 * hs], (0.26 * rx, 0.34 * ry, 0.18 * hs)), 45.0, HEART)
        self._paint(Ellipsoid(self.c + [0.0, -0.78 * ry, 0.0], (0.09 * rx, 0.12 * ry, 1e9)), 600.0, SPINE, dims=(0, 1))
        self.tubes: List[_Tube] = []
        label = VESSEL0
        for lab, e in self.lungs.items():
            hilum = np.asarray(e.centre) + [-np.sign(e.centre[0] - self.c[0]) * 0.55 * e.semi_axes[0], 0.0, 0.0]
            for _ in range(2):
                d = self.rng.normal(size=3)
                d[0] = abs(d[0]) * np.sign(e.centre[0] - self.c[0])       # grow laterally, into the lung
                self._tree(hilum, d / np.linalg.norm(d), 4.5, 0.45 * min(e.semi_axes), 4, label)
                label += 1
        for t in self.tubes:
            self._paint_tube(t)

    # ------------------------------------------------------------------------------------------ painting
    def _box_inside(self, e: Ellipsoid, dims=(0, 1, 2)):
        c = np.asarray(e.centre, dtype=np.float64)
        h = e.ras_half_extent()
        if dims == (0, 1):
            h = h.copy()
            h[2] = 1e9
        box = _ijk_box(self.ijk_to_ras, self.shape_kji, c - h, c + h)
        if box is None:
            return None, None
        return box, _quadratic_inside(self.ijk_to_ras, box, e.matrix(), c, dims=dims)

    def _paint(self, e: Ellipsoid, hu: float, label: int, dims=(0, 1, 2)) -> None:
        box, inside = self._box_inside(e, dims)
        if box is not None:
            self.image[box][inside] = hu
            self.labels[box][inside] = label

    def _lung_of(self, labels: np.ndarray) -> np.ndarray:
        return (labels == RIGHT_LUNG) | (labels == LEFT_LUNG) | (labels >= VESSEL0)

    def _tree(self, p: np.ndarray, d: np.ndarray, r: float, length: float, depth: int, label: int) -> None:
        q = p + d * length
        self.tubes.append(_Tube(np.asarray(p, float), q, r, label))
        if depth <= 1:
            return
        for _ in range(2):
            turn = oblique_rotation(self.rng.uniform(-40, 40, size=3))
            nd = turn @ d
            self._tree(q, nd / np.linalg.norm(nd), r * 0.72, length * 0.8, depth - 1, label)

    def _tube_box_dist(self, t: _Tube, pad: float):
        lo = np.minimum(t.p0, t.p1) - t.radius - pad
        hi = np.maximum(t.p0, t.p1) + t.radius + pad
        box = _ijk_box(self.ijk_to_ras, self.shape_kji, lo, hi)
        if box is None:
            return None, None
        k, j, i = (np.arange(s.start, s.stop, dtype=np.float32) for s in box)
        m = self.ijk_to_ras
        ras = [m[r, 0] * i[None, None, :] + m[r, 1] * j[None, :, None] + m[r, 2] * k[:, None, None] + m[r, 3]
               for r in range(3)]
        seg = t.p1 - t.p0
        tt = sum((ras[r] - t.p0[r]) * seg[r] for r in range(3)) / max(float(seg @ seg), 1e-9)
        tt = np.clip(tt, 0.0, 1.0)
        dist = np.sqrt(sum((ras[r] - (t.p0[r] + tt * seg[r])) ** 2 for r in range(3)))
        return box, dist

    def _paint_tube(self, t: _Tube) -> None:
        box, dist = self._tube_box_dist(t, 0.0)
        if box is None:
            return
        hit = (dist <= t.radius) & self._lung_of(self.labels[box])
        self.image[box][hit] = 40.0
        self.labels[box][hit] = t.label

    # ------------------------------------------------------------------------------------------ nodules
    def _lung_label_at(self, ras: np.ndarray) -> int:
        ijk = np.floor(np.linalg.solve(self.ijk_to_ras[:3, :3], np.asarray(ras) - self.ijk_to_ras[:3, 3]) + 0.5)
        k, j, i = int(ijk[2]), int(ijk[1]), int(ijk[0])
        if not (0 <= k < self.shape_kji[0] and 0 <= j < self.shape_kji[1] and 0 <= i < self.shape_kji[2]):
            return 0
        return int(self.labels[k, j, i])

    def _clear(self, centre: np.ndarray, radius: float, allow: Sequence[int], placed: List[Nodule],
               gap: float = 6.0) -> bool:
        """True when the ball of ``radius`` around ``centre`` holds only lung parenchyma or labels in ``allow``."""
        for n in placed:
            if np.linalg.norm(np.asarray(n.centre) - centre) < radius + n.diameter_mm / 2 + gap:
                return False
        u = self.rng.normal(size=(64, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        pts = np.vstack([centre, centre + u * radius, centre + u * radius * 0.5])
        labs = {self._lung_label_at(p) for p in pts}
        return labs <= ({RIGHT_LUNG, LEFT_LUNG} | set(allow))

    def _new(self, centre, d, kind, site) -> Nodule:
        ratio = tuple(float(v) for v in self.rng.uniform(0.8, 1.0, size=2))
        return Nodule(tuple(float(v) for v in centre), float(d), kind, site, ratio,
                      oblique_rotation(self.rng.uniform(-90, 90, size=3)))

    def place(self, diameter_mm: float, kind: str, site: str, placed: List[Nodule],
              at: Optional[Sequence[float]] = None, tries: int = 400) -> Optional[Nodule]:
        """A nodule of the given kind at a random place of the given site (or near ``at`` for
        ``region_border``), clear of the nodules ``placed``; None when no place was found."""
        if kind not in NODULE_KINDS or site not in NODULE_SITES:
            raise ValueError(f"kind must be one of {NODULE_KINDS} and site one of {NODULE_SITES}")
        r = 0.5 * float(diameter_mm)
        lungs = list(self.lungs.items())
        for attempt in range(tries):
            lab, e = lungs[int(self.rng.integers(len(lungs)))]
            c0, semi = np.asarray(e.centre), np.asarray(e.semi_axes)
            if site == "region_border":
                centre = np.asarray(at, dtype=np.float64) + self.rng.normal(scale=1.0, size=3)
                ok = self._clear(centre, r + 3.0, (), placed)
            elif site == "free":
                centre = c0 + self.rng.uniform(-0.8, 0.8, size=3) * semi
                ok = self._clear(centre, r + 4.0, (), placed)
            elif site == "juxta_pleural":
                u = self.rng.normal(size=3)
                u[0] = abs(u[0]) * np.sign(c0[0] - self.c[0])               # lateral half: the rib-side wall
                u /= np.linalg.norm(u)
                t = 1.0 / np.linalg.norm(e.matrix() @ u)
                b = c0 + t * u
                n = e.matrix().T @ (e.matrix() @ (b - c0))
                centre = b - n / np.linalg.norm(n) * 0.55 * r
                ok = (self._lung_label_at(centre) == lab and self._lung_label_at(b + 2.0 * n / np.linalg.norm(n)) == BODY
                      and self._clear(centre, 0.3 * r, (), placed))
            else:   # juxta_vascular
                tubes = [t for t in self.tubes if t.radius >= 1.5]
                tb = tubes[int(self.rng.integers(len(tubes)))]
                p = tb.p0 + self.rng.uniform(0.3, 0.7) * (tb.p1 - tb.p0)
                v = np.cross(tb.p1 - tb.p0, self.rng.normal(size=3))
                centre = p + v / np.linalg.norm(v) * (r + 0.4 * tb.radius)
                ok = self._clear(centre, r + 3.0, range(VESSEL0, NODULE0), placed) and \
                    self._lung_label_at(centre) in (RIGHT_LUNG, LEFT_LUNG)
            if ok:
                return self._new(centre, diameter_mm, kind, site)
            if site == "region_border" and attempt > 40:
                return None
        return None

    def case(self, nodules: Sequence[Nodule]) -> ChestCase:
        """The image with ``nodules`` painted, the nodule labels (1..N in the given order), all structures."""
        from scipy import ndimage

        image, labels = self.image.copy(), self.labels.copy()
        nod = np.zeros(self.shape_kji, dtype=np.uint16)
        table = []
        for n, nd in enumerate(nodules, start=1):
            box, inside = self._box_inside(nd.ellipsoid())
            if box is None:
                continue
            inside &= self._lung_of(self.labels[box]) & (nod[box] == 0)
            image[box][inside] = -550.0 if nd.kind == "part_solid" else 30.0
            labels[box][inside] = NODULE0 + n
            nod[box][inside] = n
            if nd.kind == "part_solid":
                cbox, core = self._box_inside(nd.ellipsoid(0.5))
                core &= nod[cbox] == n
                image[cbox][core] = 20.0
            vox = int(inside.sum())
            table.append({"label": n, "diameter_mm": nd.diameter_mm, "kind": nd.kind, "site": nd.site,
                          "centre_ras": [round(float(v), 2) for v in nd.centre], "voxels": vox,
                          "volume_ml": round(vox * abs(float(np.linalg.det(self.ijk_to_ras[:3, :3]))) / 1000.0, 4)})
        if self.blur > 0:
            image = ndimage.gaussian_filter(image, self.blur, truncate=3.0)
        if self.noise > 0:
            rng = np.random.default_rng(self.seed + 1)
            image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(self.noise)
        img = np.clip(np.rint(image), -32768, 32767).astype(np.int16)
        meta = {"source": f"phantom:chest_nodules:{self.seed}"}
        m = self.ijk_to_ras
        return ChestCase(Volume(img, m.copy(), dict(meta)), Volume(nod, m.copy(), dict(meta)),
                         Volume(labels, m.copy(), dict(meta)), table)

    def random_nodules(self, diameters: Sequence[float], sites: Sequence[str] = ("free", "juxta_pleural",
                       "juxta_vascular"), kinds: Sequence[str] = NODULE_KINDS,
                       placed: Optional[List[Nodule]] = None) -> List[Nodule]:
        """One nodule per diameter, kinds and sites taken in turn; those that found no place are skipped."""
        placed = list(placed or [])
        out = []
        for n, d in enumerate(diameters):
            nd = self.place(d, kinds[n % len(kinds)], sites[n % len(sites)], placed)
            if nd is not None:
                placed.append(nd)
                out.append(nd)
        return out
