"""Training data: JSONL rows -> chat-template tokens with assistant labels -> packed batches (docs/DESIGN.md,
"Packed batch"), and the seeded, resumable, rank-sharded loaders of the SFT and BPO trainers.

SFT rows are ``{"messages": [...]}`` (OpenAI-style chat; an assistant turn's thought comes from a ``<think>`` block in
its content or from ``reasoning_content``) or ``{"prompt": str, "response": str}`` (optional ``"system"``). BPO rows
are ``{"prompt": str}`` or ``{"messages": [...]}`` without the final assistant turn, with a reference under
``"answer"`` (or ``"reference"``). Image parts ``{"type": "image", "image": "path"}`` are read from local files,
relative to ``image_root`` (default: the JSONL file's folder). A bad row is logged, recorded in the dataset's
``skipped`` and left out; it never stops a run.

Packing: ``plan_batches`` shuffles with a generator seeded from (seed, epoch) and fills rows of at most
``max_tokens`` tokens first-fit over a small window of open rows. ``PackedLoader`` deals an epoch's rows round-robin
over the ranks and drops the tail that cannot give every rank a full step; its ``state_dict`` (the same on every
rank) resumes the exact batch sequence.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from r4b.kernels import pack_sequences

from ..chat import ChatTokenizer, parse_response
from ..rollout import model_inputs

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
OPEN_ROWS = 8  # plan_batches' window: rows kept open for first-fit (wider fills rows better, keeps order less random)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_rank(rank: Any, world_size: Any) -> None:
    _check_int("world_size", world_size, 1)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def _generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for (seed, epoch). torch's CPU generator keeps only a seed's low 32 bits, so the pair is
    hashed into them (seed * 2**32 + epoch would give every seed the same stream)."""
    digest = hashlib.sha256(f"r4b.data:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=_generator(seed, epoch)).tolist()


# ---------------------------------------------------------------------------------------------------------- rows


def read_jsonl(path: str | Path, *, skipped: list[tuple[str, str]] | None = None) -> list[tuple[str, dict]]:
    """The JSON objects of a JSONL file as ("file:line", row), blank lines left out.

    A line that is not a JSON object (invalid JSON or UTF-8, or another JSON value) is logged with its file:line
    and the reason, appended to ``skipped`` as (where, reason) when given, and left out.
    """
    path = Path(path)
    rows: list[tuple[str, dict]] = []
    bad = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                reason = f"not valid JSON ({e})"
            else:
                if isinstance(row, dict):
                    rows.append((where, row))
                    continue
                reason = f"not a JSON object (a JSON {type(row).__name__})"
            bad += 1
            log.warning("%s: skipped: %s", where, reason)
            if skipped is not None:
                skipped.append((where, reason))
    if bad:
        log.warning("%s: %d bad line(s) skipped, %d row(s) read", path, bad, len(rows))
    return rows


def _source_rows(source: str | Path | list[dict], image_root: str | Path | None,
                 skipped: list[tuple[str, str]]) -> tuple[list[tuple[str, Any]], Path | None]:
    """(where, row) pairs and the image root of a JSONL path or an in-memory list of rows."""
    if isinstance(source, (str, Path)):
        rows = read_jsonl(source, skipped=skipped)
        return rows, Path(image_root) if image_root is not None else Path(source).parent
    if isinstance(source, list):
        return [(f"rows[{i}]", r) for i, r in enumerate(source)], Path(image_root) if image_root is not None else None
    raise TypeError(f"source must be a JSONL path or a list of row dicts, got {type(source).__name__}")


def _open_image(ref: str | Path, root: Path | None, where: str) -> Any:
    """A local image file as an RGB PIL image (URLs are refused: r4b reads no network)."""
    from PIL import Image, UnidentifiedImageError

    s = str(ref)
    if "://" in s or s.startswith("data:"):
        raise ValueError(f"{where}: only local image files are read, got {s[:80]!r}")
    p = Path(s)
    if not p.is_absolute() and root is not None:
        p = root / p
    if not p.is_file():
        raise ValueError(f"{where}: image file not found: {p}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:  # (the last is no OSError)
        raise ValueError(f"{where}: cannot read image {p}: {e}") from e


def _load_images(messages: list, where: str, root: Path | None, sources: list | None = None) -> list:
    """A copy of ``messages`` whose image parts holding a path hold the opened image instead; ``sources`` (when
    given) gets each image's source in order: its resolved file path, or the image object given."""
    from PIL import Image

    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None:
                img, at = part["image"], f"{where}: messages[{i}].content[{j}]"
                if isinstance(img, (str, Path)):
                    part = {**part, "image": _open_image(img, root, at)}
                    if sources is not None:  # absolute: a later open does not depend on the working directory
                        p = Path(str(img))
                        sources.append((p if p.is_absolute() or root is None else root / p).absolute())
                elif not isinstance(img, (Image.Image, Tensor)):
                    raise ValueError(f"{at}: an image must be a file path, got {type(img).__name__}")
                elif sources is not None:
                    sources.append(img)
            parts.append(part)
        out.append({**m, "content": parts})
    return out


# ----------------------------------------------------------------------------------------------------------- SFT


@dataclass
class Example:
    """One encoded SFT conversation."""

    input_ids: Tensor  # (L,) int64: the whole conversation
    labels: Tensor  # (L,) bool: tokens of the trained assistant turns (content through <|im_end|>)
    pixel_values: list[Tensor] = field(default_factory=list)  # per image (1 + tiles, 3, S, S)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # per image (height, width)
    thinking: bool = False  # the last trained assistant turn has a non-empty thought
    where: str = ""  # "file:line" or "rows[i]"
    # with lazy images: each image's source (file path, or the image object), preprocessed when a batch needs it
    images: list = field(default_factory=list, repr=False)


def encode_sft_row(tok: ChatTokenizer, row: Any, *, where: str, max_seq_len: int, train_on: str = "all",
                   image_root: str | Path | None = None, lazy_images: bool = False) -> Example:
    """Encode one SFT row (``{"messages": [...]}`` or ``{"prompt", "response"[, "system"]}``, either with an optional
    ``"tools"``: the function schemas the conversation offered, rendered by the chat template; its assistant turns'
    ``tool_calls`` are trained, its ``tool`` messages (the results) are not).

    Raises ValueError naming ``where`` and the reason for a row that cannot be trained: a bad shape, no final
    assistant turn, a missing or unreadable image file, more than ``max_seq_len`` tokens (never truncated).
    lazy_images: every image is still read (checked), but the Example keeps its source and size, not its pixels
    (``SFTDataset`` preprocesses them when a batch needs them).
    """
    _check_int("max_seq_len", max_seq_len, 1)
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of chat messages, got {messages!r:.80}")
    elif "prompt" in row and "response" in row:
        prompt, response, system = row["prompt"], row["response"], row.get("system")
        if not isinstance(prompt, str) or not isinstance(response, str) or not isinstance(system, (str, type(None))):
            raise ValueError(f"{where}: 'prompt', 'response' (and 'system') must be strings")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
    else:
        raise ValueError(f"{where}: a row needs 'messages', or 'prompt' and 'response'; got keys {sorted(row)}")
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"{where}: 'tools' must be a list of tool schemas, got {tools!r:.80}")
    sources: list = []
    messages = _load_images(messages, where, Path(image_root) if image_root is not None else None, sources)
    try:
        enc, labels = tok.encode_chat_for_training(messages, train_on=train_on, pixels=not lazy_images, tools=tools)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: {e}") from e
    n = enc.input_ids.numel()
    if n > max_seq_len:
        raise ValueError(f"{where}: {n} tokens, longer than max_seq_len={max_seq_len} (rows are not truncated)")
    lab = labels.tolist()
    end = len(lab) - lab[::-1].index(True)  # the last trained turn is the last run of labels
    start = end - 1
    while start > 0 and lab[start - 1]:
        start -= 1
    thinking = parse_response(tok.decode(enc.input_ids[start:end]), thinking_mode=None).mode == "think"
    return Example(enc.input_ids, labels, enc.pixel_values, enc.image_sizes, thinking, where,
                   sources if lazy_images else [])


def _encode_rows(rows: Any, skipped: list[tuple[str, str]], what: str, encode: Any) -> list:
    """``encode(row, where)`` of every (where, row); a row that raises ValueError is reported and skipped. Raises
    when nothing is left."""
    out = []
    for where, row in rows:
        try:
            out.append(encode(row, where))
        except ValueError as e:
            _skip(skipped, where, e)
    if not out:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"source has no usable {what} row: {len(skipped)} skipped{first}")
    if skipped:
        log.warning("%s data: %d row(s) skipped, %d kept", what, len(skipped), len(out))
    return out


def _skip(skipped: list[tuple[str, str]], where: str, err: Exception) -> None:
    msg = str(err)
    reason = msg[len(where) + 2:] if msg.startswith(where + ": ") else msg
    skipped.append((where, reason))
    log.warning("%s: skipped: %s", where, reason)


class SFTDataset:
    """Every row of a JSONL file (or a list of row dicts) encoded up front; bad rows skipped and recorded.

    ``skipped``: (where, reason) per left-out line or row; ``lengths``: tokens per example. Every image is read
    once up front (a missing or unreadable one skips its row), but only its path (or the image object a row
    gave) and size are kept: ``dataset[i]`` preprocesses its pixels (float tiles, 16 MB for a 6-tile image at
    448 px) when a batch needs them, so memory does not grow with the images (``preload_images=True``: keep every
    image's pixels from the start, as for a small set read many times). An image that cannot be read again, or
    changed its size, at that point: its example trains nothing (labels off, a blank image of its size in its
    place, so the batch keeps its shape), logged and recorded in ``load_failures``; the run goes on.
    """

    def __init__(self, source: str | Path | list[dict], tok: ChatTokenizer, *, max_seq_len: int, train_on: str = "all",
                 image_root: str | Path | None = None, progress: bool = True, preload_images: bool = False) -> None:
        _check_int("max_seq_len", max_seq_len, 1)
        if train_on not in ("all", "last"):
            raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
        self.tok = tok
        self.skipped: list[tuple[str, str]] = []
        self.load_failures: list[tuple[str, str]] = []  # (where, reason) of an example whose image failed later
        rows, root = _source_rows(source, image_root, self.skipped)
        rows = tqdm(rows, desc="encoding SFT rows", unit="row", disable=not progress)
        self.examples: list[Example] = _encode_rows(rows, self.skipped, "SFT", lambda row, where: encode_sft_row(
            tok, row, where=where, max_seq_len=max_seq_len, train_on=train_on, image_root=root,
            lazy_images=not preload_images))
        self.lengths: list[int] = [e.input_ids.numel() for e in self.examples]
        self.has_images = any(e.image_sizes for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        e = self.examples[i]
        return self._with_pixels(e) if e.images else e

    def _with_pixels(self, e: Example) -> Example:
        """The example with its images read and preprocessed (a blank one of each size, and no trained token, when
        one cannot be read or changed its size)."""
        proc = self.tok.image_processor
        pix = []
        try:
            for k, (src, size) in enumerate(zip(e.images, e.image_sizes, strict=True)):
                img = _open_image(src, None, f"{e.where}: image {k}") if isinstance(src, Path) else src
                p, got = proc(img)
                if tuple(got) != tuple(size):
                    raise ValueError(f"{e.where}: image {k} ({src}) is {got[0]}x{got[1]} now, {size[0]}x{size[1]} "
                                     "when the dataset was read (its token count would not match)")
                pix.append(p)
        except ValueError as err:
            log.warning("%s: trains nothing this time: %s", e.where, err)
            self.load_failures.append((e.where, str(err)))
            blank = [proc(torch.zeros(3, h, w, dtype=torch.uint8))[0] for h, w in e.image_sizes]
            return replace(e, pixel_values=blank, labels=torch.zeros_like(e.labels), images=[])
        return replace(e, pixel_values=pix, images=[])

    def stats(self) -> dict[str, int]:
        """Counts: rows (kept), skipped, think / no_think (by the last trained turn), tokens, trained_tokens."""
        think = sum(e.thinking for e in self.examples)
        return {"rows": len(self.examples), "skipped": len(self.skipped), "think": think,
                "no_think": len(self.examples) - think, "tokens": sum(self.lengths),
                "trained_tokens": sum(int(e.labels.sum()) for e in self.examples)}


# ------------------------------------------------------------------------------------------------------- packing


@dataclass
class PackedBatch:
    """A packed SFT batch (docs/DESIGN.md, "Packed batch"); position p's target is token p + 1 of its sequence."""

    input_ids: Tensor  # (T,) int64
    position_ids: Tensor  # (T,) int64, restarting at 0 per sequence
    cu_seqlens: Tensor  # (n + 1,) int32
    max_seqlen: int
    targets: Tensor  # (T,) int64: the next token where loss_mask, else -100
    loss_mask: Tensor  # (T,) bool: positions whose target is a trained token
    seq_ids: Tensor  # (T,) int32
    pixel_values: list[Tensor]  # the images of all sequences, in order
    image_sizes: list[tuple[int, int]]
    thinking: Tensor  # (n,) bool: per sequence, its last trained turn has a thought
    num_loss_tokens: int  # loss_mask.sum(), on the host

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward (images only when there are any)."""
        return model_inputs(self)

    def to(self, device: str | torch.device) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        return replace(self, input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device),
                       cu_seqlens=self.cu_seqlens.to(device), targets=self.targets.to(device),
                       loss_mask=self.loss_mask.to(device), seq_ids=self.seq_ids.to(device),
                       pixel_values=[p.to(device) for p in self.pixel_values], image_sizes=list(self.image_sizes),
                       thinking=self.thinking.to(device))


def collate(examples: Sequence[Example]) -> PackedBatch:
    """Pack examples into one batch (CPU tensors).

    targets[p] = input_ids[p + 1] and loss_mask[p] = labels[p + 1] inside a sequence (position p predicts token
    p + 1); a sequence's last position has loss_mask False; targets are -100 wherever loss_mask is False, so a
    cross-entropy with ignore_index=-100 and the mask agree.
    """
    if isinstance(examples, Example) or not isinstance(examples, Sequence) or len(examples) == 0:
        raise ValueError(f"examples must be a non-empty list of Example, got {examples!r:.80}")
    for i, e in enumerate(examples):
        ids, lab = e.input_ids, e.labels
        if ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() == 0:
            raise ValueError(f"examples[{i}].input_ids must be a non-empty 1-D int64 tensor, got dtype={ids.dtype} "
                             f"shape={tuple(ids.shape)}")
        if lab.dtype != torch.bool or lab.shape != ids.shape:
            raise ValueError(f"examples[{i}].labels must be bool with input_ids' shape {tuple(ids.shape)}, got "
                             f"dtype={lab.dtype} shape={tuple(lab.shape)}")
    packed = pack_sequences([e.input_ids for e in examples])
    labels = torch.cat([e.labels for e in examples])  # (T,)
    T = labels.numel()
    loss_mask = torch.zeros(T, dtype=torch.bool)
    loss_mask[:-1] = labels[1:]
    loss_mask[packed.cu_seqlens[1:].long() - 1] = False  # no next token at a sequence's end
    targets = torch.full((T,), IGNORE_INDEX, dtype=torch.int64)
    targets[:-1] = packed.flat[1:]
    targets.masked_fill_(~loss_mask, IGNORE_INDEX)
    return PackedBatch(
        input_ids=packed.flat, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens,
        max_seqlen=packed.max_seqlen, targets=targets, loss_mask=loss_mask, seq_ids=packed.seq_ids,
        pixel_values=[p for e in examples for p in e.pixel_values],
        image_sizes=[s for e in examples for s in e.image_sizes],
        thinking=torch.tensor([e.thinking for e in examples], dtype=torch.bool),
        num_loss_tokens=int(loss_mask.sum()))


def plan_batches(lengths: Sequence[int], max_tokens: int, *, seed: int, epoch: int,
                 shuffle: bool = True) -> list[list[int]]:
    """An epoch's rows: lists of example indices whose lengths sum to at most ``max_tokens``.

    The examples are visited in a permutation drawn from (seed, epoch) (in index order without ``shuffle``); each
    goes into the first of up to OPEN_ROWS open rows it fits, else a new row (closing the fullest when the window
    is full); a row that is exactly full closes at once. Rows come out in closing order. Every index appears once.
    """
    _check_int("max_tokens", max_tokens, 1)
    _check_int("epoch", epoch, 0)
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for i, n in enumerate(lengths):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"lengths[{i}] must be an int >= 1, got {n!r}")
        if n > max_tokens:
            raise ValueError(f"lengths[{i}]={n} is longer than max_tokens={max_tokens}: it fits no row")
    rows: list[list[int]] = []
    open_rows: list[tuple[list[int], int]] = []  # (indices, tokens), in opening order
    for i in _permutation(len(lengths), seed, epoch, shuffle):
        n = lengths[i]
        k = next((k for k, (_, used) in enumerate(open_rows) if used + n <= max_tokens), None)
        if k is None:
            if len(open_rows) == OPEN_ROWS:
                fullest = max(range(len(open_rows)), key=lambda j: open_rows[j][1])
                rows.append(open_rows.pop(fullest)[0])
            open_rows.append(([], 0))
            k = len(open_rows) - 1
        idx, used = open_rows[k]
        idx.append(i)
        if used + n == max_tokens:
            rows.append(open_rows.pop(k)[0])
        else:
            open_rows[k] = (idx, used + n)
    rows += [idx for idx, _ in open_rows]
    return rows


class PackedLoader:
    """Packed SFT batches of one rank, epoch after epoch, resumable exactly.

    Each epoch's rows (``plan_batches``) are dealt round-robin: global row j goes to rank j % world_size. A step
    of ``micro_batches`` takes each rank's next micro_batches rows; the epoch's tail that cannot give every rank
    a full step is dropped, so all ranks run the same steps. Call ``next_step`` with the same micro_batches
    throughout a run (the position counts rows of this rank).
    """

    def __init__(self, dataset: SFTDataset, *, max_tokens: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        _check_int("max_tokens", max_tokens, 1)
        _check_rank(rank, world_size)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        longest = max(dataset.lengths)
        if longest > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} is shorter than the longest example ({longest} tokens)")
        self.dataset, self.max_tokens, self.seed, self.shuffle = dataset, max_tokens, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self._epoch, self._pos = 0, 0  # _pos: rows of this rank taken in the epoch
        self._plans: dict[tuple[int, int], list[list[int]]] = {}  # (seed, epoch) -> rows: this epoch's and the next
        # a dataset with images: the next step's batches are read and preprocessed in a thread while this one trains
        self.prefetch = bool(getattr(dataset, "has_images", False))
        self._ahead: tuple[tuple, Any] | None = None  # (what it is: seed, epoch, position, micro_batches; a Future)
        self._pool: Any = None

    @property
    def epoch(self) -> int:
        """The epoch the next step is taken from (it moves on lazily, when a step no longer fits)."""
        return self._epoch

    def _rows(self, epoch: int | None = None) -> list[list[int]]:
        key = (self.seed, self._epoch if epoch is None else epoch)
        if key not in self._plans:
            for old in [k for k in self._plans if k[0] != key[0] or k[1] < key[1] - 1]:
                del self._plans[old]
            self._plans[key] = plan_batches(self.dataset.lengths, self.max_tokens, seed=key[0], epoch=key[1],
                                            shuffle=self.shuffle)
        return self._plans[key]

    def steps_per_epoch(self, micro_batches: int) -> int:
        """Full steps in the current epoch (the row count varies a little from epoch to epoch)."""
        _check_int("micro_batches", micro_batches, 1)
        return len(self._rows()) // (self.world_size * micro_batches)

    def _locate(self, epoch: int, pos: int, micro_batches: int) -> tuple[int, int, list[list[int]]]:
        """Where the step at (epoch, pos) really starts (the next epoch when it no longer fits) and its rows."""
        _check_int("micro_batches", micro_batches, 1)
        per_step = self.world_size * micro_batches
        steps = len(self._rows(epoch)) // per_step
        if pos + micro_batches > steps * micro_batches:
            epoch, pos = epoch + 1, 0
            steps = len(self._rows(epoch)) // per_step
        if steps == 0:
            raise ValueError(f"epoch {epoch} packs into {len(self._rows(epoch))} rows of max_tokens={self.max_tokens}"
                             f", fewer than world_size * micro_batches = {per_step}")
        rows = self._rows(epoch)
        return epoch, pos, [rows[(pos + k) * self.world_size + self.rank] for k in range(micro_batches)]

    def _batches(self, mine: list[list[int]]) -> list[PackedBatch]:
        return [collate([self.dataset[i] for i in row]) for row in mine]

    def next_step(self, micro_batches: int) -> list[PackedBatch]:
        """The next ``micro_batches`` packed batches of this rank (moving to the next epoch when needed). With
        images, the step after it is prepared in a background thread meanwhile (the same batches as without)."""
        self._epoch, self._pos, mine = self._locate(self._epoch, self._pos, micro_batches)
        key = (self.seed, self._epoch, self._pos, micro_batches)
        ahead, self._ahead = self._ahead, None
        batches = ahead[1].result() if ahead is not None and ahead[0] == key else self._batches(mine)
        self._pos += micro_batches
        if self.prefetch:
            try:
                epoch, pos, nxt = self._locate(self._epoch, self._pos, micro_batches)
            except ValueError:  # the next epoch packs into too few rows: next_step will say so
                return batches
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r4b-sft-prefetch")
            self._ahead = ((self.seed, epoch, pos, micro_batches), self._pool.submit(self._batches, nxt))
        return batches

    def state_dict(self) -> dict:
        """JSON-serialisable position (the same on every rank): seed, epoch, position, and the settings it needs."""
        return {"seed": self.seed, "epoch": self._epoch, "position": self._pos, "world_size": self.world_size,
                "max_tokens": self.max_tokens, "shuffle": self.shuffle, "num_examples": len(self.dataset)}

    def close(self) -> None:
        """Stop the prefetch thread (a step prepared ahead and not taken is dropped; its images are not read if it
        has not started)."""
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; its max_tokens, shuffle and dataset size must match this loader's. With the same
        world_size the batches continue exactly; with another (a run resumed on more or fewer ranks) the epoch
        continues after the rows already taken (rounded up to whole rows per rank), with a warning."""
        _check_state(state, {"max_tokens": self.max_tokens, "shuffle": self.shuffle,
                             "num_examples": len(self.dataset)})
        self.seed, self._epoch, self._pos = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._pos = _rescale_position(self._pos, state, self.world_size, 1, "rows")


def _check_state(state: dict, expected: dict) -> None:
    missing = [k for k in ("seed", "epoch", "position", *expected) if k not in state]
    if missing:
        raise ValueError(f"state is missing {missing}")
    for k, v in expected.items():
        if state[k] != v:
            raise ValueError(f"state[{k!r}]={state[k]!r} does not match this loader's {k}={v!r}")
    _check_int("state['epoch']", state["epoch"], 0)
    _check_int("state['position']", state["position"], 0)


# ----------------------------------------------------------------------------------------------------------- BPO


def encode_prompt_row(row: Any, *, where: str, tok: ChatTokenizer | None = None,
                      image_root: str | Path | None = None, lazy_images: bool = False) -> tuple[str | list[dict], Any]:
    """One BPO row -> (prompt, reference): a str, or a chat (no final assistant turn) with its images opened.

    The reference is ``row["answer"]`` (when not null), else ``row["reference"]``, else None. With ``tok`` the chat
    is rendered once to check it. Raises ValueError naming ``where`` and the reason. lazy_images: the images are
    opened (checked) but the chat keeps their resolved paths (:func:`open_prompt_images` opens them).
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    reference = row["answer"] if row.get("answer") is not None else row.get("reference")
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.80}")
        return prompt, reference
    if "messages" not in row:
        raise ValueError(f"{where}: a row needs 'prompt' or 'messages'; got keys {sorted(row)}")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of chat messages, got {messages!r:.80}")
    if messages[-1].get("role") == "assistant":
        raise ValueError(f"{where}: 'messages' ends with an assistant turn; a prompt stops before the answer")
    root = Path(image_root) if image_root is not None else None
    sources: list = []
    opened = _load_images(messages, where, root, sources)
    if tok is not None:
        try:
            tok.apply_chat_template(opened)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}: {e}") from e
    return (_with_images(messages, sources) if lazy_images else opened), reference


def _with_images(messages: list, images: list) -> list:
    """A copy of ``messages`` whose image parts (in order) hold ``images`` instead."""
    it = iter(images)
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            m = {**m, "content": [{**part, "image": next(it)} if isinstance(part, dict) and part.get("type") == "image"
                                  and part.get("image") is not None else part for part in content]}
        out.append(m)
    return out


class UnreadableImage:
    """In a prompt's chat, an image file that could not be read when its step came: rendering the chat raises
    ValueError with the reason (the engine then reports that prompt and skips it)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason

    @property
    def size(self) -> tuple[int, int]:
        raise ValueError(f"image {self.path} cannot be read: {self.reason}")

    def __repr__(self) -> str:
        return f"UnreadableImage({str(self.path)!r})"


def open_prompt_images(prompt: str | list[dict], where: str = "",
                       failures: list[tuple[str, str]] | None = None) -> str | list[dict]:
    """A lazy prompt (paths in its image parts) with its images opened; one that fails becomes an
    :class:`UnreadableImage` (logged, and added to ``failures``)."""
    if isinstance(prompt, str):
        return prompt
    images = []
    for m in prompt:
        content = m.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None:
                img = part["image"]
                if isinstance(img, Path):
                    try:
                        img = _open_image(img, None, where)
                    except ValueError as e:
                        log.warning("%s: skipped this step: %s", where, e)
                        if failures is not None:
                            failures.append((where, str(e)))
                        img = UnreadableImage(part["image"], str(e))
                images.append(img)
    return _with_images(prompt, images)


class PromptDataset:
    """BPO prompts with references; items are (prompt, reference). Bad rows skipped and recorded in ``skipped``.

    Every image is opened once to check its row, then only its path is kept; ``dataset[i]`` opens it again (an
    image that fails then is an :class:`UnreadableImage`, and the engine skips that prompt; ``load_failures``).
    ``preload_images=True``: keep every opened image instead."""

    def __init__(self, source: str | Path | list[dict], *, tok: ChatTokenizer | None = None,
                 image_root: str | Path | None = None, preload_images: bool = False) -> None:
        self.skipped: list[tuple[str, str]] = []
        self.load_failures: list[tuple[str, str]] = []
        rows, root = _source_rows(source, image_root, self.skipped)
        wheres: list[str] = []

        def encode(row: Any, where: str) -> tuple[str | list[dict], Any]:
            item = encode_prompt_row(row, where=where, tok=tok, image_root=root, lazy_images=not preload_images)
            wheres.append(where)
            return item

        self.items: list[tuple[str | list[dict], Any]] = _encode_rows(rows, self.skipped, "prompt", encode)
        self.wheres = wheres

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str | list[dict], Any]:
        prompt, reference = self.items[i]
        return open_prompt_images(prompt, self.wheres[i], self.load_failures), reference


class PromptLoader:
    """``prompts_per_step`` prompts per rank per step, reshuffled each epoch from (seed, epoch), resumable exactly.

    A step takes the epoch permutation's next prompts_per_step * world_size prompts and deals them round-robin
    (the step's prompt j goes to rank j % world_size); the tail too short for a full step is dropped.
    """

    def __init__(self, dataset: PromptDataset, *, prompts_per_step: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        _check_int("prompts_per_step", prompts_per_step, 1)
        _check_rank(rank, world_size)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if len(dataset) < prompts_per_step * world_size:
            raise ValueError(f"the dataset's {len(dataset)} prompts do not fill one step of prompts_per_step * "
                             f"world_size = {prompts_per_step * world_size}")
        self.dataset, self.prompts_per_step, self.seed, self.shuffle = dataset, prompts_per_step, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self._epoch, self._pos = 0, 0  # _pos: steps taken in the epoch
        self._perm: tuple[int, int, list[int]] | None = None  # (seed, epoch, permutation)

    @property
    def epoch(self) -> int:
        """The epoch the next step is taken from."""
        return self._epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // (self.prompts_per_step * self.world_size)

    def next_prompts(self) -> tuple[list, list]:
        """(prompts, references) of this rank for the next step, prompts_per_step of each."""
        if self._pos >= self.steps_per_epoch:
            self._epoch, self._pos = self._epoch + 1, 0
        if self._perm is None or self._perm[:2] != (self.seed, self._epoch):
            self._perm = (self.seed, self._epoch, _permutation(len(self.dataset), self.seed, self._epoch, self.shuffle))
        per = self.prompts_per_step * self.world_size
        idx = self._perm[2][self._pos * per : (self._pos + 1) * per][self.rank :: self.world_size]
        self._pos += 1
        items = [self.dataset[i] for i in idx]
        return [p for p, _ in items], [r for _, r in items]

    def state_dict(self) -> dict:
        """JSON-serialisable position (the same on every rank): seed, epoch, position (steps), and settings."""
        return {"seed": self.seed, "epoch": self._epoch, "position": self._pos, "world_size": self.world_size,
                "prompts_per_step": self.prompts_per_step, "shuffle": self.shuffle, "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; its shuffle and dataset size must match. With the same world_size and
        prompts_per_step the prompts continue exactly; with others (a run resumed on more or fewer ranks) the epoch
        continues after the prompts already taken (rounded up to a whole step), with a warning."""
        _check_state(state, {"shuffle": self.shuffle, "num_prompts": len(self.dataset)})
        _check_int("state['prompts_per_step']", state.get("prompts_per_step"), 1)
        self.seed, self._epoch, self._pos = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._pos = _rescale_position(self._pos * state["prompts_per_step"], state, self.world_size,
                                      self.prompts_per_step, "prompts")


def _rescale_position(taken: int, state: dict, world_size: int, per_step: int, what: str) -> int:
    """The position (in units of ``per_step`` items per rank) of a loader of ``world_size`` ranks that continues
    after the ``taken`` items per rank of ``state``'s world: ceil(taken * old_world / (new_world * per_step))."""
    old_world = state.get("world_size")
    _check_int("state['world_size']", old_world, 1)
    total = taken * old_world  # items of the epoch already taken by all ranks
    unit = world_size * per_step
    pos = -(-total // unit)
    if pos * unit != total or old_world != world_size:
        log.warning("loader resumed on %d ranks from a state of %d ranks: epoch %d continues after %d of its %s, "
                    "from %s %d (the exact order needs the same world size)", world_size, old_world,
                    int(state["epoch"]), total, what, what, pos * unit)
    return pos
