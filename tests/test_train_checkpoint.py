"""Training checkpoints and FSDP2 (r4b/engine/train/checkpoint.py, parallel.py) on the CPU with gloo.

In this process (a world of one through a FileStore): a resumed run replays the uninterrupted run's losses and
parameters bitwise (and does not when the RNG is left unrestored), the directory layout, ``latest`` and
``keep_last``, a save that fails midway (the previous checkpoint stays the latest and loads), bad arguments and
checkpoints, the HF export (tied embeddings too) and the R-4B vision tower under FSDP2. With torchrun (2 processes,
tests/_train_dist_worker.py): resume at a world of two, a save failing on one rank, ``gathered`` with the
inference engine, ``clip_grad_norm_``, the collectives, the export; then the two-rank checkpoint loads here at a
world of one with the same parameters, optimizer state, lr and rank 0's RNG.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")  # tiny_models' configs

import _train_dist_worker as W  # noqa: E402
from tiny_models import PINPOINTS  # noqa: E402

from r4b.engine.model import from_pretrained  # noqa: E402
from r4b.engine.train import checkpoint as ckpt  # noqa: E402
from r4b.engine.train import parallel  # noqa: E402


@pytest.fixture
def world1(monkeypatch):
    """A world of one for the test, torn down after it; r4b's torch kernels (these tests are about state)."""
    monkeypatch.setenv("R4B_BACKEND", "torch")
    info = parallel.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert parallel.init_distributed("cpu") is info  # idempotent
    yield info
    parallel.shutdown_distributed()
    parallel.shutdown_distributed()  # safe twice


def run_steps(model, opt, sched, n: int) -> list[float]:
    return [W.train_step(model, opt, sched, 0) for _ in range(n)]


def trained(steps: int = 1, seed: int = 0, tie: bool = False):
    model = W.build(seed=seed, tie=tie)
    opt, sched = W.optim(model)
    run_steps(model, opt, sched, steps)
    return model, opt, sched


@pytest.mark.parametrize("restore_rng", [True, False], ids=["rng", "rng_not_restored"])
def test_resume_replays_the_loss_curve_bitwise(world1, tmp_path, monkeypatch, restore_rng):
    torch.manual_seed(0)
    random.seed(0)
    model, opt, sched = trained(W.K)
    path = ckpt.save_checkpoint(tmp_path, W.K, model=model, optimizer=opt, scheduler=sched,
                                trainer_state={"step": W.K, "loader": {"epoch": 0, "pos": [1, 2]}})
    ref_losses = run_steps(model, opt, sched, W.M)
    ref_params = W.full_params(model)

    torch.manual_seed(123)  # a restarted process: other RNG states, another initialisation
    random.seed(123)
    model2 = W.build(seed=1)
    opt2, sched2 = W.optim(model2)
    if not restore_rng:  # the batches after the checkpoint come from the RNGs: the curve must then differ
        monkeypatch.setattr(ckpt, "_restore_rng", lambda *a: None)
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"step": W.K, "loader": {"epoch": 0, "pos": [1, 2]}}
    losses = run_steps(model2, opt2, sched2, W.M)
    if restore_rng:
        assert losses == ref_losses
        assert W.same(W.full_params(model2), ref_params)
    else:
        assert losses != ref_losses


def test_layout_latest_and_keep_last(world1, tmp_path):
    model, opt, sched = trained()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched,
                             trainer_state={"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    assert (tmp_path / "latest").read_text() == "step-00000004\n"
    last = tmp_path / "step-00000004"
    assert ckpt.latest_checkpoint(tmp_path) == last
    assert sorted(p.name for p in last.iterdir()) == ["COMPLETE", "rng-rank0.pt", "scheduler.json", "state",
                                                      "trainer_state.json"]
    assert json.loads((last / "COMPLETE").read_text()) == {"step": 4, "world_size": 1}
    rng = torch.load(last / "rng-rank0.pt", weights_only=True)
    assert rng["torch"].dtype == torch.uint8 and all(isinstance(x, int) for x in rng["python"]["state"])
    assert (last / "state" / ".metadata").is_file()

    # a dead save's temp dir (even one holding a marker) and an unmarked directory are never returned
    dead = tmp_path / ".step-00000009.tmp-x1"
    dead.mkdir()
    (dead / "COMPLETE").write_text("{}")
    (tmp_path / "step-00000007").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == last
    (tmp_path / "latest").write_text("step-00000007\n")  # names an incomplete one: the highest complete step
    assert ckpt.latest_checkpoint(tmp_path) == last
    (tmp_path / "latest").write_text("step-00000003\n")  # names a complete one: it wins
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    (tmp_path / "latest").write_text("../elsewhere\n")
    assert ckpt.latest_checkpoint(tmp_path) == last
    assert ckpt.latest_checkpoint(tmp_path / "absent") is None

    with pytest.raises(FileNotFoundError, match="step-00000099"):
        ckpt.load_checkpoint(tmp_path / "step-00000099", model=model, optimizer=opt)
    with pytest.raises(ValueError, match=r"step-00000007 is incomplete"):
        ckpt.load_checkpoint(tmp_path / "step-00000007", model=model, optimizer=opt)

    # the next save clears the dead temp dir, leaves the unmarked directory alone, replaces a same-step save
    ckpt.save_checkpoint(tmp_path, 4, model=model, optimizer=opt, scheduler=sched, trainer_state={"again": 1},
                         keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004",
                                                          "step-00000007"]
    assert json.loads((last / "trainer_state.json").read_text()) == {"again": 1}


def test_bad_arguments(world1, tmp_path):
    model, opt, sched = trained(0)
    kw = dict(model=model, optimizer=opt, trainer_state={})
    with pytest.raises(ValueError, match="keep_last must be"):
        ckpt.save_checkpoint(tmp_path, 1, keep_last=0, **kw)
    with pytest.raises(ValueError, match="step must be"):
        ckpt.save_checkpoint(tmp_path, -1, **kw)
    with pytest.raises(TypeError, match="trainer_state must be JSON-serialisable"):
        ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={"x": object()})
    assert not tmp_path.joinpath("step-00000001").exists()
    ckpt.save_checkpoint(tmp_path, 1, **kw)  # without a scheduler
    with pytest.raises(ValueError, match="no scheduler state"):
        ckpt.load_checkpoint(tmp_path / "step-00000001", model=model, optimizer=opt, scheduler=sched)
    with pytest.raises(ValueError, match="max_norm must be"):
        parallel.clip_grad_norm_(model, 0.0)
    with pytest.raises(ValueError, match="dtype must be"):
        ckpt.export_hf(model, tmp_path / "hf", dtype=torch.int8)


class Injected(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["dcp_save", "before_rename"])
def test_failed_save_keeps_the_previous_checkpoint(world1, tmp_path, monkeypatch, where):
    model, opt, sched = trained()
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, trainer_state={"step": 1})
    params1 = W.full_params(model)
    run_steps(model, opt, sched, 1)
    if where == "dcp_save":  # the tensors are written, then the save dies
        real = ckpt.dcp.save

        def save(*args, **kwargs):
            real(*args, **kwargs)
            raise Injected("after the DCP files")

        monkeypatch.setattr(ckpt.dcp, "save", save)
    else:  # everything written and marked COMPLETE in the temp dir, then the save dies

        def fail(path):
            raise Injected("before the rename")

        monkeypatch.setattr(ckpt, "_fsync_dir", fail)
    with pytest.raises(Injected):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, trainer_state={"step": 2})
    monkeypatch.undo()
    monkeypatch.setenv("R4B_BACKEND", "torch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    fresh, opt2, sched2 = trained(0, seed=7)
    assert ckpt.load_checkpoint(tmp_path / "step-00000001", model=fresh, optimizer=opt2, scheduler=sched2) == \
        {"step": 1}
    assert W.same(W.full_params(fresh), params1)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_hf_round_trip(world1, tmp_path, tie):
    model, _, _ = trained(tie=tie)
    params = W.full_params(model)
    assert not W.same(params, W.full_params(W.build(tie=tie)))  # the step changed them
    ckpt.export_hf(model, tmp_path / "hf")
    loaded = from_pretrained(tmp_path / "hf")
    assert W.same(dict(loaded.named_parameters()), params)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    ckpt.export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)  # over the first: replaced
    low = from_pretrained(tmp_path / "hf")
    assert W.same(dict(low.named_parameters()), {n: p.bfloat16() for n, p in params.items()})


def test_r4b_vision_layers_are_sharded_and_export(world1, tmp_path):
    from torch.distributed.fsdp import FSDPModule

    from r4b.engine.model import Qwen3Config, R4BConfig, R4BForConditionalGeneration, SiglipConfig

    cfg = R4BConfig(text_config=Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            tie_word_embeddings=True),
                    vision_config=SiglipConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=28, patch_size=7),
                    image_token_index=5, image_grid_pinpoints=PINPOINTS, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = R4BForConditionalGeneration(cfg)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    parallel.apply_fsdp(model)
    assert all(isinstance(m, FSDPModule) for m in [*model.model.vision_tower.encoder.layers,
                                                   *model.language_model.layers, model])
    with torch.no_grad(), parallel.gathered(model):
        assert W.same({n: p.detach() for n, p in model.named_parameters()}, want)
    ckpt.export_hf(model, tmp_path / "hf")
    assert W.same(dict(from_pretrained(tmp_path / "hf").named_parameters()), want)


def test_two_processes_then_resume_at_world_one(tmp_path, monkeypatch):
    with socket.socket() as s:  # a free port for the rendezvous (torchrun's --master_port 0 hangs)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "_train_dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), worker, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "R4B_BACKEND": "torch"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)  # about 6 s
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"results-rank{rank}.json").read_text())
        assert res.pop("world") == 2
        assert res and all(v is True for v in res.values()), (rank, res)
    assert len(json.loads((tmp_path / "results-rank0.json").read_text())) == 27  # rank 0 also checked the export

    # the two-rank checkpoint at a world of one: DCP reshards the parameters and the optimizer state
    monkeypatch.setenv("R4B_BACKEND", "torch")
    parallel.init_distributed("cpu")
    try:
        path = ckpt.latest_checkpoint(tmp_path / "ckpt")
        assert path == tmp_path / "ckpt" / f"step-{W.K:08d}"
        assert json.loads((path / "COMPLETE").read_text())["world_size"] == 2
        saved = torch.load(tmp_path / "saved.pt", weights_only=True)
        model = W.build(seed=9)
        opt, sched = W.optim(model)
        assert ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched) == {"step": W.K}
        assert W.same(W.full_params(model), saved["params"])
        assert W.same(W.full_optim_state(model, opt), saved["optim"])
        assert opt.param_groups[0]["lr"] == saved["lr"] and sched.last_epoch == W.K
        assert torch.equal(torch.get_rng_state(), saved["torch_rng"])  # rank 0's
    finally:
        parallel.shutdown_distributed()


def test_shutdown_leaves_a_group_it_did_not_create(tmp_path):
    """A training script that initialised torch.distributed itself keeps its group after a trainer closes."""
    import torch.distributed as dist

    from r4b.engine.train import parallel

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        info = parallel.init_distributed("cpu")
        assert (info.rank, info.world_size) == (0, 1)
        parallel.shutdown_distributed()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    info = parallel.init_distributed("cpu")  # r4b's own world of one: destroyed by its shutdown
    parallel.shutdown_distributed()
    assert not dist.is_initialized()
