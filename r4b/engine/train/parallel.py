"""Process group and FSDP2 for the trainers: one code path for one GPU, N GPUs (torchrun) and the CPU tests (gloo).

Owns: :func:`init_distributed` / :func:`shutdown_distributed` (torchrun's env, or a world of one through a
FileStore, no network port), :func:`apply_fsdp` (``fully_shard`` per decoder layer, per vision encoder layer, then
the root, applied from outside the model as torchtitan's ``parallelize_*`` do), :func:`gathered` (whole plain
parameters for the inference engine between training steps), :func:`reshard`, and the small collectives the trainers use
(:func:`all_reduce_sum`, :func:`all_gather_object`, :func:`broadcast_object`, :func:`barrier`,
:func:`clip_grad_norm_`). Every collective helper is the identity when no process group is initialised.

FSDP2 facts this file relies on (checked in tests/test_train_checkpoint.py, torch 2.13):
  * The root keeps its parameters (embeddings, final norm, lm_head; tied or not) unsharded after its forward
    until the backward, so ``model.lm_head.weight`` read after ``model(...)`` is the whole weight the fused losses
    need. After a forward under ``no_grad`` nothing reshards it: a backward, :func:`reshard` or the end of a
    :func:`gathered` block must come before ``optimizer.step()``, or the next forward reuses the stale unsharded
    copy (seen: lm_head 0.8 off after one SGD step).
  * Between steps every parameter is a DTensor shard; inside :func:`gathered` each is a plain ``nn.Parameter``
    of ``param_dtype`` (the all-gathered compute copy: bf16 when apply_fsdp was given bf16), not the fp32 master.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` on the machine and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_info: DistInfo | None = None
_store_file: str | None = None  # the FileStore of a world of one, removed by shutdown_distributed


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


_external: set[int] = set()  # ids of default groups r4b found initialised (not its own to destroy)


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise the default process group and return this process's :class:`DistInfo`.

    Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the group comes from the environment: nccl
    on ``cuda:LOCAL_RANK`` (made the current device), gloo on the CPU. Without torchrun it is a world of one
    through a FileStore in a fresh temporary file (no network port). ``device``: "cuda", "cpu" (or "cuda:N"
    outside torchrun); None picks cuda when available. Idempotent: a second call returns the same info (a group
    someone else initialised is described, not replaced).
    """
    global _info, _store_file
    if dist.is_available() and dist.is_initialized():
        if _info is None:
            _external.add(id(dist.group.WORLD))
            local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            backend = dist.get_backend()
            dev = _pick_device(device or ("cuda" if "nccl" in backend else "cpu"), local_rank)
            _info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
        return _info
    present = [k for k in _TORCHRUN_ENV if k in os.environ]
    if present and len(present) != len(_TORCHRUN_ENV):
        raise ValueError(f"torchrun environment incomplete: {present} set, {_TORCHRUN_ENV} needed")
    if present:
        rank, world, local_rank = (int(os.environ[k]) for k in _TORCHRUN_ENV)
        if device is not None and torch.device(device).index is not None:
            raise ValueError(f"device={device!r}: under torchrun each rank uses cuda:LOCAL_RANK; pass 'cuda'")
        dev = _pick_device(device, local_rank)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    else:
        rank, world, local_rank = 0, 1, 0
        dev = _pick_device(device, 0)
        fd, _store_file = tempfile.mkstemp(prefix="r4b-dist-store-")
        os.close(fd)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.FileStore(_store_file, 1), rank=0, world_size=1)
    _info = DistInfo(rank, world, local_rank, dev)
    return _info


def shutdown_distributed() -> None:
    """Barrier, then destroy the default process group (and a world of one's FileStore). Safe to call twice. A group
    that someone else initialised (init_distributed found it) is left to them."""
    global _info, _store_file
    if dist.is_available() and dist.is_initialized() and id(dist.group.WORLD) in _external:
        _external.discard(id(dist.group.WORLD))  # init_distributed finds it again if it is still there
        _info = None
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if _store_file is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(_store_file)
    _info, _store_file = None, None


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    """Where tensors must live for the default group's collectives (cuda under nccl, else the CPU)."""
    if "nccl" in dist.get_backend():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- FSDP2 ---------------------------------------------------------------------------------------------------------
def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: decoder layers, then the vision tower's encoder layers when there is one."""
    lm = getattr(model, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise TypeError(f"model must expose .language_model.layers (Qwen3ForCausalLM, R4BForConditionalGeneration), "
                        f"got {type(model).__name__}")
    blocks = list(lm.layers)
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    if tower is not None:
        blocks += list(tower.encoder.layers)
    return blocks


def apply_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
               mesh: Any = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it: ``fully_shard`` on each decoder layer, each vision encoder
    layer (R-4B), then the root (embeddings, final norm, lm_head, projector, vision embeddings; tied embeddings
    stay one parameter in the root's group).

    ``param_dtype``: the dtype parameters are all-gathered in for forward and backward (None: as stored, e.g. fp32
    masters); ``reduce_dtype``: the dtype gradients are reduce-scattered in. ``reshard_after_forward`` applies to
    the layers; the root never reshards after forward (FSDP2's default for the root), so ``model.lm_head.weight``
    is the whole weight right after ``model(...)`` for the fused losses. ``mesh``: a 1-D DeviceMesh (default: all
    ranks, on the device type of the default group). The parameters move to the mesh's device.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not _initialised():
        raise RuntimeError("apply_fsdp needs a process group: call init_distributed() first")
    if not isinstance(reshard_after_forward, bool):
        raise ValueError(f"reshard_after_forward must be a bool, got {reshard_after_forward!r}")
    blocks = _blocks(model)
    if mesh is None:
        mesh = init_device_mesh(_collective_device().type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    _lazy_init_root(model)
    return model


def _lazy_init_root(model: nn.Module) -> None:
    """Fix ``model`` as the FSDP root now. FSDP2 picks the root lazily, as the first FSDP module to run forward: the
    inference engine calls ``model.language_model(...)`` directly, which would otherwise make the first decoder
    layer a root and break the next full forward. (A private FSDP2 method; no public one does this.)"""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model._get_fsdp_state()._lazy_init()


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Whole parameters for plain code, e.g. the inference engine generating between training steps::

        with torch.no_grad(), gathered(model):
            llm.generate(...)   # reads model.lm_head.weight, calls model.language_model(...), any number of times

    Inside, every FSDP module is unsharded (one all-gather each, on entry) and stays so through every forward:
    each parameter is a plain ``nn.Parameter`` holding the whole tensor, in ``param_dtype`` when apply_fsdp was
    given one (the compute copy, not the fp32 master; writes to it are lost). On exit everything is resharded and
    each module's reshard-after-forward setting restored, so training continues with the same gradients.
    Meant for no-grad use; every rank must enter (the all-gathers are collective). Yields the model.
    """
    modules = _fsdp_modules(model)
    if not modules:
        yield model
        return
    _lazy_init_root(model)
    # the exact per-group setting (private FSDP2 state: post_forward_mesh_info None = keep unsharded after forward)
    saved = [[g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups] for m in modules]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield model
    finally:
        for m, infos in zip(modules, saved, strict=True):
            m.reshard()
            for g, info in zip(m._get_fsdp_state()._fsdp_param_groups, infos, strict=True):
                g.post_forward_mesh_info = info
        _forget_forward_order(modules)


def _forget_forward_order(modules: list[nn.Module]) -> None:
    """Drop the forward order FSDP2 recorded inside the block. Its backward prefetches, for each module, the one
    that ran before it in the last forwards; the block's no-grad forwards (which differ between ranks: a rank whose
    rollout failed ran none) would make the first backward after it prefetch a stale module on some ranks only, and
    the ranks' collectives drift apart (a hang; seen with 2 gloo ranks, 2026-11-28). Private FSDP2 state, as
    nothing public resets it; checked by tests/test_train_bpo.py's two-rank failure test."""
    for m in modules:
        state = m._get_fsdp_state()
        ctx = getattr(state, "_comm_ctx", None)
        order = getattr(ctx, "post_forward_order", None)
        if order is None:
            raise RuntimeError("this torch's FSDP2 has no _comm_ctx.post_forward_order: parallel.gathered cannot "
                               "reset the backward prefetch order (update r4b/engine/train/parallel.py)")
        order.clear()
        for g in state._fsdp_param_groups:
            g._post_forward_indices.clear()


def reshard(model: nn.Module) -> None:
    """Reshard every FSDP module of ``model`` (frees whole-parameter copies). Needed after a forward under no_grad
    that no backward follows, before ``optimizer.step()``: the root keeps its unsharded copy until then."""
    for m in _fsdp_modules(model):
        m.reshard()


# -- collectives ---------------------------------------------------------------------------------------------------
def all_reduce_sum(x: T) -> T:
    """The sum of ``x`` (a float / int, or a tensor on any device) over all ranks, of the same kind (a tensor comes
    back on its own device, a new tensor)."""
    if isinstance(x, Tensor):
        if not _initialised():
            return x.clone()
        dev = _collective_device()
        t = x.detach().to(dev, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(x.device)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"x must be a float, int or Tensor, got {type(x).__name__}")
    if not _initialised():
        return x
    dtype = torch.int64 if isinstance(x, int) else torch.float64
    t = torch.tensor([x], dtype=dtype, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return type(x)(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order. Only for trusted in-job data: objects are pickled."""
    if not _initialised():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (what other ranks pass is ignored)."""
    if not _initialised():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if _initialised():
        dist.barrier()


def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``; returns the norm before clipping
    as a python float (the norm over every rank's shards: the unsharded model's gradient norm; inf / nan when a
    gradient is not finite: the gradients are then meaningless and the caller skips the step)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor: the reduction over the shards happens here
        norm = norm.full_tensor()
    return float(norm)
