"""3DSAM-adapter model files as this project reads and writes them: the published format plus our metadata.

A published 3DSAM-adapter file is ``{"encoder_dict", "decoder_dict", "feature_dict"}`` (:mod:`.checkpoint`).
It does not say which architecture it is (the published ViT-B is assumed) nor how CT was normalised for it.
Files written by ``sam3d train`` (:func:`save_model_file`) keep exactly that layout, so other readers of the
published format load them too, and add one top-level entry, ``"sam3dsegment"``, which the published readers
never look at::

    {"config": Sam3DAdapterConfig.to_dict(), "intensity": WindowZNorm.to_dict() or None,
     "recipe": "original" | "dualpath" | None, "epoch": int | None, "name": str | None}

:func:`load_model_file` loads either (strictly, through :func:`.checkpoint.load_published`) and returns the model
with ``family``, ``intensity`` (a :class:`~SAM3DSegmentLib.core.intensity.WindowZNorm` or None) and
``description`` set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ...core.intensity import WindowZNorm
from ..checkpoint import CheckpointError, atomic_torch_save, read_checkpoint
from .checkpoint import published_state
from .config import Sam3DAdapterConfig

META_KEY = "sam3dsegment"
#: Where a resumable training file (``latest.pt`` of ``sam3d train``) keeps the training state.
TRAINING_KEY = "sam3dsegment_training"
FAMILY = "3dsam_adapter"

__all__ = ["META_KEY", "TRAINING_KEY", "FAMILY", "save_model_file", "load_model_file", "file_metadata"]


def save_model_file(model, path, intensity: Optional[WindowZNorm] = None, recipe: Optional[str] = None,
                    epoch: Optional[int] = None, name: Optional[str] = None, overwrite: bool = False,
                    training_state: Optional[dict] = None) -> Path:
    """Write ``model`` in the published format plus our ``"sam3dsegment"`` metadata (atomic; an existing
    file is replaced only with ``overwrite``). ``training_state`` (optimiser, schedule, counters: what resuming
    a run needs) goes under :data:`TRAINING_KEY`."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True")
    payload = published_state(model)
    payload[META_KEY] = {"config": model.config.to_dict(),
                         "intensity": None if intensity is None else intensity.to_dict(),
                         "recipe": recipe, "epoch": None if epoch is None else int(epoch), "name": name}
    if training_state is not None:
        payload[TRAINING_KEY] = training_state
    atomic_torch_save(payload, path)
    return Path(path)


def file_metadata(obj: Any, where: str = "the checkpoint") -> dict:
    """Our metadata of a loaded file: ``config`` (a :class:`Sam3DAdapterConfig` or None: the published ViT-B),
    ``intensity`` (:class:`WindowZNorm` or None) and the plain entries; CheckpointError when malformed."""
    meta = obj.get(META_KEY) if isinstance(obj, Mapping) else None
    if meta is None:
        return {"config": None, "intensity": None, "recipe": None, "epoch": None, "name": None}
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{where}: its {META_KEY!r} entry is a {type(meta).__name__}, not a dict")
    out = {"recipe": meta.get("recipe"), "epoch": meta.get("epoch"), "name": meta.get("name")}
    try:
        cfg = meta.get("config")
        out["config"] = Sam3DAdapterConfig.from_dict(dict(cfg)) if isinstance(cfg, Mapping) else None
        inten = meta.get("intensity")
        out["intensity"] = WindowZNorm.from_dict(inten) if inten is not None else None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the settings stored under {META_KEY!r} are invalid: {exc}") from None
    return out


def load_model_file(source: Any, map_location: Any = "cpu", trusted: bool = False):
    """A published-format 3DSAM-adapter file (path or loaded dict), loaded strictly, with our metadata."""
    from .checkpoint import load_published

    where = str(source) if isinstance(source, (str, os.PathLike)) else "the checkpoint"
    obj = read_checkpoint(source, map_location=map_location, trusted=trusted) \
        if isinstance(source, (str, os.PathLike)) else source
    meta = file_metadata(obj, where)
    model = load_published(obj, config=meta["config"])
    model.family = FAMILY
    model.intensity = meta["intensity"]
    model.file_metadata = meta
    label = meta["name"] or (Path(source).name if isinstance(source, (str, os.PathLike)) else "3DSAM-adapter")
    model.description = f"{label} ({model.config.name}, {model.config.adapter} adapter)"
    return model
