"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, shared by reference count.

The cache itself (per layer ``(num_blocks, block_size, Hkv, D)`` keys and values) lives in the engine; this
class only hands out block ids. A sequence's table lists its blocks in order: token ``i`` of the sequence lives
in block ``table[i // block_size]`` at offset ``i % block_size``, its slot is ``block * block_size + offset``.

Forked sequences (the rollouts of one prompt) share the prompt's blocks: ``fork`` copies the table and counts
one more reference on each block. Before a sequence writes into a block that someone else also holds (the
prompt's last, partly filled block), ``ensure`` gives it a private copy: a fresh block plus a (src, dst) pair
that the engine copies in every layer's cache before the step writes (copy-on-write).
"""

from __future__ import annotations

from collections.abc import Hashable


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

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
        if new + len(shared) > len(self._free):
            return None
        pairs = []
        for i in shared:
            src, dst = table[i], self._free.pop()
            self._refs[src] -= 1
            self._refs[dst] = 1
            table[i] = dst
            if i * self.block_size < num_cached:  # it holds tokens before the write
                pairs.append((src, dst))
        for _ in range(new):
            b = self._free.pop()
            self._refs[b] = 1
            table.append(b)
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
        """Drop the sequence's references; a block nobody holds any more is free again."""
        for b in reversed(self._tables.pop(seq_id, [])):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def slot(self, seq_id: Hashable, position: int) -> int:
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
