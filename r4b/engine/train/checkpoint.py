"""Training checkpoints (model + optimizer + scheduler + RNG + trainer state), written atomically with
torch.distributed.checkpoint (DCP) so that a run saved on N ranks resumes on M, and the HF export of a trained
(FSDP2-sharded) model.

Layout of ``root/step-XXXXXXXX/`` (step zero-padded to 8 digits):
  state/                DCP files: {"model": ..., "optim": ...} from ``get_state_dict`` (sharded, every rank writes)
  scheduler.json        the LR scheduler's state_dict (when one was passed)
  trainer_state.json    what the trainer passed (loader position, metrics, config)
  rng-rank{r}.pt        each rank's RNG: torch CPU, CUDA (when initialised), python ``random`` (ints only)
  COMPLETE              written last, JSON {"step", "world_size"}: a directory without it is never loaded
``root/latest`` holds the newest checkpoint's directory name. A save goes to a hidden temporary sibling
(``.step-XXXXXXXX.tmp-*``), is fsynced, marked COMPLETE and renamed into place, then ``latest`` is replaced
(temp file + os.replace) and checkpoints beyond ``keep_last`` are pruned (renamed aside first, so a crash never
leaves a marked but half-deleted directory). The root must be on a filesystem every rank sees.

Nothing is unpickled: RNG files are read with ``weights_only=True``, the rest is JSON or DCP tensors.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from . import parallel

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_DIR = "state"
SCHEDULER_FILE = "scheduler.json"
TRAINER_STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_LEFTOVER = re.compile(r"^\.step-\d{8,}\.(tmp|old|del)-")  # temp dirs of saves that died, old copies, prunes


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _write(path: Path, data: bytes) -> None:
    """Write and fsync one file."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _agree(err: Exception | None, what: str) -> None:
    """Collective: every rank learns whether any rank failed ``what``; the failing rank re-raises its own error,
    the others raise RuntimeError naming it (so no rank waits forever at the next collective)."""
    errors = parallel.all_gather_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        raise RuntimeError(f"{what} failed on rank {bad[0][0]}: {bad[0][1]}")


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).is_file()


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and _is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


# -- RNG -----------------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    version, state, gauss_next = random.getstate()
    out: dict[str, Any] = {"torch": torch.get_rng_state(),
                           "python": {"version": version, "state": list(state), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _restore_rng(path: Path, rank: int) -> None:
    """This rank's RNG from its own file. A rank the saving run did not have (a larger world) takes rank 0's state
    and reseeds from it with its rank mixed in: repeatable on every resume, and different on every rank."""
    own = path / f"rng-rank{rank}.pt"
    if own.is_file():
        _set_rng_state(torch.load(own, weights_only=True))
        return
    base = torch.load(path / "rng-rank0.pt", weights_only=True)
    _set_rng_state(base)
    g = torch.Generator().manual_seed(0)
    g.set_state(base["torch"])
    seed = int(torch.randint(0, 2**62, (1,), generator=g)) + rank
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    log.info("checkpoint %s has no RNG state for rank %d: seeded from rank 0's (%d)", path, rank, seed)


# -- save / find / load --------------------------------------------------------------------------------------------
def save_checkpoint(root: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None, trainer_state: dict, keep_last: int | None = 3) -> Path:
    """Write ``root/step-{step:08d}`` atomically and return its path. Collective: every rank calls it.

    ``trainer_state``: a JSON-serialisable dict (loader position, metrics, config) that :func:`load_checkpoint`
    returns. ``scheduler``: anything with ``state_dict()`` / ``load_state_dict()`` whose state is JSON (torch's
    LR schedulers with function lambdas are). ``keep_last``: complete checkpoints kept, this one and the newest
    others by step (None keeps all). An existing checkpoint of the same step is replaced. A failure on any rank
    raises on every rank and leaves the previous checkpoints and ``latest`` as they were.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    if not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    # serialised first, on every rank: a bad value fails everywhere before any collective
    try:
        state_json = json.dumps(trainer_state, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(f"trainer_state must be JSON-serialisable: {e}") from e
    sched_json = None
    if scheduler is not None:
        try:
            sched_json = json.dumps(scheduler.state_dict())
        except (TypeError, ValueError) as e:
            raise TypeError(f"scheduler.state_dict() must be JSON-serialisable: {e}") from e
    root = Path(root)
    name = step_dir_name(step)
    rank, world = _rank_world()

    err: Exception | None = None
    tmp_name = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for p in root.iterdir():  # leftovers of saves that died; nobody else writes here
                if _LEFTOVER.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
            tmp_name = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)).name
        except Exception as e:
            err = e
    tmp_name = parallel.broadcast_object(tmp_name)
    _agree(err, f"creating the checkpoint directory in {root}")
    tmp = root / tmp_name

    try:
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / STATE_DIR)
            buf = io.BytesIO()
            torch.save(_rng_state(), buf)
            _write(tmp / f"rng-rank{rank}.pt", buf.getvalue())
            if rank == 0:
                _write(tmp / TRAINER_STATE_FILE, state_json.encode())
                if sched_json is not None:
                    _write(tmp / SCHEDULER_FILE, sched_json.encode())
            err = None
        except Exception as e:
            err = e
        _agree(err, f"saving checkpoint {root / name}")
        if rank == 0:
            try:
                _finish(root, tmp, name, step, world, keep_last)
            except Exception as e:
                err = e
        _agree(err, f"finishing checkpoint {root / name}")
    finally:
        if rank == 0 and tmp.exists():  # only when something failed: a finished save renamed it
            shutil.rmtree(tmp, ignore_errors=True)
    return root / name


def _finish(root: Path, tmp: Path, name: str, step: int, world: int, keep_last: int | None) -> None:
    """Rank 0, after every rank wrote: mark, rename into place, point ``latest`` at it, prune."""
    _write(tmp / COMPLETE, json.dumps({"step": step, "world_size": world}).encode())
    _fsync_dir(tmp)
    final = root / name
    old = None
    if final.exists():
        old = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    latest_tmp = root / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
    _write(latest_tmp, (name + "\n").encode())
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    if keep_last is not None:
        others = [p for _, p in _complete_checkpoints(root) if p.name != name]
        for p in others[: max(len(others) - (keep_last - 1), 0)]:
            doomed = root / f".{p.name}.del-{uuid.uuid4().hex[:8]}"
            os.rename(p, doomed)  # out of sight first: never a marked, half-deleted checkpoint
            shutil.rmtree(doomed, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint to resume from: the one ``root/latest`` names when it is complete, else the complete
    ``step-*`` directory of the highest step; None when there is none (or no ``root``). Temporary and incomplete
    directories are never returned. Not collective."""
    root = Path(root)
    if not root.is_dir():
        return None
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.match(name) and _is_complete(root / name):
        return root / name
    found = _complete_checkpoints(root)
    return found[-1][1] if found else None


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` / ``optimizer`` / ``scheduler`` (in
    place, any world size: DCP reshards) and this rank's RNG; returns the trainer_state dict. Collective.

    ``optimizer`` None loads the model alone. RNG: each rank takes its own saved state; a rank the saving run did
    not have takes rank 0's reseeded with its rank (see ``_restore_rng``). A missing checkpoint raises
    FileNotFoundError, an incomplete one (no COMPLETE marker) ValueError, both naming the path.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: its save did not finish); "
                         "latest_checkpoint(root) finds the newest complete one")
    if scheduler is not None and not (path / SCHEDULER_FILE).is_file():
        raise ValueError(f"checkpoint {path} holds no scheduler state but a scheduler was given")
    trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=path / STATE_DIR)
        set_model_state_dict(model, model_sd)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path / STATE_DIR)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    if scheduler is not None:
        scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text(encoding="utf-8")))
    _restore_rng(path, _rank_world()[0])
    return trainer_state


# -- HF export -----------------------------------------------------------------------------------------------------
def export_hf(model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write the (sharded) model as an HF checkpoint at ``path`` (config.json + safetensors, R-4B / Qwen3 layout,
    as ``r4b.engine.model.save_pretrained``), floats cast to ``dtype`` (None: as trained). Collective: the full
    state is gathered to rank 0's CPU, rank 0 writes (temp dir + rename), every rank returns once it is there."""
    from ..model import Qwen3ForCausalLM, R4BForConditionalGeneration, save_pretrained

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    cls = next((c for c in type(model).__mro__ if c in (Qwen3ForCausalLM, R4BForConditionalGeneration)), None)
    if cls is None:
        raise TypeError(f"model must be a Qwen3ForCausalLM or R4BForConditionalGeneration, got {type(model).__name__}")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    err = None
    if _rank_world()[0] == 0:
        try:
            if dtype is not None:
                full = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in full.items()}
            with torch.device("meta"):
                plain = cls(copy.deepcopy(model.config))
            plain.load_state_dict(full, strict=True, assign=True)
            if plain.config.tie_word_embeddings:
                plain.tie_weights()
            save_pretrained(plain, path)
        except Exception as e:
            err = e
    _agree(err, f"exporting the model to {path}")
