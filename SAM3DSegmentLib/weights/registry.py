"""The registered checkpoints: short names (``"sam-med3d-turbo"``, ``"sam-med3d"``, ``"demo"``) mapped to
:class:`ModelWeights` records (file name, URL, published size and sha256 where known, architecture, licence).

Registry file names must be plain file names, so that no entry can point outside the cache folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from .errors import WeightsError

ENV_BASE_URL = "SAM3D_WEIGHTS_BASE_URL"
HF_REPO = "blueyo0/SAM-Med3D"
HF_BASE_URL = f"https://huggingface.co/{HF_REPO}/resolve/main"
DEFAULT_MODEL = "sam-med3d-turbo"


@dataclass(frozen=True)
class ModelWeights:
    """One named checkpoint.

    ``size`` (bytes) and ``sha256`` are None where no exact published value is known; then the file is
    checked trust-on-first-use (see :mod:`SAM3DSegmentLib.weights.verify`). ``size_hint`` is the rounded size
    shown by the host, for messages only. ``url`` is None for files shipped inside the package (``bundled``).
    """

    name: str
    filename: str
    url: Optional[str]
    size: Optional[int]
    sha256: Optional[str]
    architecture: str
    license: str
    description: str
    bundled: bool = False
    clinical_use: bool = False
    size_hint: Optional[str] = None
    checksum_source: Optional[str] = None
    notes: str = ""
    #: 3DSAM-adapter files only: the HU window and dataset foreground statistics the model was trained with
    #: (``{"window": [lo, hi], "mean": m, "std": s}``, see :mod:`SAM3DSegmentLib.core.intensity`); published
    #: files do not carry them.
    intensity: Optional[dict] = None

    def __post_init__(self) -> None:
        check_plain_filename(self.name, self.filename)

    def download_url(self) -> Optional[str]:
        """The URL actually fetched: ``$SAM3D_WEIGHTS_BASE_URL/<filename>`` if that is set, else ``url``."""
        if self.bundled or self.url is None:
            return None
        base = os.environ.get(ENV_BASE_URL, "").strip()
        if base:
            return base.rstrip("/") + "/" + self.filename
        return self.url

    def bundled_path(self) -> Optional[Path]:
        """Where a bundled file lies inside the installed package (it may be absent from a build)."""
        if not self.bundled:
            return None
        return Path(__file__).resolve().parents[1] / "resources" / self.filename


def check_plain_filename(name: str, filename: str) -> None:
    """A registry file name must name a file directly inside the cache (or resources) folder."""
    bad = (not isinstance(filename, str) or not filename or filename in (".", "..") or filename.startswith(".")
           or "/" in filename or "\\" in filename or "\0" in filename or ":" in filename
           or os.path.isabs(filename) or Path(filename).name != filename)
    if bad:
        raise WeightsError(f"Registry entry {name!r} has the file name {filename!r}, which is not a plain file "
                           "name (it would point outside the cache folder); use a name such as 'model.pth'.")


_HF_LICENSE = "Apache-2.0 (uni-medical/SAM-Med3D)"
_NOT_CLINICAL = "Research use only; not a medical device."

REGISTRY: Dict[str, ModelWeights] = {}


def register_weights(entry: ModelWeights, *, replace: bool = False) -> ModelWeights:
    """Add ``entry`` to :data:`REGISTRY` (for extensions and tests). Names are case-insensitive."""
    key = entry.name.lower()
    if key in REGISTRY and not replace:
        raise WeightsError(f"A checkpoint named {entry.name!r} is already registered; pass replace=True "
                           "to override it.")
    REGISTRY[key] = entry
    return entry


register_weights(ModelWeights(
    name="sam-med3d-turbo",
    filename="sam_med3d_turbo.pth",
    url=f"{HF_BASE_URL}/sam_med3d_turbo.pth",
    size=None,  # the host shows "402 MB" only; the exact byte count is not published on the file page
    size_hint="402 MB",
    # Git LFS SHA256 shown on https://huggingface.co/blueyo0/SAM-Med3D/blob/main/sam_med3d_turbo.pth
    # (revision 07f6f69, "Update SAM-Med3D ckpt with new Torch Version", 2024-09-07).
    sha256="899a46d04d3b70f723282ceb489149373558bf0aaba389a346f5ab57da5cdd3c",
    checksum_source="https://huggingface.co/blueyo0/SAM-Med3D/blob/main/sam_med3d_turbo.pth (Git LFS details)",
    architecture="vit_b_ori",
    license=_HF_LICENSE,
    description="SAM-Med3D-turbo: SAM-Med3D fine-tuned on 44 datasets; the recommended general model.",
    notes=_NOT_CLINICAL,
))

register_weights(ModelWeights(
    name="sam-med3d",
    filename="sam_med3d.pth",
    url=f"{HF_BASE_URL}/sam_med3d.pth",
    size=None,
    sha256=None,  # no published checksum found: trust on first use
    architecture="vit_b_ori",
    license=_HF_LICENSE,
    description="SAM-Med3D: the original release trained on SA-Med3D (131K masks, 247 categories).",
    notes=_NOT_CLINICAL + " This file was not in the Hugging Face repository's file listing we could "
          "see; if the URL answers 404, fetch the checkpoint from the links in the SAM-Med3D README "
          "and pass it as a local file.",
))

register_weights(ModelWeights(
    name="demo",
    filename="demo_model.pt",
    url=None,
    size=None,
    sha256=None,
    architecture="tiny",  # our own checkpoint format: the file stores its SamMed3DConfig
    license="Apache-2.0 (SAM3DSegment)",
    description="Small embedded demo model shipped in the package (local, bundled); for trying the tools "
                "only - NOT for clinical use.",
    bundled=True,
    notes="Bundled with the package at SAM3DSegmentLib/resources/demo_model.pt; never downloaded.",
))


def get_weights(name: str) -> ModelWeights:
    """The registry entry for ``name`` (case-insensitive) or a :class:`WeightsError` listing the names."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise WeightsError(f"Unknown model name {name!r}. Known names: {', '.join(known_names())}. "
                           "To use your own file pass its path instead (CLI: --checkpoint PATH).") from None


def known_names() -> List[str]:
    return sorted(REGISTRY)


def iter_registry() -> Iterator[ModelWeights]:
    for key in known_names():
        yield REGISTRY[key]


def is_registered_name(name_or_path) -> bool:
    """A plain string naming a registered model (no folder separator): it resolves to the cache only."""
    if not isinstance(name_or_path, str):
        return False
    if os.sep in name_or_path or (os.altsep and os.altsep in name_or_path):
        return False
    return name_or_path.lower() in REGISTRY
