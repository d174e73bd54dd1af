"""The value types of the training config schema (:mod:`.config`): the few conversions a hand-written file needs
(an integral number for an integer, ``"true"``/``"no"``... for a flag, one name for a list of names) and the
strict section base class. No torch import."""
from __future__ import annotations

from typing import Annotated, Any, List

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["Int", "Flag", "Floats", "Ints", "Names", "Section", "switch"]


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _flag(v: Any) -> Any:
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    return v


def _as_list(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _names(v: Any) -> Any:
    return [v] if isinstance(v, str) else _as_list(v)


def switch(v: Any) -> Any:
    if isinstance(v, bool):  # e.g. --set log.tensorboard=true
        return "true" if v else "false"
    return v.lower() if isinstance(v, str) else v


Int = Annotated[int, BeforeValidator(_integral)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Floats = Annotated[List[float], BeforeValidator(_as_list)]
Ints = Annotated[List[Int], BeforeValidator(_as_list)]
#: a list of names, or one name
Names = Annotated[List[str], BeforeValidator(_names)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
