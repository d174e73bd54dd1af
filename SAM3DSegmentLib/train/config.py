"""Training configuration: a pydantic schema, JSON (or YAML) files and dotted ``--set`` overrides.

A config file is a JSON object whose keys mirror :class:`TrainConfig` (nested sections are objects);
every key is optional. YAML files (``.yaml``/``.yml``) are read only when PyYAML is installed.
``--set optim.lr=1e-4`` overrides one leaf; the value is parsed as JSON (``true``, ``[1,2]``, ``"text"``)
and falls back to a plain string.

Validation is pydantic's (strict types, plus the few conversions a hand-written file needs: an integral
number for an integer, ``"true"``/``"no"``... for a flag, one name for a list of names); its errors are
turned into :class:`ConfigError` messages that name the key path and what it takes, and suggest the
nearest known key for a typo. Build configs with :func:`config_from_dict` / :func:`load_config` (they raise
:class:`ConfigError`); no torch import here.
"""
from __future__ import annotations

import difflib
import json
import os
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence, Tuple

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator

from ..core.click_protocols import new_spelling
from .adapter_config import Sam3DAdapterTrainConfig
from .config_types import Flag, Floats, Int, Ints, Names, Section as _Section, switch as _switch

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "AdapterConfig", "OptimConfig", "ScheduleConfig",
    "LoopConfig", "ValidationConfig", "CheckpointConfig", "LogConfig", "TrainConfig", "MODES",
    "Sam3DAdapterTrainConfig",
    "load_config", "apply_overrides", "config_from_dict", "config_to_dict",
]

#: Training modes: what is trained (see docs/training.md, "Modes").
MODES = ("full", "decoder", "adapter3d", "dualpath")


class ConfigError(ValueError):
    """A configuration that cannot be used (the message names the key and the fix)."""


# ----------------------------------------------------------------------------------- the schema
class DataConfig(_Section):
    #: Dataset folders: nnU-Net raw (``dataset.json`` + ``imagesTr/<case>_0000.nii.gz`` +
    #: ``labelsTr/<case>.nii.gz``) or the simple binary layout (``imagesTr``/``labelsTr``, equal names).
    roots: Names = []
    #: Write the demo training set (``sam3d train make-demo-data``) into each root that does not exist yet
    #: before training (configs/tiny.json and configs/demo.json set it; offline, about 3 s, 31 MB).
    make_demo_data: Flag = False
    #: "auto" (nnU-Net when dataset.json exists), "nnunet" or "binary".
    layout: Literal["auto", "nnunet", "binary"] = "auto"
    #: Preprocessing cache folder; "" = ``<output_dir>/cache``.
    cache_dir: str = ""
    #: Isotropic target spacing (mm) of the preprocessing.
    spacing: float = Field(1.5, gt=0)
    #: Cached image dtype: "int16" (CT HU, rounded) or "float32".
    image_dtype: Literal["int16", "float32"] = "int16"
    #: Targets smaller than this (mm^3, after resampling) are dropped (reference: 10 mm^3).
    min_target_mm3: float = 10.0
    #: Validation split: a seeded fraction of CASES, or an explicit case list (wins when given).
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    val_cases: Names = []
    split_seed: Int = 0
    #: Crop side (voxels); 0 = the model's image_size (128 for SAM-Med3D).
    crop_size: Int = 0
    #: Maximum random offset (voxels, per axis) of the crop centre from the label-box centre; 0 = none.
    crop_jitter: Int = 0
    #: Random flips along each of the three axes (p = 0.5 each).
    flip: Flag = True
    #: Resample another target when the crop holds <= this many label voxels (reference: 1000).
    min_crop_label_voxels: Int = 1000
    #: How many other targets to try before using the best one seen (with a warning).
    max_resample_tries: Int = 20
    #: CT clamp before z-normalisation ([lo, hi] HU); [] disables it.
    ct_clamp: Floats = [-1000.0, 1000.0]
    #: Crop padding value (HU) applied before normalisation (reference: 0).
    pad_value: float = 0.0
    #: DataLoader worker processes (0 = in the main process).
    num_workers: Int = 0

    @field_validator("ct_clamp")
    @classmethod
    def _lo_hi_or_empty(cls, v: List[float]) -> List[float]:
        if v and len(v) != 2:
            raise ValueError("must be [lo, hi] or []")
        return v


class ModelConfig(_Section):
    #: Model family: "sam_med3d" or "3dsam_adapter" (trained by train/adapter_loop.py with ``recipe``,
    #: starting from ``init``: segment-anything's sam_vit_b .pth or a 3DSAM-adapter file; "" = random).
    family: Literal["sam_med3d", "3dsam_adapter"] = "sam_med3d"
    recipe: Literal["original", "dualpath"] = "original"
    init: str = ""
    #: Architecture preset of ``SamMed3DConfig``: "vit_b_ori", "small", "tiny" (ignored when a
    #: checkpoint is given: its architecture is used); 3dsam_adapter: "vit_b" (the default) or "tiny".
    arch: str = "vit_b_ori"
    #: Overrides of ``SamMed3DConfig`` fields (e.g. {"encoder_depth": 4}).
    arch_overrides: Dict[str, Any] = {}
    #: Base checkpoint (published SAM-Med3D file or ours); "" = random initialisation.
    checkpoint: str = ""


class AdapterConfig(_Section):
    """PEFT settings (modes ``adapter3d`` and ``dualpath``); stored in the model config as ``adapter``."""
    #: Bottleneck width as a fraction of the encoder width (3DSAM-adapter uses 0.5).
    bottleneck_ratio: float = Field(0.5, gt=0.0, le=4.0)
    #: Depthwise kernel side (3 = 3x3x3 global; the dual-path local kernel is k x k x 1, axial).
    kernel_size: Int = 3
    #: Seed of the adapters' random initialisation (the frozen init snapshot is rebuilt from it).
    init_seed: Int = 0
    #: Activation inside the adapter: "relu" or "gelu".
    activation: Literal["relu", "gelu"] = "gelu"
    #: Also train: the blocks' LayerNorms, the 3D position embedding, the neck, prompt enc. + decoder.
    train_norms: Flag = True
    train_pos_embed: Flag = True
    train_neck: Flag = True
    train_prompt_decoder: Flag = True

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v < 1 or v % 2 == 0:
            raise ValueError("must be odd and >= 1")
        return v


class OptimConfig(_Section):
    #: Learning rate of the image encoder (reference: 8e-4 from scratch, 8e-5 when fine-tuning).
    lr: float = 8e-5
    #: Prompt encoder / mask decoder learning rate = lr * this (reference 0.1).
    decoder_lr_scale: float = 0.1
    weight_decay: float = 0.1
    betas: Floats = [0.9, 0.999]
    eps: float = 1e-8
    #: Max global L2 norm of the trained parameters' gradients; 0 disables clipping.
    grad_clip: float = 1.0


class ScheduleConfig(_Section):
    #: "multistep" (reference), "step", "cosine", "linear", "plateau" or "constant".
    name: Literal["multistep", "step", "cosine", "linear", "plateau", "constant"] = "multistep"
    #: Linear warm-up over this many optimiser steps, from ``warmup_start_factor`` x lr.
    warmup_steps: Int = 0
    warmup_start_factor: float = 0.01
    #: multistep: epochs at which lr is multiplied by ``gamma`` (reference [120, 180], x0.1).
    milestones: Ints = [120, 180]
    gamma: float = 0.1
    #: step: multiply by ``gamma`` every ``step_epochs`` epochs.
    step_epochs: Int = 30
    #: cosine / linear: final lr factor.
    min_lr_factor: float = 0.0
    #: plateau: factor and patience (validation checks) on the validation Dice.
    plateau_factor: float = 0.5
    plateau_patience: Int = 5


class LoopConfig(_Section):
    epochs: Int = Field(200, ge=1)
    #: Samples per process per micro-batch.
    batch_size: Int = Field(12, ge=1)
    #: Micro-batches per optimiser step (gradient accumulation; reference 20).
    accumulate: Int = Field(1, ge=1)
    #: Click steps per sample (reference 11), honoured.
    num_click_steps: Int = Field(11, ge=1)
    #: One random step in [lo, hi] (plus the last step) runs with no points (mask only).
    mask_only_range: Ints = [2, 8]
    #: Training click sampler: "random" (reference: uniform in the error region) or "deepest"
    #: (RITM: deepest point of the larger error region).
    click_mode: Literal["random", "deepest"] = "random"
    #: The click protocol (core/click_protocols.py): "newest-click" (reference training) or "all-clicks".
    feed: Annotated[Literal["newest-click", "all-clicks"], BeforeValidator(new_spelling)] = "newest-click"
    #: Detach the fed-back low-res logits (reference: not detached).
    detach_feedback: Flag = False
    #: Stop after this many optimiser steps in total (0 = no limit); used by quick runs and tests.
    max_steps: Int = 0
    #: Stop cleanly (saving a checkpoint) after this many minutes of wall-clock (0 = no limit).
    max_minutes: float = 0.0
    #: Training samples per epoch (0 = one per target).
    samples_per_epoch: Int = 0

    @field_validator("mask_only_range")
    @classmethod
    def _lo_le_hi(cls, v: List[int]) -> List[int]:
        if len(v) != 2 or v[0] > v[1]:
            raise ValueError("must be [lo, hi] with lo <= hi")
        return v


class ValidationConfig(_Section):
    #: Validate every N epochs (0 = never).
    every_epochs: Int = 1
    #: Click steps during validation (0 = loop.num_click_steps).
    click_steps: Int = 0
    #: Validation clicks: "deepest" (deterministic) or "random" (seeded).
    click_mode: Literal["random", "deepest"] = "deepest"
    #: Use at most this many validation targets (0 = all).
    max_targets: Int = 0
    #: Early stopping: stop after this many validations without improvement (0 = off).
    early_stopping_patience: Int = 0
    early_stopping_min_delta: float = 0.0


class CheckpointConfig(_Section):
    #: Save ``latest.pt`` every N optimiser steps (0 = at the end of every epoch only).
    every_steps: Int = 0
    #: Resume from: "" (fresh), "auto" (``<output_dir>/latest.pt`` if present) or a path.
    resume: str = ""
    #: Also write the image encoder alone (``encoder.pt``) at the end.
    export_encoder: Flag = False


class LogConfig(_Section):
    csv: Flag = True
    #: "auto" = when tensorboard is installed; true/false force it.
    tensorboard: Annotated[Literal["auto", "true", "false"], BeforeValidator(_switch)] = "auto"
    wandb: Flag = False
    wandb_project: str = "sam3dsegment"
    progress: Flag = True
    #: Print a line every N optimiser steps (0 = only per epoch).
    print_every: Int = 10


class TrainConfig(_Section):
    #: Where checkpoints, logs and (by default) the cache go.
    output_dir: str = "runs/sam3d"
    #: "full", "decoder", "adapter3d" or "dualpath".
    mode: Literal[MODES] = "full"
    #: "auto" (cuda if available), "cpu", "cuda", "cuda:1", "mps".
    device: str = "auto"
    #: "auto" (bf16 on GPUs that support it, else fp16; off on CPU), "off", "bf16", "fp16".
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    grad_checkpointing: Flag = False
    seed: Int = 0
    #: torch.use_deterministic_algorithms (slower kernels on GPU).
    deterministic: Flag = True
    #: Intra-op CPU threads (0 = torch default).
    threads: Int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    val: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    sam3d_adapter: Sam3DAdapterTrainConfig = Field(default_factory=Sam3DAdapterTrainConfig)


# ------------------------------------------------------------------------------- clear messages
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "list_type": "a list", "dict_type": "an object", "model_type": "an object"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _section(model: type, path: Sequence[Any]) -> Optional[type]:
    """The section class at ``path`` below ``model`` (None when the path leaves the schema)."""
    for part in path:
        ann = model.model_fields[part].annotation if part in getattr(model, "model_fields", {}) else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _key(loc: Sequence[Any]) -> str:
    """``data.roots[0]`` for the location ``("data", "roots", 0)``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _messages(err: ValidationError) -> List[str]:
    unknown: Dict[Tuple[Any, ...], List[str]] = {}
    out: List[str] = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = _key(loc)
        kind, ctx = e["type"], e.get("ctx") or {}
        if kind == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        elif kind in _EXPECTED:
            out.append(f"{key or 'the config'} must be {_EXPECTED[kind]}, got {e['input']!r}")
        elif kind == "literal_error":
            out.append(f"{key} must be one of {ctx['expected'].replace(' or ', ', ')}; got {e['input']!r}")
        elif kind in _BOUNDS:
            bound = next(iter(ctx.values()))
            out.append(f"{key} must be {_BOUNDS[kind]} {bound}, got {e['input']!r}")
        elif kind == "value_error":
            out.append(f"{key} {ctx['error']}, got {e['input']!r}")
        else:
            out.append(f"{key}: {e['msg']} (got {e['input']!r})")
    for parent, names in unknown.items():
        section = _section(TrainConfig, parent)
        known = list(section.model_fields) if section else []
        where = _key(parent)
        full = [f"{where}.{n}" if where else n for n in names]
        near = [difflib.get_close_matches(n, known, n=1, cutoff=0.6) for n in names]
        hints = [f"{where}.{m[0]}" if where else m[0] for m in near if m]
        hint = f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
        out.insert(0, f"unknown config key(s) {full}{hint}; known keys under {where or 'the top level'}: "
                      f"{sorted(known)}")
    return out


def _validate(data: Any, source: str = "") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        where = f" ({source})" if source else ""
        raise ConfigError(f"invalid training config{where}: " + "; ".join(_messages(err))) from None


def config_from_dict(d: Dict[str, Any]) -> TrainConfig:
    """A checked :class:`TrainConfig` from a (possibly partial) dict; raises :class:`ConfigError`."""
    return _validate(d)


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    return cfg.model_dump()


# ------------------------------------------------------------------------------------ overrides
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def _set(data: Dict[str, Any], item: str) -> None:
    """Set the leaf of one ``key.sub=value`` in the raw config dict ``data`` (the validation checks the key)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
    key, text = item.split("=", 1)
    *sections, leaf = key.strip().split(".")
    for part in sections:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[leaf] = _parse_value(text)


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``key.sub=value`` strings; an unknown key raises :class:`ConfigError` naming the known ones."""
    data = config_to_dict(cfg)
    for item in overrides or ():
        _set(data, item)
    return _validate(data, "with --set" if overrides else "")


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a JSON (or YAML, when PyYAML is installed) config file, apply ``--set`` overrides, check it."""
    data: Any = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist; give a JSON file (see configs/)")
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
        if path.lower().endswith((".yaml", ".yml")):
            try:
                import yaml  # type: ignore
            except ImportError as err:
                raise ConfigError(f"{path} is YAML but PyYAML is not installed; `pip install pyyaml` "
                                  "or write the config as JSON") from err
            data = yaml.safe_load(text) or {}
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: not valid JSON ({err}); fix the file") from err
    for item in overrides or () if isinstance(data, dict) else ():  # else: the validation names the problem
        _set(data, item)
    return _validate(data, f"{path}{' with --set' if overrides else ''}" if path else "")
