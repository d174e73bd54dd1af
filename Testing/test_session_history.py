"""An object's undo/redo history (SAM3DSegmentLib.inference.history): the memory budget counts what stays."""
from __future__ import annotations

import numpy as np

from SAM3DSegmentLib.inference.history import Edit, History, Patch


def _edit(n_bytes: int) -> Edit:
    box = (slice(0, 1), slice(0, 1), slice(0, n_bytes))
    patch = Patch.of(np.ones((1, 1, n_bytes), dtype=np.uint8), box)
    return Edit((), (), (), (), box, Patch(box), patch)


def _ids(edits):
    return [id(e) for e in edits]


def test_a_new_edit_drops_redo_before_the_budget_is_checked():
    """Redo entries die with a new edit: they must not push older undo entries out of the budget."""
    h = History()
    e1, e2, e3, e4 = (_edit(1000) for _ in range(4))
    for e in (e1, e2, e3):
        h.push(e, limit=100, budget_bytes=1e9, live=[])
    h.redo.extend([h.undo.pop(), h.undo.pop()])          # two undos: e3 and e2 wait on the redo stack
    h.push(e4, limit=100, budget_bytes=2000, live=[])    # room for exactly two entries
    assert _ids(h.undo) == _ids([e1, e4]) and h.redo == []
    assert h.nbytes(live=[]) == 2000


def test_the_budget_and_the_limit_drop_the_oldest_entries_and_keep_one():
    h = History()
    edits = [_edit(1000) for _ in range(5)]
    for e in edits:
        h.push(e, limit=3, budget_bytes=1e9, live=[])
    assert _ids(h.undo) == _ids(edits[2:])               # the limit: oldest first
    big = _edit(10_000)
    h.push(big, limit=3, budget_bytes=2500, live=[])
    assert _ids(h.undo) == _ids([big])                   # over budget alone, but the newest entry stays
    shared = h.undo[0].patch_after.crop
    assert h.nbytes(live=[shared]) == 0                  # arrays shared with the live mask are not history
