"""The click protocols: which clicks the mask decoder sees at each step, by name.

SAM-Med3D's training and its published evaluation feed only the newest click (with the previous low-res
logits); its inference code (``validate_paired_img_gt`` in ``utils/infer_utils.py`` of
github.com/uni-medical/SAM-Med3D) feeds every click so far (with the previous low-res logits). Each has its
own name here, used by the engine (``SessionOptions.prompt_mode``), ``sam3d`` (``--prompt-mode``), evaluation
reports (``click_protocol``) and training (``loop.feed``). The older spellings ``newest`` and ``all`` are
still accepted (:data:`CLICK_PROTOCOL_ALIASES`) and mean the same. No dependencies beyond the standard library.
"""
from __future__ import annotations

from typing import Any

__all__ = ["NEWEST_CLICK", "ALL_CLICKS", "CLICK_PROTOCOLS", "CLICK_PROTOCOL_ALIASES", "click_protocol", "new_spelling"]

NEWEST_CLICK = "newest-click"
ALL_CLICKS = "all-clicks"

#: Click protocols (name: what the decoder sees at each step).
CLICK_PROTOCOLS = {
    NEWEST_CLICK: "only the newest click, with the previous low-res logits (SAM-Med3D's training and its "
                  "published evaluation)",
    ALL_CLICKS: "all clicks so far, with the previous low-res logits (SAM-Med3D's inference code, "
                "validate_paired_img_gt)",
}

#: Older spellings, still accepted: ``newest`` = ``newest-click``, ``all`` = ``all-clicks``.
CLICK_PROTOCOL_ALIASES = {"newest": NEWEST_CLICK, "all": ALL_CLICKS}


def new_spelling(value: Any) -> Any:
    """An older spelling's new name (``newest`` -> ``newest-click``, ``all`` -> ``all-clicks``); any other
    value unchanged (for a validator that checks it afterwards)."""
    return CLICK_PROTOCOL_ALIASES.get(value, value) if isinstance(value, str) else value


def click_protocol(name: Any, what: str = "click protocol") -> str:
    """The click protocol ``name`` stands for (an older spelling gives its new name). Raises ValueError naming
    ``what`` (the option being read) and the accepted names otherwise."""
    key = new_spelling(name)
    if key not in CLICK_PROTOCOLS:
        raise ValueError(f"{what} must be one of {', '.join(CLICK_PROTOCOLS)} (older spellings: "
                         f"{', '.join(CLICK_PROTOCOL_ALIASES)}), got {name!r}")
    return key
