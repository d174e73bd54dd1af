"""Parameter-efficient adapters for the SAM-Med3D image encoder (3DSAM-adapter style) and trainable sets.

Two adapter kinds, one per encoder block, placed in ``Block3D``'s optional ``adapter`` slot, which maps the
tokens after the attention residual, before ``norm2``/MLP: ``x <- x + delta(x)`` (3DSAM-adapter puts its
adapter at the block input, before ``norm1``; both are residual bottlenecks on the same token grid):

* ``adapter3d``: Linear down (C -> r) -> depthwise Conv3d k x k x k on the token grid -> activation ->
  Linear up (r -> C).
* ``dualpath``: a shared Linear down-projection (C -> r), then
  - a GLOBAL path: depthwise Conv3d k x k x k;
  - a LOCAL path (UNet++-like nested skips, no resampling on the small token grid): units of
    in-plane depthwise Conv3d with kernel (k, k, 1) + pointwise Conv3d 1x1x1 + InstanceNorm3d + ReLU,
    ``l1 = U1(h)``, ``l2 = U2(l1)``, ``l12 = U3(l1 + l2)``, ``local = h + l1 + l12``;
  - a 1x1x1 Conv3d GATE on ``[global, local]`` with a sigmoid: ``g*global + (1-g)*local``;
  - activation, Linear up (r -> C).

Axis conventions. Encoder tokens are channels-last ``(B, D, H, W, C)``; the grid axes (D, H, W) are the
region's (a, b, c) = RAS-canonical (i, j, k) = (R, A, S) axes (see ``backends.py``). Convolutions run on
``(B, r, D, H, W)``. The AXIAL plane is (R, A) = (D, H), so the in-plane kernel is ``(k, k, 1)``.

Identity at initialisation WITH gradient ("delta from a frozen initial copy"). Each adapter holds its
trainable body ``A_theta`` and a frozen snapshot ``theta0`` of the body's random initial parameters
(non-persistent buffers rebuilt from ``init_seed``), and outputs ``x + A_theta(x) - A_theta0(x)``.
At initialisation theta == theta0, so the two terms are computed by the same kernels on the same bits and
cancel EXACTLY: the encoder output is unchanged. The gradient w.r.t. theta is the ordinary gradient of
``A_theta`` (nothing is zero-initialised), so every adapter tensor changes in the first optimiser step.
(A zero-initialised up-projection would be identity too but leaves every tensor before it with exactly zero
gradient at the first step.) ``theta0`` is not stored in checkpoints: it is regenerated from
``init_seed`` with a private CPU generator; ``adapter_cfg["theta0_sha256"]`` (set by :func:`apply_adapters`)
detects a torch whose generator would rebuild a different snapshot.

Trainable sets (:func:`mark_trainable`): ``full`` = everything; ``decoder`` = prompt encoder + mask
decoder; ``adapter3d``/``dualpath`` = the adapters + (optionally) the blocks' norm1/norm2, the 3D
``pos_embed`` (SAM-Med3D's position embedding is already 3D, so it plays the role of 3DSAM-adapter's
added depth embedding: we train it instead of adding a new term), the neck, and the prompt encoder +
mask decoder; everything else gets ``requires_grad=False``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ADAPTER_KINDS", "Adapter3D", "DualPathAdapter", "apply_adapters", "adapter_modules",
    "mark_trainable", "count_parameters", "default_adapter_config",
]

ADAPTER_KINDS = ("adapter3d", "dualpath")


def default_adapter_config(kind: str = "adapter3d", **kw) -> Dict[str, Any]:
    cfg = {"kind": kind, "bottleneck_ratio": 0.5, "kernel_size": 3, "init_seed": 0, "activation": "gelu"}
    cfg.update(kw)
    return cfg


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"adapter activation must be 'relu' or 'gelu', got {name!r}")


def _seeded_init_(module: nn.Module, generator: torch.Generator) -> None:
    """Deterministic init of every parameter from ``generator`` (uniform, fan-in scaled, none zero)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
        else:  # biases, norm affines: use the fan-in of the owner weight when known, else 1
            fan_in = max(1, getattr(p, "_fan_in_hint", 1))
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            u = torch.rand(p.shape, generator=generator, dtype=torch.float32) * 2.0 - 1.0
            p.copy_((u * bound).to(p.dtype))


class _DeltaAdapter(nn.Module):
    """Base: ``forward(x) = x + body(x) - body_theta0(x)``, x channels-last (B, D, H, W, C)."""

    body: nn.Module

    def _finish_init(self, init_seed: int) -> None:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(init_seed))
        # bias fan-in hints: the fan-in of the layer they belong to
        for mod in self.body.modules():
            w = getattr(mod, "weight", None)
            b = getattr(mod, "bias", None)
            if isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter) and w.dim() >= 2:
                b._fan_in_hint = w[0].numel()  # type: ignore[attr-defined]
        _seeded_init_(self.body, g)
        self._theta0_names: List[str] = []
        for name, p in self.body.named_parameters():
            buf = "theta0__" + name.replace(".", "__")
            self.register_buffer(buf, p.detach().clone(), persistent=False)
            self._theta0_names.append(name)

    def theta0(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, "theta0__" + n.replace(".", "__")) for n in self._theta0_names}

    def theta0_digest(self) -> bytes:
        h = hashlib.sha256()
        for n, t in self.theta0().items():
            h.update(n.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.digest()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = torch.func.functional_call(self.body, self.theta0(), (x,))
        return x + (self.body(x) - frozen)


class _Adapter3DBody(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel_size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.act = _act(activation)
        self.up = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x).permute(0, 4, 1, 2, 3)          # (B, r, D, H, W) = (B, r, a, b, c)
        h = self.act(self.conv(h)).permute(0, 2, 3, 4, 1)  # back to channels-last
        return self.up(h)


class Adapter3D(_DeltaAdapter):
    """3DSAM-adapter-style bottleneck: Linear down -> depthwise 3D conv -> act -> Linear up (delta form)."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3, activation: str = "gelu",
                 init_seed: int = 0):
        super().__init__()
        self.body = _Adapter3DBody(dim, hidden, kernel_size, activation)
        self._finish_init(init_seed)


class _InPlaneUnit(nn.Module):
    """Depthwise (k, k, 1) conv in the axial (a, b) plane + pointwise 1x1x1 + InstanceNorm3d + ReLU."""

    def __init__(self, ch: int, k: int):
        super().__init__()
        self.dw = nn.Conv3d(ch, ch, (k, k, 1), padding=(k // 2, k // 2, 0), groups=ch)
        self.pw = nn.Conv3d(ch, ch, 1)
        self.norm = nn.InstanceNorm3d(ch, affine=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.pw(self.dw(h))))


class _DualPathBody(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel_size: int, activation: str):
        super().__init__()
        k = kernel_size
        self.down = nn.Linear(dim, hidden)
        self.global_conv = nn.Conv3d(hidden, hidden, k, padding=k // 2, groups=hidden)
        self.local1 = _InPlaneUnit(hidden, k)
        self.local2 = _InPlaneUnit(hidden, k)
        self.local12 = _InPlaneUnit(hidden, k)
        self.gate = nn.Conv3d(2 * hidden, hidden, 1)
        self.act = _act(activation)
        self.up = nn.Linear(hidden, dim)

    def local_path(self, h: torch.Tensor) -> torch.Tensor:
        """(B, r, a, b, c) -> same; mixes voxels only within each axial (a, b) plane."""
        l1 = self.local1(h)
        l2 = self.local2(l1)
        l12 = self.local12(l1 + l2)
        return h + l1 + l12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x).permute(0, 4, 1, 2, 3)  # (B, r, a, b, c)
        g_path = self.global_conv(h)
        l_path = self.local_path(h)
        gate = torch.sigmoid(self.gate(torch.cat([g_path, l_path], dim=1)))
        fused = gate * g_path + (1.0 - gate) * l_path
        return self.up(self.act(fused).permute(0, 2, 3, 4, 1))


class DualPathAdapter(_DeltaAdapter):
    """Global (3D depthwise) + local (axial in-plane, UNet++-like) paths fused by a gate (delta form)."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3, activation: str = "gelu",
                 init_seed: int = 0):
        super().__init__()
        self.body = _DualPathBody(dim, hidden, kernel_size, activation)
        self._finish_init(init_seed)


def _encoder_width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "encoder_embed_dim"):
        return int(cfg.encoder_embed_dim)
    return int(model.image_encoder.blocks[0].norm1.normalized_shape[0])


def apply_adapters(model: nn.Module, adapter_cfg: Dict[str, Any]) -> nn.Module:
    """Insert one adapter into every image-encoder block of ``model`` (in place) and return it.

    ``adapter_cfg``: ``{"kind": "adapter3d"|"dualpath", "bottleneck_ratio": 0.5, "kernel_size": 3,
    "init_seed": 0, "activation": "gelu"}`` (plus optional ``theta0_sha256``, checked, and trainable-set
    flags that :func:`mark_trainable` reads). Block ``i`` gets ``init_seed + i``. The adapters live at
    ``image_encoder.blocks.<i>.adapter.body.*`` in the state dict; existing keys are unchanged.
    After the call ``adapter_cfg["theta0_sha256"]`` holds the fingerprint of the frozen init snapshot.
    """
    if adapter_cfg is None:
        return model
    kind = adapter_cfg.get("kind")
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {kind!r}")
    dim = _encoder_width(model)
    hidden = max(1, int(round(dim * float(adapter_cfg.get("bottleneck_ratio", 0.5)))))
    k = int(adapter_cfg.get("kernel_size", 3))
    act = str(adapter_cfg.get("activation", "gelu"))
    seed = int(adapter_cfg.get("init_seed", 0))
    cls = Adapter3D if kind == "adapter3d" else DualPathAdapter
    blocks = model.image_encoder.blocks
    param = next(model.image_encoder.parameters())
    digest = hashlib.sha256()
    for i, block in enumerate(blocks):
        if not hasattr(block, "adapter"):
            raise TypeError(f"image_encoder.blocks[{i}] ({type(block).__name__}) has no adapter slot")
        if getattr(block, "adapter", None) is not None:
            raise ValueError(f"image_encoder.blocks[{i}] already has an adapter; apply adapters once")
        adapter = cls(dim, hidden, k, act, init_seed=seed + i).to(device=param.device, dtype=param.dtype)
        block.adapter = adapter  # Block3D's optional slot: x <- adapter(x) after the attention residual
        digest.update(adapter.theta0_digest())
    fingerprint = digest.hexdigest()
    expected = adapter_cfg.get("theta0_sha256")
    if expected and expected != fingerprint:
        raise RuntimeError(
            "the adapters' frozen initial snapshot rebuilt from init_seed differs from the one the "
            "checkpoint was trained with (different torch random generator?); merge the adapter "
            "checkpoint with the torch version that trained it (`sam3d train merge`) and load the merged "
            "file instead")
    adapter_cfg["theta0_sha256"] = fingerprint
    return model


def adapter_modules(model: nn.Module) -> List[nn.Module]:
    return [b.adapter for b in model.image_encoder.blocks if getattr(b, "adapter", None) is not None]


def _is_norm_of_block(name: str) -> bool:
    parts = name.split(".")
    return (len(parts) >= 4 and parts[0] == "image_encoder" and parts[1] == "blocks"
            and parts[3] in ("norm1", "norm2"))


def trainable_predicate(mode: str, flags: Optional[Dict[str, Any]] = None):
    """A function ``name -> bool`` deciding which parameters train in ``mode``."""
    flags = dict(flags or {})
    if mode == "full":
        return lambda name: True
    if mode == "decoder":
        return lambda name: name.startswith(("prompt_encoder.", "mask_decoder."))
    if mode in ADAPTER_KINDS:
        def pred(name: str) -> bool:
            if ".adapter." in name and name.startswith("image_encoder.blocks."):
                return True
            if flags.get("train_norms", True) and _is_norm_of_block(name):
                return True
            if flags.get("train_pos_embed", True) and name.startswith("image_encoder.pos_embed"):
                return True
            if flags.get("train_neck", True) and name.startswith("image_encoder.neck."):
                return True
            if flags.get("train_prompt_decoder", True) and name.startswith(("prompt_encoder.",
                                                                           "mask_decoder.")):
                return True
            return False
        return pred
    raise ValueError(f"unknown training mode {mode!r}; use full, decoder, adapter3d or dualpath")


def mark_trainable(model: nn.Module, mode: str, flags: Optional[Dict[str, Any]] = None
                   ) -> Tuple[int, int]:
    """Set ``requires_grad`` for ``mode``; returns ``(trainable, total)`` parameter counts."""
    pred = trainable_predicate(mode, flags)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pred(name)))
    return count_parameters(model)


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements (shared tensors counted once)."""
    seen = set()
    n_train = n_total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n_total += p.numel()
        if p.requires_grad:
            n_train += p.numel()
    return n_train, n_total
