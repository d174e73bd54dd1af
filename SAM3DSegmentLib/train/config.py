"""Training configuration: a dataclass schema, JSON (or YAML) files and dotted ``--set`` overrides.

A config file is a JSON object whose keys mirror :class:`TrainConfig` (nested sections are objects);
every key is optional and unknown keys are an error that lists the known ones. YAML files
(``.yaml``/``.yml``) are read only when PyYAML is installed. ``--set optim.lr=1e-4`` overrides one
leaf; the value is parsed as JSON (``true``, ``[1,2]``, ``"text"``) and falls back to a plain string.

No torch import here: this module is light.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "AdapterConfig", "OptimConfig", "ScheduleConfig",
    "LoopConfig", "ValidationConfig", "CheckpointConfig", "LogConfig", "TrainConfig", "MODES",
    "load_config", "apply_overrides", "config_from_dict", "config_to_dict",
]

#: Training modes: what is trained (see docs/training.md, "Modes").
MODES = ("full", "decoder", "adapter3d", "dualpath")


class ConfigError(ValueError):
    """A configuration that cannot be used (the message names the key and the fix)."""


@dataclass
class DataConfig:
    #: Dataset folders: nnU-Net raw (``dataset.json`` + ``imagesTr/<case>_0000.nii.gz`` +
    #: ``labelsTr/<case>.nii.gz``) or the simple binary layout (``imagesTr``/``labelsTr``, equal names).
    roots: List[str] = field(default_factory=list)
    #: Write the demo training set (``sam3d train make-demo-data``) into each root that does not exist yet
    #: before training (configs/tiny.json and configs/demo.json set it; offline, about 3 s, 31 MB).
    make_demo_data: bool = False
    #: "auto" (nnU-Net when dataset.json exists), "nnunet" or "binary".
    layout: str = "auto"
    #: Preprocessing cache folder; "" = ``<output_dir>/cache``.
    cache_dir: str = ""
    #: Isotropic target spacing (mm) of the preprocessing.
    spacing: float = 1.5
    #: Cached image dtype: "int16" (CT HU, rounded) or "float32".
    image_dtype: str = "int16"
    #: Targets smaller than this (mm^3, after resampling) are dropped (reference: 10 mm^3).
    min_target_mm3: float = 10.0
    #: Validation split: a seeded fraction of CASES, or an explicit case list (wins when given).
    val_fraction: float = 0.1
    val_cases: List[str] = field(default_factory=list)
    split_seed: int = 0
    #: Crop side (voxels); 0 = the model's image_size (128 for SAM-Med3D).
    crop_size: int = 0
    #: Maximum random offset (voxels, per axis) of the crop centre from the label-box centre; 0 = none.
    crop_jitter: int = 0
    #: Random flips along each of the three axes (p = 0.5 each).
    flip: bool = True
    #: Resample another target when the crop holds <= this many label voxels (reference: 1000).
    min_crop_label_voxels: int = 1000
    #: How many other targets to try before using the best one seen (with a warning).
    max_resample_tries: int = 20
    #: CT clamp before z-normalisation ([lo, hi] HU); [] disables it.
    ct_clamp: List[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    #: Crop padding value (HU) applied before normalisation (reference: 0).
    pad_value: float = 0.0
    #: DataLoader worker processes (0 = in the main process).
    num_workers: int = 0


@dataclass
class ModelConfig:
    #: Architecture preset of ``SamMed3DConfig``: "vit_b_ori", "small", "tiny" (ignored when a
    #: checkpoint is given: its architecture is used).
    arch: str = "vit_b_ori"
    #: Overrides of ``SamMed3DConfig`` fields (e.g. {"encoder_depth": 4}).
    arch_overrides: Dict[str, Any] = field(default_factory=dict)
    #: Base checkpoint (published SAM-Med3D file or ours); "" = random initialisation.
    checkpoint: str = ""


@dataclass
class AdapterConfig:
    """PEFT settings (modes ``adapter3d`` and ``dualpath``); stored in the model config as ``adapter``."""
    #: Bottleneck width as a fraction of the encoder width (3DSAM-adapter uses 0.5).
    bottleneck_ratio: float = 0.5
    #: Depthwise kernel side (3 = 3x3x3 global; the dual-path local kernel is k x k x 1, axial).
    kernel_size: int = 3
    #: Seed of the adapters' random initialisation (the frozen init snapshot is rebuilt from it).
    init_seed: int = 0
    #: Activation inside the adapter: "relu" or "gelu".
    activation: str = "gelu"
    #: Also train: the blocks' LayerNorms, the 3D position embedding, the neck, prompt enc. + decoder.
    train_norms: bool = True
    train_pos_embed: bool = True
    train_neck: bool = True
    train_prompt_decoder: bool = True


@dataclass
class OptimConfig:
    #: Learning rate of the image encoder (reference: 8e-4 from scratch, 8e-5 when fine-tuning).
    lr: float = 8e-5
    #: Prompt encoder / mask decoder learning rate = lr * this (reference 0.1).
    decoder_lr_scale: float = 0.1
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    #: Max global L2 norm of the trained parameters' gradients; 0 disables clipping.
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    #: "multistep" (reference), "step", "cosine", "linear", "plateau" or "constant".
    name: str = "multistep"
    #: Linear warm-up over this many optimiser steps, from ``warmup_start_factor`` x lr.
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    #: multistep: epochs at which lr is multiplied by ``gamma`` (reference [120, 180], x0.1).
    milestones: List[int] = field(default_factory=lambda: [120, 180])
    gamma: float = 0.1
    #: step: multiply by ``gamma`` every ``step_epochs`` epochs.
    step_epochs: int = 30
    #: cosine / linear: final lr factor.
    min_lr_factor: float = 0.0
    #: plateau: factor and patience (validation checks) on the validation Dice.
    plateau_factor: float = 0.5
    plateau_patience: int = 5


@dataclass
class LoopConfig:
    epochs: int = 200
    #: Samples per process per micro-batch.
    batch_size: int = 12
    #: Micro-batches per optimiser step (gradient accumulation; reference 20).
    accumulate: int = 1
    #: Click steps per sample (reference 11), honoured.
    num_click_steps: int = 11
    #: One random step in [lo, hi] (plus the last step) runs with no points (mask only).
    mask_only_range: List[int] = field(default_factory=lambda: [2, 8])
    #: Training click sampler: "random" (reference: uniform in the error region) or "deepest"
    #: (RITM: deepest point of the larger error region).
    click_mode: str = "random"
    #: Which clicks the decoder sees: "newest" (reference training) or "all" clicks so far.
    feed: str = "newest"
    #: Detach the fed-back low-res logits (reference: not detached).
    detach_feedback: bool = False
    #: Stop after this many optimiser steps in total (0 = no limit); used by quick runs and tests.
    max_steps: int = 0
    #: Stop cleanly (saving a checkpoint) after this many minutes of wall-clock (0 = no limit).
    max_minutes: float = 0.0
    #: Training samples per epoch (0 = one per target).
    samples_per_epoch: int = 0


@dataclass
class ValidationConfig:
    #: Validate every N epochs (0 = never).
    every_epochs: int = 1
    #: Click steps during validation (0 = loop.num_click_steps).
    click_steps: int = 0
    #: Validation clicks: "deepest" (deterministic) or "random" (seeded).
    click_mode: str = "deepest"
    #: Use at most this many validation targets (0 = all).
    max_targets: int = 0
    #: Early stopping: stop after this many validations without improvement (0 = off).
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    #: Save ``latest.pt`` every N optimiser steps (0 = at the end of every epoch only).
    every_steps: int = 0
    #: Resume from: "" (fresh), "auto" (``<output_dir>/latest.pt`` if present) or a path.
    resume: str = ""
    #: Also write the image encoder alone (``encoder.pt``) at the end.
    export_encoder: bool = False


@dataclass
class LogConfig:
    csv: bool = True
    #: "auto" = when tensorboard is installed; true/false force it.
    tensorboard: str = "auto"
    wandb: bool = False
    wandb_project: str = "sam3dsegment"
    progress: bool = True
    #: Print a line every N optimiser steps (0 = only per epoch).
    print_every: int = 10


@dataclass
class TrainConfig:
    #: Where checkpoints, logs and (by default) the cache go.
    output_dir: str = "runs/sam3d"
    #: "full", "decoder", "adapter3d" or "dualpath".
    mode: str = "full"
    #: "auto" (cuda if available), "cpu", "cuda", "cuda:1", "mps".
    device: str = "auto"
    #: "auto" (bf16 on GPUs that support it, else fp16; off on CPU), "off", "bf16", "fp16".
    amp: str = "auto"
    grad_checkpointing: bool = False
    seed: int = 0
    #: torch.use_deterministic_algorithms (slower kernels on GPU).
    deterministic: bool = True
    #: Intra-op CPU threads (0 = torch default).
    threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    val: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "TrainConfig":
        """Check value ranges and choices; raises :class:`ConfigError`."""
        p = []
        if self.mode not in MODES:
            p.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            p.append(f"amp must be auto/off/bf16/fp16, got {self.amp!r}")
        if self.data.layout not in ("auto", "nnunet", "binary"):
            p.append(f"data.layout must be auto/nnunet/binary, got {self.data.layout!r}")
        if self.data.image_dtype not in ("int16", "float32"):
            p.append(f"data.image_dtype must be int16 or float32, got {self.data.image_dtype!r}")
        if not 0.0 <= self.data.val_fraction < 1.0:
            p.append(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if self.data.spacing <= 0:
            p.append("data.spacing must be > 0 (mm)")
        if self.data.ct_clamp and len(self.data.ct_clamp) != 2:
            p.append("data.ct_clamp must be [lo, hi] or []")
        if self.loop.batch_size < 1 or self.loop.accumulate < 1 or self.loop.epochs < 1:
            p.append("loop.batch_size, loop.accumulate and loop.epochs must be >= 1")
        if self.loop.num_click_steps < 1:
            p.append("loop.num_click_steps must be >= 1")
        if len(self.loop.mask_only_range) != 2 or self.loop.mask_only_range[0] > self.loop.mask_only_range[1]:
            p.append("loop.mask_only_range must be [lo, hi] with lo <= hi")
        if self.loop.click_mode not in ("random", "deepest"):
            p.append(f"loop.click_mode must be random or deepest, got {self.loop.click_mode!r}")
        if self.val.click_mode not in ("random", "deepest"):
            p.append(f"val.click_mode must be random or deepest, got {self.val.click_mode!r}")
        if self.loop.feed not in ("newest", "all"):
            p.append(f"loop.feed must be newest or all, got {self.loop.feed!r}")
        if self.schedule.name not in ("multistep", "step", "cosine", "linear", "plateau", "constant"):
            p.append(f"schedule.name must be multistep/step/cosine/linear/plateau/constant, "
                     f"got {self.schedule.name!r}")
        if self.adapter.activation not in ("relu", "gelu"):
            p.append("adapter.activation must be relu or gelu")
        if not 0.0 < self.adapter.bottleneck_ratio <= 4.0:
            p.append("adapter.bottleneck_ratio must be in (0, 4]")
        if self.adapter.kernel_size < 1 or self.adapter.kernel_size % 2 == 0:
            p.append("adapter.kernel_size must be odd and >= 1")
        if self.log.tensorboard not in ("auto", "true", "false", True, False):
            p.append("log.tensorboard must be auto, true or false")
        if p:
            raise ConfigError("invalid training config: " + "; ".join(p))
        return self


# ------------------------------------------------------------------------------ dict <-> dataclass
def _from_dict(cls, d: Dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be an object/dict, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[_join(where, u) for u in unknown]}; "
                          f"known keys under {where or 'the top level'}: {sorted(known)}")
    obj = cls()
    for name, value in d.items():
        current = getattr(obj, name)
        if is_dataclass(current):
            setattr(obj, name, _from_dict(type(current), value, _join(where, name)))
        else:
            setattr(obj, name, _coerce(current, value, _join(where, name)))
    return obj


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(current: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type of the default ``current`` (int -> float is allowed)."""
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        if isinstance(value, bool):  # e.g. log.tensorboard=true
            return "true" if value else "false"
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(current, list):
        if isinstance(value, (str, int, float)) and key.endswith(("roots", "val_cases")):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return list(value)
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be an object, got {value!r}")
        return dict(value)
    return value


def config_from_dict(d: Dict[str, Any]) -> TrainConfig:
    return _from_dict(TrainConfig, d, "").validate()


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    return asdict(cfg)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``key.sub=value`` strings; unknown keys raise :class:`ConfigError` listing the known ones."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        obj = cfg
        for depth, part in enumerate(parts):
            if not is_dataclass(obj):
                # a dict-valued leaf such as model.arch_overrides.encoder_depth
                if isinstance(obj, dict):
                    if depth != len(parts) - 1:
                        obj = obj.setdefault(part, {})
                        continue
                    obj[part] = _parse_value(text)
                    break
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is not a section")
            names = {f.name for f in fields(obj)}
            if part not in names:
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(f"--set {key}: unknown key {part!r}; known keys under {where}: "
                                  f"{sorted(names)}")
            if depth == len(parts) - 1:
                current = getattr(obj, part)
                if is_dataclass(current):
                    raise ConfigError(f"--set {key}: {key} is a section; set one of its keys, e.g. "
                                      f"{key}.{fields(current)[0].name}=...")
                setattr(obj, part, _coerce(current, _parse_value(text), key))
            else:
                obj = getattr(obj, part)
    return cfg.validate()


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a JSON (or YAML, when PyYAML is installed) config file and apply ``--set`` overrides."""
    data: Dict[str, Any] = {}
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
    cfg = _from_dict(TrainConfig, data, "")
    return apply_overrides(cfg, overrides)
