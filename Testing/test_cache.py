"""Embedding cache and its keys (SAM3DSegmentLib.inference.cache)."""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.inference.cache import EmbeddingCache, region_key, volume_content_key
from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.inference.regions import Region


def _array(seed=0, shape=(20, 24, 28), dtype=np.int16):
    return (np.random.default_rng(seed).normal(0, 300, size=shape)).astype(dtype)


M = make_ijk_to_ras((0.7, 0.7, 2.5), origin=(-10.0, 5.0, 3.0))


def test_same_content_same_key_and_any_change_changes_it():
    a = _array()
    k = volume_content_key(a, M)
    assert k == volume_content_key(a.copy(), M.copy())
    b = a.copy()
    b[7, 3, 11] += 1                                   # one voxel
    assert volume_content_key(b, M) != k
    c = a.copy()
    c[[0, 1]] = c[[1, 0]]                              # same values, other positions (sum-invariant)
    assert volume_content_key(c, M) != k
    assert volume_content_key(a.astype(np.int32), M) != k                 # dtype
    assert volume_content_key(a.reshape(24, 20, 28), M) != k              # shape
    m2 = M.copy()
    m2[0, 3] += 0.5
    assert volume_content_key(a, m2) != k                                 # geometry


def test_key_of_a_non_contiguous_view_equals_its_copy():
    a = _array(shape=(20, 24, 29))
    view = a[:, ::2, 1:]
    assert not view.flags.c_contiguous
    assert volume_content_key(view, M) == volume_content_key(np.ascontiguousarray(view), M)


def test_odd_byte_counts_are_hashed_entirely():
    a = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)   # 105 bytes: not a multiple of 8
    b = a.copy()
    b[-1, -1, -1] += 1                                           # only the tail byte differs
    assert volume_content_key(a, M) != volume_content_key(b, M)


def test_region_key_identifies_region_geometry():
    vol = Volume(_array(), M)
    r1 = Region.around(vol, (0.0, 10.0, 20.0))
    r2 = Region.around(vol, (0.0, 10.0, 20.0))
    assert region_key(r1) == region_key(r2) and hash(region_key(r1)) == hash(region_key(r2))
    assert region_key(r1.shifted((64, 0, 0))) != region_key(r1)
    assert region_key(Region.around(vol, (0.0, 10.0, 20.0), spacing=3.0)) != region_key(r1)
    assert region_key(r1.shifted((64, 0, 0)).shifted((-64, 0, 0))) == region_key(r1)   # rounding


def test_lru_eviction_and_counters():
    c = EmbeddingCache(2)
    assert c.get("a") is None and c.misses == 1
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1 and c.hits == 1          # a is now most recent
    c.put("c", 3)                                   # evicts b (least recently used)
    assert "b" not in c and "a" in c and "c" in c and len(c) == 2 and c.evictions == 1
    value, computed = c.get_or_compute("d", lambda: 4)
    assert (value, computed) == (4, True) and "a" not in c
    value, computed = c.get_or_compute("d", lambda: pytest.fail("must not recompute"))
    assert (value, computed) == (4, False)
    assert c.stats() == {"entries": 2, "max_entries": 2, "hits": 2, "misses": 2, "evictions": 2, "bytes": 0,
                         "max_bytes": None}
    c.clear()
    assert len(c) == 0


def test_cache_size_must_be_positive():
    with pytest.raises(ValueError, match="cache_size"):
        EmbeddingCache(0)
