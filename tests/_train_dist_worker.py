"""Worker of tests/test_train_checkpoint.py, and the helpers both share (a tiny FSDP2 Qwen3, AdamW + LambdaLR, a
training step whose batch is drawn from torch's and python's global RNGs).

Run by torchrun (2 processes, gloo on the CPU, r4b's torch kernels): save at step K and resume (bitwise the same
losses and parameters as the uninterrupted run), a save that fails on one rank, ``gathered`` (plain whole
parameters, the inference engine generating through them, then the same gradients as an untouched twin),
``clip_grad_norm_`` against one process's unsharded gradients, the collectives and ``export_hf``. Each rank
writes its checks to OUT/results-rank{r}.json; rank 0 also the saved state (OUT/saved.pt) that the test loads at
a world of one.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before r4b imports triton; the importing test has its own settings
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("R4B_BACKEND", "torch")
    sys.path.insert(0, os.path.dirname(__file__))

import faulthandler  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tiny_models import packed, tiny_qwen3  # noqa: E402
from torch import nn  # noqa: E402

from r4b.engine.train import checkpoint as ckpt  # noqa: E402
from r4b.engine.train import parallel  # noqa: E402
from r4b.kernels import fused_linear_cross_entropy  # noqa: E402

VOCAB = 97
K, M = 2, 3  # steps before the checkpoint, steps after it


def build(seed: int = 0, tie: bool = False, param_dtype: torch.dtype | None = None) -> nn.Module:
    model = tiny_qwen3(tie=tie, seed=seed)
    return parallel.apply_fsdp(model, param_dtype=param_dtype)


def optim(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # a different lr every step


def draw_batch(rank: int) -> dict:
    """A packed batch from the global RNGs: lengths from python's random, tokens seeded from torch's."""
    lengths = [random.randint(1, 12) for _ in range(3)]
    seed = int(torch.randint(0, 2**31, (1,))) + 1000 * rank
    return packed(lengths, VOCAB, seed=seed)[1]


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    targets = torch.roll(batch["input_ids"], -1)
    return fused_linear_cross_entropy(model(**batch), model.lm_head.weight, targets)


def train_step(model: nn.Module, opt, sched, rank: int) -> float:
    """One optimizer step on this rank's fresh batch (clipped at 1.0); the mean loss over the ranks."""
    loss = loss_of(model, draw_batch(rank))
    loss.backward()
    parallel.clip_grad_norm_(model, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return parallel.all_reduce_sum(loss.item()) / parallel.init_distributed().world_size


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in model.named_parameters()}


def full_optim_state(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            out[f"{n}.{k}"] = full(v)
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def is_plain(t: torch.Tensor) -> bool:
    return type(t) is nn.Parameter and not hasattr(t, "full_tensor")


def check_resume(out: Path, rank: int, res: dict) -> None:
    torch.manual_seed(0)
    random.seed(0)
    model = build(seed=0)
    opt, sched = optim(model)
    for _ in range(K):
        train_step(model, opt, sched, rank)
    root = out / "ckpt"
    ckpt.save_checkpoint(root, K, model=model, optimizer=opt, scheduler=sched, trainer_state={"step": K})
    saved = {"params": full_params(model), "optim": full_optim_state(model, opt), "lr": opt.param_groups[0]["lr"],
             "torch_rng": torch.get_rng_state()}
    ref_losses = [train_step(model, opt, sched, rank) for _ in range(M)]
    ref_params = full_params(model)

    # a failure on rank 1 alone: every rank raises, nothing of the failed save is left, latest unchanged
    real = ckpt._rng_state

    def failing():
        if rank == 1:
            raise OSError("disk full (injected)")
        return real()

    ckpt._rng_state = failing
    try:
        ckpt.save_checkpoint(root, K + M, model=model, optimizer=opt, scheduler=sched, trainer_state={})
        res["failed_save_raised"] = False
    except OSError as e:
        res["failed_save_raised"] = rank == 1 and "injected" in str(e)
    except RuntimeError as e:
        res["failed_save_raised"] = rank == 0 and "rank 1" in str(e) and "injected" in str(e)
    finally:
        ckpt._rng_state = real
    parallel.barrier()
    res["failed_save_left_nothing"] = sorted(p.name for p in root.iterdir()) == ["latest", f"step-{K:08d}"]

    torch.manual_seed(99)  # what a restarted process would hold
    random.seed(99)
    model2 = build(seed=1)
    opt2, sched2 = optim(model2)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), model=model2, optimizer=opt2, scheduler=sched2)
    res["trainer_state"] = state == {"step": K}
    res["resume_params_after_load"] = same(full_params(model2), saved["params"])
    losses = [train_step(model2, opt2, sched2, rank) for _ in range(M)]
    res["resume_losses_equal"] = losses == ref_losses
    res["resume_params_equal"] = same(full_params(model2), ref_params)
    if rank == 0:
        torch.save(saved, out / "saved.pt")


def check_gathered(rank: int, world: int, res: dict) -> None:
    from r4b.engine.llm import LLM
    from r4b.engine.sampling import SamplingParams

    torch.manual_seed(5)
    model, twin = build(seed=2, tie=True), build(seed=2, tie=True)
    shards = full_params(model)
    batch = packed([4, 7], VOCAB, seed=10 + rank)[1]
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    with torch.no_grad(), parallel.gathered(model):
        params = dict(model.named_parameters())
        res["gathered_plain"] = all(is_plain(p) for p in params.values())
        res["gathered_equal"] = same({n: p.detach() for n, p in params.items()}, shards)
        head = model.lm_head.weight  # read outside any forward, as the engine's sampler does
        res["gathered_lm_head"] = is_plain(head) and tuple(head.shape) == (VOCAB, 64)
        h1, h2 = model(**batch), model(**batch)
        res["gathered_two_forwards"] = torch.equal(h1, h2) and all(is_plain(p) for p in model.parameters())
        llm = LLM(model, num_kv_blocks=16, cuda_graphs=False)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4),
                                                              use_tqdm=False)]
    res["resharded_after"] = all(hasattr(p, "full_tensor") for p in model.parameters())
    plain = tiny_qwen3(tie=True, seed=2)
    want = [o.outputs[0].token_ids for o in LLM(plain, num_kv_blocks=16, cuda_graphs=False).generate(
        prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)]
    res["gathered_generate"] = got == want and all(len(t) == 4 for t in got)
    losses = [loss_of(m, batch) for m in (model, twin)]
    layers = [p for layer in model.language_model.layers for p in layer.parameters()]
    res["layers_reshard_after_forward_again"] = all(hasattr(p, "full_tensor") for p in layers)
    for loss in losses:
        loss.backward()
    res["grads_after_gathered"] = all(torch.equal(full(a.grad), full(b.grad))
                                      for a, b in zip(model.parameters(), twin.parameters(), strict=True))

    # clip_grad_norm_: the norm of the unsharded model's gradients (one process, the mean of the ranks' losses)
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    norm = parallel.clip_grad_norm_(model, float("inf"))
    plain = tiny_qwen3(tie=True, seed=2)
    (sum(loss_of(plain, packed([4, 7], VOCAB, seed=10 + r)[1]) for r in range(world)) / world).backward()
    ref = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.parameters()])))
    res["clip_norm_matches_unsharded"] = abs(norm - ref) <= 1e-6 * ref and isinstance(norm, float)
    res["clip_norm_matches_shards"] = abs(norm - float(torch.cat([g.flatten() for g in grads.values()]).norm())) \
        <= 1e-6 * norm
    parallel.clip_grad_norm_(model, norm / 4)
    after = float(torch.cat([full(p.grad).flatten() for p in model.parameters()]).norm())
    res["clip_scales"] = abs(after - norm / 4) <= 1e-4 * norm

    # param_dtype bf16: inside the block the parameters are the bf16 compute copies of the fp32 masters
    low = build(seed=3, param_dtype=torch.bfloat16)
    masters = full_params(low)
    with torch.no_grad(), parallel.gathered(low):
        res["gathered_bf16"] = all(p.dtype == torch.bfloat16 and torch.equal(p, masters[n].bfloat16())
                                   for n, p in low.named_parameters())
        res["gathered_bf16_forward"] = low(**batch).dtype == torch.bfloat16
    res["bf16_masters_fp32"] = all(p.dtype == torch.float32 for p in low.parameters())


def check_collectives(out: Path, rank: int, world: int, res: dict) -> None:
    res["all_reduce_float"] = parallel.all_reduce_sum(rank + 0.5) == sum(r + 0.5 for r in range(world))
    res["all_reduce_int"] = parallel.all_reduce_sum(rank + 1) == sum(range(1, world + 1))
    t = parallel.all_reduce_sum(torch.full((2,), float(rank)))
    res["all_reduce_tensor"] = torch.equal(t, torch.full((2,), float(sum(range(world)))))
    res["all_gather_object"] = parallel.all_gather_object({"r": rank}) == [{"r": r} for r in range(world)]
    res["broadcast_object"] = parallel.broadcast_object(f"from {rank}") == "from 0"

    model = build(seed=4, tie=True)
    ckpt.export_hf(model, out / "hf", dtype=torch.bfloat16)
    want = {n: p.bfloat16() for n, p in full_params(model).items()}  # collective: every rank
    if rank == 0:
        from r4b.engine.model import from_pretrained

        loaded = from_pretrained(out / "hf")
        res["export_hf_world2"] = same(dict(loaded.named_parameters()), want) and \
            loaded.lm_head.weight is loaded.model.embed_tokens.weight


def main() -> None:
    faulthandler.enable()
    out = Path(sys.argv[1])
    info = parallel.init_distributed("cpu")
    rank, world = info.rank, info.world_size
    res: dict = {"world": world}
    check_resume(out, rank, res)
    check_gathered(rank, world, res)
    check_collectives(out, rank, world, res)
    (out / f"results-rank{rank}.json").write_text(json.dumps(res, default=str))
    # as tests/_fsdp_worker.py: leave together, without the interpreter's teardown (a C++ thread destroyed at exit
    # aborted a rank now and then)
    parallel.shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
