"""Decode steps as CUDA graphs: one captured graph per batch-size bucket, replayed with new inputs.

A decode step of B sequences (one row each) is padded to the smallest bucket >= B (1, 2, 4, 8, then multiples of
8 up to 64, then of 32): the padded rows write nowhere (slot -1, which store_kv skips) and read nothing (context
length 0, for which paged_decode_attention returns zeros), so the real rows' results do not depend on the padding.
Every input lives in a static buffer whose first rows the step fills (block tables are as wide as the longest
sequence the engine allows, so paged_decode_attention's split count, a function of the shapes, never changes;
a step copies only the columns its tables use, the kernels never read past a row's context); the graph computes
the hidden states of all its rows; the engine computes the logits of the rows that sample, eagerly (a (b, V) fp32
output per bucket would hold gigabytes the KV cache's sizing did not count).

The graph of a bucket is captured the first time a step needs it, after one eager run of the same step on the
same buffers (Triton compiles and autotunes there, never inside a capture). Graphs share one memory pool: they
never run concurrently and each step reads its hidden states before the next replay. A capture that fails is
logged and the steps run eagerly from then on. The graphs hold the weights' addresses: ``stale()`` tells the engine
when a parameter was replaced rather than updated in place (then the graphs are dropped and captured again).

``capture=False`` runs the identical padded step eagerly: that is how the CPU tests check the padding.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .model.qwen3 import PagedKV

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    out = [b for b in (1, 2, 4) if b < max_batch]
    out += list(range(8, min(max_batch, 64) + 1, 8))
    out += list(range(96, max_batch + 1, 32))
    if not out or out[-1] != max_batch:
        out.append(max_batch)
    return sorted(set(out))


class DecodeGraphs:
    def __init__(self, lm: torch.nn.Module, k_caches: list[Tensor], v_caches: list[Tensor], *, max_batch: int,
                 max_blocks: int, device: torch.device, capture: bool) -> None:
        self.lm = lm
        self.k_caches, self.v_caches = k_caches, v_caches
        self.sizes = buckets(max_batch)
        self.max_batch, self.max_blocks, self.capture = max_batch, max_blocks, capture
        B = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(B, **i64)
        self.positions = torch.zeros(B, **i64)
        self.slots = torch.full((B,), -1, **i64)
        self.context_lens = torch.zeros(B, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((B, max_blocks), dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}
        self.pool = None
        self.device = device
        self._params: tuple[int, ...] | None = None  # the weights' addresses the graphs were captured with
        self._keep: list[Tensor] = []  # tensors the graphs read that no module owns (rope's inv_freq cache)

    def stale(self) -> bool:
        """True when the graphs read weights that were replaced (not updated in place) since their capture."""
        return self._params is not None and self._params != tuple(p.data_ptr() for p in self.lm.parameters())

    def reset(self) -> None:
        self.graphs.clear()
        self.outputs.clear()
        self.pool, self._params, self._keep = None, None, []

    def fits(self, batch_size: int, widest_table: int) -> bool:
        return batch_size <= self.max_batch and widest_table <= self.max_blocks

    def _forward(self, b: int) -> Tensor:
        kv = PagedKV(self.k_caches, self.v_caches, self.slots[:b], self.block_tables[:b], self.context_lens[:b])
        x = self.lm.embed_tokens(self.input_ids[:b])
        return self.lm(x, self.positions[:b], self.cu_seqlens[: b + 1], 1, kv)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> Tensor:
        """The (B, H) hidden states of one decode step of B = len(ids) sequences."""
        B = len(ids)
        b = next(s for s in self.sizes if s >= B)
        host = torch.zeros((4, b), dtype=torch.int64)
        host[0, :B] = torch.tensor(ids)
        host[1, :B] = torch.tensor(positions)
        host[2] = -1
        host[2, :B] = torch.tensor(slots)
        host[3, :B] = host[1, :B] + 1
        width = max(len(t) for t in tables)
        table = torch.zeros((b, width), dtype=torch.int32)
        for r, t in enumerate(tables):
            table[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
        host = host.to(self.device, non_blocking=True)
        self.input_ids[:b].copy_(host[0])
        self.positions[:b].copy_(host[1])
        self.slots[:b].copy_(host[2])
        self.context_lens[:b].copy_(host[3])
        self.block_tables[:b, :width].copy_(table.to(self.device, non_blocking=True))
        if self.capture and b not in self.graphs:
            try:
                self._capture(b)
            except Exception as ex:  # noqa: BLE001 - a failed capture costs speed, not the run
                log.warning("CUDA graph capture of decode batch %d failed (%s: %s): decode steps run eagerly",
                            b, type(ex).__name__, ex)
                self.capture = False
                self.reset()
        if not self.capture:
            return self._forward(b)[:B]
        with torch.cuda.device(self.device):
            self.graphs[b].replay()
        return self.outputs[b][:B]

    def _capture(self, b: int) -> None:
        with torch.cuda.device(self.device):
            self._capture_on_device(b)
        from r4b.kernels import rope

        self._keep += list(rope._INV_FREQ.values())  # a cache entry the graphs read must outlive any clear()
        if self._params is None:
            self._params = tuple(p.data_ptr() for p in self.lm.parameters())

    def _capture_on_device(self, b: int) -> None:
        # one eager run first, on a side stream (torch's recipe): Triton compiles and autotunes here; the padded
        # rows write nowhere, and the real rows write the same values again at replay
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture mid-run must not be invalidated by another thread's CUDA calls (a data loader)
        with torch.cuda.graph(graph, pool=self.pool, stream=torch.cuda.Stream(self.device),
                              capture_error_mode="thread_local"):
            out = self._forward(b)
        self.outputs[b], self.graphs[b] = out, graph
