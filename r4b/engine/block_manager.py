"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, shared by reference count.

The cache itself (per layer ``(num_blocks, block_size, Hkv, D)`` keys and values) lives in the engine; this
class only hands out block ids. A sequence's table lists its blocks in order: token ``i`` of the sequence lives
in block ``table[i // block_size]`` at offset ``i % block_size``, its slot is ``block * block_size + offset``.

Forked sequences (the rollouts of one prompt) share the prompt's blocks: ``fork`` copies the table and counts
one more reference on each block. Before a sequence writes into a block that someone else also holds (the
prompt's last, partly filled block), ``ensure`` gives it a private copy: a fresh block plus a (src, dst) pair
that the engine copies in every layer's cache before the step writes (copy-on-write).

Prefix caching (``prefix_caching=True``): a full block whose keys and values are computed can be registered under
a key that names its content (the engine's: a chained digest of every token up to the block's end, and of the
images they show). A block nobody holds any more keeps its content and its key: it is free (it counts in
``num_free_blocks``) but it is handed out only when no blank block is left, least recently freed first, and a new
sequence whose leading blocks' keys are registered takes those blocks (``acquire``) instead of computing them.
Registered blocks are full, so nobody writes into them again (a sequence's writes start at its first uncomputed
token); ``clear_cache`` forgets every key (the weights changed) and starts a new ``epoch``: a sequence that was
computing across the change holds keys and values of the old weights, so the engine registers a sequence's blocks
only in the epoch it was admitted in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = bool(prefix_caching)
        self._free = list(range(num_blocks - 1, -1, -1))  # blank blocks, a stack: pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._tables: dict[Hashable, list[int]] = {}
        self._key_of: dict[int, Hashable] = {}  # registered block -> its content key
        self._block_of: dict[Hashable, int] = {}  # content key -> block
        self._cached: OrderedDict[int, None] = OrderedDict()  # free registered blocks, least recently freed first
        self.evictions = 0
        self.epoch = 0  # clear_cache counts up: blocks computed before it must not be registered after it

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks (held or free)."""
        return len(self._key_of)

    def _alloc(self) -> int:
        """A block for new content: a blank one, else the least recently freed registered one (forgetting it)."""
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of.pop(b)]
            self.evictions += 1
        self._refs[b] = 1
        return b

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def table(self, seq_id: Hashable) -> list[int]:
        """The sequence's blocks in order (empty for a sequence that holds none)."""
        return self._tables.get(seq_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def ensure(self, seq_id: Hashable, num_tokens: int, num_cached: int) -> list[tuple[int, int]] | None:
        """Make the sequence's table hold ``num_tokens`` tokens, of which ``[num_cached, num_tokens)`` are about
        to be written. Every block of that range that someone else also holds is replaced by a private one; the
        returned copy-on-write pairs (src, dst) are those to copy before writing (a replaced block that holds
        earlier tokens of the sequence: the one token ``num_cached`` falls in, when it is not a block's first).
        Returns None when the free blocks do not suffice; then nothing changed."""
        if not 0 <= num_cached <= num_tokens:
            raise ValueError(f"need 0 <= num_cached <= num_tokens, got num_cached={num_cached} "
                             f"num_tokens={num_tokens}")
        table = self._tables.get(seq_id, [])
        if num_cached > len(table) * self.block_size:
            raise ValueError(f"sequence {seq_id!r} has {num_cached} cached tokens but holds only {len(table)} "
                             f"blocks of {self.block_size}")
        needed = self.blocks_needed(num_tokens)
        new = max(0, needed - len(table))
        written = range(num_cached // self.block_size, min(len(table), needed)) if num_cached < num_tokens else ()
        shared = [i for i in written if self._refs[table[i]] > 1]
        if new + len(shared) > self.num_free_blocks:
            return None
        pairs = []
        for i in shared:
            src, dst = table[i], self._alloc()
            self._refs[src] -= 1
            table[i] = dst
            if i * self.block_size < num_cached:  # it holds tokens before the write
                pairs.append((src, dst))
        for _ in range(new):
            table.append(self._alloc())
        self._tables[seq_id] = table
        return pairs

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child starts with the parent's blocks, shared (one more reference on each)."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id!r} already holds blocks")
        table = list(self.table(parent_id))
        for b in table:
            self._refs[b] += 1
        self._tables[child_id] = table

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's references; a block nobody holds any more is free again (a registered one keeps its
        content until it is needed: its last blocks are freed first, so they go first, and its prefix stays)."""
        for b in reversed(self._tables.pop(seq_id, [])):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    # -------------------------------------------------------------------------------------------- prefix caching
    def match(self, keys: Sequence[Hashable]) -> list[int]:
        """The registered blocks of the longest run of ``keys`` from the first (a sequence's leading blocks)."""
        out = []
        for key in keys:
            b = self._block_of.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, seq_id: Hashable, blocks: Sequence[int]) -> None:
        """A sequence that holds no blocks starts with these registered ones (from :meth:`match`), shared."""
        if self._tables.get(seq_id):
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        for b in blocks:
            if b not in self._key_of:
                raise ValueError(f"block {b} is not registered")
        for b in blocks:
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1
        self._tables[seq_id] = list(blocks)

    def register(self, seq_id: Hashable, keys: Sequence[Hashable], start: int = 0) -> int:
        """Register the sequence's blocks ``start .. len(keys) - 1`` (full, their content computed) under
        ``keys[start:]``; a block already registered, or a key another block holds already, is left as it is.
        Returns how many blocks were newly registered. No-op without prefix caching."""
        if not self.prefix_caching:
            return 0
        table = self._tables.get(seq_id, [])
        if len(keys) > len(table):
            raise ValueError(f"sequence {seq_id!r} holds {len(table)} blocks, cannot register {len(keys)}")
        new = 0
        for i in range(start, len(keys)):
            b, key = table[i], keys[i]
            if b in self._key_of or key in self._block_of:
                continue
            self._key_of[b], self._block_of[key] = key, b
            new += 1
        return new

    def clear_cache(self) -> None:
        """Forget every registered key (the model's weights changed); the free registered blocks become blank."""
        self._free.extend(reversed(self._cached))
        self._cached.clear()
        self._key_of.clear()
        self._block_of.clear()
        self.epoch += 1

    def slot(self, seq_id: Hashable, position: int) -> int:
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
