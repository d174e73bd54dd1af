"""Loading and saving checkpoints the way real users hit them.

* Published SAM-Med3D files: a dict with the weights under ``model_state_dict`` (plus ``args``, an
  ``argparse.Namespace``, optimiser state, ...), saved with CUDA tensors. Loaded with ``map_location`` and
  ``weights_only=True`` with the needed allow-list.
* Bare state dicts, ``state_dict``/``model`` wrappers, and ``module.`` / ``_orig_mod.`` prefixes from
  DDP or ``torch.compile`` wrappers.
* Our own files (``FORMAT``) also store the model ``config`` so smaller or adapter models rebuild exactly.

Never loads silently with random weights left in: any missing, unexpected or mis-shaped key is an error
that lists them. Files that need arbitrary pickled objects load only when the caller says the file is
trusted, and that fallback is logged.
"""
from __future__ import annotations

import argparse
import collections
import logging
import pickle
import re
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .checkpoint_file import (ENCODER_FORMAT, FULL_FORMAT, PARTIAL_FORMAT, STATE_DICT_KEYS, CheckpointError,
                              CheckpointSummary, inspect_checkpoint, strip_wrapper_prefixes)
from .sam_med3d.config import SamMed3DConfig

log = logging.getLogger(__name__)

FORMAT = FULL_FORMAT
#: Python objects the published checkpoints carry besides tensors (needed with weights_only=True).
SAFE_GLOBALS = (argparse.Namespace, collections.Counter, collections.OrderedDict)


# ---------------------------------------------------------------------------------------------- reading
def _sniff(path: Path) -> CheckpointSummary:
    """Refuse what is not a ``torch.save`` file, or declares more data than it holds, before torch sees it."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}. Pass an existing .pth/.pt file "
                              "(--checkpoint PATH) or a registered model name (--model NAME).")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a device, pipe or socket); pass the .pth/.pt "
                              "checkpoint file itself")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the download or copy failed; fetch it again")
    summary = inspect_checkpoint(path)
    return summary


def read_checkpoint(path, map_location: Any = "cpu", trusted: bool = False) -> Any:
    """``torch.load`` with the published files' allow-list, on any device (CUDA tensors land on CPU)."""
    import torch

    path = Path(path)
    _sniff(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            what = f"({found.group(1)})" if found else f"({type(exc).__name__})"
            raise CheckpointError(
                f"checkpoint {path} contains Python objects that safe loading does not allow {what}. If you trust where the file comes from, convert it once "
                "in Python: SAM3DSegmentLib.models.save_checkpoint(load_checkpoint(PATH, trusted=True), "
                "NEW.pt), then use NEW.pt; loading an untrusted pickle can run code.") from None
        log.warning("Loading %s with weights_only=False because the caller marked it trusted", path)
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({msg}). Download it again.") from None


def extract_state_dict(obj: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The weights inside a loaded checkpoint object, with wrapper prefixes stripped; plus the rest."""
    import torch

    meta: Dict[str, Any] = {}
    sd = obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(torch.is_tensor(v) for v in inner.values()):
                sd = inner
                meta = {k: v for k, v in obj.items() if k != key}
                break
    if not isinstance(sd, Mapping) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        top = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"no model weights found in the checkpoint (top-level: {top}); expected a state dict "
                              f"or one under {list(STATE_DICT_KEYS)}")
    sd, removed = strip_wrapper_prefixes(sd)
    if removed:
        meta["stripped_prefixes"] = removed
    return sd, meta


def show_keys(items, limit: int = 8) -> str:
    """At most ``limit`` names, comma-separated, with how many more there are."""
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def key_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any], label: str = "",
                 ignore: Callable[[str], bool] = lambda key: False) -> List[str]:
    """What keeps the state dict ``got`` from loading strictly where ``expected`` (name -> tensor) is wanted: one
    phrase each for missing keys, unexpected keys (those ``ignore`` accepts aside) and keys whose value has another
    shape or is no tensor, naming up to 8 keys and prefixed with ``label``; empty when they match."""
    import torch

    def shape(value):
        return tuple(value.shape) if torch.is_tensor(value) else type(value).__name__

    missing = [k for k in expected if k not in got]
    unexpected = [str(k) for k in got if k not in expected and not ignore(k)]
    misshaped = [f"{k}: file {shape(got[k])} vs model {tuple(v.shape)}" for k, v in expected.items()
                 if k in got and shape(got[k]) != tuple(v.shape)]
    prefix = f"{label}: " if label else ""
    return [f"{prefix}{len(keys)} {what} [{show_keys(keys)}]" for keys, what in
            ((missing, "missing keys"), (unexpected, "unexpected keys"), (misshaped, "keys with the wrong shape"))
            if keys]


def check_state_dict(model, state_dict: Mapping[str, Any]) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and mis-shaped keys (nothing is loaded)."""
    parts = key_mismatch(model.state_dict(), state_dict)
    if not parts:
        return
    name = getattr(getattr(model, "config", None), "name", "?")
    raise CheckpointError(
        f"the checkpoint does not match the {name} SAM-Med3D architecture: " + "; ".join(parts) +
        ". Is it a SAM-Med3D (vit_b_ori) checkpoint, or one of ours saved with its config? A 2D SAM or another "
        "network cannot be used.")


def _refuse_training_artifacts(path, obj: Any) -> None:
    """Adapter-only and encoder-only files from ``sam3d train`` are not models: say how to get one."""
    fmt = obj.get("format") if isinstance(obj, Mapping) else None
    if fmt == PARTIAL_FORMAT:
        base = obj.get("base") if isinstance(obj.get("base"), Mapping) else {}
        raise CheckpointError(
            f"{path} holds only the trained tensors of a {obj.get('mode', 'parameter-efficient')} fine-tune "
            f"(base: {base.get('path', 'unknown')}), not a whole model. Merge it with its base first: "
            f"`sam3d train merge {path} -o MERGED.pt`, then load MERGED.pt.")
    if fmt == ENCODER_FORMAT:
        raise CheckpointError(
            f"{path} is an exported image encoder alone (sam3d train export-encoder); the interactive model "
            "also needs the prompt encoder and mask decoder. Load the full checkpoint it was exported from.")


#: Largest value a checkpoint's stored config may ask for, per field: four times the published vit_b_ori
#: (SamMed3DConfig.vit_b_ori()) where it sets a size. Checked before anything is built.
CONFIG_LIMITS = {
    "image_size": 512, "encoder_embed_dim": 3072, "encoder_depth": 48, "encoder_num_heads": 48,
    "encoder_mlp_ratio": 16.0, "window_size": 56, "prompt_embed_dim": 1536, "mask_in_chans": 64,
    "decoder_depth": 8, "decoder_num_heads": 32, "decoder_mlp_dim": 8192, "decoder_attention_downsample": 8,
    "num_multimask_outputs": 12, "iou_head_depth": 12, "iou_head_hidden_dim": 1024,
}


#: Bounds of an adapter config (models/adapters.py) stored in a checkpoint.
ADAPTER_LIMITS = {"bottleneck_ratio": 4.0, "kernel_size": 9}


def check_config_limits(config: SamMed3DConfig, path=None) -> None:
    """Refuse a config outside the SAM-Med3D family's size envelope (:data:`CONFIG_LIMITS`)."""
    problems = []
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in CONFIG_LIMITS or f.name == "patch_size":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
                problems.append(f"{f.name}={value!r} (must be a positive number)")
            elif f.name in CONFIG_LIMITS and value > CONFIG_LIMITS[f.name]:
                problems.append(f"{f.name}={value} (limit {CONFIG_LIMITS[f.name]})")
    if any(not isinstance(i, int) or not 0 <= i < max(1, int(config.encoder_depth))
           for i in config.encoder_global_attn_indexes):
        problems.append(f"encoder_global_attn_indexes={list(config.encoder_global_attn_indexes)} (must be block "
                        f"numbers below encoder_depth {config.encoder_depth})")
    adapter = config.adapter if isinstance(config.adapter, Mapping) else None
    if adapter is not None:
        try:
            ratio = float(adapter.get("bottleneck_ratio", 0.5))
            kernel = int(adapter.get("kernel_size", 3))
        except (TypeError, ValueError):
            ratio, kernel = -1.0, -1
        if not 0 < ratio <= ADAPTER_LIMITS["bottleneck_ratio"]:
            problems.append(f"adapter bottleneck_ratio={adapter.get('bottleneck_ratio')!r} (must be in "
                            f"(0, {ADAPTER_LIMITS['bottleneck_ratio']}])")
        if not 1 <= kernel <= ADAPTER_LIMITS["kernel_size"]:
            problems.append(f"adapter kernel_size={adapter.get('kernel_size')!r} (must be 1 to "
                            f"{ADAPTER_LIMITS['kernel_size']})")
    if problems:
        where = f"the config stored in {path}" if path else "the config"
        raise CheckpointError(
            f"{where} does not describe a known SAM-Med3D-family architecture: {'; '.join(problems)}. "
            "Nothing was built. Use a checkpoint saved by SAM3DSegment or a published SAM-Med3D file.")


def _check_against_file(config: SamMed3DConfig, sd: Mapping[str, Any], path) -> None:
    """Compare the state-dict shapes of ``config``'s model, built on torch's "meta" device (no memory),
    with the file's tensors, before the real model is allocated.

    Adapters (which fingerprint their initial weights and so cannot live on "meta") are left out of the
    skeleton: the base model's keys are checked here, the adapters' (bounded by :data:`ADAPTER_LIMITS`
    and the base width) after the real build by :func:`check_state_dict`.
    """
    import dataclasses

    import torch

    from .sam_med3d.model import build_sam_med3d

    check_config_limits(config, path)
    with torch.device("meta"):
        skeleton = build_sam_med3d(dataclasses.replace(config, adapter=None) if config.adapter else config)
    if config.adapter:
        base_keys = set(skeleton.state_dict())
        sd = {k: v for k, v in sd.items() if k in base_keys or ".adapter." not in k}
    check_state_dict(skeleton, sd)


def load_checkpoint(path, config: Optional[SamMed3DConfig] = None, map_location: Any = "cpu",
                    trusted: bool = False, attention_impl: Optional[str] = None):
    """Build the model a checkpoint describes and load it with ``strict=True``.

    The config comes from ``config``, else from the file (our format), else the published ``vit_b_ori``.
    The file is inspected first (``checkpoint_file.inspect_checkpoint``: nothing it declares exceeds what it
    holds), and the config is checked against :data:`CONFIG_LIMITS` and, on a memory-free "meta" copy of
    the model, against the file's tensor shapes before the real model is built.
    """
    from .sam_med3d.model import build_sam_med3d

    obj = read_checkpoint(path, map_location=map_location, trusted=trusted)  # bounded by the file size
    _refuse_training_artifacts(path, obj)
    sd, meta = extract_state_dict(obj)
    if config is None:
        cfg_dict = meta.get("config") if isinstance(meta.get("config"), Mapping) else None
        try:
            config = SamMed3DConfig.from_dict(dict(cfg_dict)) if cfg_dict else SamMed3DConfig.vit_b_ori()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"the config stored in {path} is invalid: {exc}") from None
    if attention_impl:
        config.attention_impl = attention_impl
    _check_against_file(config, sd, path)  # before the real model is allocated
    model = build_sam_med3d(config)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
    model.checkpoint_info = {
        "path": str(path), "format": meta.get("format", "sam-med3d" if "args" in meta else "state_dict"),
        "epoch": meta.get("epoch"), "stripped_prefixes": meta.get("stripped_prefixes", []),
    }
    label = meta.get("name") or Path(path).name
    model.description = f"{label} ({config.name})"
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing
def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save`` through :func:`SAM3DSegmentLib.core.atomic.atomic_write` (parent folders created)."""
    import torch

    from ..core.atomic import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp), make_dirs=True)


def save_checkpoint(model, path, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Save weights + config in our format (atomic). ``extra`` adds top-level entries (epoch, name, ...)."""
    payload = {"format": FORMAT, "config": model.config.to_dict(), "model_state_dict": model.state_dict()}
    payload.update(extra or {})
    atomic_torch_save(payload, path)
    return Path(path)
