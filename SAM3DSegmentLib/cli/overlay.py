"""The ``sam3d demo`` picture: per structure an axial and a coronal CT slice through its first click, the
reference outlined and the prediction filled in the structure's colour, its Dice, the slice position and
the patient's R/L (matplotlib, drawn without a display)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

#: Colours of the structures, in order (RGB 0..255).
COLORS = [(230, 75, 60), (60, 160, 230), (250, 200, 40), (120, 220, 90), (200, 100, 230), (250, 140, 40),
          (40, 220, 210), (240, 90, 170)]


def _canonical(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Array reoriented to (R, A, S) axis order (closest canonical axes) and its spacing."""
    from ..core.geometry import closest_canonical_axes

    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    perm, signs = closest_canonical_axes(ijk_to_ras[:3, :3] / spacing[None, :])
    arr = np.asarray(array_kji).transpose(2, 1, 0)        # (i, j, k)
    arr = arr.transpose(perm)                              # RAS axis r <- volume axis perm[r]
    for r in range(3):
        if signs[r] < 0:
            arr = np.flip(arr, axis=r)
    return arr, spacing[perm]


def _canonical_frame(volume) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(perm, signs, spacing, first)``: how :func:`_canonical` reorders the volume, the spacing per R/A/S
    axis and the RAS position (mm) of canonical voxel (0, 0, 0) along each axis (exact for volumes whose
    axes are aligned with RAS; for oblique ones the panels' mm labels are the closest-axis approximation)."""
    from ..core.geometry import closest_canonical_axes

    m = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    perm, signs = closest_canonical_axes(m[:3, :3] / spacing[None, :])
    n = np.asarray(volume.shape_ijk)
    corner = np.array([0.0 if signs[r] > 0 else n[perm[r]] - 1.0 for r in range(3)])
    ijk0 = np.zeros(3)
    ijk0[list(perm)] = corner
    first = (m[:3, :3] @ ijk0 + m[:3, 3])
    return np.asarray(perm), np.asarray(signs), spacing[list(perm)], first


def _to_canonical_index(ijk: Sequence[int], volume) -> np.ndarray:
    perm, signs, _, _ = _canonical_frame(volume)
    n = np.asarray(volume.shape_ijk)
    return np.array([ijk[perm[r]] if signs[r] > 0 else n[perm[r]] - 1 - ijk[perm[r]] for r in range(3)])


def overlay_figure(volume, preds: Dict[str, np.ndarray], refs: Dict[str, np.ndarray],
                   window: Tuple[float, float] = (-1000.0, 400.0), *, title: Sequence[str] = (),
                   scores: Optional[Dict[str, str]] = None, clicks: Optional[Dict[str, list]] = None,
                   colors: Optional[Dict[str, Tuple[int, int, int]]] = None):
    """A matplotlib Figure: per structure an axial and a coronal CT slice through its first click (else
    its reference centroid) with the REFERENCE outlined in the structure's colour (solid line), the
    PREDICTION filled in the same colour (translucent, dashed border), the clicks in that slice (+ / x),
    patient R/L (radiological convention: patient right on the image left), A/P, S/I and the slice
    position in mm. ``title`` lines go on top; ``scores[name]`` is the structure's caption (e.g. Dice)."""
    import textwrap

    from matplotlib.figure import Figure

    title = [w for line in title for w in (textwrap.wrap(line, 150, subsequent_indent="  ") or [""])]
    ct, _ = _canonical(volume.array, volume.ijk_to_ras)
    _, _, sp, first = _canonical_frame(volume)
    names = list(preds)
    colors = colors or {n: COLORS[k % len(COLORS)] for k, n in enumerate(names)}
    lo, hi = window
    coords = [first[r] + sp[r] * np.arange(ct.shape[r]) for r in range(3)]   # mm along R, A, S
    per_row = 2
    n_rows = max(1, -(-len(names) // per_row))
    head = 0.30 * (len(title) + 1)
    height = 4.3 * n_rows + head
    fig = Figure(figsize=(16.0, height), dpi=80)
    fig.text(0.01, 1.0 - 0.12 / height, "\n".join(title), va="top", ha="left", fontsize=12,
             family="monospace")
    top = 1.0 - head / height
    grid = fig.add_gridspec(n_rows, 2 * per_row, left=0.03, right=0.99, bottom=0.02, top=top - 0.035,
                            wspace=0.25, hspace=0.42)
    for idx, name in enumerate(names):
        col = np.asarray(colors[name], dtype=float) / 255.0
        pred = _canonical(preds[name], volume.ijk_to_ras)[0].astype(bool)
        ref = _canonical(refs[name], volume.ijk_to_ras)[0].astype(bool) if name in refs else None
        its_clicks = (clicks or {}).get(name) or []
        if its_clicks:
            centre = _to_canonical_index(its_clicks[0]["ijk"], volume)
        elif ref is not None and ref.any():
            centre = np.round(np.argwhere(ref).mean(axis=0)).astype(int)
        else:
            centre = np.asarray(ct.shape) // 2
        row, c0 = divmod(idx, per_row)
        for panel, fixed in enumerate((2, 1)):  # axial (fix S), coronal (fix A)
            ax = fig.add_subplot(grid[row, 2 * c0 + panel])
            other = 1 if fixed == 2 else 2
            t = int(np.clip(centre[fixed], 0, ct.shape[fixed] - 1))
            sl = [slice(None)] * 3
            sl[fixed] = t
            sl = tuple(sl)
            x, y = coords[0], coords[other]
            half = [sp[0] / 2, sp[other] / 2]
            ax.imshow(np.clip(ct[sl].T.astype(np.float32), lo, hi), cmap="gray", vmin=lo, vmax=hi,
                      origin="lower", interpolation="nearest",
                      extent=[x[0] - half[0], x[-1] + half[0], y[0] - half[1], y[-1] + half[1]])
            p2 = pred[sl].T.astype(np.float32)
            if p2.any():
                ax.contourf(x, y, p2, levels=[0.5, 1.5], colors=[col], alpha=0.35)
                ax.contour(x, y, p2, levels=[0.5], colors=[col], linewidths=1.0, linestyles="dashed")
            if ref is not None and ref[sl].any():
                ax.contour(x, y, ref[sl].T.astype(np.float32), levels=[0.5], colors=[col], linewidths=2.0)
            for n_click, c in enumerate(its_clicks, 1):
                ci = _to_canonical_index(c["ijk"], volume)
                if ci[fixed] != t:
                    continue
                ax.plot(coords[0][ci[0]], coords[other][ci[other]], marker="P" if c["positive"] else "X",
                        markersize=11, color="lime" if c["positive"] else "red", markeredgecolor="black")
                ax.annotate(str(n_click), (coords[0][ci[0]], coords[other][ci[other]]), xytext=(6, 6),
                            textcoords="offset points", color="white", fontsize=9, weight="bold")
            ax.set_xlim(x[-1] + half[0], x[0] - half[0])      # patient right on the image left
            ax.set_ylim(y[0] - half[1], y[-1] + half[1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            box = dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.7)
            for text, (u, v) in (("R", (0.02, 0.5)), ("L", (0.98, 0.5)),
                                 ("A" if fixed == 2 else "S", (0.5, 0.97)), ("P" if fixed == 2 else "I", (0.5, 0.03))):
                ax.text(u, v, text, transform=ax.transAxes, ha="center", va="center", color="yellow",
                        fontsize=11, weight="bold", bbox=box)
            axis_name = "S" if fixed == 2 else "A"
            ax.set_title(f"{'axial' if fixed == 2 else 'coronal'}, {axis_name} = {coords[fixed][t]:.0f} mm",
                         fontsize=10)
            if panel == 0:
                caption = (scores or {}).get(name, "")
                ax.text(0.0, 1.11, f"{name}\n{caption}" if caption else name, transform=ax.transAxes,
                        fontsize=11, weight="bold", color=col * 0.8, ha="left", va="bottom", linespacing=1.3)
    return fig


def overlay_png(path: str, volume, preds: Dict[str, np.ndarray], refs: Dict[str, np.ndarray],
                window: Tuple[float, float] = (-1000.0, 400.0), **figure_kwargs) -> str:
    """Write :func:`overlay_figure` as a PNG (atomically); returns the absolute path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ..core.atomic import atomic_write

    fig = overlay_figure(volume, preds, refs, window, **figure_kwargs)
    FigureCanvasAgg(fig)

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=80, facecolor="white")

    return atomic_write(path, write)
