"""Training logs: one JSON line per logged step (``metrics.jsonl``, the record the plots and a resumed run read),
TensorBoard scalars (``tb/``) and the matplotlib plot of a run (``metrics.png``). Only the main rank writes.

A resumed run first drops the lines a crashed run wrote after its last checkpoint (steps > the resumed step), so
the file holds one curve, as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    """``log(step, {name: float})`` appends to output_dir/metrics.jsonl and, when ``tensorboard``, writes the same
    scalars to output_dir/tb. ``enabled=False`` (the other ranks) makes every call a no-op."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step if resume_step is not None else -1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSON lines still hold everything
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=(resume_step or 0) + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None  # JSON has no NaN / inf
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (a torn last line, from a crash mid-write, is dropped)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def truncate_after(path: Path, step: int) -> None:
    """Keep only the rows with ``row["step"] <= step`` (atomically rewritten); -1 empties the file."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    os.replace(tmp, path)


def plot_metrics(path: str | Path, out: str | Path, keys: list[str] | None = None, *, title: str = "") -> Path | None:
    """One panel per metric (the ones in ``keys`` that were logged, or every one) against the step, saved as a PNG.
    Returns the file, or None when matplotlib is missing or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(path)
    names = [k for k in (keys or sorted({k for r in rows for k in r} - {"step"})) if any(r.get(k) is not None
                                                                                        for r in rows)]
    if not names:
        return None
    cols = min(3, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
