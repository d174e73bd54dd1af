"""Shared helpers of the 3DSAM-adapter tests: the segment-anything oracle and tiny models.

segment-anything (PyPI ``segment-anything``, Apache-2.0) is a test-only oracle (the ``test`` extra). Its
top-level ``__init__`` imports torchvision for the 2D predictor, which these tests do not need, so
:func:`sam_modeling` imports only its ``modeling`` sub-package (which needs torch alone).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def sam_modeling():
    """``segment_anything.modeling`` (skips the test when the test extra is not installed)."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        pytest.skip("segment-anything (test extra, the oracle) is not installed")
    if "segment_anything" not in sys.modules:
        try:
            importlib.import_module("segment_anything")
        except ImportError:  # torchvision missing: register the package without running its __init__
            pkg = types.ModuleType("segment_anything")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__spec__ = spec
            sys.modules["segment_anything"] = pkg
    return importlib.import_module("segment_anything.modeling")


def randomize_(module, seed: int = 0, std: float = 0.05):
    """Fill every parameter with N(0, std²) (tables and embeddings start at zeros otherwise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_sam_encoder(seed: int = 0):
    """A segment-anything ImageEncoderViT shaped like ``Sam3DAdapterConfig.tiny()``'s 2D start point."""
    from functools import partial

    import torch

    m = sam_modeling()
    enc = m.ImageEncoderViT(img_size=256, patch_size=16, in_chans=3, embed_dim=32, depth=4, num_heads=2,
                            mlp_ratio=2.0, out_chans=16, qkv_bias=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_abs_pos=True, use_rel_pos=True,
                            window_size=4, global_attn_indexes=(1, 3))
    return randomize_(enc, seed)
