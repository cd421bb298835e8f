"""python -m bench <name ...> | all [--quick] [--list]

Runs bench/bench_<name>.py's main(). Without a GPU the benches run their --quick (tiny) shapes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in argv if a.startswith("-")]
    wanted = [a for a in argv if not a.startswith("-")]
    if "--list" in flags or not wanted:
        print("benches:", " ".join(names()))
        print(__doc__.strip())
        return 0 if "--list" in flags else 2
    if wanted == ["all"]:
        wanted = names()
    unknown = [w for w in wanted if w not in names()]
    if unknown:
        print(f"unknown bench {unknown}; available: {names()}", file=sys.stderr)
        return 2
    failed = []
    for w in wanted:
        print(f"== bench {w}", flush=True)
        mod = importlib.import_module(f"bench.bench_{w}")
        try:
            mod.main(flags)
        except Exception as ex:  # one failing bench must not hide the others
            print(f"bench {w} failed: {type(ex).__name__}: {ex}", file=sys.stderr)
            failed.append(w)
    if failed:
        print(f"failed benches: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
