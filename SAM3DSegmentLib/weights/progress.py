"""Download progress: a tqdm bar behind the ``progress(bytes_done, bytes_total)`` callback that
:func:`~SAM3DSegmentLib.weights.fetch.download` calls, and the byte counts used in messages."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Union

from .errors import require

from ..core.units import fmt_bytes  # noqa: F401 (re-exported: weights.fmt_bytes)

#: ``progress(bytes_done, bytes_total_or_None)``
ProgressCallback = Callable[[int, Optional[int]], None]
#: What the ``progress`` argument accepts: a callback, ``True``/``"text"`` for a bar on stderr, ``"auto"`` for a
#: bar only when stderr is a terminal, ``None``/``False`` for silence.
ProgressArg = Union[ProgressCallback, bool, str, None]


class TextProgress:
    """A tqdm progress bar on ``stream`` (default stderr), driven as ``progress(done, total)``; call
    :meth:`close` at the end."""

    def __init__(self, description: str = "download", stream=None, min_interval: float = 0.2):
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self._bar = None
        self._n = 0

    def __call__(self, done: int, total: Optional[int]) -> None:
        if self._bar is None:
            tqdm = require("tqdm", "show the download progress").tqdm
            self._bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=self.description, file=self.stream, leave=True, mininterval=self.min_interval)
        elif done < self._n:  # the server ignored a resume: the transfer restarted from zero
            self._bar.reset(total=total)
            self._bar.update(done)
        else:
            self._bar.update(done - self._n)
        self._n = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def make_progress(progress: ProgressArg, description: str):
    """``(callback or None, closer)`` for a ``progress`` argument (see :data:`ProgressArg`)."""
    if progress is None or progress is False:
        return None, lambda: None
    if callable(progress):
        return progress, lambda: None
    if progress == "auto":
        try:  # no bar where stderr is missing or no terminal (a GUI's redirected stream, a log file)
            interactive = sys.stderr is not None and sys.stderr.isatty()
        except Exception:
            interactive = False
        if not interactive:
            return None, lambda: None
    elif progress not in (True, "text"):
        raise ValueError(f"progress must be a callable, True, 'text', 'auto', False or None, not {progress!r}")
    bar = TextProgress(description)
    return bar, bar.close
