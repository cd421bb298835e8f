"""The ``r4b`` command line.

    r4b info                      what this install has: extension, CUDA, backends of every op
    r4b bench <op ...>|all        run benchmarks (from a source checkout: python -m bench)
    r4b demo                      the CPU demo of the first milestone (same as `make demo`)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def cmd_info(_: argparse.Namespace) -> int:
    import torch

    import r4b
    from r4b.kernels import available_backends, registered_ops
    from r4b.kernels._dispatch import PEER_BACKENDS
    from r4b.kernels._ext import load

    ext = load()
    print(f"r4b {r4b.__version__}  torch {torch.__version__}  cuda available: {torch.cuda.is_available()}")
    if ext is None:
        print("r4b._C: not built (pip install -e . --no-build-isolation)")
    else:
        print(f"r4b._C: cpu ops {ext.cpu_ops()}, cuda ops {ext.cuda_ops() or 'none (built without CUDA)'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = registered_ops()
    w = max(28, *(len(",".join(b)) + 1 for b in ops.values()))
    print(f"{'op':<28} {'implements':<{w}} " + " ".join(f"{'runs on ' + d:<{w}}" for d in devices))
    for op, backends in sorted(ops.items()):
        runs = " ".join(f"{','.join(available_backends(op, d)):<{w}}" for d in devices)
        print(f"{op:<28} {','.join(backends):<{w}} {runs}")
    print(f"{', '.join(PEER_BACKENDS)}: opt-in, never picked by backend=None (backend=..., or R4B_ATTN_BACKEND=...)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "__main__.py").exists():
        print("r4b bench runs from a source checkout (the bench/ folder is not installed)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *args.names], cwd=root)


def cmd_demo(_: argparse.Namespace) -> int:
    from r4b import demo

    return demo.main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r4b", description="r4b: kernels and engine for auto-thinking LLMs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="extension, devices and the backends of every op").set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="run benchmarks (source checkout)")
    b.add_argument("names", nargs="+", help="bench names or 'all' (add --quick for tiny shapes)")
    b.set_defaults(fn=cmd_bench)
    sub.add_parser("demo", help="run the CPU demo").set_defaults(fn=cmd_demo)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        args.names += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
