"""Evaluation in R-4B's thinking modes (``r4b eval``): per mode the accuracy, output tokens and think-rate, and how
well auto mode decides when to think. These are the numbers the paper reports (accuracy and average output tokens in
non-thinking / auto / thinking mode) and the one BPO is meant to move (think where thinking is what gets the answer
right, answer directly elsewhere).

Each prompt is rendered once and completed ``n`` times in every mode from one prefill (``LLM.generate`` with a list
of modes). Each completion's answer (the text after ``</think>``) is scored by a rule reward (r4b.engine.rewards by
name, or "package.module:function"); a reward that raises or returns a non-finite value scores 0 and is counted; a
row that cannot be read and a request the engine refuses are recorded and left out of the means (the summary counts
them). Each prompt draws from its own seed, derived from (seed, prompt id), so its samples do not depend on which
other prompts share its batch.

Files (``run_eval``): ``samples.jsonl`` gets one line per completion, appended a chunk of prompts at a time and
fsynced, so an interrupted run resumes where it stopped and draws the same samples; ``summary.json`` and
``summary.md`` (the table) and ``eval.png`` (accuracy against mean output tokens, one point per mode) are written
from samples.jsonl at the end, atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._config import config_from_dict
from .agent import Toolbox, converse, score, tool_config_error
from .chat import check_mode
from .llm import LLM
from .rewards import REWARDS, resolve_reward
from .sampling import SamplingParams

log = logging.getLogger(__name__)

MODES = ("short", "auto", "long")
# the fields of EvalConfig that change what a sample is: a resumed run must agree with the samples on all of them
_SAMPLE_FIELDS = ("model", "tokenizer", "data", "image_root", "reward", "modes", "n", "temperature", "top_p", "top_k",
                  "max_tokens", "max_thinking_tokens", "seed", "dtype")
# sampling fields added later: in the key only when set (so a run written before they existed still resumes)
_SAMPLE_FIELDS_IF_SET = {"min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
# with tools: these too, and the tools' source digest (the spec alone would resume over edited tools)
_TOOL_FIELDS = ("tools", "max_tool_turns", "tool_timeout")


@dataclass
class EvalConfig:
    """model: a checkpoint directory (HF layout; R-4B or Qwen3) with its tokenizer.json (or ``tokenizer``); data: a
    JSONL of {"prompt": str} or {"messages": [...]} rows with the reference in "answer" (or "reference"), the BPO
    prompt format (images as in SFT rows, relative to ``image_root`` or the file's folder); output_dir: where the
    samples and the summary go.

    reward: "math" / "exact" / "choice" or "package.module:function" (answer, reference) -> float in [0, 1];
    modes: comma-separated thinking modes ("short": non-thinking, "auto", "long": thinking); n: completions per
    prompt and mode; temperature / top_p / top_k / max_tokens / max_thinking_tokens: sampling (0 = greedy; the
    thinking budget forces "</think>" after that many thought tokens); min_p / presence_penalty / frequency_penalty
    / repetition_penalty: as SamplingParams' (Qwen3 suggests presence_penalty up to 1.5 where a thinking model
    repeats itself endlessly); seed: the base of every prompt's seed;
    limit: evaluate only the first ``limit`` rows (0: all); batch_size: prompts per engine call (and per chunk
    of samples.jsonl); device (default: cuda when available) / dtype ("auto": the checkpoint's) / max_num_seqs: the
    engine; resume: continue the samples already in output_dir (they must come from the same
    sampling fields); progress: a tqdm bar; plot: eval.png.
    tools: Python functions the model may call, "package.module:fn1,fn2" or "path/tools.py:fn" (or a module's list,
    "module:TOOLS"; r4b.engine.agent.Toolbox): each completion is then a conversation of at most max_tool_turns
    assistant turns, scored on its last answer (a sample also records its turns, calls and messages);
    tool_timeout: seconds a call may take.
    """

    model: str = ""
    data: str = ""
    output_dir: str = ""
    tokenizer: str | None = None
    image_root: str | None = None
    reward: str = "math"
    modes: str = "short,auto,long"
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 2048
    max_thinking_tokens: int | None = None
    seed: int = 0
    limit: int = 0
    batch_size: int = 64
    device: str | None = None
    dtype: str = "auto"
    max_num_seqs: int = 256
    resume: bool = True
    progress: bool = True
    plot: bool = True
    tools: str | None = None
    max_tool_turns: int = 4
    tool_timeout: float = 30.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        """Build from a dict (e.g. a JSON config file), refusing unknown keys by name."""
        return config_from_dict(cls, d)

    @property
    def mode_list(self) -> tuple[str, ...]:
        return parse_modes(self.modes)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, max_tokens=self.max_tokens, n=self.n,
                              seed=self.seed)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"EvalConfig.{name} must be {want}, got {getattr(self, name)!r}")

        for name in ("model", "data", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a non-empty path")
        for name, low in (("n", 1), ("batch_size", 1), ("max_num_seqs", 1), ("limit", 0), ("seed", 0),
                          ("max_tool_turns", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise bad(name, f"an int >= {low}")
        for name in ("resume", "progress", "plot"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if (wrong := tool_config_error(self.tools, self.tool_timeout)) is not None:
            raise bad(*wrong)
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise bad("dtype", "one of auto, bf16, fp16, fp32")
        if not isinstance(self.reward, str) or not self.reward:
            raise bad("reward", "a reward name or 'package.module:function'")
        try:
            parse_modes(self.modes)
        except ValueError as e:
            raise ValueError(f"EvalConfig.{e}") from None
        try:
            self.sampling_params()
        except ValueError as e:
            raise ValueError(f"EvalConfig: {e}") from None
        if self.max_thinking_tokens is not None and (not isinstance(self.max_thinking_tokens, int)
                                                     or isinstance(self.max_thinking_tokens, bool)
                                                     or self.max_thinking_tokens < 0):
            raise bad("max_thinking_tokens", "None or an int >= 0")


def parse_modes(modes: str | Sequence[str]) -> tuple[str, ...]:
    """"short,auto,long" or a list of modes -> a tuple of distinct valid modes (ValueError naming a bad one)."""
    items = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    if not items or any(not isinstance(m, str) or not m for m in items):
        raise ValueError(f"modes must be a non-empty list of thinking modes {MODES}, got {modes!r}")
    for m in items:
        try:
            check_mode(m)
        except ValueError:
            raise ValueError(f"modes must be thinking modes {MODES}, got {m!r} in {modes!r}") from None
    if len(set(items)) != len(items):
        raise ValueError(f"modes must not repeat a mode, got {modes!r}")
    return tuple(items)


def prompt_seed(seed: int, prompt_id: int) -> int:
    """The seed of one prompt's completions: independent of the batch it is generated in, the same in every process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def _prompt_text(prompt: Any) -> str:
    """A prompt as text for samples.jsonl: the string, or the chat's text parts (an image shows as <image>)."""
    if isinstance(prompt, str):
        return prompt
    lines = []
    for m in prompt:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") if p.get("type") == "text" else "<image>" for p in content
                              if isinstance(p, dict))
        lines.append(f"{m.get('role')}: {content}")
    return "\n".join(lines)


def score_prompts(llm: LLM, prompts: Sequence[Any], references: Sequence[Any], ids: Sequence[int],
                  reward: Callable[[str, Any], float], *, modes: Sequence[str] = MODES,
                  params: SamplingParams | None = None, max_thinking_tokens: int | None = None,
                  toolbox: Toolbox | None = None, max_turns: int = 4) -> list[dict]:
    """Complete each prompt ``params.n`` times in every mode (one prefill per prompt) and score the answers.

    Returns one row per completion: id, mode, sample, reward, reward_error, think (a non-empty thought),
    tokens, thinking_tokens, finish_reason, answer, thinking, reference; and for a request the engine refused
    one row {id, error}. ``ids`` name the prompts (the seed of prompt i's completions comes from (params.seed,
    ids[i])). With ``toolbox`` each completion is a conversation of at most ``max_turns`` turns
    (r4b.engine.agent.run_tool_loop): think and thinking are its first turn's (the choice the question got),
    answer and finish_reason its last turn's, tokens and thinking_tokens summed over its turns; the row adds turns,
    tool_calls, tool_errors, stop_reason and messages (the conversation after the prompt).
    """
    if not len(prompts) == len(references) == len(ids):
        raise ValueError(f"prompts, references and ids must have one entry each, got {len(prompts)}, "
                         f"{len(references)} and {len(ids)}")
    params = params or SamplingParams(temperature=0.0, max_tokens=2048)
    modes = parse_modes(modes)
    per = [dataclasses.replace(params, seed=prompt_seed(params.seed or 0, int(i))) for i in ids]
    outs = converse(llm, prompts, per, toolbox=toolbox, thinking_mode=list(modes), max_turns=max_turns,
                    max_thinking_tokens=max_thinking_tokens)
    rows = []
    for pid, prompt, ref, out in zip(ids, prompts, references, outs, strict=True):
        text = _prompt_text(prompt)
        if out.error is not None or not out.trajectories:
            rows.append({"id": int(pid), "prompt": text, "error": out.error or "no completion"})
            continue
        for t in out.trajectories:
            first = t.turns[0].output
            r, err = score(reward, t, ref)
            row = {"id": int(pid), "mode": t.mode, "sample": t.index % params.n, "reward": r,
                   "reward_error": err, "think": first.mode == "think", "tokens": t.generated_tokens,
                   "thinking_tokens": sum(u.output.num_thinking_tokens for u in t.turns),
                   "finish_reason": t.final.finish_reason, "answer": t.answer, "thinking": first.thinking,
                   "reference": _jsonable(ref), "prompt": text}
            if toolbox is not None:
                row.update(turns=len(t.turns), tool_calls=t.num_tool_calls, tool_errors=t.tool_errors,
                           stop_reason=t.stop_reason, messages=t.messages(images=False))
            rows.append(row)
    return rows


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except (TypeError, ValueError):
        return repr(x)


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return math.fsum(xs) / len(xs) if xs else None


def summarize(rows: Iterable[dict], modes: Sequence[str] = MODES) -> dict:
    """The summary of sample rows (as score_prompts / samples.jsonl hold them).

    Per mode: accuracy (mean reward over every completion of the prompts that ran) with the standard error over
    prompts, think_rate, mean tokens / thinking tokens / answer tokens, truncated (finish "length") rate,
    reward_errors. With "short" and "long" both evaluated, ``thinking_gain`` splits the prompts by what thinking
    does to their accuracy (helps / hurts / no change) and, with "auto" too, ``auto_decision`` says how auto mode
    chooses on each kind: its think-rate where thinking helps and where it does not, its decision accuracy (the
    right choice on the prompts where one mode is better, weighted by how often auto made it) and the
    per-prompt oracle (the better forced mode's accuracy, and its tokens; a tie goes to the short answer).
    A mean over nothing is None.
    """
    modes = parse_modes(modes)
    per: dict[int, dict[str, list[dict]]] = {}
    failed, skipped = set(), []
    for r in rows:
        if "skipped" in r:
            skipped.append({"id": r["id"], "where": r.get("where"), "reason": r["skipped"]})
        elif "error" in r:
            failed.add(r["id"])
        elif r.get("mode") in modes:
            per.setdefault(r["id"], {}).setdefault(r["mode"], []).append(r)
    ok = sorted(pid for pid, by in per.items() if all(by.get(m) for m in modes))
    out: dict[str, Any] = {"prompts": len(ok), "failed_prompts": len(failed - set(ok)),
                           "skipped_rows": len(skipped), "incomplete_prompts": len(set(per) - set(ok) - failed),
                           "modes": {}}
    acc: dict[str, dict[int, float]] = {}
    toks: dict[str, dict[int, float]] = {}
    think: dict[str, dict[int, float]] = {}
    for m in modes:
        samples = [s for pid in ok for s in per[pid][m]]
        acc[m] = {pid: _mean(s["reward"] for s in per[pid][m]) for pid in ok}
        toks[m] = {pid: _mean(s["tokens"] for s in per[pid][m]) for pid in ok}
        think[m] = {pid: _mean(float(s["think"]) for s in per[pid][m]) for pid in ok}
        a = list(acc[m].values())
        stderr = None
        if len(a) > 1:
            mu = sum(a) / len(a)
            stderr = math.sqrt(sum((x - mu) ** 2 for x in a) / (len(a) - 1) / len(a))
        out["modes"][m] = {
            "completions": len(samples),
            "accuracy": _mean(s["reward"] for s in samples),
            "accuracy_stderr": stderr,
            "think_rate": _mean(float(s["think"]) for s in samples),
            "tokens_mean": _mean(s["tokens"] for s in samples),
            "thinking_tokens_mean": _mean(s["thinking_tokens"] for s in samples),
            "answer_tokens_mean": _mean(s["tokens"] - s["thinking_tokens"] for s in samples),
            "truncated_rate": _mean(float(s["finish_reason"] == "length") for s in samples),
            "reward_errors": sum(s.get("reward_error") is not None for s in samples),
        }
        if any("turns" in s for s in samples):  # conversations with tools
            out["modes"][m].update(
                turns_mean=_mean(s.get("turns", 1) for s in samples),
                tool_calls_mean=_mean(s.get("tool_calls", 0) for s in samples),
                tool_errors=sum(s.get("tool_errors", 0) for s in samples),
                max_turns_rate=_mean(float(s.get("stop_reason") == "max_turns") for s in samples),
                engine_errors=sum(s.get("stop_reason") == "error" for s in samples))
    if "short" in modes and "long" in modes:
        # a gain within rounding of 0 (partial-credit rewards summed in another order) is no change
        gain = {pid: 0.0 if abs(d := acc["long"][pid] - acc["short"][pid]) <= 1e-9 else d for pid in ok}
        helps = [pid for pid in ok if gain[pid] > 0]
        hurts = [pid for pid in ok if gain[pid] < 0]
        same = [pid for pid in ok if gain[pid] == 0]
        out["thinking_gain"] = {"helps": len(helps), "hurts": len(hurts), "no_change": len(same),
                                "mean": _mean(gain.values())}
        best = {pid: "long" if gain[pid] > 0 else "short" for pid in ok}
        out["oracle"] = {"accuracy": _mean(acc[best[pid]][pid] for pid in ok),
                         "tokens_mean": _mean(toks[best[pid]][pid] for pid in ok)}
        if "auto" in modes:
            t = think["auto"]
            decided = [t[pid] for pid in helps] + [1.0 - t[pid] for pid in hurts]
            out["auto_decision"] = {
                "think_rate_when_thinking_helps": _mean(t[pid] for pid in helps),
                "think_rate_when_thinking_hurts": _mean(t[pid] for pid in hurts),
                "think_rate_when_no_change": _mean(t[pid] for pid in same),
                "decision_accuracy": _mean(decided),
                "auto_minus_oracle_accuracy": (None if not ok else out["modes"]["auto"]["accuracy"]
                                               - out["oracle"]["accuracy"]),
            }
    if skipped:  # the first by row (samples.jsonl's order depends on the ranks and the resumes that wrote it)
        out["skipped"] = sorted(skipped, key=lambda r: r["id"])[:20]
    return out


def evaluate(llm: LLM, items: Sequence[tuple[Any, Any]], reward: Callable[[str, Any], float] | str, *,
             modes: Sequence[str] | str = MODES, params: SamplingParams | None = None,
             max_thinking_tokens: int | None = None, batch_size: int = 64,
             progress: bool = False, toolbox: Toolbox | None = None, max_turns: int = 4) -> tuple[dict, list[dict]]:
    """Evaluate (prompt, reference) pairs in memory: (summary, sample rows). The Python API of ``r4b eval``
    without files; prompts are ids 0, 1, ... in order; ``toolbox``: conversations with tools (score_prompts)."""
    fn = resolve_reward(reward) if isinstance(reward, str) else reward
    modes = parse_modes(modes)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    rows: list[dict] = []
    bar = _bar(len(items), progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rows += score_prompts(llm, [p for p, _ in chunk], [r for _, r in chunk],
                              list(range(start, start + len(chunk))), fn, modes=modes, params=params,
                              max_thinking_tokens=max_thinking_tokens, toolbox=toolbox, max_turns=max_turns)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return summarize(rows, modes), rows


def _bar(total: int, on: bool):
    if not on or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="prompt", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------- files


def _file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_samples(path: str | Path) -> list[dict]:
    """The complete lines of a samples.jsonl; a last line cut off by a crash is dropped (and cut from the file)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", path,
                    len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
    return [json.loads(line) for line in data[:keep].decode("utf-8").splitlines() if line.strip()]


def _model_fingerprint(cfg: EvalConfig) -> dict:
    """What identifies the model's contents without reading its weights: config.json's and the tokenizer's hashes,
    and each weight file's name, size and modification time (a checkpoint retrained in place differs)."""
    path = Path(cfg.model)
    tok = Path(cfg.tokenizer) if cfg.tokenizer else path / "tokenizer.json"
    out: dict[str, Any] = {}
    for name, f in (("config_sha256", path / "config.json"), ("tokenizer_sha256", tok)):
        out[name] = _file_digest(f) if f.is_file() else None
    if path.is_dir():
        out["weights"] = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir()
                                if p.name.endswith((".safetensors", ".safetensors.index.json")))
    return out


def _sample_key(cfg: EvalConfig, digest: str) -> dict:
    key = {k: getattr(cfg, k) for k in _SAMPLE_FIELDS}
    key.update({k: getattr(cfg, k) for k, default in _SAMPLE_FIELDS_IF_SET.items() if getattr(cfg, k) != default})
    if cfg.tools:
        key.update({k: getattr(cfg, k) for k in _TOOL_FIELDS})
        key["tools_sha256"] = Toolbox.source_digest(cfg.tools)
    key["modes"] = list(cfg.mode_list)
    key["data_sha256"] = digest
    key["model_files"] = _model_fingerprint(cfg)
    return key


def _world(cfg: EvalConfig) -> tuple[int, int, Any]:
    """(rank, world size, device) of this process: under torchrun with more than one process, from the process group
    (r4b.engine.train.parallel); otherwise a world of one on cfg.device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, cfg.device
    from .train.parallel import init_distributed

    info = init_distributed(cfg.device)
    return info.rank, info.world_size, str(info.device)


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("samples.rank*.jsonl"))


def _prepare(cfg: EvalConfig, key: dict, out: Path) -> None:
    """Rank 0, before any sampling: fold an interrupted data-parallel run's per-rank files into samples.jsonl,
    check that the samples there come from this evaluation (or start over), and drop a prompt cut off mid-chunk."""
    samples_path, key_path = out / "samples.jsonl", out / "eval_config.json"
    done_rows = read_samples(samples_path) if cfg.resume else []
    shard_rows = [r for p in _shards(out) for r in read_samples(p)] if cfg.resume else []
    if done_rows or shard_rows:  # (an empty samples.jsonl, e.g. from a run that failed early, binds nothing)
        old = json.loads(key_path.read_text(encoding="utf-8")) if key_path.exists() else None
        if old != key:
            diff = sorted(k for k in set(key) | set(old or {}) if (old or {}).get(k) != key.get(k))
            raise ValueError(f"{samples_path} holds samples of another evaluation (it differs in {diff}); use "
                             "another output_dir, or resume=False to start over")
    else:
        samples_path.write_bytes(b"")
        for name in ("summary.json", "summary.md", "eval.png"):  # an earlier run's: not of these samples
            (out / name).unlink(missing_ok=True)
    if shard_rows:  # a fold cut off between appending the ranks' files and deleting them: each row once
        seen = {json.dumps(r, sort_keys=True) for r in done_rows}
        for r in shard_rows:
            if (k := json.dumps(r, sort_keys=True)) not in seen:
                seen.add(k)
                done_rows.append(r)
    done = _finished_ids(done_rows, cfg.mode_list, cfg.n)
    if shard_rows or any(r["id"] not in done for r in done_rows):  # a prompt cut off mid-chunk: it reruns
        kept = sorted((r for r in done_rows if r["id"] in done), key=lambda r: r["id"])  # stable: a prompt's rows
        _atomic_write(samples_path, "".join(json.dumps(r) + "\n" for r in kept))  # keep their order
    for p in _shards(out):
        p.unlink()
    _atomic_write(key_path, json.dumps(key, indent=1) + "\n")
    _atomic_write(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")


def run_eval(cfg: EvalConfig, *, llm: LLM | None = None) -> dict:
    """``r4b eval``: evaluate cfg.data with cfg.model into cfg.output_dir (see the module docstring); returns the
    summary. ``llm``: an engine to use instead of loading cfg.model (cfg.model is still recorded).

    Under torchrun (``torchrun --nproc-per-node 8 -m r4b.cli eval ...``) the prompts still to do are dealt out
    across the processes (prompt i to rank i mod world), each on its own GPU with its own engine, appending to its
    own ``samples.rank<r>.jsonl``; rank 0 then folds those into samples.jsonl and writes the summary, which every
    rank returns. A prompt's samples do not depend on the rank that drew them (its seed is its own), and a run
    interrupted in any world size resumes in any other."""
    from .train.data import _source_rows

    cfg.validate()
    if not Path(cfg.data).is_file():
        raise ValueError(f"EvalConfig.data: no file at {cfg.data!r}")
    resolve_reward(cfg.reward)  # a bad name fails here, before any process group or engine exists
    rank, world, device = _world(cfg)
    try:
        out = Path(cfg.output_dir)
        error = None
        if rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                _prepare(cfg, _sample_key(cfg, _file_digest(cfg.data)), out)
            except Exception as e:  # noqa: BLE001 - every rank hears of it (none waits at a collective for it)
                error = e
        if world > 1:
            import torch.distributed as dist

            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                error = ValueError(f"rank 0: {box[0]}")
        if error is not None:
            raise error
        skipped: list[tuple[str, str]] = []
        failure = None
        try:
            rows, root = _source_rows(cfg.data, cfg.image_root, skipped)
            if cfg.limit:
                rows = rows[: cfg.limit]
            samples_path = out / "samples.jsonl"
            done = _finished_ids(read_samples(samples_path), cfg.mode_list, cfg.n)
            todo = [(i, where, row) for i, (where, row) in enumerate(rows) if i not in done]
            if done and rank == 0:
                log.info("resuming: %d of %d prompts already evaluated", len(rows) - len(todo), len(rows))
            mine = todo[rank::world]
            if mine and llm is None:
                llm = _load_llm(cfg, device)
            _sample(cfg, llm, mine, root, samples_path if world == 1 else out / f"samples.rank{rank}.jsonl",
                    progress=cfg.progress and rank == 0, total=len(rows) if world == 1 else len(mine),
                    already=len(rows) - len(todo) if world == 1 else 0)
        except Exception as e:  # noqa: BLE001 - every rank hears of it below (none waits for a rank that left)
            if world == 1:
                raise
            failure = e
        _agree(world, failure, "sampling")
        summary, failure = None, None
        if rank == 0:
            try:
                if world > 1:  # fold the ranks' samples into samples.jsonl (a fold cut off is redone on resume)
                    extra = [r for p in _shards(out) for r in read_samples(p)]
                    with open(samples_path, "a", encoding="utf-8") as f:
                        f.write("".join(json.dumps(r) + "\n" for r in sorted(extra, key=lambda r: r["id"])))
                        f.flush()
                        os.fsync(f.fileno())
                    for p in _shards(out):
                        p.unlink()
                summary = _write_summary(cfg, out, read_samples(samples_path), len(rows), len(skipped))
            except Exception as e:  # noqa: BLE001 - as above
                if world == 1:
                    raise
                failure = e
        if world > 1:
            import torch.distributed as dist

            box = [(summary, None if failure is None else f"{type(failure).__name__}: {failure}")]
            dist.broadcast_object_list(box, src=0)
            summary, why = box[0]
            if failure is not None:
                raise failure
            if why is not None:
                raise RuntimeError(f"rank 0 failed writing the summary: {why}")
        return summary
    finally:
        if world > 1:
            from .train.parallel import shutdown_distributed

            shutdown_distributed()


def _agree(world: int, failure: Exception | None, what: str) -> None:
    """Every rank learns whether any failed (a collective all of them reach, so a failing rank never leaves the
    others waiting on a barrier it will not reach); then each raises: its own error, or one naming the failed
    ranks. The ranks' samples files stay for a resume."""
    if world == 1:
        return
    import torch.distributed as dist

    why = [None] * world
    dist.all_gather_object(why, None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [(r, w) for r, w in enumerate(why) if w is not None]
    if failed:
        raise RuntimeError(f"{what} failed on rank(s) {', '.join(f'{r} ({w})' for r, w in failed)}; this rank "
                           "stopped too (what the ranks wrote is kept: run it again to resume)")


def _sample(cfg: EvalConfig, llm: LLM | None, todo: list, root: Any, path: Path, *, progress: bool, total: int,
            already: int) -> None:
    """Score ``todo`` (index, where, row) in chunks of batch_size prompts, each chunk appended to ``path`` and
    fsynced."""
    from .train.data import encode_prompt_row

    fn = resolve_reward(cfg.reward)
    toolbox = Toolbox.load(cfg.tools, timeout=cfg.tool_timeout) if cfg.tools else None
    bar = _bar(total, progress)
    if bar is not None:
        bar.update(already)
    params = cfg.sampling_params()
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), cfg.batch_size):
            chunk, new = todo[start : start + cfg.batch_size], []
            ids, prompts, refs = [], [], []
            for i, where, row in chunk:
                try:
                    prompt, ref = encode_prompt_row(row, where=where, tok=llm.tokenizer, image_root=root)
                    if ref is None:
                        raise ValueError(f"{where}: no reference ('answer' or 'reference') to score against")
                    if cfg.reward in REWARDS and not (isinstance(ref, (str, int, float)) and not isinstance(ref, bool)
                                                      and str(ref).strip()):
                        raise ValueError(f"{where}: the {cfg.reward!r} reward needs a non-empty string or number "
                                         f"reference, got {ref!r:.60}")
                except ValueError as e:
                    log.warning("skipped: %s", e)
                    new.append({"id": i, "where": where, "skipped": str(e)})
                    continue
                ids.append(i)
                prompts.append(prompt)
                refs.append(ref)
            if ids:
                new += score_prompts(llm, prompts, refs, ids, fn, modes=cfg.mode_list, params=params,
                                     max_thinking_tokens=cfg.max_thinking_tokens, toolbox=toolbox,
                                     max_turns=cfg.max_tool_turns)
            f.write("".join(json.dumps(r) + "\n" for r in new))  # ASCII: a lone surrogate in the data writes too
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()


def _write_summary(cfg: EvalConfig, out: Path, done_rows: list[dict], num_rows: int, unreadable: int) -> dict:
    keep = set(range(num_rows))
    summary = summarize([r for r in done_rows if r["id"] in keep], cfg.mode_list)
    summary["data"], summary["model"], summary["rows"] = cfg.data, cfg.model, num_rows
    summary["unreadable_lines"] = unreadable  # lines that are not JSON objects (read_jsonl logged them)
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    _atomic_write(out / "summary.md", format_summary(summary, cfg.mode_list) + "\n")
    if cfg.plot:
        plot_summary(summary, out / "eval.png", title=Path(cfg.model).name)
    return summary


def _finished_ids(rows: list[dict], modes: Sequence[str], n: int) -> set[int]:
    """The prompts samples.jsonl holds in full: a skipped row, a refused request, or n samples in every mode."""
    count: dict[int, int] = {}
    final = set()
    for r in rows:
        if "skipped" in r or "error" in r:
            final.add(r["id"])
        elif r.get("mode") in modes:
            count[r["id"]] = count.get(r["id"], 0) + 1
    return final | {i for i, c in count.items() if c == len(modes) * n}


def _load_llm(cfg: EvalConfig, device: str | None = None) -> LLM:
    return LLM.from_pretrained(cfg.model, tokenizer=cfg.tokenizer, device=device or cfg.device, dtype=cfg.dtype,
                               max_num_seqs=cfg.max_num_seqs)


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.1f}"


def format_summary(s: dict, modes: Sequence[str] = MODES) -> str:
    """The summary as a markdown table (what ``r4b eval`` prints)."""
    names = {"short": "non-thinking (short)", "auto": "auto", "long": "thinking (long)"}
    lines = [f"{s['prompts']} prompts ({s['failed_prompts']} failed, {s['skipped_rows']} rows skipped)", "",
             "| mode | accuracy % | ± stderr | think-rate % | tokens | thinking tokens | answer tokens | truncated % |",
             "|---|---|---|---|---|---|---|---|"]
    for m in modes:
        r = s["modes"][m]
        lines.append(f"| {names[m]} | {_fmt(r['accuracy'], True)} | {_fmt(r['accuracy_stderr'], True)} | "
                     f"{_fmt(r['think_rate'], True)} | {_fmt(r['tokens_mean'])} | {_fmt(r['thinking_tokens_mean'])} | "
                     f"{_fmt(r['answer_tokens_mean'])} | {_fmt(r['truncated_rate'], True)} |")
    if "oracle" in s:
        o = s["oracle"]
        lines.append(f"| oracle (better forced mode per prompt) | {_fmt(o['accuracy'], True)} | | | "
                     f"{_fmt(o['tokens_mean'])} | | | |")
        g = s["thinking_gain"]
        lines += ["", f"thinking helps on {g['helps']} prompts, hurts on {g['hurts']}, changes nothing on "
                      f"{g['no_change']}"]
    if "auto_decision" in s:
        d = s["auto_decision"]
        lines.append(f"auto mode thinks on {_fmt(d['think_rate_when_thinking_helps'], True)}% of the prompts where "
                     f"thinking helps and {_fmt(d['think_rate_when_thinking_hurts'], True)}% where it hurts; "
                     f"decision accuracy {_fmt(d['decision_accuracy'], True)}%")
    if any("turns_mean" in s["modes"][m] for m in modes):
        lines += ["", "| mode | turns | tool calls | failed tool calls | turns ran out % | turns refused |",
                  "|---|---|---|---|---|---|"]
        for m in modes:
            r = s["modes"][m]
            if "turns_mean" in r:
                lines.append(f"| {names[m]} | {_fmt(r['turns_mean'])} | {_fmt(r['tool_calls_mean'])} | "
                             f"{r['tool_errors']} | {_fmt(r['max_turns_rate'], True)} | {r['engine_errors']} |")
    errors = sum(s["modes"][m]["reward_errors"] for m in modes)
    if errors:
        lines.append(f"{errors} completions scored 0 because the reward function failed on them")
    return "\n".join(lines)


def plot_summary(s: dict, out: str | Path, *, title: str = "") -> Path | None:
    """Accuracy against mean output tokens, one point per mode (and the oracle), with the standard error; a PNG.
    Returns the file, or None when matplotlib is missing or nothing was evaluated."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [(m, r["tokens_mean"], r["accuracy"], r["accuracy_stderr"]) for m, r in s["modes"].items()
           if r["accuracy"] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for m, x, y, e in pts:
        ax.errorbar([x], [100 * y], yerr=None if e is None else [100 * e], fmt="o", capsize=3, label=m)
    if s.get("oracle", {}).get("accuracy") is not None:
        ax.plot([s["oracle"]["tokens_mean"]], [100 * s["oracle"]["accuracy"]], "k*", markersize=10,
                label="oracle (per prompt)")
    ax.set_xlabel("mean output tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}: {s['prompts']} prompts" if title else f"{s['prompts']} prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
