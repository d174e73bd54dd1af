"""Which model family a checkpoint file holds, and loading any family's file through one call.

Families: ``"sam_med3d"`` (SAM-Med3D and this project's SAM-Med3D-format files, :mod:`.checkpoint`) and
``"3dsam_adapter"`` (the 3DSAM-adapter, :mod:`.sam3d_adapter`). A third kind of file is recognised but is not a
model one can click with: ``"sam_vit_b"``, segment-anything's 2D ViT-B (``sam_vit_b_01ec64.pth``), the start
point for training a 3DSAM-adapter (``sam3d train`` with ``model.family: 3dsam_adapter``).

:func:`checkpoint_family` decides from the file's table of contents (:func:`.checkpoint_file.inspect_checkpoint`:
no torch, no tensor data read): the three published dicts -> 3DSAM-adapter; a 2D patch embedding (4-D
``patch_embed.proj.weight``) -> 2D SAM; anything else goes to the SAM-Med3D loader, whose strict checks say
precisely what does not match. Importing this module does not import torch.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .checkpoint_file import CheckpointError, CheckpointSummary, _as_tensor, inspect_checkpoint, sam_state_dict_problem

SAM_MED3D = "sam_med3d"
SAM3D_ADAPTER = "3dsam_adapter"
SAM_2D = "sam_vit_b"
#: Families a model for clicking can belong to.
FAMILIES = (SAM_MED3D, SAM3D_ADAPTER)
#: The top-level dicts of a published 3DSAM-adapter file.
PUBLISHED_DICTS = ("encoder_dict", "decoder_dict", "feature_dict")

__all__ = ["SAM_MED3D", "SAM3D_ADAPTER", "SAM_2D", "FAMILIES", "family_of", "checkpoint_family", "load_model",
           "model_file_problem",
           "SAM_2D_FOR_INFERENCE"]

#: Why a 2D segment-anything file cannot be clicked with (the loader's message ends with the path).
SAM_2D_FOR_INFERENCE = (
    "it is segment-anything's 2D SAM ViT-B (sam_vit_b_01ec64.pth): the start point for TRAINING a 3DSAM-adapter "
    "(sam3d train with model.family 3dsam_adapter and model.init pointing at this file), not a 3D model to click "
    "with. Load a trained 3DSAM-adapter file or a SAM-Med3D checkpoint")


def family_of(summary: CheckpointSummary) -> str:
    """The family of an inspected file: :data:`SAM3D_ADAPTER`, :data:`SAM_2D` or :data:`SAM_MED3D`."""
    root = summary.root
    if isinstance(root, Mapping) and all(k in root for k in PUBLISHED_DICTS):
        return SAM3D_ADAPTER
    sd = summary.state_dict()
    for key in ("image_encoder.patch_embed.proj.weight", "patch_embed.proj.weight"):
        t = sd.get(key)
        if t is not None and len(t.shape) == 4:
            return SAM_2D
    return SAM_MED3D


def model_file_problem(summary: CheckpointSummary) -> Optional[str]:
    """None when an inspected file holds a model of either family, else what is wrong (one phrase): used before
    a downloaded file without a published sha256 is trusted (:mod:`SAM3DSegmentLib.weights.verify`)."""
    family = family_of(summary)
    if family == SAM3D_ADAPTER:
        root = summary.root
        enc, dec, feats = (root.get(k) for k in PUBLISHED_DICTS)
        parts = [enc, dec] + (list(feats) if isinstance(feats, (list, tuple)) else [feats])
        if all(isinstance(p, Mapping) and p and all(_as_tensor(v) for v in p.values()) for p in parts):
            return None
        return "it has the 3DSAM-adapter dicts but they do not all hold tensors"
    if family == SAM_2D:
        return f"{SAM_2D_FOR_INFERENCE}"
    return sam_state_dict_problem(summary)


def checkpoint_family(path) -> str:
    """:func:`family_of` of the file at ``path`` (CheckpointError when it is not a torch checkpoint)."""
    return family_of(inspect_checkpoint(path))


def load_model(path, map_location: Any = "cpu", trusted: bool = False):
    """Build and strictly load the model in ``path``, whatever its family; the model has ``family`` set.

    A 2D segment-anything file is refused (:data:`SAM_2D_FOR_INFERENCE`); every loader refuses anything else
    with a message naming what it found.
    """
    family = checkpoint_family(path)
    if family == SAM_2D:
        raise CheckpointError(f"{path}: {SAM_2D_FOR_INFERENCE}.")
    if family == SAM3D_ADAPTER:
        from .sam3d_adapter.files import load_model_file

        return load_model_file(str(path), map_location=map_location, trusted=trusted)
    from .checkpoint import load_checkpoint

    model = load_checkpoint(str(path), map_location=map_location, trusted=trusted)
    model.family = SAM_MED3D
    return model
