"""Human-readable quantities for messages and reports."""
from typing import Optional


def fmt_bytes(n: Optional[int]) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"?"`` (binary units, up to TiB)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
