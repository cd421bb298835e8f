"""Host (Python) time per call of rms_norm, rope, swiglu on the CPU, kernel launches made no-ops (not a test)."""

# Run: .venv/bin/python -m bench.host_overhead [--n 2000]. The ops run on small CPU tensors under
# TRITON_INTERPRET=1 (so dispatch picks the triton backend, as on a GPU) with every Triton launch (the
# interpreter's run, also under a cached autotuner) a no-op that only resolves the grid: what is timed is the
# wrapper's own work (checks, dispatch, allocation, autograd) that a GPU call pays on top of triton's launch path.
# The last two rows time the autotuner's own per-call Python (its cache filled: key, argument dicts, config)
# against a launch with the config given, both ending in the no-op.

from __future__ import annotations

import argparse
import importlib
import os
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402


def _noop_run(self, *args, grid, warmup, **kwargs):
    if callable(grid):
        grid(kwargs)
    return None


def _time(fn, n: int) -> float:
    for _ in range(min(200, n)):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    n = p.parse_args().n

    from triton.runtime.interpreter import InterpretedFunction

    from r4b.kernels import add_rms_norm, qk_norm_rope, rms_norm, rope, swiglu

    InterpretedFunction.run = _noop_run
    # outputs are left as torch.empty made them: the weight gradient's sum may meet denormals
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    w = torch.randn(256)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    q = torch.randn(64, 8, 128)
    qg = q.clone().requires_grad_()
    pos = torch.arange(64)
    g, u = torch.randn(64, 512), torch.randn(64, 512)
    gg, ug = g.clone().requires_grad_(), u.clone().requires_grad_()
    k, wh = torch.randn(64, 2, 128), torch.randn(128)
    r = torch.randn(64, 256)
    rg = r.clone().requires_grad_()

    def _unfused_add(a, b, wt):
        s = a + b
        return rms_norm(s, wt), s

    kg, whg, wkg = k.clone().requires_grad_(), wh.clone().requires_grad_(), wh.clone().requires_grad_()
    dy_x, dy_q, dy_g, dy_k = torch.ones_like(x), torch.ones_like(q), torch.ones_like(g), torch.ones_like(k)

    def fwd_bwd(out, dy, *leaves):
        torch.autograd.backward(out, dy)
        for t in leaves:  # the next backward hands its gradient over instead of adding to this one
            t.grad = None

    rows = {
        "rms_norm fwd": lambda: rms_norm(x, w),
        "rms_norm fwd+bwd": lambda: fwd_bwd(rms_norm(xg, wg), dy_x, xg, wg),
        "rope fwd": lambda: rope(q, pos),
        "rope fwd+bwd": lambda: fwd_bwd(rope(qg, pos), dy_q, qg),
        "swiglu fwd": lambda: swiglu(g, u),
        "swiglu fwd+bwd": lambda: fwd_bwd(swiglu(gg, ug), dy_g, gg, ug),
        # the decoder's residual add + norm: fused, and the add and norm it replaces
        "add_rms_norm fwd": lambda: add_rms_norm(x, r, w),
        "add_rms_norm fwd+bwd": lambda: fwd_bwd(add_rms_norm(xg, rg, wg), (dy_x, dy_x), xg, rg, wg),
        "unfused add + rms_norm fwd": lambda: (rms_norm(x + r, w), x + r),
        "unfused add + rms_norm fwd+bwd": lambda: fwd_bwd(_unfused_add(xg, rg, wg), (dy_x, dy_x), xg, rg, wg),
        # the attention input's q/k norm + RoPE: fused, and the four ops it replaces
        "qk_norm_rope fwd": lambda: qk_norm_rope(q, k, wh, wh, pos),
        "qk_norm_rope fwd+bwd": lambda: fwd_bwd(qk_norm_rope(qg, kg, whg, wkg, pos), (dy_q, dy_k), qg, kg, whg, wkg),
        "unfused q/k norm + rope fwd": lambda: (rope(rms_norm(q, wh), pos), rope(rms_norm(k, wh), pos)),
        "unfused q/k norm + rope fwd+bwd": lambda: fwd_bwd((rope(rms_norm(qg, whg), pos), rope(rms_norm(kg, wkg), pos)),
                                                           (dy_q, dy_k), qg, kg, whg, wkg),
    }
    ref = {"torch.empty_like (reference)": lambda: torch.empty_like(x)}
    for name, fn in {**ref, **rows}.items():
        print(f"{name:32s} {_time(fn, n):7.1f} us/call")

    # triton's autotuner per call (its cache filled, as after the first call of a key): key and config in Python
    mod = importlib.import_module("r4b.kernels.swiglu")
    y = torch.empty_like(g)
    args = (g, u, y, 64, 512, 0, 512, 512, 512)
    cfg = mod._cfgs[0]
    key = (512, 0, "torch.float32", "torch.float32", "torch.float32")
    mod._fwd_tuned.cache[key] = cfg
    grid = lambda m: (1,)  # noqa: E731
    print(f"{'autotuner run (swiglu fwd)':32s} {_time(lambda: mod._fwd_tuned[grid](*args), n):7.1f} us/call")
    print(f"{'kernel[grid] with a config':32s} "
          f"{_time(lambda: mod._swiglu_fwd_kernel[grid](*args, **cfg.all_kwargs()), n):7.1f} us/call")


if __name__ == "__main__":
    main()
