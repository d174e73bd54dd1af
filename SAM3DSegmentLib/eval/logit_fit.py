"""The best low-res logits for a known label: what a perfect model could answer on the 32^3 grid.

SAM-Med3D answers on a ``s^3`` (32^3) low-res grid over its region; the engine interpolates those logits to
the original voxels (:func:`SAM3DSegmentLib.inference.regions.logits_to_volume`). For a labelled image this
module finds, per region, the low-res field whose interpolation onto the region's footprint best fits the
label: a least-squares fit of ``+1`` (inside) / ``-1`` (outside), then L-BFGS steps on the logistic loss
(a classification fit: only the sign at each voxel matters to the mask). Scoring that field's paste-back
against the label measures what the 32^3 representation itself costs, independently of any model
(benchmarks/bench_guided_upsampling.py).

The operator is built from the same placement as the engine's paste-back (low-res cell ``u`` at region index
``(u + 0.5) * size / s - 0.5``, positions clamped at the low-res border, voxels outside the region excluded),
for axis-aligned and oblique regions alike; :func:`paste_operator` is checked against ``logits_to_volume``
in Testing/test_guided_upsampling.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..core.geometry import Volume
from ..inference import regions as _regions

__all__ = ["PasteOperator", "paste_operator", "fit_logits"]


@dataclass
class PasteOperator:
    """The paste-back of one region's ``(s, s, s)`` logits onto the volume voxels of its footprint ``box``
    whose centres lie inside the region, as a sparse linear map: ``values = sum_c weights[c] * x[index[c]]``
    over the 8 trilinear corners ``c``. ``inside`` (box shape, bool) marks the voxels it covers."""

    box: Tuple[slice, slice, slice]
    inside: np.ndarray
    index: np.ndarray     # (8, N) int32 flat low-res cell of each corner
    weights: np.ndarray   # (8, N) float32
    low_res_size: int

    def matrix(self):
        """The map as a ``scipy.sparse`` CSR matrix (N voxels x s^3 cells), built once."""
        if getattr(self, "_matrix", None) is None:
            from scipy import sparse

            n = self.index.shape[1]
            rows = np.broadcast_to(np.arange(n, dtype=np.int64), self.index.shape)
            self._matrix = sparse.csr_matrix(
                (self.weights.ravel(), (rows.ravel(), self.index.ravel())),
                shape=(n, self.low_res_size ** 3))
            self._matrix_t = self._matrix.T.tocsr()
        return self._matrix

    def forward(self, x: np.ndarray) -> np.ndarray:
        return (self.matrix() @ np.asarray(x, dtype=np.float32).reshape(-1)).astype(np.float64)

    def adjoint(self, r: np.ndarray) -> np.ndarray:
        self.matrix()
        return (self._matrix_t @ np.asarray(r, dtype=np.float32)).astype(np.float64)


def paste_operator(volume: Volume, region, low_res_size: int = 32,
                   box: Optional[Tuple[slice, slice, slice]] = None) -> PasteOperator:
    """:class:`PasteOperator` of ``region`` on ``volume`` (over the region's footprint unless ``box``)."""
    s = int(low_res_size)
    if box is None:
        box = _regions.footprint(volume, region)
    shape = tuple(sl.stop - sl.start for sl in box)
    m = region.ras_to_region @ volume.ijk_to_ras
    kk, jj, ii = np.meshgrid(*(np.arange(sl.start, sl.stop, dtype=np.float64) for sl in box), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()])
    x = m[:3, :3] @ ijk + m[:3, 3:4]
    inside = np.all((x >= -0.5) & (x <= region.size - 0.5), axis=0)
    u = np.clip((x[:, inside] + 0.5) * (s / float(region.size)) - 0.5, 0.0, s - 1.0)
    lo = np.minimum(np.floor(u).astype(np.int64), s - 2)
    f = (u - lo).astype(np.float32)
    index = np.empty((8, u.shape[1]), dtype=np.int32)
    weights = np.empty((8, u.shape[1]), dtype=np.float32)
    c = 0
    for da in (0, 1):
        wa = f[0] if da else 1.0 - f[0]
        for db in (0, 1):
            wb = f[1] if db else 1.0 - f[1]
            for dc in (0, 1):
                wc = f[2] if dc else 1.0 - f[2]
                index[c] = ((lo[0] + da) * s + (lo[1] + db)) * s + lo[2] + dc
                weights[c] = wa * wb * wc
                c += 1
    return PasteOperator(box, inside.reshape(shape), index, weights, s)


def fit_logits(label: np.ndarray, op: PasteOperator, ridge: float = 1e-3, logistic_steps: int = 60,
               scale: float = 4.0, cg_steps: int = 60) -> np.ndarray:
    """Low-res logits ``(s, s, s)`` float32 whose paste-back best classifies ``label`` (the volume's mask,
    full grid or the operator's box) on the voxels the operator covers.

    Least squares of ``+-1`` with a small ridge (``cg_steps`` Jacobi-preconditioned conjugate gradients), then ``logistic_steps`` L-BFGS steps
    on ``sum log(1 + exp(-scale * t * value))`` (+ the ridge), starting from it. Cells that touch no voxel
    stay at the ridge's minimum (about -1: outside)."""
    from scipy.optimize import minimize
    from scipy.sparse.linalg import LinearOperator, cg

    lab = np.asarray(label)
    if lab.shape != op.inside.shape:
        lab = lab[op.box]
    t = np.where(lab[op.inside] > 0, 1.0, -1.0).astype(np.float32)
    n = op.low_res_size ** 3
    # Cells no voxel touches would be undetermined: pull every cell weakly towards -1 (outside).
    prior = -np.ones(n)
    normal = LinearOperator((n, n), matvec=lambda v: op.adjoint(op.forward(v)) + ridge * v, dtype=np.float64)
    # Jacobi preconditioner: cells differ a lot in how many voxels they reach (borders, oblique corners)
    diag = np.asarray(op.matrix().multiply(op.matrix()).sum(axis=0)).ravel() + ridge
    jacobi = LinearOperator((n, n), matvec=lambda v: v / diag, dtype=np.float64)
    x0 = (op.adjoint(t) + ridge * prior) / diag
    x, _ = cg(normal, op.adjoint(t) + ridge * prior, x0=x0, M=jacobi, rtol=1e-3, maxiter=cg_steps)
    if logistic_steps > 0:
        def loss(v):
            z = scale * t * op.forward(v)
            f = np.logaddexp(0.0, -z).sum() + 0.5 * ridge * np.sum((v - prior) ** 2)
            g = -scale * t / (1.0 + np.exp(np.clip(z, -60, 60)))
            return float(f), op.adjoint(g) + ridge * (v - prior)

        x = minimize(loss, x, jac=True, method="L-BFGS-B", options={"maxiter": int(logistic_steps)}).x
    s = op.low_res_size
    return np.asarray(x, dtype=np.float32).reshape(s, s, s)
