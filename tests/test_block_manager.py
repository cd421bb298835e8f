"""BlockManager (r4b.engine.block_manager): tables and slots, allocation, running out of blocks, fork / copy-on-write,
reference counts and freeing, checked by hand and by a seeded random walk against a plain Python model that also
keeps a simulated KV cache (each slot's content), so a write into a block someone else holds shows as wrong data."""

from __future__ import annotations

import random

import pytest

from r4b.engine.block_manager import BlockManager


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def snapshot(bm: BlockManager, seqs: list) -> tuple:
    return ({s: list(bm.table(s)) for s in seqs}, bm.num_free_blocks, [bm.ref_count(b) for b in range(bm.num_blocks)])


def check_refs(bm: BlockManager, seqs: list) -> None:
    """Reference counts = how many tables hold each block; free blocks = the blocks nobody holds."""
    counts = [0] * bm.num_blocks
    for s in seqs:
        for b in bm.table(s):
            counts[b] += 1
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == counts
    assert bm.num_free_blocks == counts.count(0)


# ------------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("num_blocks,block_size,name", [
    (0, 4, "num_blocks"), (-1, 4, "num_blocks"), (2.0, 4, "num_blocks"), ("3", 4, "num_blocks"),
    (None, 4, "num_blocks"), (4, 0, "block_size"), (4, -16, "block_size"), (4, 1.5, "block_size"),
])
def test_constructor_rejects_bad_args(num_blocks, block_size, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        BlockManager(num_blocks, block_size)


def test_fresh_manager():
    bm = BlockManager(5, 3)
    assert (bm.num_blocks, bm.block_size, bm.num_free_blocks) == (5, 3, 5)
    assert [bm.ref_count(b) for b in range(5)] == [0] * 5
    assert not bm.has("a") and bm.table("a") == []
    assert [bm.blocks_needed(n) for n in range(8)] == [0, 1, 1, 1, 2, 2, 2, 3]


# -------------------------------------------------------------------------------------------- allocation, slots


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_ensure_allocates_cdiv_blocks_and_slots(block_size):
    bm = BlockManager(64, block_size)
    lengths = {"a": 1, "b": block_size, "c": block_size + 1, "d": 3 * block_size, "e": 3 * block_size - 1, "z": 0}
    free = bm.num_free_blocks
    for s, n in lengths.items():
        assert bm.ensure(s, n, 0) == []
        assert len(bm.table(s)) == cdiv(n, block_size)
        free -= cdiv(n, block_size)
        assert bm.num_free_blocks == free
        assert bm.has(s)
    check_refs(bm, list(lengths))
    assert all(bm.ref_count(b) == 1 for s in lengths for b in bm.table(s))
    slots = []
    for s, n in lengths.items():
        table = bm.table(s)
        for pos in range(n):
            slot = bm.slot(s, pos)
            assert slot == table[pos // block_size] * block_size + pos % block_size
            slots.append(slot)
    assert len(set(slots)) == len(slots) and all(0 <= x < 64 * block_size for x in slots)


def test_ensure_grows_a_table_in_place():
    bm = BlockManager(8, 4)
    assert bm.ensure("a", 5, 0) == []
    t = list(bm.table("a"))
    assert bm.ensure("a", 6, 5) == [] and bm.table("a") == t  # room in the last block: no new block
    assert bm.ensure("a", 8, 6) == [] and bm.table("a") == t
    assert bm.ensure("a", 9, 8) == [] and bm.table("a")[:2] == t and len(bm.table("a")) == 3
    assert bm.ensure("a", 20, 9) == [] and len(bm.table("a")) == 5
    assert bm.ensure("a", 20, 20) == [] and len(bm.table("a")) == 5  # nothing to write
    assert bm.ensure("a", 3, 0) == [] and len(bm.table("a")) == 5  # fewer tokens: a table does not shrink
    assert bm.num_free_blocks == 3
    check_refs(bm, ["a"])


def test_blocks_are_handed_out_low_ids_first_and_reused():
    bm = BlockManager(6, 2)
    bm.ensure("a", 4, 0)
    bm.ensure("b", 3, 0)
    assert bm.table("a") == [0, 1] and bm.table("b") == [2, 3]
    bm.free("a")
    assert bm.num_free_blocks == 4 and not bm.has("a") and bm.table("a") == []
    assert bm.ensure("c", 8, 0) == []  # the 4 blocks b does not hold
    assert sorted(bm.table("c")) == [0, 1, 4, 5]
    assert bm.num_free_blocks == 0
    check_refs(bm, ["b", "c"])


# ------------------------------------------------------------------------------------------- running out of blocks


def test_ensure_returns_none_and_changes_nothing_when_blocks_run_out():
    bm = BlockManager(4, 4)
    bm.ensure("a", 6, 0)  # 2 blocks
    bm.fork("a", "b")
    seqs = ["a", "b", "new"]
    before = snapshot(bm, seqs)
    assert bm.ensure("a", 17, 6) is None  # 3 more blocks, 2 free
    assert snapshot(bm, seqs) == before
    assert bm.ensure("new", 9, 0) is None  # 3 blocks for a new sequence
    assert snapshot(bm, seqs) == before and bm.table("new") == []
    # b writes into the shared, partly filled last block: one copy plus 2 new blocks = 3 > 2 free
    assert bm.ensure("b", 16, 6) is None
    assert snapshot(bm, seqs) == before
    # the copy-on-write block alone counts: copy + 1 new fits exactly
    assert bm.ensure("b", 12, 6) is not None
    assert bm.num_free_blocks == 0
    check_refs(bm, ["a", "b"])
    assert bm.ensure("a", 9, 6) is None  # a is now the only holder (no copy) but needs 1 block, 0 free
    assert bm.ensure("a", 8, 6) == []  # fits in place


# ---------------------------------------------------------------------------------------- fork and copy-on-write


def test_fork_shares_blocks_and_the_first_write_copies_the_partly_filled_block():
    bm = BlockManager(16, 4)
    assert bm.ensure("p", 10, 0) == []
    p = list(bm.table("p"))
    free = bm.num_free_blocks
    bm.fork("p", "c")
    assert bm.table("c") == p and bm.table("c") is not bm.table("p")
    assert [bm.ref_count(b) for b in p] == [2, 2, 2]
    assert bm.num_free_blocks == free  # sharing costs nothing
    pairs = bm.ensure("c", 11, 10)  # token 10 goes into p[2], which holds tokens 8, 9
    assert len(pairs) == 1
    (src, dst), = pairs
    assert src == p[2] and dst not in p
    assert bm.table("c") == [p[0], p[1], dst] and bm.table("p") == p
    assert [bm.ref_count(b) for b in p] == [2, 2, 1] and bm.ref_count(dst) == 1
    assert bm.num_free_blocks == free - 1
    assert bm.slot("c", 10) == dst * 4 + 2 and bm.slot("p", 10) == p[2] * 4 + 2
    assert bm.slot("c", 5) == bm.slot("p", 5)  # still shared
    # from now on both write in place
    assert bm.ensure("c", 12, 11) == [] and bm.table("c") == [p[0], p[1], dst]
    assert bm.ensure("p", 11, 10) == [] and bm.table("p") == p
    assert bm.num_free_blocks == free - 1
    check_refs(bm, ["p", "c"])


def test_each_sharer_but_the_last_copies():
    bm = BlockManager(16, 4)
    bm.ensure("p", 6, 0)
    p = list(bm.table("p"))
    for c in ["c1", "c2", "c3"]:
        bm.fork("p", c)
    assert [bm.ref_count(b) for b in p] == [4, 4]
    dsts = []
    for i, c in enumerate(["c1", "c2", "c3"]):
        (src, dst), = bm.ensure(c, 7, 6)
        assert src == p[1] and dst not in p + dsts
        dsts.append(dst)
        assert bm.ref_count(p[1]) == 3 - i
    assert bm.ref_count(p[0]) == 4
    assert bm.ensure("p", 7, 6) == [] and bm.table("p") == p  # the last holder writes in place
    check_refs(bm, ["p", "c1", "c2", "c3"])


def test_the_remaining_holder_writes_in_place_after_the_others_free():
    bm = BlockManager(8, 4)
    bm.ensure("p", 7, 0)
    bm.fork("p", "c")
    p = list(bm.table("p"))
    free = bm.num_free_blocks
    bm.free("p")
    assert bm.num_free_blocks == free and [bm.ref_count(b) for b in p] == [1, 1]
    assert bm.ensure("c", 8, 7) == [] and bm.table("c") == p
    assert bm.num_free_blocks == free
    check_refs(bm, ["p", "c"])


def test_a_write_at_a_block_boundary_copies_nothing():
    bm = BlockManager(16, 4)
    bm.ensure("p", 8, 0)  # 2 full blocks
    p = list(bm.table("p"))
    bm.fork("p", "c")
    free = bm.num_free_blocks
    assert bm.ensure("c", 9, 8) == []  # token 8 starts a new block: the full shared blocks stay shared
    assert bm.table("c")[:2] == p and len(bm.table("c")) == 3
    assert [bm.ref_count(b) for b in p] == [2, 2]
    assert bm.num_free_blocks == free - 1
    check_refs(bm, ["p", "c"])


def test_a_write_at_the_start_of_a_held_shared_block_replaces_it_without_a_copy():
    bm = BlockManager(16, 4)
    bm.ensure("p", 9, 0)  # blocks of tokens 0-3, 4-7, 8
    p = list(bm.table("p"))
    bm.fork("p", "c")
    free = bm.num_free_blocks
    # c rewrites from token 8 on (num_cached a multiple of block_size): the shared block holds nothing of c's
    # that is kept, so c gets a fresh block and no pair
    assert bm.ensure("c", 10, 8) == []
    c = bm.table("c")
    assert c[:2] == p[:2] and c[2] not in p
    assert [bm.ref_count(b) for b in p] == [2, 2, 1] and bm.ref_count(c[2]) == 1
    assert bm.num_free_blocks == free - 1
    check_refs(bm, ["p", "c"])


def test_fork_of_a_sequence_without_blocks_and_into_an_existing_one():
    bm = BlockManager(4, 2)
    bm.fork("nobody", "c")
    assert bm.has("c") and bm.table("c") == [] and bm.num_free_blocks == 4
    bm.ensure("a", 3, 0)
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.fork("a", "c")
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.fork("a", "a")
    check_refs(bm, ["a", "c"])
    assert bm.ref_count(bm.table("a")[0]) == 1


# ----------------------------------------------------------------------------------------------------- freeing


def test_free_returns_a_block_only_when_nobody_holds_it():
    bm = BlockManager(8, 4)
    bm.ensure("p", 10, 0)
    bm.fork("p", "c")
    bm.ensure("c", 14, 10)  # c: copy of p's last block + one more
    seqs = ["p", "c"]
    held_by_both = bm.table("p")[:2]
    free = bm.num_free_blocks
    assert free == 8 - 5
    bm.free("p")  # p's private last block comes back, the shared two stay
    assert bm.num_free_blocks == free + 1
    assert [bm.ref_count(b) for b in held_by_both] == [1, 1]
    check_refs(bm, seqs)
    bm.free("p")  # again: a no-op
    bm.free("unknown")
    assert bm.num_free_blocks == free + 1
    bm.free("c")
    assert bm.num_free_blocks == 8 and all(bm.ref_count(b) == 0 for b in range(8))
    assert not bm.has("c")


# ----------------------------------------------------------------------------------------------- bad arguments


def test_ensure_rejects_bad_counts_and_changes_nothing():
    bm = BlockManager(8, 4)
    bm.ensure("a", 5, 0)  # 2 blocks: 8 token places
    before = snapshot(bm, ["a"])
    with pytest.raises(ValueError, match="num_cached <= num_tokens"):
        bm.ensure("a", 4, 5)
    with pytest.raises(ValueError, match="num_cached <= num_tokens"):
        bm.ensure("a", 4, -1)
    with pytest.raises(ValueError, match="cached tokens but holds only 2 blocks"):
        bm.ensure("a", 12, 9)  # 9 cached tokens need 3 blocks
    with pytest.raises(ValueError, match="holds only 0 blocks"):
        bm.ensure("new", 5, 1)
    assert snapshot(bm, ["a"]) == before and bm.table("new") == []
    assert bm.ensure("a", 12, 8) == []  # 8 cached: exactly the places held


def test_slot_of_an_unknown_sequence_or_past_the_table_raises():
    bm = BlockManager(4, 4)
    bm.ensure("a", 5, 0)
    with pytest.raises(KeyError):
        bm.slot("b", 0)
    with pytest.raises(IndexError):
        bm.slot("a", 8)


# -------------------------------------------------------------------------------------------------- random walk


def test_random_walk_against_a_model():
    """300 seeded ensure / fork / free operations. The model: each sequence's table and token contents, a
    simulated cache {slot: value}; after every operation the reference counts, free count and tables match the
    model, every sequence reads back its own tokens through its slots (a write into a shared block would show in
    another sequence's reads), and at the end freeing everything restores every block."""
    rng = random.Random(2)
    NB, BS = 24, 4
    bm = BlockManager(NB, BS)
    tables: dict[int, list[int]] = {}  # the model's tables
    content: dict[int, list[int]] = {}  # each sequence's token values, position by position
    cache: dict[int, int] = {}  # slot -> value last written there
    next_id, next_value = 0, 0
    registered: set[int] = set()  # every sequence that held a table
    seen = {"cow": 0, "replace": 0, "none": 0, "fork": 0, "free": 0, "ensure": 0}

    def refs() -> list[int]:
        r = [0] * NB
        for t in tables.values():
            for b in t:
                r[b] += 1
        return r

    for _ in range(300):
        op = rng.random()
        if bm.num_free_blocks < 4 and rng.random() < 0.7:  # short of blocks: free or fork more often
            op = 0.6 + 0.4 * op
        if op < 0.6 or not tables:
            # ensure: a new sequence, or an existing one appending (num_cached = its tokens) or rewriting the tail
            # of its last block (num_cached in the last held block, writing at least to its current end)
            if tables and rng.random() < 0.8:
                s = rng.choice(sorted(tables))
            else:
                s, next_id = next_id, next_id + 1
            held = content.get(s, [])
            n_old = len(held)
            t_old = tables.get(s, [])
            lo = min(n_old, max(0, (len(t_old) - 1) * BS)) if rng.random() < 0.3 else n_old
            cached = lo if rng.random() < 0.5 else rng.randint(lo, n_old)
            num_tokens = max(n_old, cached + rng.randint(0, 10))
            r_before, free_before = refs(), bm.num_free_blocks
            first = cached // BS
            cow = first < len(t_old) and cached < num_tokens and r_before[t_old[first]] > 1
            need = max(0, cdiv(num_tokens, BS) - len(t_old))
            pairs = bm.ensure(s, num_tokens, cached)
            if need + cow > free_before:
                assert pairs is None
                seen["none"] += 1
                assert bm.num_free_blocks == free_before and [bm.ref_count(b) for b in range(NB)] == r_before
                assert bm.table(s) == t_old
            else:
                seen["ensure"] += 1
                assert pairs is not None
                t_new = bm.table(s)
                assert len(t_new) == len(t_old) + need
                fresh = [b for i, b in enumerate(t_new) if i >= len(t_old) or b != t_old[i]]
                assert all(r_before[b] == 0 for b in fresh) and len(set(fresh)) == len(fresh)
                if cow:
                    assert t_new[first] != t_old[first] and t_new[:first] == t_old[:first]
                    assert t_new[first + 1 : len(t_old)] == t_old[first + 1 :]
                    if cached % BS:
                        assert pairs == [(t_old[first], t_new[first])]
                        seen["cow"] += 1
                    else:
                        assert pairs == []
                        seen["replace"] += 1
                else:
                    assert pairs == [] and t_new[: len(t_old)] == t_old
                assert bm.num_free_blocks == free_before - need - cow
                tables[s] = list(t_new)
                registered.add(s)
                # the engine: copy each pair's block, then write tokens [cached, num_tokens)
                for src, dst in pairs:
                    for o in range(BS):
                        if src * BS + o in cache:
                            cache[dst * BS + o] = cache[src * BS + o]
                values = list(range(next_value, next_value + num_tokens - cached))
                next_value += len(values)
                for pos, v in zip(range(cached, num_tokens), values, strict=True):
                    cache[bm.slot(s, pos)] = v
                content[s] = held[:cached] + values
        elif op < 0.8:
            parent = rng.choice(sorted(tables))
            child, next_id = next_id, next_id + 1
            bm.fork(parent, child)
            seen["fork"] += 1
            tables[child] = list(tables[parent])
            registered.add(child)
            content[child] = list(content[parent])
        else:
            s = rng.choice(sorted(tables))
            bm.free(s)
            seen["free"] += 1
            del tables[s], content[s]
            assert not bm.has(s)
        r = refs()
        assert [bm.ref_count(b) for b in range(NB)] == r
        assert bm.num_free_blocks == r.count(0)
        for s, t in tables.items():
            assert bm.table(s) == t
            assert len(t) >= cdiv(len(content[s]), BS)
            assert [cache.get(bm.slot(s, p)) for p in range(len(content[s]))] == content[s], s
    # the walk went through every case (this seed: 23 copies, 7 replacements, 13 failed ensures, 94 forks)
    assert all(v >= 3 for v in seen.values()), seen
    for s in sorted(tables):
        bm.free(s)
    assert bm.num_free_blocks == NB and all(bm.ref_count(b) == 0 for b in range(NB))
    assert not any(bm.has(s) for s in registered)


def test_a_failed_ensure_of_a_new_sequence_leaves_no_table():
    bm = BlockManager(1, 4)
    assert bm.ensure("a", 8, 0) is None
    assert not bm.has("a")
    with pytest.raises(ValueError):
        bm.ensure("a", 5, 1)  # more cached tokens than held blocks
    assert not bm.has("a")
    bm.fork("p", "a")  # no table was left behind: the fork is allowed


def test_a_write_over_several_shared_blocks_takes_each_private():
    """A child forked from a 12-token parent (3 blocks of 4) that rewrites from token 5: block 1 (holding tokens
    4) is copied, block 2 (nothing of the child's before the write) is replaced; the parent keeps its blocks."""
    bm = BlockManager(8, 4)
    bm.ensure("p", 12, 0)
    parent = list(bm.table("p"))
    bm.fork("p", "c")
    pairs = bm.ensure("c", 12, 5)
    child = bm.table("c")
    assert child[0] == parent[0] and bm.ref_count(parent[0]) == 2
    assert pairs == [(parent[1], child[1])]
    assert child[2] not in parent and all(bm.ref_count(b) == 1 for b in (*parent[1:], *child[1:]))
    assert bm.table("p") == parent
