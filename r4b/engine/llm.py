"""The inference engine: ``LLM(model, tokenizer).generate(requests, SamplingParams(...), thinking_mode=...)``.

Rollouts for BPO and serving share it. What it does (docs/DESIGN.md, "Inference engine"):
- **Paged KV cache.** Per layer ``(num_blocks, block_size, Hkv, D)`` keys and values; a BlockManager hands out
  blocks. Every model step writes its rows' keys/values with ``store_kv``.
- **Shared prompts, one KV for all thinking modes.** A chat request is rendered once up to
  ``<|im_start|>assistant\\n``; that prompt (its images included) is prefilled once, then forked into its
  n x len(modes) completions, which share its blocks by reference count (copy-on-write of the last partial
  block). Each completion then feeds its mode suffix (``<think>`` / ``<think>\\n`` /
  ``<think>\\n\\n</think>\\n\\n``, see r4b.engine.chat) through the cache and samples on.
- **Continuous batching.** Each step is either a prefill (new sequences, packed, ``varlen_attention``) or an
  extend/decode step of the running sequences (every row attends through the cache, ``paged_decode_attention``;
  a long prompt's later chunks go this way too: chunked prefill). Up to ``max_num_seqs`` sequences and
  ``max_num_batched_tokens`` rows a step; when the cache runs out of blocks the latest sequence is preempted
  (its blocks freed) and recomputed later from its tokens, so its output does not change.
- **Thinking modes.** ``thinking_mode`` "auto" (the model decides), "long" (forced thinking), "short" (forced
  non-thinking), or several at once (BPO's ("long", "short")). ``max_thinking_tokens``: a thought that reaches
  the budget gets ``\\n</think>\\n\\n`` forced, and the answer follows.
- **Prefix caching** (``prefix_caching=True``, the default). Every full block a step computes is registered
  under a digest of all the tokens up to its end (and of the images whose tokens start by its end, for a block
  that shows one); a new or preempted sequence whose leading blocks are registered takes them instead of computing them
  (a shared system prompt, the earlier turns of a chat, the same question asked again). Finished sequences'
  blocks keep their content until the cache needs them. The cache is dropped when the model's parameters change
  (replaced, or updated in place through them: checked at every step); ``reset_prefix_cache()`` drops it by
  hand (weights loaded some other way, e.g. FSDP's gather into the same storage). A sequence that was running
  when the cache was dropped never registers its blocks (they hold the old weights' keys and values).
- A request that cannot run (empty, unknown token ids, longer than the model or the cache) is reported in its
  output's ``error`` and skipped; the others go on.
Logits are computed only for the rows that sample (the model returns hidden states).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, count
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import structured
from .block_manager import BlockManager, cdiv
from .chat import MODE_SUFFIX, ChatTokenizer, ToolCall, check_mode, check_tools, parse_response, parse_tool_calls
from .graphs import DecodeGraphs
from .model.image import num_image_tokens
from .model.qwen3 import PagedKV
from .sampling import PenaltyCounts, SamplingParams, make_generator, sample

log = logging.getLogger(__name__)

FORCED_END_OF_THOUGHT = "\n</think>\n\n"
CPU_KV_CACHE_BYTES = 512 * 2**20  # the default cache on a CPU (num_kv_blocks= to choose)


@dataclass
class CompletionOutput:
    index: int  # within its request: mode-major, then sample (modes ("long", "short"), n=2: L0 L1 S0 S1)
    text: str  # the generated text (the mode suffix is the prompt's; cut before a stop string)
    thinking: str  # the thought ("" for a direct answer)
    answer: str  # the text after </think>
    token_ids: list[int]  # generated tokens (a forced end of thought included)
    logprobs: list[float]  # log-prob of each generated token (SamplingParams' docstring says which)
    thinking_mode: str | None  # the prompt's mode suffix ("auto" / "long" / "short"; None: the prompt as given)
    mode: str  # what the output did: "think" (a non-empty or unfinished thought) or "no_think"
    num_thinking_tokens: int  # generated tokens before </think> (all of them when the thought never closed)
    finish_reason: str  # "stop" (end of turn, a stop token or string), "length" (max_tokens / model length)
    top_logprobs: list[dict[int, float]] | None = None  # with SamplingParams.logprobs=k
    # with tools: the calls in the answer (parse_tool_calls; the answer keeps their <tool_call> blocks); None
    # when the request offered no tools
    tool_calls: list[ToolCall] | None = None


@dataclass
class RequestOutput:
    request_index: int
    prompt_token_ids: list[int]  # the shared prompt (without the mode suffixes)
    outputs: list[CompletionOutput] = field(default_factory=list)
    error: str | None = None  # why the request did not run (then outputs is empty)
    # prompt tokens taken from the prefix cache instead of computed (not part of the result: not compared)
    num_cached_tokens: int = field(default=0, compare=False)
    # the prompt's preprocessed images, as the engine fed them (a trainer's forward of the completions takes them)
    pixel_values: list[Tensor] = field(default_factory=list, repr=False, compare=False)
    image_sizes: list[tuple[int, int]] = field(default_factory=list, repr=False, compare=False)
    # with SamplingParams.prompt_logprobs: per prompt token, its log-prob given the ones before (None for the first),
    # and (prompt_logprobs=k) its top-k alternatives; at the sampling temperature (1 when greedy), like logprobs
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class StreamEvent:
    request_index: int
    index: int  # completion index within the request
    token_id: int | None  # None: the completion ended without a new token (the KV cache could not hold it)
    text: str  # the text this event adds ("" while a multi-byte character or a possible stop string is held back)
    finished: bool
    finish_reason: str | None
    logprob: float | None = None  # the token's log-prob (None without a token)
    top_logprobs: dict[int, float] | None = None  # with SamplingParams.logprobs=k: the top k alternatives


class _Request:
    def __init__(self, index: int, prompt: list[int], params: SamplingParams, modes: list[str | None],
                 pixel_values: list[Tensor], image_sizes: list) -> None:
        self.index, self.prompt, self.params, self.modes = index, prompt, params, modes
        self.pixel_values, self.image_sizes = pixel_values, image_sizes
        self.image_embeds: Tensor | None = None  # computed at the first prefill that needs it
        self.seqs: list[_Seq] = []
        self.unfinished = 0
        self.error: str | None = None
        self.budget: int | None = None  # max_thinking_tokens
        self.cached_tokens = 0  # prompt tokens its first admission took from the prefix cache
        self.prompt_lps: list[float | None] | None = None  # with params.prompt_logprobs, filled as prompt rows run
        self.prompt_top: list[dict[int, float] | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_lps = [None] * len(prompt)
            self.prompt_top = [None] * len(prompt) if params.prompt_logprobs else None
        self._image_digests: list[bytes] | None = None  # [k]: the digest of the first k images (image_digest)
        self._image_positions: list[int] = []
        self._image_starts: list[int] = []
        self.tools = False  # the chat was rendered with tools: its outputs' tool calls are parsed
        self.answer_prefix: list[int] = []  # forced as the answer's first tokens (after the thought)
        self.answer_prefix_after_think: list[int] = []  # the same, after a </think> the model wrote: "\n\n" first

    def image_digest(self, upto: int, image_token: int, config: Any) -> bytes:
        """The prefix cache's key salt for a prompt block ending before token ``upto``: a chained digest of the
        images (pixels, dtypes, shapes, sizes) whose tokens start before it. A block depends on those images only,
        so a request with more images after them (a later turn that read a tool's image) still matches the
        earlier blocks."""
        if self._image_digests is None:
            chain, h = [b""], hashlib.blake2b(digest_size=16)
            for p, size in zip(self.pixel_values, self.image_sizes, strict=True):
                t = p.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}{tuple(size)}".encode())
                h.update(t.flatten().view(torch.uint8).numpy().tobytes())
                chain.append(h.copy().digest())
            self._image_digests = chain
            self._image_positions = [i for i, t in enumerate(self.prompt) if t == image_token]
            counts = [num_image_tokens(int(h), int(w), config) for h, w in self.image_sizes]
            self._image_starts = list(accumulate([0, *counts[:-1]]))  # each image's first token's rank
        seen = bisect_right(self._image_positions, upto - 1)  # image tokens before upto
        started = bisect_right(self._image_starts, seen - 1) if seen else 0
        return self._image_digests[started]


class _Seq:
    def __init__(self, sid: int, req: _Request, tokens: list[int], *, index: int = -1, mode: str | None = None,
                 num_prompt: int = 0, generator: torch.Generator | None = None) -> None:
        self.id, self.req, self.tokens, self.index, self.mode = sid, req, tokens, index, mode
        self.num_prompt = num_prompt or len(tokens)
        self.num_cached = 0
        self.generator = generator
        self.children: list[_Seq] = []  # a shared-prompt parent's completions (parents never sample)
        self.forced: deque[int] = deque()
        self.logprobs: list[float] = []
        self.top: list[dict[int, float]] = []
        self.thought_open_at_start = False
        self.thought_open = False
        self.answer_start: int | None = None  # index in generated where the answer starts (None: thought open)
        self.json: tuple | None = None  # JSON mode: the automaton's state over the answer (structured.py)
        self.finish_reason: str | None = None
        self.text_sent = ""  # streamed so far
        self.decoded = ("", 0)  # (text, tokens): the generated tokens decoded so far, ending on a whole character
        self.block_keys: list[bytes] = []  # prefix-cache keys of its leading full blocks (tokens only grow)
        self.registered = 0  # its blocks below this index are registered (or were offered) in the prefix cache
        self.admitted = False
        self.epoch = -1  # the prefix cache's epoch when it was admitted (its blocks register only in that one)

    @property
    def is_parent(self) -> bool:
        return bool(self.children)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def seats(self) -> int:
        return len(self.children) if self.children else 1


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _is_token_list(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.dim() == 1 and not x.is_floating_point()
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) for t in x)


class LLM:
    """The engine over a model (Qwen3ForCausalLM or R4BForConditionalGeneration), used in place (no weight copy:
    the trainer's model generates its own rollouts).

    tokenizer: a ChatTokenizer (needed for text and chat requests, stop strings and the thinking modes; token-id
    requests work without one); device / dtype: where and in what the model runs (None: where it is; the model is
    moved in place when they differ); max_num_seqs / max_num_batched_tokens: a step's sequences and rows at most;
    block_size: tokens per KV block; kv_cache_fraction: on a GPU, the share of the free memory the cache takes;
    num_kv_blocks: the cache's size in blocks (overrides the fraction; on a CPU the default is 512 MiB);
    max_model_len: the longest sequence (the config's max_position_embeddings by default); eos_token_ids: the
    end-of-turn tokens (the tokenizer's by default); cuda_graphs: replay decode steps as CUDA graphs (one per
    batch-size bucket, captured at first use; r4b/engine/graphs.py), on by default on a GPU; prefix_caching: reuse
    the KV blocks of prompts (and earlier outputs) seen before (the module docstring), on by default.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: ChatTokenizer | None = None, *,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, block_size: int = 16,
                 kv_cache_fraction: float = 0.5, num_kv_blocks: int | None = None, max_model_len: int | None = None,
                 eos_token_ids: Sequence[int] | None = None, cuda_graphs: bool | None = None,
                 prefix_caching: bool = True) -> None:
        for name, val in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                          ("block_size", block_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction!r}")
        if not hasattr(model, "language_model") or not hasattr(model, "compute_logits"):
            raise ValueError(f"model must be a Qwen3ForCausalLM or R4BForConditionalGeneration, got "
                             f"{type(model).__name__}")
        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        if param.device != device or param.dtype != dtype:
            if _is_fsdp(model):  # moving it would break the shards: the trainer gathers it first (parallel.gathered)
                raise ValueError(f"model is sharded with FSDP2 and its parameters are {param.dtype} on {param.device}, "
                                 f"not {dtype} on {device}: build the LLM inside r4b.engine.train.parallel.gathered"
                                 f"(model), with its compute dtype")
            model.to(device=device, dtype=dtype)
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.lm = model.language_model
        cfg = self.lm.config
        self.vocab_size = cfg.vocab_size
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        self.image_token = getattr(model.config, "image_token_index", None)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_ids if tokenizer is not None else ()
        self.eos_ids = frozenset(int(t) for t in eos_token_ids)

        L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        block_bytes = 2 * L * block_size * Hkv * D * torch.empty((), dtype=dtype).element_size()
        if num_kv_blocks is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                num_kv_blocks = int(free * kv_cache_fraction) // block_bytes
            else:
                num_kv_blocks = CPU_KV_CACHE_BYTES // block_bytes
        if not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be an int >= 1, got {num_kv_blocks!r} (a block of {block_size} "
                             f"tokens takes {block_bytes} bytes)")
        shape = (num_kv_blocks, block_size, Hkv, D)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        self.blocks = BlockManager(num_kv_blocks, block_size, prefix_caching=prefix_caching)
        self._weights_seen: tuple | None = None
        self._penalties: PenaltyCounts | None = None  # penalised sequences' token counts, made at first use
        self.block_size = block_size
        self._ids = count()
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._live: dict[int, _Request] = {}  # add_request / step (serving): requests not reported yet
        self._refused: list[_Request] = []  # added but cannot run: step() reports them first
        self._req_ids = count()
        self._events: list[tuple[_Seq, int | None]] = []
        self.stats = {"steps": 0, "prefill_steps": 0, "graph_steps": 0, "preemptions": 0,
                      "prompt_tokens_computed": 0, "prefix_cache_hit_tokens": 0, "generated_tokens": 0}
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got device={device}")
        self._graphs: DecodeGraphs | None = None
        if cuda_graphs and self._graph_safe_backends():
            self._padded_decode(capture=True)
        self._masker: structured.JsonMasker | None = None  # JSON mode's token masks, built at first use
        self._masker_lock = threading.Lock()
        self._eos_sorted = tuple(sorted(self.eos_ids))  # the end-of-turn ids a finished JSON answer may take
        if tokenizer is not None:
            self._end_of_thought = tokenizer.encode(FORCED_END_OF_THOUGHT)
            self._suffix_ids = {m: tokenizer.encode(s) for m, s in MODE_SUFFIX.items()}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: str | Path | None = None, device: str | None = None,
                        dtype: str | torch.dtype | None = "auto", **kwargs: Any) -> LLM:
        """The engine over a checkpoint directory (HF layout; R-4B or Qwen3) and its tokenizer.json (or
        ``tokenizer``). device: default cuda when available; dtype: "auto" / None (the checkpoint's), "bf16",
        "fp16", "fp32" or a torch dtype; kwargs go to LLM(...)."""
        from .model import R4BConfig, from_pretrained

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model: no checkpoint at {path} (a directory with config.json and *.safetensors)")
        tok_file = Path(tokenizer) if tokenizer else path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"no tokenizer at {tok_file} (pass tokenizer= / --tokenizer)")
        names = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if isinstance(dtype, str) and dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or a torch dtype, got {dtype!r}")
        dtype = names[dtype] if isinstance(dtype, str) else dtype
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = from_pretrained(path, dtype=dtype, device=device).eval()
        tok = ChatTokenizer(tok_file, model_config=model.config if isinstance(model.config, R4BConfig) else None)
        return cls(model, tok, **kwargs)

    def mode_suffix_ids(self, mode: str) -> list[int]:
        """The token ids a thinking mode appends after ``<|im_start|>assistant\\n`` (r4b.engine.chat.MODE_SUFFIX)."""
        check_mode(mode)
        if self.tokenizer is None:
            raise ValueError("mode suffixes need the LLM's tokenizer")
        return list(self._suffix_ids[mode])

    def _graph_safe_backends(self) -> bool:
        """The paged ops' torch references read lengths and masks on the host, which a CUDA graph cannot capture:
        decode steps run eagerly when either op dispatches to them here (e.g. R4B_BACKEND=torch)."""
        from r4b.kernels import _dispatch

        probe = self.k_caches[0][:1]
        picked = {op: _dispatch.pick(op, None, probe) for op in ("store_kv", "paged_decode_attention")}
        if "torch" in picked.values():
            log.warning("decode steps run without CUDA graphs: %s", picked)
            return False
        return True

    def _padded_decode(self, capture: bool) -> None:
        """Decode steps through DecodeGraphs (``capture=False``: the same padded step run eagerly, for tests)."""
        self._graphs = DecodeGraphs(self.lm, self.k_caches, self.v_caches, max_batch=min(self.max_num_seqs, 512),
                                    max_blocks=cdiv(self.max_model_len, self.block_size), device=self.device,
                                    capture=capture)

    # ------------------------------------------------------------------ requests
    def _prompt(self, request: Any, i: int, tools: list[dict] | None = None) -> tuple[list[int], list[Tensor], list,
                                                                                      bool]:
        """(token ids, pixel values, image sizes, is_chat) of one request; the chat prompt ends before the mode
        suffix."""
        if isinstance(request, dict) or _is_token_list(request) or (isinstance(request, (list, tuple)) and not request):
            if tools:
                raise ValueError(f"requests[{i}] is token ids: tools apply to chats (render them into the prompt)")
            if isinstance(request, dict):
                return *self._token_prompt(request, i), False
            return request.tolist() if isinstance(request, Tensor) else list(request), [], [], False
        if isinstance(request, str):
            request = [{"role": "user", "content": request}]
        if not isinstance(request, list) or not request or not isinstance(request[0], dict):
            raise ValueError(f"requests[{i}] must be a str, a list of chat messages, a list of token ids or a "
                             f"{{'prompt_token_ids': ...}} dict, got {type(request).__name__}")
        if self.tokenizer is None:
            raise ValueError(f"requests[{i}] is a chat: LLM needs tokenizer= to render it")
        enc = self.tokenizer.encode_chat(request, thinking_mode="auto", tools=tools)
        ids = enc.input_ids.tolist()
        if enc.pixel_values:  # a text part that spells <image> is one more image token than the images fill
            self._check_image_tokens(ids, enc.image_sizes, f"requests[{i}]: the chat's images", "its text")
        if not ids or ids[-1] != self.tokenizer.think_id:  # the "auto" suffix is exactly <think>
            raise RuntimeError("the chat template's auto suffix is not the <think> token")
        return ids[:-1], enc.pixel_values, enc.image_sizes, True

    def _token_prompt(self, request: dict, i: int) -> tuple[list[int], list[Tensor], list[tuple[int, int]]]:
        """A ``{"prompt_token_ids": [...], "pixel_values": [...], "image_sizes": [...]}`` request (token ids taken as
        given, with the preprocessed images their ``<image>`` tokens show, e.g. a RequestOutput's: how a multi-turn
        caller continues a multimodal conversation token for token), checked."""
        where = f"requests[{i}]"
        unknown = set(request) - {"prompt_token_ids", "pixel_values", "image_sizes"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)} (a token prompt takes prompt_token_ids, "
                             f"pixel_values, image_sizes)")
        ids = request.get("prompt_token_ids")
        if not _is_token_list(ids):
            raise ValueError(f"{where}.prompt_token_ids must be a non-empty list (or 1-D integer tensor) of token "
                             f"ids, got {ids!r:.80}")
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        pix, sizes = list(request.get("pixel_values") or []), list(request.get("image_sizes") or [])
        if len(pix) != len(sizes):
            raise ValueError(f"{where} has {len(pix)} pixel_values but {len(sizes)} image_sizes (one per image)")
        if not all(isinstance(p, Tensor) and p.dim() == 4 for p in pix):
            raise ValueError(f"{where}.pixel_values must be preprocessed images, tensors (tiles, 3, S, S), as a "
                             f"RequestOutput or ChatTokenizer.encode_chat gives them")
        try:
            sizes = [(int(h), int(w)) for h, w in sizes]
        except (TypeError, ValueError):
            raise ValueError(f"{where}.image_sizes must be (height, width) pairs, got {sizes!r:.80}") from None
        if pix:
            from .model import R4BConfig

            cfg = getattr(self.model, "config", None)
            if self.image_token is None or not isinstance(cfg, R4BConfig):
                raise ValueError(f"{where} has images but the model takes none")
            self.model._split_pixels(pix, sizes)  # the tile counts (ValueError naming the image)
            side = cfg.vision_config.image_size
            for k, p in enumerate(pix):
                if tuple(p.shape[1:]) != (3, side, side):
                    raise ValueError(f"{where}.pixel_values[{k}] must be tiles (n, 3, {side}, {side}), got "
                                     f"{tuple(p.shape)}")
            self._check_image_tokens(ids, sizes, f"{where}: its images", "prompt_token_ids")
        return ids, pix, sizes

    def _check_image_tokens(self, ids: list[int], sizes: list, what: str, holder: str) -> None:
        """The prompt holds exactly the ``<image>`` tokens its images take (else the step's embedding would fail
        for every request in it): ValueError naming the counts."""
        want = sum(num_image_tokens(int(h), int(w), self.model.config) for h, w in sizes)
        got = sum(t == self.image_token for t in ids)
        if got != want:
            raise ValueError(f"{what} need {want} <image> tokens (id {self.image_token}), {holder} holds {got}")

    def _add(self, index: int, request: Any, params: SamplingParams, modes: tuple[str | None, ...],
             tools: list[dict] | None = None, call: structured.CallSchema | None = None) -> _Request:
        try:
            ids, pix, sizes, is_chat = self._prompt(request, index, tools)
        except Exception as e:  # noqa: BLE001 - a bad request (or its image) is reported and skipped
            req = _Request(index, [], params, [], [], [])
            req.error = f"{type(e).__name__}: {e}"
            log.warning("request %d skipped: %s", index, req.error)
            return req
        modes_here = [m if (m is not None or not is_chat) else "auto" for m in modes]
        req = _Request(index, ids, params, modes_here, pix, sizes)
        req.tools = bool(tools)
        suffixes = [self._suffix_ids[m] if m is not None else [] for m in modes_here]
        longest = len(ids) + max(len(s) for s in suffixes)
        if not ids:
            req.error = "the prompt is empty"
        elif any(not 0 <= t < self.vocab_size for t in ids):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            req.error = f"the prompt holds token id {bad}, outside the vocabulary [0, {self.vocab_size})"
        elif self.image_token is not None and not pix and self.image_token in ids:
            req.error = f"the prompt holds image tokens (id {self.image_token}) but no images: pass a chat with " \
                        f"image parts"
        elif longest >= self.max_model_len:
            req.error = f"the prompt ({longest} tokens with its mode suffix) leaves no room in max_model_len=" \
                        f"{self.max_model_len}"
        elif self.blocks.blocks_needed(longest + 1) > self.blocks.num_blocks:
            req.error = f"the prompt ({longest} tokens) needs more KV blocks than the cache holds " \
                        f"({self.blocks.num_blocks} of {self.block_size} tokens)"
        if req.error is not None:
            log.warning("request %d skipped: %s", index, req.error)
            return req
        if call is not None:  # tool_choice "required" / a named function: the answer is one call
            json_start = structured.initial_call(call)
        elif params.response_format is not None:  # json_object / json_schema (checked by SamplingParams)
            json_start = structured.initial(structured.compile_schema(params.json_schema))
        else:
            json_start = None
        children = []
        for j, (m, suffix) in enumerate((m, s) for m, s in zip(modes_here, suffixes, strict=True)
                                        for _ in range(params.n)):
            tokens = ids + suffix
            seq = _Seq(next(self._ids), req, tokens, index=j, mode=m,
                       generator=make_generator(params.seed, j, self.device))
            seq.thought_open = seq.thought_open_at_start = self._thought_open(tokens)
            seq.answer_start = None if seq.thought_open else 0
            seq.json = json_start
            children.append(seq)
        req.seqs, req.unfinished = children, len(children)
        if len(children) > 1 and len(ids) > 1:  # prefill the shared prompt once (all but its last token:
            parent = _Seq(next(self._ids), req, ids[:-1])  # each completion feeds that one with its suffix)
            parent.children = children
            self.waiting.append(parent)
        else:
            self.waiting.extend(children)
        return req

    def _thought_open(self, tokens: list[int]) -> bool:
        if self.tokenizer is None:
            return False
        for t in reversed(tokens):
            if t == self.tokenizer.think_id:
                return True
            if t == self.tokenizer.end_think_id:
                return False
        return False

    # ------------------------------------------------------------------ scheduling
    def _release(self, seq: _Seq) -> None:
        """Free the sequence's blocks (and its penalty counts) and take it off the running list (if it is there)."""
        self.blocks.free(seq.id)
        if self._penalties is not None:
            self._penalties.release(seq.id)
        if seq in self.running:
            self.running.remove(seq)

    def _preempt(self, seq: _Seq) -> None:
        self._release(seq)
        seq.num_cached = seq.registered = 0
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.finish_reason = reason
        self._release(seq)
        seq.req.unfinished -= 1

    def _drop(self, seq: _Seq, tokens: int) -> None:
        """A sequence the KV cache cannot hold even alone. A completion ends there ("length", as at the model's
        length); a shared prompt that cannot be prefilled fails its request."""
        why = (f"a sequence of {tokens} tokens does not fit the KV cache ({self.blocks.num_blocks} blocks of "
               f"{self.block_size} tokens)")
        log.warning("request %d: %s", seq.req.index, why)
        if not seq.is_parent:
            self._finish(seq, "length")
            self._events.append((seq, None))
            return
        self._release(seq)
        seq.req.error, seq.req.unfinished = why, 0
        for child in seq.children:
            child.finish_reason = "error"
            self._events.append((child, None))

    def _schedule(self) -> tuple[list[tuple[_Seq, int]], list[tuple[int, int]], bool]:
        """The next step: [(sequence, rows)], copy-on-write pairs, and whether it is a prefill (nothing cached)."""
        batch: list[tuple[_Seq, int]] = []
        pairs: list[tuple[int, int]] = []
        budget = self.max_num_batched_tokens
        seats = sum(s.seats for s in self.running)
        while self.waiting and budget > 0:  # admit new (or preempted) sequences: a prefill step
            seq = self.waiting[0]
            if seats + seq.seats > self.max_num_seqs and (self.running or batch):
                break
            hit = self._match(seq)  # leading blocks in the prefix cache
            cached = len(hit) * self.block_size
            n = min(len(seq.tokens) - cached, budget)
            # keep a block free for each running sequence's growth, so that admitting does not just preempt; a
            # hit on a free cached block takes it from the free ones
            reserve = len(self.running)
            need = self.blocks.blocks_needed(cached + n) - len(hit) + sum(self.blocks.ref_count(b) == 0 for b in hit)
            if need + reserve > self.blocks.num_free_blocks:
                if self.running:
                    break
                self.waiting.popleft()
                self._drop(seq, len(seq.tokens))
                continue
            self.waiting.popleft()
            self.running.append(seq)
            seats += seq.seats
            seq.epoch = self.blocks.epoch  # everything it computes from here is this epoch's weights'
            if not seq.admitted:
                seq.admitted, seq.req.cached_tokens = True, max(seq.req.cached_tokens, cached)
            if hit:  # its first chunk's blocks now; the chunk runs in the next extend step, after the cached context
                self.blocks.acquire(seq.id, hit)
                self.blocks.ensure(seq.id, cached + n, cached)  # fits: checked above
                seq.num_cached, seq.registered = cached, len(hit)
                self.stats["prefix_cache_hit_tokens"] += cached
                continue
            self.blocks.ensure(seq.id, n, 0)
            batch.append((seq, n))
            budget -= n
        if batch:
            return batch, pairs, True
        for seq in list(self.running):  # extend / decode the running sequences
            if budget == 0:
                break
            if seq not in self.running:  # preempted for an earlier one
                continue
            n = min(len(seq.tokens) - seq.num_cached, budget)
            while (got := self.blocks.ensure(seq.id, seq.num_cached + n, seq.num_cached)) is None:
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1 and not batch:
                    self._drop(seq, seq.num_cached + n)
                    break
                self._preempt(victim)
                if victim is seq:
                    break
            if got is None:
                continue
            pairs += got
            batch.append((seq, n))
            budget -= n
        return batch, pairs, False

    # ------------------------------------------------------------------ prefix cache
    def _keys(self, seq: _Seq, num_blocks: int) -> list[bytes]:
        """The prefix-cache keys of the sequence's first ``num_blocks`` blocks: each a digest of the previous key and
        the block's tokens, and, for a block that holds an image token of the prompt, of the images started by its
        end (the blocks after it take them through the chain)."""
        keys, bs, req = seq.block_keys, self.block_size, seq.req
        while len(keys) < num_blocks:
            i = len(keys)
            toks = seq.tokens[i * bs : (i + 1) * bs]
            h = hashlib.blake2b(keys[-1] if keys else b"r4b", digest_size=16)
            if req.pixel_values and i * bs < len(req.prompt) and self.image_token in toks:
                h.update(req.image_digest(min((i + 1) * bs, len(req.prompt)), self.image_token, self.model.config))
            h.update(array("q", toks).tobytes())
            keys.append(h.digest())
        return keys[:num_blocks]

    def _match(self, seq: _Seq) -> list[int]:
        """The cached blocks a sequence about to be admitted can start from (its last token is always computed:
        it is the one that samples, or the one a shared prompt's completions follow)."""
        if not self.blocks.num_cached_blocks or seq.num_cached or self.blocks.has(seq.id) \
                or seq.req.prompt_lps is not None:  # its prompt rows' log-probs are wanted: all computed
            return []
        return self.blocks.match(self._keys(seq, (len(seq.tokens) - 1) // self.block_size))

    def _register(self, seq: _Seq) -> None:
        """Offer the sequence's newly computed full blocks to the prefix cache."""
        full = seq.num_cached // self.block_size
        # a sequence admitted before the weights changed holds the old weights' keys and values: never offered
        if self.blocks.prefix_caching and full > seq.registered and seq.epoch == self.blocks.epoch:
            self.blocks.register(seq.id, self._keys(seq, full), seq.registered)
            seq.registered = full

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (call after changing the model's weights in a way the engine cannot see:
        replaced or updated through their parameters, or replaced submodules, it notices by itself at the next
        step)."""
        self.blocks.clear_cache()
        if self._graphs is not None and self._graphs.stale():
            self._graphs.reset()
        self._weights_seen = self._weights_key()

    def _check_weights(self) -> None:
        """At every generate / add_request and every step (weights may change between a stream's or a server's
        steps): when a parameter was replaced or updated in place since the last check, drop the prefix cache, and
        the decode graphs if they read a replaced one (about 0.3 ms a step for R-4B's 841 parameter tensors)."""
        if not self.blocks.prefix_caching and self._graphs is None:
            return
        key = self._weights_key()
        if key == self._weights_seen:
            return
        if self._graphs is not None and self._graphs.stale():
            log.info("the model's parameters moved since the decode graphs were captured: capturing them again")
            self._graphs.reset()
        if self.blocks.prefix_caching:
            if self.blocks.num_cached_blocks:
                log.info("the model's parameters changed: the prefix cache is dropped")
            self.blocks.clear_cache()
        self._weights_seen = key

    def _weights_key(self) -> tuple:
        """(data_ptr, version counter) of every parameter, read by a plain walk of the modules' parameter dicts
        (a replaced parameter or submodule shows; a quarter of ``model.parameters()``'s cost: 0.34 vs 1.21 ms for
        840 tensors on this CPU)."""
        out = []
        stack = [self.model]
        while stack:
            mod = stack.pop()
            for p in mod._parameters.values():
                if p is not None:
                    try:
                        out.append((p.data_ptr(), p._version))
                    except RuntimeError:  # an inference tensor has no version counter
                        out.append((p.data_ptr(), None))
            stack.extend(m for m in mod._modules.values() if m is not None)
        return tuple(out)

    # ------------------------------------------------------------------ running
    def _embed(self, batch: list[tuple[_Seq, int]], input_ids: Tensor) -> Tensor:
        lm = self.lm
        if self.image_token is None or not any(s.req.pixel_values and s.num_cached < len(s.req.prompt)
                                               for s, _ in batch):  # image features enter prompt rows only
            return lm.embed_tokens(input_ids)
        parts = []
        for seq, n in batch:
            c = seq.num_cached
            ids = torch.tensor(seq.tokens[c : c + n], dtype=torch.int64, device=self.device)
            pos = torch.arange(c, c + n, device=self.device)
            mask = (ids == self.image_token) & (pos < len(seq.req.prompt))
            x = lm.embed_tokens(ids.masked_fill(mask, 0))
            if bool(mask.any()):
                req = seq.req
                if req.image_embeds is None:
                    pixels = [p.to(self.device) for p in req.pixel_values]
                    req.image_embeds = torch.cat(self.model.image_features(pixels, req.image_sizes), 0)
                first = sum(1 for t in seq.tokens[:c] if t == self.image_token)
                x[mask] = req.image_embeds[first : first + int(mask.sum())].to(x.dtype)
            parts.append(x)
        return torch.cat(parts, 0)

    @torch.inference_mode()
    def _run(self, batch: list[tuple[_Seq, int]], pairs: list[tuple[int, int]], prefill: bool) -> Tensor | None:
        """One model step; returns the logits of the sequences that sample (rows in batch order), or None."""
        for src, dst in pairs:
            for cache in (*self.k_caches, *self.v_caches):
                cache[dst] = cache[src]
        if self._graphs is not None and not prefill and self._graph_step(batch):
            return self._graph_run(batch)
        ids, pos, slots, lens = [], [], [], []
        for seq, n in batch:
            c = seq.num_cached
            ids += seq.tokens[c : c + n]
            pos += range(c, c + n)
            slots += [self.blocks.slot(seq.id, p) for p in range(c, c + n)]
            lens.append(n)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        position_ids = torch.tensor(pos, dtype=torch.int64, device=dev)
        cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        kv = PagedKV(self.k_caches, self.v_caches, torch.tensor(slots, dtype=torch.int64, device=dev))
        if not prefill:  # the rows read their sequences' tables
            tables = [self.blocks.table(seq.id) for seq, _ in batch]
            width = max(len(t) for t in tables)
            bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
            if max(lens) == 1:  # a decode step: one row a sequence
                kv.block_tables, kv.context_lens = bt, (position_ids + 1).to(torch.int32)
            else:  # an extend step: chunks after cached contexts
                kv.seq_block_tables = bt
                kv.seq_context_lens = torch.tensor([s.num_cached + n for s, n in batch], dtype=torch.int32,
                                                   device=dev)
        hidden = self.lm(self._embed(batch, input_ids), position_ids, cu, max(lens), kv)
        self._prompt_logprobs(batch, hidden)
        last, row = [], 0
        for seq, n in batch:
            row += n
            if seq.num_cached + n == len(seq.tokens) and not seq.is_parent:
                last.append(row - 1)
        self.stats["steps"] += 1
        self.stats["prefill_steps"] += prefill
        self.stats["prompt_tokens_computed"] += sum(min(n, max(0, s.num_prompt - s.num_cached)) for s, n in batch)
        if not last:
            return None
        return self._logits(hidden[torch.tensor(last, device=dev)])

    PROMPT_LOGPROB_ROWS = 512  # prompt rows scored at a time

    def _prompt_logprobs(self, batch: list[tuple[_Seq, int]], hidden: Tensor) -> None:
        """Fill the log-probs of the prompt tokens whose previous row ran in this step (a request that asked for
        them): the row at position p scores prompt token p + 1. Logits are made ``chunk`` rows at a time, scaled in
        place (at the peak two fp32 (chunk, V) buffers, the logits and logsumexp's: 311 MB each at Qwen3's
        vocabulary)."""
        rows, targets, where = [], [], []
        row = 0
        for seq, n in batch:
            req, c = seq.req, seq.num_cached
            if req.prompt_lps is not None:
                for p in range(c, min(c + n, len(req.prompt) - 1)):
                    rows.append(row + p - c)
                    targets.append(req.prompt[p + 1])
                    where.append((req, p + 1))
            row += n
        if not rows:
            return
        dev, chunk = hidden.device, self.PROMPT_LOGPROB_ROWS
        for a in range(0, len(rows), chunk):
            idx = torch.tensor(rows[a : a + chunk], device=dev)
            part = where[a : a + chunk]
            temps = torch.tensor([r.params.temperature or 1.0 for r, _ in part], device=dev)
            logits = self._logits(hidden[idx]).div_(temps[:, None])
            lse = torch.logsumexp(logits, dim=-1)
            chosen = (logits.gather(1, torch.tensor(targets[a : a + chunk], device=dev)[:, None])[:, 0]
                      - lse).tolist()
            k = max(r.params.prompt_logprobs for r, _ in part)
            top = None
            if k:
                vals, ids = logits.topk(min(k, logits.shape[1]), dim=-1)
                top = ((vals - lse[:, None]).tolist(), ids.tolist())
            for j, (req, pos) in enumerate(part):
                req.prompt_lps[pos] = chosen[j]
                if top is not None and req.prompt_top is not None:
                    kk = req.params.prompt_logprobs
                    req.prompt_top[pos] = dict(zip(top[1][j][:kk], top[0][j][:kk], strict=True))

    def _graph_step(self, batch: list[tuple[_Seq, int]]) -> bool:
        """A decode step the graphs can take: one row a sequence, no image rows, no prompt rows whose log-probs are
        wanted, tables within the graph's width."""
        if any(n != 1 or (s.req.pixel_values and s.num_cached < len(s.req.prompt))
               or (s.req.prompt_lps is not None and s.num_cached < len(s.req.prompt) - 1) for s, n in batch):
            return False
        return self._graphs.fits(len(batch), max(len(self.blocks.table(s.id)) for s, _ in batch))

    def _graph_run(self, batch: list[tuple[_Seq, int]]) -> Tensor | None:
        seqs = [s for s, _ in batch]
        hidden = self._graphs.run([s.tokens[s.num_cached] for s in seqs], [s.num_cached for s in seqs],
                                  [self.blocks.slot(s.id, s.num_cached) for s in seqs],
                                  [self.blocks.table(s.id) for s in seqs])
        self.stats["steps"] += 1
        self.stats["graph_steps"] += 1
        self.stats["prompt_tokens_computed"] += sum(s.num_cached < s.num_prompt for s in seqs)
        last = [i for i, s in enumerate(seqs) if s.num_cached + 1 == len(s.tokens) and not s.is_parent]
        if not last:
            return None
        return self._logits(hidden if len(last) == len(seqs) else hidden[torch.tensor(last, device=self.device)])

    def _logits(self, rows: Tensor) -> Tensor:
        """fp32 logits of the sampling rows: a bf16 / fp16 model's hidden states times its lm_head with fp32
        output (what fused_linear_logprobs computes in training; a bf16 logit near 20 would be off by up to 0.06)."""
        head = self.model.lm_head
        if rows.dtype not in (torch.bfloat16, torch.float16):
            return head(rows)
        if rows.is_cuda and head.bias is None:
            try:  # cuBLAS with an fp32 output: no fp32 copy of the weight
                return torch.mm(rows, head.weight.t(), out_dtype=torch.float32)
            except (RuntimeError, TypeError):  # a torch without mm's out_dtype
                pass
        bias = head.bias.float() if head.bias is not None else None
        return torch.nn.functional.linear(rows.float(), head.weight.float(), bias)

    def _step(self) -> list[tuple[_Seq, int | None]]:
        """Schedule and run one step; returns (sequence, new token) for every sequence that sampled, and
        (sequence, None) for one that ended without a token (the cache could not hold it)."""
        self._events: list[tuple[_Seq, int | None]] = []
        self._check_weights()
        batch, pairs, prefill = self._schedule()
        if not batch:
            return self._events
        logits = self._run(batch, pairs, prefill)
        samplers = []
        for seq, n in batch:
            seq.num_cached += n
            self._register(seq)
            if seq.is_parent and seq.num_cached == len(seq.tokens):  # the shared prompt is in: fork
                i = self.running.index(seq)
                for child in seq.children:
                    self.blocks.fork(seq.id, child.id)
                    child.num_cached, child.registered = seq.num_cached, seq.registered
                    child.epoch = seq.epoch
                    child.admitted = True  # its prompt came in through the parent (the request's cached_tokens)
                    child.block_keys = list(seq.block_keys)  # the shared prompt's blocks are the child's first
                self.running[i : i + 1] = seq.children
                self.blocks.free(seq.id)
            elif seq.num_cached == len(seq.tokens) and not seq.is_parent:
                samplers.append(seq)
        if not samplers:
            return self._events
        forced = [s.forced.popleft() if s.forced else None for s in samplers]
        plist = [s.req.params for s in samplers]
        pen = [i for i, p in enumerate(plist) if p.has_penalties]
        state = None
        if pen:  # their counts live on the device, a scatter a step (PenaltyCounts)
            if self._penalties is None:
                self._penalties = PenaltyCounts(logits.shape[1], logits.device)
            slots = self._penalties.rows([samplers[i].id for i in pen],
                                         [(samplers[i].tokens, samplers[i].num_prompt) for i in pen])
            state = (self._penalties.counts[slots], self._penalties.seen[slots])
        allowed = None
        if any(s.json is not None for s in samplers):
            allowed = [self._json_allowed(s) if f is None else None for s, f in zip(samplers, forced, strict=True)]
        tokens, logps, top = sample(logits, plist, [s.generator for s in samplers], forced, state=state,
                                    allowed=allowed)
        if pen:
            self._penalties.add(slots, [tokens[i] for i in pen])
        out = self._events
        for i, seq in enumerate(samplers):
            self._append(seq, tokens[i], logps[i], top[i] if top is not None else None)
            out.append((seq, tokens[i]))
        return out

    def _append(self, seq: _Seq, token: int, logp: float, top: dict[int, float] | None) -> None:
        p = seq.req.params
        seq.tokens.append(token)
        seq.logprobs.append(logp)
        self.stats["generated_tokens"] += 1
        if top is not None:
            seq.top.append(top)
        tok = self.tokenizer
        reason = None
        if seq.json is not None and seq.answer_start is not None and len(seq.generated) > seq.answer_start \
                and token not in self.eos_ids and token not in p.stop_token_ids:
            data = self._json_masker().bytes[token] if token < self.vocab_size else None
            seq.json = structured.advance(seq.json, data) if data else None
            if seq.json is None:  # only a forced token (an answer prefix) can leave the language
                log.warning("request %d: a forced token left JSON mode's language: the rest is not constrained",
                            seq.req.index)
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif p.ignore_eos and structured.is_complete(seq.json):  # JSON mode: the object is the answer, whole
            reason = "stop"
        elif p.stop and tok is not None and self._hits_stop(seq):
            reason = "stop"
        elif len(seq.generated) >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            reason = "length"
        elif tok is not None and seq.thought_open:
            if token == tok.end_think_id:
                seq.thought_open = False
                seq.answer_start = len(seq.generated)
                seq.forced.extend(seq.req.answer_prefix_after_think)
            elif (seq.req.budget is not None and not seq.forced
                  and len(seq.generated) >= seq.req.budget):
                seq.forced.extend(self._end_of_thought)
                seq.forced.extend(seq.req.answer_prefix)
                seq.thought_open = False  # the forced tokens close it
                seq.answer_start = len(seq.generated) + len(self._end_of_thought)
        if reason is not None:
            self._finish(seq, reason)

    def _json_masker(self) -> structured.JsonMasker:
        if self._masker is None:
            with self._masker_lock:  # one build, also with warm_json_masker's thread at it
                if self._masker is None:
                    self._masker = structured.JsonMasker(self.tokenizer, self.vocab_size, self.device)
        return self._masker

    def warm_json_masker(self) -> threading.Thread | None:
        """Build JSON mode's token masker (the vocabulary's byte trie: about 5 s and 190 MB for a 151k vocabulary)
        in a background thread now, instead of inside the engine step of the first JSON or forced-tool-call
        request, where it would stall every request in flight (r4b serve calls this at start). Returns the
        thread (None without a tokenizer, or when it is built already)."""
        if self.tokenizer is None or self._masker is not None:
            return None
        th = threading.Thread(target=self._json_masker, name="r4b-json-masker", daemon=True)
        th.start()
        return th

    def _json_allowed(self, seq: _Seq) -> Tensor | None:
        """JSON mode's mask for the sequence's next token (None: not constrained now, e.g. inside the thought)."""
        if seq.json is None or seq.answer_start is None or len(seq.generated) < seq.answer_start:
            return None
        m = self._json_masker().mask(seq.json, self._eos_sorted + seq.req.params.stop_token_ids)
        if m is None:
            log.warning("request %d: no token of the vocabulary continues its JSON: the rest is not constrained",
                        seq.req.index)
            seq.json = None
        return m

    def _hits_stop(self, seq: _Seq) -> bool:
        gen = seq.generated
        longest = max(len(s.encode("utf-8")) for s in seq.req.params.stop)  # a byte-level token may be one byte
        tail = self.tokenizer.decode(gen[-(longest + 8) :])
        return any(s in tail for s in seq.req.params.stop)

    # ------------------------------------------------------------------ outputs
    def _text(self, seq: _Seq, incremental: bool = False) -> str:
        """The completion's text, cut before a stop string. ``incremental`` (streaming): decode only the tokens
        after the last whole character decoded before (byte-level tokens decode piece by piece), so a stream of n
        tokens costs O(n) decoding, not O(n^2); the finished output decodes everything once."""
        if self.tokenizer is None:
            return ""
        gen = seq.generated
        if incremental:
            done, upto = seq.decoded
            tail = self.tokenizer.decode(gen[upto:])
            text = done + tail
            if not tail.endswith("\ufffd"):
                seq.decoded = (text, len(gen))
        else:
            text = self.tokenizer.decode(gen)
        for s in seq.req.params.stop:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text

    def _output(self, req: _Request) -> RequestOutput:
        out = RequestOutput(req.index, req.prompt, error=req.error, num_cached_tokens=req.cached_tokens,
                            pixel_values=list(req.pixel_values), image_sizes=list(req.image_sizes))
        if req.error is not None:
            return out
        if req.prompt_lps is not None:
            out.prompt_logprobs = list(req.prompt_lps)
            out.prompt_top_logprobs = list(req.prompt_top) if req.prompt_top is not None else None
        tok = self.tokenizer
        for seq in req.seqs:
            text = self._text(seq)
            gen = seq.generated
            if seq.thought_open_at_start:
                end = tok.end_think_id
                n_think = gen.index(end) if end in gen else len(gen)
                parsed = parse_response(text, thinking_mode="long")
            else:
                n_think = 0
                parsed = parse_response(text, thinking_mode=None)
            out.outputs.append(CompletionOutput(
                index=seq.index, text=text, thinking=parsed.thinking, answer=parsed.answer, token_ids=list(gen),
                logprobs=list(seq.logprobs), thinking_mode=seq.mode, mode=parsed.mode, num_thinking_tokens=n_think,
                finish_reason=seq.finish_reason or "error",
                top_logprobs=list(seq.top) if seq.req.params.logprobs else None,
                tool_calls=parse_tool_calls(parsed.answer)[1] if req.tools else None))
        return out

    # ------------------------------------------------------------------ public
    def _check_call(self, plist: Sequence[SamplingParams], thinking_mode: str | Sequence[str] | None,
                    max_thinking_tokens: int | None, answer_prefix: str | None = None) -> tuple[str | None, ...]:
        """Validate one call's sampling params, modes, budget and answer prefix; the modes as a tuple."""
        if answer_prefix is not None:
            if not isinstance(answer_prefix, str):
                raise ValueError(f"answer_prefix must be None or a str, got {type(answer_prefix).__name__}")
            if self.tokenizer is None:
                raise ValueError("answer_prefix needs the LLM's tokenizer")
        if self.tokenizer is None and any(p.response_format for p in plist):
            raise ValueError("SamplingParams.response_format needs the LLM's tokenizer (the tokens' bytes)")
        if self.tokenizer is None and any(p.stop for p in plist):
            raise ValueError("SamplingParams.stop (strings) needs the LLM's tokenizer; use stop_token_ids")
        for p in plist:
            if p.logit_bias and p.logit_bias[-1][0] >= self.vocab_size:
                raise ValueError(f"SamplingParams.logit_bias names token {p.logit_bias[-1][0]}, outside the "
                                 f"vocabulary [0, {self.vocab_size})")
        if thinking_mode is None or isinstance(thinking_mode, str):
            modes: tuple[str | None, ...] = (thinking_mode,)
        else:
            modes = tuple(thinking_mode)
            if not modes:
                raise ValueError("thinking_mode must be a mode or a non-empty list of modes")
        for m in modes:
            if m is not None:
                check_mode(m)
                if self.tokenizer is None:
                    raise ValueError(f"thinking_mode={m!r} needs the LLM's tokenizer (for the mode suffix)")
        if max_thinking_tokens is not None:
            if not isinstance(max_thinking_tokens, int) or isinstance(max_thinking_tokens, bool) \
                    or max_thinking_tokens < 0:
                raise ValueError(f"max_thinking_tokens must be None or an int >= 0, got {max_thinking_tokens!r}")
            if self.tokenizer is None:
                raise ValueError("max_thinking_tokens needs the LLM's tokenizer")
        self._check_weights()
        if self._graphs is not None and self._graphs.stale():  # weights replaced since the capture: capture again
            log.info("the model's parameters moved since the decode graphs were captured: capturing them again")
            self._graphs.reset()
        return modes

    def _prefix_ids(self, answer_prefix: str | None) -> tuple[list[int], list[int]]:
        """The answer prefix's tokens: (at once / after a forced end of thought, after the model's </think>)."""
        if not answer_prefix:
            return [], []
        return self.tokenizer.encode(answer_prefix), self.tokenizer.encode("\n\n" + answer_prefix)

    def _set_budget(self, req: _Request, budget: int | None, prefix: tuple[list[int], list[int]] = ([], [])) -> None:
        """The request's thinking budget and answer prefix (``_prefix_ids``): a zero budget closes the thought before
        the first sampled token; the prefix is forced at once where no thought is open, else when the thought
        closes."""
        req.budget = budget
        req.answer_prefix, req.answer_prefix_after_think = prefix
        for seq in req.seqs:
            if budget == 0 and seq.thought_open:
                seq.forced.extend(self._end_of_thought)
                seq.thought_open = False
                seq.answer_start = len(self._end_of_thought)
            if not seq.thought_open:
                seq.forced.extend(req.answer_prefix)

    def _start(self, requests: Sequence[Any], params: SamplingParams | Sequence[SamplingParams] | None,
               thinking_mode: str | Sequence[str] | None, max_thinking_tokens: int | None,
               tools: list[dict] | None = None, answer_prefix: str | None = None,
               tool_choice: Any = None) -> list[_Request]:
        if self.waiting or self.running or self._live:
            raise RuntimeError("LLM is already generating (one generate / stream at a time, and not while "
                               "add_request / step serve requests)")
        if isinstance(requests, (str, Tensor, dict)) or _is_token_list(requests) or (
                isinstance(requests, list) and requests and isinstance(requests[0], dict)
                and "prompt_token_ids" not in requests[0]):
            raise ValueError("requests must be a list of requests (wrap a single prompt or chat in a list)")
        requests = list(requests)
        params = params if params is not None else SamplingParams()
        plist = [params] * len(requests) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(requests) or not all(isinstance(p, SamplingParams) for p in plist):
            raise ValueError(f"params must be a SamplingParams or one per request ({len(requests)}), got "
                             f"{len(plist)} items")
        modes = self._check_call(plist, thinking_mode, max_thinking_tokens, answer_prefix)
        tools, call = self._check_tools(tools, tool_choice, plist, answer_prefix)
        try:
            reqs = [self._add(i, r, p, modes, tools, call)
                    for i, (r, p) in enumerate(zip(requests, plist, strict=True))]
        except BaseException:
            self._reset()
            raise
        prefix = self._prefix_ids(answer_prefix)
        for req in reqs:
            self._set_budget(req, max_thinking_tokens, prefix)
        return reqs

    def _check_tools(self, tools: Any, tool_choice: Any = None, plist: Sequence[SamplingParams] = (),
                     answer_prefix: str | None = None) -> tuple[list[dict] | None, structured.CallSchema | None]:
        """(the tools to render, the forced call's grammar or None), checked."""
        tools = check_tools(tools)
        if tools and self.tokenizer is None:
            raise ValueError("tools need the LLM's tokenizer (to render them into the chat)")
        if tool_choice in (None, "auto"):
            return tools, None
        if tool_choice == "none":
            return None, None
        if not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs tools")
        if tool_choice == "required":
            name = None
        elif isinstance(tool_choice, str):
            name = tool_choice
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict) \
                and isinstance(tool_choice["function"].get("name"), str):
            name = tool_choice["function"]["name"]
        else:
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required', a tool's name or {{'type': 'function', "
                             f"'function': {{'name': ...}}}}, got {tool_choice!r}")
        if any(p.response_format for p in plist):
            raise ValueError("tool_choice forces a tool call: it cannot go with SamplingParams.response_format")
        if any(p.stop for p in plist):
            raise ValueError("tool_choice forces a tool call: SamplingParams.stop strings could cut it (use none)")
        try:
            call = structured.compile_tool_call(tools, name)
        except structured.SchemaError as e:
            raise ValueError(f"tool_choice: {e}") from None
        if answer_prefix and structured.advance(structured.initial_call(call), answer_prefix.encode()) is None:
            raise ValueError(f"answer_prefix {answer_prefix!r} is not the start of the tool call tool_choice forces")
        return tools, call

    # ------------------------------------------------------------------ serving: one request at a time
    def add_request(self, request: Any, params: SamplingParams | None = None, *,
                    thinking_mode: str | Sequence[str] | None = None,
                    max_thinking_tokens: int | None = None, tools: list[dict] | None = None,
                    answer_prefix: str | None = None, tool_choice: Any = None) -> int:
        """Queue one request while others run (serving; r4b/engine/server.py); returns its id. Its tokens and its
        RequestOutput (also for a request that cannot run: ``error`` set) come from :meth:`step`. A bad argument
        (not the request itself) raises ValueError. Call from one thread, not during generate / stream."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        modes = self._check_call([params], thinking_mode, max_thinking_tokens, answer_prefix)
        req = self._add(next(self._req_ids), request, params, modes,
                        *self._check_tools(tools, tool_choice, [params], answer_prefix))
        self._set_budget(req, max_thinking_tokens, self._prefix_ids(answer_prefix))
        self._live[req.index] = req
        if req.error is not None:
            self._refused.append(req)
        return req.index

    def has_unfinished(self) -> bool:
        """Whether step() has work or outputs left (requests added with add_request)."""
        return bool(self._live or self.waiting or self.running)

    def abort(self, request_id: int) -> bool:
        """Drop a request added with add_request (a client that went away): its sequences leave the queues and
        their KV blocks are freed; it reports nothing more. False when it is not live (finished or unknown)."""
        req = self._live.pop(request_id, None)
        if req is None:
            return False
        for seq in [s for s in (*self.running, *self.waiting) if s.req is req]:
            self._release(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)
        return True

    def step(self) -> list[StreamEvent | RequestOutput]:
        """One engine step over the requests added with add_request: a StreamEvent per generated token, and each
        request's RequestOutput once all its completions are done (a request that cannot run reports at once).
        A step that raises (the model failing) fails the requests it was running, reports them with the error and
        leaves the engine clean for the next ones."""
        refused, self._refused = self._refused, []
        out: list[StreamEvent | RequestOutput] = [self._report(r) for r in refused if r.index in self._live]
        if not (self.waiting or self.running):
            return out
        try:
            events = self._step()
        except Exception as e:  # noqa: BLE001 - reported to every request in flight, never takes the server down
            log.exception("engine step failed: the %d requests in flight fail", len(self._live))
            self._reset()
            for req in list(self._live.values()):
                req.error = f"the engine step failed: {type(e).__name__}: {e}"
                req.seqs = []
                out.append(self._report(req))
            return out
        done = {i for i in {seq.req.index for seq, _ in events} if i not in self._live}
        for item in self._with_outputs(events, done):
            out.append(item)
            if isinstance(item, RequestOutput):
                self._live.pop(item.request_index, None)
        return out

    def _with_outputs(self, events: list[tuple[_Seq, int | None]], done: set[int]) -> Iterator[StreamEvent |
                                                                                                 RequestOutput]:
        """A step's StreamEvents, each request's RequestOutput right after its last event of the step once all its
        completions are done (never before another completion's final token of the same step); ``done``: the
        requests already reported (updated)."""
        left: dict[int, int] = {}
        for seq, _ in events:
            left[seq.req.index] = left.get(seq.req.index, 0) + 1
        for seq, token in events:
            yield self._event(seq, token)
            left[seq.req.index] -= 1
            if seq.req.unfinished == 0 and not left[seq.req.index] and seq.req.index not in done:
                done.add(seq.req.index)
                yield self._output(seq.req)

    def _report(self, req: _Request) -> RequestOutput:
        self._live.pop(req.index, None)
        return self._output(req)

    def _reset(self) -> None:
        """Drop every queued and running sequence and its blocks (after an interrupted or failed generate; live
        add_request requests are the caller's to report)."""
        for seq in [*self.running, *self.waiting]:
            self.blocks.free(seq.id)
        if self._penalties is not None:
            self._penalties.clear()
        self.running.clear()
        self.waiting.clear()

    def _loop(self) -> Iterator[list[tuple[_Seq, int | None]]]:
        """Each step's (sequence, token) events, a list a step."""
        try:
            while self.waiting or self.running:
                yield self._step()
        finally:  # an interrupted stream or a failing step leaves a clean engine
            self._reset()

    def generate(self, requests: Sequence[Any], params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 thinking_mode: str | Sequence[str] | None = None, max_thinking_tokens: int | None = None,
                 use_tqdm: bool = True, tools: list[dict] | None = None,
                 answer_prefix: str | None = None, tool_choice: Any = None) -> list[RequestOutput]:
        """Complete every request; one RequestOutput per request, in order.

        requests: each a str (one user message), a list of chat messages (``{"role", "content"}``; image parts
        need a tokenizer made with the model's config), a list / 1-D tensor of token ids (taken as given), or
        ``{"prompt_token_ids": ids, "pixel_values": [...], "image_sizes": [...]}``: token ids with the preprocessed
        images their ``<image>`` tokens show (a RequestOutput's ``pixel_values`` / ``image_sizes``), e.g. to go on
        with a multimodal conversation token for token (r4b.engine.agent's tool loop).
        thinking_mode: "auto" / "long" / "short", or a list of them (each request then gets n completions in
        each mode, all from one prefill of the shared prompt); None: "auto" for chats, token-id prompts as given.
        max_thinking_tokens: force ``\\n</think>\\n\\n`` once a thought holds that many generated tokens.
        tools: functions the chats offer the model (OpenAI's tool schemas, rendered by the chat template); each
        completion's ``tool_calls`` then holds the calls it made (r4b.engine.chat.parse_tool_calls).
        tool_choice: None / "auto" (the model decides), "none" (the tools are not rendered), "required" (the
        answer is one call of one of the tools) or a tool's name (OpenAI's ``{"type": "function", "function":
        {"name": ...}}`` too: one call of it). A forced call is constrained like JSON mode (structured.py): its
        name is one of the tools', its arguments follow the tool's ``parameters`` schema, then the turn ends.
        answer_prefix: text every answer starts with, forced (not sampled; its tokens' log-probs are the model's):
        at once where no thought is open (short mode, token-id prompts), else when the thought closes (after the
        model's ``</think>`` as ``"\\n\\n" + prefix``, or after the budget's forced end of thought).
        """
        reqs = self._start(requests, params, thinking_mode, max_thinking_tokens, tools, answer_prefix, tool_choice)
        total = sum(len(r.seqs) for r in reqs)
        bar = None
        if use_tqdm and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="generate", unit="seq", dynamic_ncols=True)
        for events in self._loop():
            if bar is not None:
                bar.update(sum(seq.finish_reason is not None for seq, _ in events))
        if bar is not None:
            bar.close()
        return [self._output(r) for r in reqs]

    def stream(self, requests: Sequence[Any], params: SamplingParams | Sequence[SamplingParams] | None = None, *,
               thinking_mode: str | Sequence[str] | None = None,
               max_thinking_tokens: int | None = None,
               tools: list[dict] | None = None, answer_prefix: str | None = None,
               tool_choice: Any = None) -> Iterator[StreamEvent | RequestOutput]:
        """Like :meth:`generate`, as it happens: a StreamEvent for every generated token, and each request's
        RequestOutput as soon as all its completions are done (a skipped request's at once)."""
        reqs = self._start(requests, params, thinking_mode, max_thinking_tokens, tools, answer_prefix, tool_choice)
        try:
            done = set()
            for req in reqs:
                if req.error is not None:
                    done.add(req.index)
                    yield self._output(req)
            for events in self._loop():
                yield from self._with_outputs(events, done)
        finally:  # closed before the loop started (a skipped request's output was the last item taken)
            self._reset()

    def _event(self, seq: _Seq, token: int | None) -> StreamEvent:
        got = token is not None
        return StreamEvent(seq.req.index, seq.index, token, self._delta(seq), seq.finish_reason is not None,
                           seq.finish_reason, seq.logprobs[-1] if got else None,
                           seq.top[-1] if got and seq.req.params.logprobs else None)

    def _delta(self, seq: _Seq) -> str:
        """The text a stream has not sent yet. While the completion runs, an incomplete multi-byte character and
        an ending that may grow into a stop string are held back; its last event sends the rest."""
        text = self._text(seq, incremental=True)
        if seq.finish_reason is None:
            keep = len(text.rstrip("\ufffd"))
            for stop in seq.req.params.stop:
                for k in range(min(len(stop) - 1, keep), 0, -1):
                    if text[:keep].endswith(stop[:k]):
                        keep -= k
                        break
            text = text[:keep]
        if not text.startswith(seq.text_sent):  # cannot happen with the hold-back above; never re-send
            return ""
        delta, seq.text_sent = text[len(seq.text_sent):], text
        return delta
