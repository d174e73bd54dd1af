"""Helpers for the training tests (test_train, test_ddp, test_adapters): tiny synthetic datasets and configs."""
from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np

from SAM3DSegmentLib.io import write_volume
from SAM3DSegmentLib.data.phantoms import synthetic_case

#: The tiny model used by the training tests: the SAM-Med3D family at 32^3 input (2^3 tokens, 8^3 logits).
TINY_ARCH = {"image_size": 32, "encoder_embed_dim": 24, "encoder_depth": 2, "encoder_num_heads": 2,
             "encoder_global_attn_indexes": [1], "prompt_embed_dim": 24, "decoder_num_heads": 2,
             "decoder_mlp_dim": 32, "iou_head_hidden_dim": 16, "mask_in_chans": 8}


def write_nnunet_dataset(root: str, n_cases: int = 4, shape_ijk=(28, 28, 20), spacing=(1.5, 1.5, 2.0),
                         n_objects: int = 2, seed0: int = 0) -> str:
    """An nnU-Net raw dataset of synthetic CT phantoms (labels object_1..object_N -> 1..N)."""
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    for c in range(n_cases):
        image, masks = synthetic_case(seed0 + c, shape_ijk=shape_ijk, spacing=spacing, n_objects=n_objects,
                                      noise=5.0)
        lab = np.zeros(image.array.shape, dtype=np.uint8)
        for n in range(n_objects):
            m = masks.get(f"object_{n + 1}")
            if m is not None:
                lab[np.asarray(m.array) > 0] = n + 1
        write_volume(image, os.path.join(root, "imagesTr", f"case{c:03d}_0000.nii.gz"))
        write_volume(image.with_array(lab), os.path.join(root, "labelsTr", f"case{c:03d}.nii.gz"))
    labels = {"background": 0, **{f"object_{n + 1}": n + 1 for n in range(n_objects)}}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": labels, "channel_names": {"0": "CT"}, "numTraining": n_cases,
                   "file_ending": ".nii.gz"}, f)
    return root


def tiny_config(root: str, out: str, **over) -> Dict:
    """A config dict for a few-second CPU run on ``root``."""
    cfg = {
        "output_dir": out, "mode": "full", "device": "cpu", "seed": 0, "threads": 1,
        "data": {"roots": [root], "val_fraction": 0.25, "min_crop_label_voxels": 5, "flip": True},
        "model": {"arch": "tiny", "arch_overrides": dict(TINY_ARCH)},
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "loop": {"epochs": 2, "batch_size": 2, "num_click_steps": 3, "mask_only_range": [1, 1]},
        "val": {"every_epochs": 1, "click_steps": 2},
        "log": {"progress": False, "print_every": 0, "tensorboard": "false"},
    }
    for k, v in over.items():
        sect, _, key = k.partition("__")
        if key:
            cfg.setdefault(sect, {})[key] = v
        else:
            cfg[sect] = v
    return cfg


def write_config(path: str, cfg: Dict) -> str:
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path
