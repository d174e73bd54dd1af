"""CT intensity normalisation with a fixed HU window and dataset statistics (the 3DSAM-adapter's input).

The 3DSAM-adapter family (docs/sam3d_adapter.md) was trained on CT clipped to a per-dataset HU window and
z-normalised with the mean and standard deviation of the dataset's foreground voxels (one pair of numbers for
the whole dataset, not per crop). Published 3DSAM-adapter files do not carry these numbers, so they travel
separately: in files written by ``sam3d train`` (under ``"sam3dsegment"``), in a registry entry
(``ModelWeights.intensity``), or on the command line (``--clamp-hu`` for the window, ``--znorm MEAN,STD``).

:class:`WindowZNorm` holds them. ``mean``/``std`` None means they are unknown: each crop is then normalised
with its own mean and standard deviation after clipping (:meth:`WindowZNorm.apply`), which is this project's
fallback, not the published recipe (documented where it is used). No torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

__all__ = ["WindowZNorm", "DEFAULT_WINDOW_HU"]

#: The window used when neither the model file, the registry nor the caller gives one: the CT clamp of this
#: project's SAM-Med3D training (``data.ct_clamp``), wide enough to keep every tissue.
DEFAULT_WINDOW_HU: Tuple[float, float] = (-1000.0, 1000.0)


@dataclass(frozen=True)
class WindowZNorm:
    """``(clip(x, *window) - mean) / std``; ``mean``/``std`` None: the clipped crop's own statistics."""

    window: Tuple[float, float] = DEFAULT_WINDOW_HU
    mean: Optional[float] = None
    std: Optional[float] = None

    def __post_init__(self) -> None:
        try:
            lo, hi = (float(v) for v in self.window)
        except (TypeError, ValueError):
            raise ValueError(f"the HU window must be two numbers (low, high), got {self.window!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"the HU window must be finite with low < high, got ({lo}, {hi})")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both the foreground mean and std (or neither)")
        if self.mean is not None:
            m, s = float(self.mean), float(self.std)
            if not (math.isfinite(m) and math.isfinite(s) and s > 0):
                raise ValueError(f"the foreground mean must be finite and the std positive, got {m}, {s}")
            object.__setattr__(self, "mean", m)
            object.__setattr__(self, "std", s)
        object.__setattr__(self, "window", (lo, hi))

    @property
    def has_statistics(self) -> bool:
        """Whether the dataset's foreground mean/std are known (else each crop uses its own)."""
        return self.mean is not None

    def apply(self, clipped: np.ndarray) -> np.ndarray:
        """Normalise an array ALREADY clipped to the window: float32 ``(x - mean) / std``."""
        x = np.asarray(clipped, dtype=np.float32)
        if self.has_statistics:
            mean, std = self.mean, self.std
        else:
            mean = float(x.mean(dtype=np.float64))
            std = float(x.std(dtype=np.float64))
            if not std > 0:
                std = 1.0
        out = x - np.float32(mean)
        out /= np.float32(std)
        return out

    def describe(self) -> str:
        lo, hi = self.window
        stats = (f"foreground mean {self.mean:g}, std {self.std:g}" if self.has_statistics
                 else "each crop's own mean/std (the dataset statistics are unknown)")
        return f"HU window [{lo:g}, {hi:g}], {stats}"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return {"window": [self.window[0], self.window[1]], "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WindowZNorm":
        if not isinstance(data, Mapping):
            raise ValueError(f"intensity settings must be a mapping with window, mean, std; got {type(data).__name__}")
        unknown = sorted(set(data) - {"window", "mean", "std"})
        if unknown:
            raise ValueError(f"unknown intensity keys {unknown}; use window, mean, std")
        return cls(tuple(data.get("window", DEFAULT_WINDOW_HU)), data.get("mean"), data.get("std"))

    def replaced(self, window: Optional[Tuple[float, float]] = None,
                 mean_std: Optional[Tuple[float, float]] = None) -> "WindowZNorm":
        """A copy with the window and/or the (mean, std) pair replaced (None: kept)."""
        w = self.window if window is None else tuple(window)
        m, s = (self.mean, self.std) if mean_std is None else tuple(mean_std)
        return WindowZNorm(w, m, s)
