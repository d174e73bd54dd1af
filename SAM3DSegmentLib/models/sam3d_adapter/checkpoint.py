"""Checkpoints of the 3DSAM-adapter family: the 2D SAM start point, and the published format.

* :func:`load_sam_vit_b` loads segment-anything's ViT-B (``sam_vit_b_01ec64.pth``: keys ``image_encoder.*``,
  ``prompt_encoder.*``, ``mask_decoder.*``; or a bare image-encoder state dict) into the 3D encoder. Strict on
  the reused parts (patch embedding, pos_embed, block norms/attention/MLP, rel_pos_h/w): each must be there
  with its shape. Reports the new parts it leaves initialised (``depth_embed``, ``slice_embed``,
  ``attn_mask``, ``rel_pos_d``, ``lr``, adapters, ``neck_3d``) and the SAM keys it does not use (SAM's 2D
  ``neck.*``, prompt encoder and mask decoder). Sets ``rel_pos_d = (rel_pos_h + rel_pos_w) / 2``, ``lr = 1``.
* Published 3DSAM-adapter files are a dict ``{"encoder_dict", "decoder_dict", "feature_dict"}``;
  ``feature_dict`` is a list of 4 prompt-encoder state dicts of which index 3 is the one used. The encoder
  dict also holds the shifted-window ``attn_mask`` of every shifted block. :func:`load_published` checks all
  of it strictly (keys, shapes, and the masks' values) and refuses anything else with a message naming what
  the file is; :func:`save_published` writes that format atomically (never over an existing file unless
  ``overwrite=True``). The tensor names inside the three dicts are this implementation's own (the upstream
  code has no licence and was not consulted), organised as the published files are.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..checkpoint import CheckpointError, atomic_torch_save, key_mismatch, read_checkpoint, show_keys
from .config import Sam3DAdapterConfig
from .model import Sam3DAdapter

PUBLISHED_DICTS = ("encoder_dict", "decoder_dict", "feature_dict")
NUM_PROMPT_ENCODERS = 4
USED_PROMPT_ENCODER = 3
#: encoder parts that do not exist in the 2D SAM (left as initialised by :func:`load_sam_vit_b`)
NEW_ENCODER_PARTS = ("depth_embed", "slice_embed.", ".adapter.", ".attn.rel_pos_d", ".attn.lr", "neck_3d.")


def _load_obj(source: Any, map_location: Any, trusted: bool) -> Any:
    if isinstance(source, (str, os.PathLike)):
        return read_checkpoint(source, map_location=map_location, trusted=trusted)
    return source


def attn_mask_keys(config: Sam3DAdapterConfig) -> List[str]:
    if not config.shift_size:
        return []
    return [f"blocks.{i}.attn_mask" for i in config.shifted_blocks]


def _is_new(key: str) -> bool:
    k = "." + key
    return any(part in k for part in NEW_ENCODER_PARTS)


# ---------------------------------------------------------------------------------------------- 2D SAM
def load_sam_vit_b(model: Sam3DAdapter, source: Any, map_location: Any = "cpu") -> Dict[str, List[str]]:
    """Load a segment-anything ViT-B checkpoint (path or state dict) into ``model``'s encoder.

    Returns ``{"loaded": [...], "missing": [...], "unused": [...]}`` (encoder key names; ``missing`` includes
    the ``attn_mask`` keys of the published format, which are computed rather than stored).
    """
    obj = _load_obj(source, map_location, trusted=False)
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError("not a segment-anything checkpoint: expected a state dict of tensors "
                              "(sam_vit_b_01ec64.pth)")
    if any(k.startswith("image_encoder.") for k in obj):
        sam = {k[len("image_encoder."):]: v for k, v in obj.items() if k.startswith("image_encoder.")}
        others = sorted(k for k in obj if not k.startswith("image_encoder."))
    else:
        sam, others = dict(obj), []
    target = model.image_encoder.state_dict()
    reused = [k for k in target if not _is_new(k)]
    parts = key_mismatch({k: target[k] for k in reused}, dict(sorted(sam.items())),
                         ignore=lambda k: k in target or k.startswith("neck."))   # SAM's 2D neck is not used
    if parts:
        width = sam.get("patch_embed.proj.weight")
        hint = ""
        if width is not None and width.shape[0] != model.config.embed_dim:
            hint = (f" Its embedding width is {width.shape[0]} (ViT-L is 1024, ViT-H 1280); the 3DSAM-adapter "
                    f"starts from ViT-B ({model.config.embed_dim}): use sam_vit_b_01ec64.pth.")
        raise CheckpointError("the file is not a segment-anything ViT-B image encoder matching this model: "
                              + "; ".join(parts) + "." + hint)
    with torch.no_grad():
        for k in reused:
            target[k].copy_(sam[k])
        for blk in model.image_encoder.blocks:
            blk.attn.rel_pos_d.copy_((blk.attn.rel_pos_h + blk.attn.rel_pos_w) / 2)
            blk.attn.lr.fill_(1.0)
    missing = sorted([k for k in target if _is_new(k)] + attn_mask_keys(model.config))
    unused = sorted(["image_encoder." + k for k in sam if k.startswith("neck.")] + others)
    return {"loaded": sorted(reused), "missing": missing, "unused": unused}


def build_from_sam_vit_b(source: Any, config: Optional[Sam3DAdapterConfig] = None):
    """A new model whose encoder starts from a segment-anything ViT-B checkpoint; returns (model, report)."""
    model = Sam3DAdapter(config or Sam3DAdapterConfig.vit_b())
    return model, load_sam_vit_b(model, source)


# ---------------------------------------------------------------------------------------------- published
def published_state(model: Sam3DAdapter) -> Dict[str, Any]:
    """The model as a published-format dict (tensors detached; the masks of all shifted blocks share one)."""
    enc = {k: v.detach() for k, v in model.image_encoder.state_dict().items()}
    ref = model.image_encoder.pos_embed
    keys = attn_mask_keys(model.config)
    if keys:
        mask = model.image_encoder.shift_mask(device=ref.device, dtype=ref.dtype)
        enc.update({k: mask for k in keys})
    used = {k: v.detach() for k, v in model.prompt_encoder.state_dict().items()}
    extra = model.unused_prompt_encoder_states or [used] * (NUM_PROMPT_ENCODERS - 1)
    return {"encoder_dict": enc,
            "decoder_dict": {k: v.detach() for k, v in model.mask_decoder.state_dict().items()},
            "feature_dict": list(extra) + [used]}


def save_published(model: Sam3DAdapter, path, overwrite: bool = False) -> str:
    """Write ``model`` in the published format (atomic). Refuses to replace a file unless ``overwrite``."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True")
    atomic_torch_save(published_state(model), path)
    return os.fspath(path)


def _foreign(obj: Any) -> Optional[str]:
    """What a non-published object is, in words, or None if it has the published layout."""
    if not isinstance(obj, Mapping):
        return f"it holds a {type(obj).__name__}, not a dict"
    if all(k in obj for k in PUBLISHED_DICTS):
        return None
    keys = [str(k) for k in obj.keys()]
    if "model_state_dict" in obj or str(obj.get("format", "")).startswith("sam3dsegment"):
        return ("it is a SAM-Med3D checkpoint (or one of this project's SAM-Med3D-format files); load it as a "
                "SAM-Med3D model")
    if any(k.startswith(("image_encoder.", "mask_decoder.", "prompt_encoder.")) for k in keys):
        return ("it is a 2D segment-anything checkpoint: that is the start point for training a 3DSAM-adapter "
                "(load_sam_vit_b), not a trained 3DSAM-adapter")
    if "blocks.0.attn.qkv.weight" in obj:
        return "it is a bare image-encoder state dict; the published format also has the decoder and prompt encoders"
    return f"its top-level keys are {show_keys(keys)}"


def _check_part(label: str, expected: Mapping[str, torch.Tensor], got: Any) -> List[str]:
    if not isinstance(got, Mapping):
        return [f"{label} is a {type(got).__name__}, not a dict"]
    return key_mismatch(expected, got, label)


def _detect_config(encoder_dict: Any) -> Sam3DAdapterConfig:
    """The published ViT-B architecture with the adapter kind and width found in the file."""
    if isinstance(encoder_dict, Mapping) and "blocks.0.adapter.down.weight" in encoder_dict:
        kind = "dualpath" if "blocks.0.adapter.global_conv.weight" in encoder_dict else "original"
        return Sam3DAdapterConfig.vit_b(adapter=kind, adapter_dim=int(encoder_dict["blocks.0.adapter.down.weight"].shape[0]))
    return Sam3DAdapterConfig.vit_b()


def load_published(source: Any, config: Optional[Sam3DAdapterConfig] = None, map_location: Any = "cpu",
                   trusted: bool = False) -> Sam3DAdapter:
    """Build and strictly load a published-format 3DSAM-adapter checkpoint (path or loaded dict).

    ``config`` defaults to the published ViT-B with the adapter kind/width found in the file.
    """
    obj = _load_obj(source, map_location, trusted)
    what = _foreign(obj)
    if what:
        raise CheckpointError(f"not a 3DSAM-adapter checkpoint: {what}. A published 3DSAM-adapter file is a dict "
                              f"with {', '.join(PUBLISHED_DICTS)}.")
    config = config or _detect_config(obj["encoder_dict"])
    with torch.device("meta"):
        shapes = Sam3DAdapter(config)
    expected_enc = dict(shapes.image_encoder.state_dict())
    grid, n = config.grid_size, config.window_size
    nw = (grid // n) ** 3
    expected_enc.update({k: torch.empty(nw, n ** 3, n ** 3, device="meta") for k in attn_mask_keys(config)})
    problems = _check_part("encoder_dict", expected_enc, obj["encoder_dict"])
    problems += _check_part("decoder_dict", shapes.mask_decoder.state_dict(), obj["decoder_dict"])
    feats = obj["feature_dict"]
    if not isinstance(feats, (list, tuple)) or len(feats) != NUM_PROMPT_ENCODERS:
        problems.append(f"feature_dict must be a list of {NUM_PROMPT_ENCODERS} prompt encoders, got "
                        f"{type(feats).__name__}{f' of {len(feats)}' if isinstance(feats, (list, tuple)) else ''}")
    else:
        pe_expected = shapes.prompt_encoder.state_dict()
        for i, f in enumerate(feats):
            problems += _check_part(f"feature_dict[{i}]", pe_expected, f)
    if problems:
        raise CheckpointError(f"the checkpoint does not match the {config.name} ({config.adapter} adapter) "
                              "architecture: " + "; ".join(problems))
    model = Sam3DAdapter(config)
    enc = obj["encoder_dict"]
    keys = attn_mask_keys(config)
    if keys:
        mask = model.image_encoder.shift_mask()
        bad = [k for k in keys if not torch.equal(enc[k].to(mask.dtype).cpu(), mask)]
        if bad:
            raise CheckpointError(
                f"{show_keys(bad)} differ from the shifted-window mask of {n}³ windows shifted by {config.shift_size}: "
                "the checkpoint was made with another window layout and cannot be used with this model")
    model.image_encoder.load_state_dict({k: v for k, v in enc.items() if k not in keys}, strict=True)
    model.mask_decoder.load_state_dict(obj["decoder_dict"], strict=True)
    model.prompt_encoder.load_state_dict(feats[USED_PROMPT_ENCODER], strict=True)
    model.unused_prompt_encoder_states = [dict(f) for i, f in enumerate(feats) if i != USED_PROMPT_ENCODER]
    return model.eval()
