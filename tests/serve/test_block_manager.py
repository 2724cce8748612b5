"""Block manager: reference counts, the prefix cache's keys, and LRU eviction of unreferenced cached blocks."""

import pytest

from nanoseek.serve.block_manager import BlockManager, block_hash


def test_chain_keys_depend_on_every_earlier_token_and_the_adapter():
    a = block_hash(b"", "", [1, 2, 3, 4])
    assert a == block_hash(b"", "", [1, 2, 3, 4])
    assert block_hash(a, "", [5, 6]) != block_hash(block_hash(b"", "", [1, 2, 3, 9]), "", [5, 6])
    assert block_hash(b"", "x__v1\x001", [1, 2, 3, 4]) != block_hash(b"", "x__v2\x002", [1, 2, 3, 4])


def test_refcounts_cache_hits_and_lru_eviction():
    bm = BlockManager(3)
    b0, b1, b2 = bm.allocate(), bm.allocate(), bm.allocate()
    assert bm.allocate() is None and bm.num_free == 0
    k0, k1 = b"k0", b"k1"
    bm.register(b0, k0)
    bm.register(b1, k1)
    bm.register(b2, k0)  # same content as b0: first writer wins
    assert bm.lookup(k0) == b0 and bm.ref[b0] == 2  # shared by two holders
    bm.free_all([b0, b1, b2])
    assert bm.ref[b0] == 1 and bm.num_free == 2  # b1 cached + evictable, b2 plain free
    bm.free(b0)
    assert bm.num_free == 3
    assert bm.allocate() == b2  # free blocks go first, cached ones stay findable
    assert bm.allocate() == b1  # then the least recently used cached block: b1 (freed before b0)
    assert bm.lookup(k1) is None and bm.lookup(k0) == b0  # b1's key is gone, b0's still hits
    with pytest.raises(AssertionError):
        bm.free(b2)
        bm.free(b2)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(2, enable_prefix_caching=False)
    b = bm.allocate()
    bm.register(b, b"k")
    bm.free(b)
    assert bm.lookup(b"k") is None and bm.num_free == 2


def test_pool_needs_a_block():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0)
