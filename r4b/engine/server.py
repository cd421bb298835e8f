"""An OpenAI-compatible HTTP server over the engine (``r4b serve``): ``POST /v1/chat/completions`` (streamed or not),
``GET /v1/models``, ``GET /health``.

One engine thread owns the LLM and runs its steps (``LLM.add_request`` / ``step`` / ``abort``); every HTTP
request is a thread that submits its chat and reads its own events, so concurrent requests are batched together by
the engine (continuous batching), and a client that disconnects mid-stream has its sequences aborted and their KV
blocks freed. A request the engine refuses (too long, a bad image) gets a 400 naming the reason; a failing engine
step fails the requests it was running (500) and the server goes on.

The thinking mode: ``"thinking_mode": "auto" | "long" | "short"`` (r4b's field), or vLLM / Qwen3's
``"chat_template_kwargs": {"enable_thinking": true | false}`` (long / short); the server's default otherwise.
``"max_thinking_tokens"`` sets a thinking budget. Answers come as DeepSeek / vLLM's reasoning format: the thought in
``message.reasoning_content`` (streamed as ``delta.reasoning_content``), the answer in ``message.content``; each
choice also says ``thinking_mode`` and what the model did (``mode``: "think" / "no_think"). Images: ``image_url``
parts with ``data:`` URLs (base64); the server fetches nothing and reads no local file.

Tools (function calling): ``tools`` (OpenAI's function schemas) are rendered by the chat template (Qwen3's
``# Tools`` block); the ``<tool_call>`` blocks of an answer come back as ``message.tool_calls`` (``id``, ``type``
"function", ``function.name`` / ``function.arguments`` as a JSON string), cut out of ``content`` (null when nothing
else is left), with finish_reason "tool_calls"; streamed, each call is one ``delta.tool_calls`` entry sent when its
block closes. The history takes assistant ``tool_calls`` and ``tool`` messages (their results). ``tool_choice``:
"auto" (the default), "none" (the tools are left out of the prompt), "required" or a named function: the answer,
after the thought, is constrained (r4b/engine/structured.py) to exactly one call, of one of the tools (or the named
one), with arguments that follow its ``parameters`` schema. ``parallel_tool_calls: false`` keeps the first call.

``"response_format": {"type": "json_object"}``: JSON mode (r4b/engine/structured.py): the answer, after the
thought, is constrained token by token to one JSON object, then the end of turn; ``{"type": "json_schema",
"json_schema": {"name": ..., "schema": {...}}}``: the object follows the schema (what structured.py enforces; a
schema it cannot enforce is refused with a 400 naming where).

``"logprobs": true`` (and ``"top_logprobs": k``, k <= 20) gives each choice ``logprobs.content``: one entry per
generated token, the thought's included, in order (``token``, ``logprob``, ``bytes``, ``top_logprobs``); streamed,
each chunk of a token carries its entry. The log-probs are the engine's: of the distribution at the request's
temperature (1 when greedy), before top-k / top-p.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .chat import (
    END_THINK,
    END_TOOL_CALL,
    IM_END,
    MODE_SUFFIX,
    THINK,
    TOOL_CALL,
    ToolCall,
    parse_tool_calls,
    partial_tag,
    tool_call_of,
)
from .llm import LLM, RequestOutput, StreamEvent
from .sampling import SamplingParams
from .structured import SchemaError, compile_schema, compile_tool_call

log = logging.getLogger(__name__)

_EOT = "<|endoftext|>"
_UNSUPPORTED = ("functions", "function_call")


class EngineFailure(RuntimeError):
    """The engine failed a request it had accepted (HTTP 500)."""


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400), naming the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ----------------------------------------------------------------------------------------------------- parsing


@dataclass
class ChatRequest:
    """One engine request: a chat (or, for /v1/completions, a prompt's token ids, run as given: thinking_mode None)."""

    messages: list[dict] | list[int]
    params: SamplingParams
    thinking_mode: str
    max_thinking_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    logprobs: bool = False
    tools: list[dict] | None = None  # rendered into the prompt; the answers' tool calls are parsed
    parallel_tool_calls: bool = True  # False: a choice keeps its first call
    tool_choice: str | dict | None = None  # "required" or {"type": "function", ...}: the answer is one call


@dataclass
class CompletionRequest:
    """A /v1/completions body: its prompts (each text or token ids), run as given (no chat template, no thinking
    mode); ``logprobs`` None or k (the chosen tokens' log-probs and k alternatives); ``echo``: the prompt leads the
    text (and its tokens the log-probs)."""

    prompts: list[str | list[int]]
    params: SamplingParams
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


def _int(body: dict, name: str, low: int, default: int | None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise BadRequest(f"'{name}' must be an integer >= {low}, got {v!r}", name)
    return v


def _float(body: dict, name: str, default: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise BadRequest(f"'{name}' must be a number, got {v!r}", name)
    return float(v)


def _image(url: Any, where: str) -> Any:
    """An image_url part's ``data:`` URL as a PIL image (nothing is fetched, no file is read)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise BadRequest(f"{where}: only base64 data: URLs are accepted (the server fetches nothing), got "
                         f"{str(url)[:60]!r}", "messages")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{where}: not a readable base64 image ({type(e).__name__}: {e})", "messages") from None


def _tool_calls(raw: Any, where: str) -> list[dict]:
    """An assistant message's ``tool_calls`` (OpenAI's form), checked; arguments stay as given (a JSON string)."""
    if not isinstance(raw, list):
        raise BadRequest(f"{where} must be a list of tool calls, got {str(raw)[:60]!r}", "messages")
    out = []
    for k, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"] \
                or not isinstance(fn.get("arguments", "{}"), (str, dict)):
            raise BadRequest(f"{where}[{k}] must be {{'type': 'function', 'function': {{'name': str, 'arguments': "
                             f"str}}}}, got {str(call)[:80]!r}", "messages")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": fn.get("arguments", "{}")}})
    return out


def _tools(body: dict) -> tuple[list[dict] | None, bool, str | dict | None]:
    """(the tools to render, or None; parallel_tool_calls; the call tool_choice forces: "required", a tool's name,
    or None) of a chat body, checked (a forced call's parameters schemas compiled: one JSON mode cannot enforce is a
    400 naming the tool)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise BadRequest(f"'parallel_tool_calls' must be true or false, got {parallel!r}", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise BadRequest(f"'tool_choice' {str(choice)[:60]!r} needs 'tools'", "tool_choice")
        return None, parallel, None
    if not isinstance(tools, list):
        raise BadRequest(f"'tools' must be a list of function tools, got {str(tools)[:60]!r}", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"] \
                or not isinstance(fn.get("parameters", {}), dict):
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': str, 'description'?, "
                             f"'parameters'?: object}}}}, got {str(t)[:80]!r}", "tools")
    if choice in (None, "auto"):
        return tools, parallel, None
    if choice == "none":
        return None, parallel, None
    if choice == "required" or isinstance(choice, dict):
        name = None
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            names = [t["function"]["name"] for t in tools]
            if choice.get("type") != "function" or name not in names:
                raise BadRequest(f"'tool_choice' must name one of the tools {names} as {{'type': 'function', "
                                 f"'function': {{'name': ...}}}}, got {str(choice)[:80]!r}", "tool_choice")
        try:
            compile_tool_call(tools, name)
        except SchemaError as e:
            raise BadRequest(f"'tool_choice' forces a call, whose arguments JSON mode must enforce: {e}",
                             "tools") from None
        # a name goes on in the dict form (a tool may be called "none" or "required")
        return tools, parallel, "required" if name is None else {"type": "function", "function": {"name": name}}
    raise BadRequest(f"'tool_choice' must be 'auto', 'none', 'required' or a function, got {str(choice)[:60]!r}",
                     "tool_choice")


def _messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"'messages' must be a non-empty list, got {str(raw)[:60]!r}", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}] must be an object with role system / user / assistant / tool, got "
                             f"{str(m)[:60]!r}", "messages")
        content = m.get("content")
        if m["role"] == "tool" and isinstance(content, list):  # a tool result: its text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content of a tool message must be a string or text parts",
                                 "messages")
            content = "".join(p["text"] for p in content)
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    parts.append({"type": "image", "image": _image(part.get("image_url"),
                                                                   f"messages[{i}].content[{j}]")})
                else:
                    raise BadRequest(f"messages[{i}].content[{j}] must be a text or image_url part, got "
                                     f"{str(part)[:60]!r}", "messages")
            content = parts
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts", "messages")
        msg = {"role": m["role"], "content": content}
        if m["role"] == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        if m["role"] == "assistant" and isinstance(m.get("reasoning_content"), str):
            msg["reasoning_content"] = m["reasoning_content"]
        out.append(msg)
    if out[-1]["role"] == "assistant":
        raise BadRequest("the last message is the assistant's: nothing to answer (continuing an assistant turn is "
                         "not supported)", "messages")
    return out


def parse_chat_request(body: Any, *, default_mode: str = "auto", default_max_tokens: int = 1024) -> ChatRequest:
    """An OpenAI chat-completions body -> ChatRequest; BadRequest naming the field for anything wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for name in _UNSUPPORTED:
        if body.get(name):
            raise BadRequest(f"'{name}' is not supported by r4b serve", name)
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise BadRequest(f"'logprobs' must be true or false, got {logprobs!r}", "logprobs")
    top = _int(body, "top_logprobs", 0, None)
    if top is not None and top > 20:
        raise BadRequest(f"'top_logprobs' must be an integer in [0, 20], got {top!r}", "top_logprobs")
    if top and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    messages = _messages(body.get("messages"))
    mode = body.get("thinking_mode")
    kwargs = body.get("chat_template_kwargs")
    if mode is None and isinstance(kwargs, dict) and "enable_thinking" in kwargs:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise BadRequest("'chat_template_kwargs.enable_thinking' must be true or false", "chat_template_kwargs")
        mode = "long" if kwargs["enable_thinking"] else "short"
    mode = default_mode if mode is None else mode
    if mode not in MODE_SUFFIX:
        raise BadRequest(f"'thinking_mode' must be one of {sorted(MODE_SUFFIX)}, got {mode!r}", "thinking_mode")
    max_tokens = _int(body, "max_completion_tokens", 1, None)
    max_tokens = _int(body, "max_tokens", 1, None) if max_tokens is None else max_tokens
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    tools, parallel, forced = _tools(body)
    if forced is not None and body.get("stop"):
        raise BadRequest("'stop' with a forced 'tool_choice': a stop string could cut the call", "stop")
    fmt = _response_format(body)
    params = _sampling_params(body, max_tokens=max_tokens or default_max_tokens, logprobs=top or None,
                              response_format=fmt if fmt in (None, "json_object") else None,
                              json_schema=None if fmt in (None, "json_object") else fmt)
    return ChatRequest(messages, params, mode, _int(body, "max_thinking_tokens", 0, None), stream,
                       bool(opts.get("include_usage")), body.get("model"), logprobs, tools, parallel, forced)


def _response_format(body: dict) -> str | None:
    """A chat body's response_format: None (text), "json_object" (JSON mode), or a json_schema's schema as its
    canonical JSON text (SamplingParams.json_schema)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind in ("json_object", "json_schema") and body.get("tools") and body.get("tool_choice") != "none":
        raise BadRequest(f"'response_format' {kind} with 'tools': the answer could not hold a tool call; send one or "
                         "the other", "response_format")
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("'response_format' json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                             "response_format")
        try:
            return compile_schema(schema).text
        except SchemaError as e:
            raise BadRequest(f"'response_format' json_schema: {e}", "response_format") from None
    raise BadRequest(f"'response_format' must be {{'type': 'text' | 'json_object' | 'json_schema'}}, got "
                     f"{str(rf)[:60]!r}", "response_format")


def _sampling_params(body: dict, *, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                     response_format: str | None = None, json_schema: str | None = None) -> SamplingParams:
    """The sampling fields both endpoints share (temperature, top_p / top_k / min_p, penalties, stop, seed, n)."""
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise BadRequest(f"'stop' must be a string or a list of at most 16 non-empty strings, got {stop!r}", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}", "seed")
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise BadRequest(f"'logit_bias' must be an object of token id: bias, got {str(bias)[:60]!r}", "logit_bias")
    try:  # JSON keys are strings
        bias = {int(k): v for k, v in bias.items()}
    except ValueError:
        raise BadRequest("'logit_bias' keys must be token ids", "logit_bias") from None
    kw = dict(logit_bias=bias, temperature=_float(body, "temperature", 1.0), top_p=_float(body, "top_p", 1.0),
              top_k=_int(body, "top_k", 0, 0) or 0, max_tokens=max_tokens, stop=tuple(stop),
              seed=seed, n=_int(body, "n", 1, 1) or 1, logprobs=logprobs, min_p=_float(body, "min_p", 0.0),
              presence_penalty=_float(body, "presence_penalty", 0.0),
              frequency_penalty=_float(body, "frequency_penalty", 0.0),
              repetition_penalty=_float(body, "repetition_penalty", 1.0), prompt_logprobs=prompt_logprobs,
              response_format=response_format, json_schema=json_schema)
    try:
        return SamplingParams(**kw)
    except ValueError as e:  # SamplingParams.<field> must be ...
        msg = str(e)
        name = msg.split(".", 1)[1].split(" ", 1)[0] if msg.startswith("SamplingParams.") else None
        raise BadRequest(f"'{name}': {msg}" if name else msg, name) from None


def parse_completion_request(body: Any, *, default_max_tokens: int = 16) -> CompletionRequest:
    """An OpenAI (legacy) completions body -> CompletionRequest; BadRequest naming the field for anything wrong.
    max_tokens defaults to 16, as OpenAI's does."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for name in ("suffix",):
        if body.get(name):
            raise BadRequest(f"'{name}' is not supported by r4b serve", name)
    prompt = body.get("prompt")
    is_ids = lambda x: isinstance(x, list) and bool(x) and all(  # noqa: E731
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)
    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) or is_ids(x) for x in prompt):
        prompts = list(prompt)
    else:
        raise BadRequest("'prompt' must be a string, a list of token ids, or a non-empty list of either, got "
                         f"{str(prompt)[:60]!r}", "prompt")
    if any(p == "" for p in prompts):
        raise BadRequest("'prompt' must not be empty", "prompt")
    if len(prompts) > 1024:
        raise BadRequest(f"'prompt' holds {len(prompts)} prompts; at most 1024 a request", "prompt")
    logprobs = _int(body, "logprobs", 0, None)
    if logprobs is not None and logprobs > 20:
        raise BadRequest(f"'logprobs' must be an integer in [0, 20], got {logprobs!r}", "logprobs")
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise BadRequest(f"'echo' must be true or false, got {echo!r}", "echo")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
    if stream and len(prompts) > 1:
        raise BadRequest("a streamed completion takes one prompt (send a list without 'stream')", "prompt")
    if stream and echo and logprobs is not None:
        raise BadRequest("'echo' with 'logprobs' is not streamed (the prompt's log-probs come at the end); send "
                         "'stream': false", "echo")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    n = _int(body, "n", 1, 1) or 1
    best_of = _int(body, "best_of", 1, None)
    if best_of is not None and best_of != n:
        raise BadRequest(f"'best_of' other than n is not supported by r4b serve, got {best_of}", "best_of")
    max_tokens = _int(body, "max_tokens", 1, None)
    params = _sampling_params(body, max_tokens=max_tokens or default_max_tokens, logprobs=logprobs or None,
                              prompt_logprobs=logprobs if echo and logprobs is not None else None)
    return CompletionRequest(prompts, params, echo, logprobs, stream, bool(opts.get("include_usage")),
                             body.get("model"))


# ------------------------------------------------------------------------------------------------------ engine


@dataclass
class Handle:
    """One submitted request: its events arrive on ``events`` (StreamEvent..., then its RequestOutput; or a
    ("refused", message) tuple when add_request refused the arguments, ("failed", message) when the engine failed)."""

    events: queue.Queue = field(default_factory=queue.Queue)
    request_id: int | None = None
    aborted: bool = False


class EngineLoop:
    """Runs an LLM in one background thread. Other threads submit(...) chats and read the events of their handle;
    abort(handle) drops a request (its KV blocks are freed at the engine's next turn)."""

    def __init__(self, llm: LLM, *, idle_wait: float = 0.02) -> None:
        self.llm = llm
        self.idle_wait = idle_wait
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="r4b-engine", daemon=True)
        self.steps = 0
        self.max_batch = 0  # the most requests in flight at one step (a measure of batching, for tests and logs)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, req: ChatRequest) -> Handle:
        h = Handle()
        self._inbox.put(("add", req, h))
        return h

    def abort(self, h: Handle) -> None:
        h.aborted = True
        self._inbox.put(("abort", None, h))

    def _take(self, block: bool) -> list:
        items = []
        try:
            items.append(self._inbox.get(timeout=self.idle_wait) if block else self._inbox.get_nowait())
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return [x for x in items if x is not None]

    def _run(self) -> None:
        handles: dict[int, Handle] = {}
        while not self._stopping.is_set():
            for kind, req, h in self._take(block=not self.llm.has_unfinished()):
                try:
                    if kind == "abort":
                        if h.request_id is not None and handles.pop(h.request_id, None) is not None:
                            self.llm.abort(h.request_id)
                        continue
                    if h.aborted:
                        continue
                    h.request_id = self.llm.add_request(req.messages, req.params, thinking_mode=req.thinking_mode,
                                                        max_thinking_tokens=req.max_thinking_tokens,
                                                        tools=req.tools, tool_choice=req.tool_choice)
                    handles[h.request_id] = h
                except ValueError as e:  # the arguments: the client's to fix
                    h.events.put(("refused", str(e)))
                except Exception as e:  # noqa: BLE001 - this request fails; the others in the inbox go on
                    log.exception("could not add a request")
                    h.events.put(("failed", f"{type(e).__name__}: {e}"))
            try:
                if not self.llm.has_unfinished():
                    continue
                self.max_batch = max(self.max_batch, len(handles))
                self.steps += 1
                for ev in self.llm.step():
                    h = handles.get(ev.request_index)
                    if h is None:
                        continue
                    h.events.put(ev)
                    if isinstance(ev, RequestOutput):
                        handles.pop(ev.request_index, None)
            except Exception as e:  # noqa: BLE001 - a bug here fails the requests in flight, not the server
                log.exception("engine loop error")
                for rid, h in list(handles.items()):
                    self.llm.abort(rid)
                    h.events.put(("failed", f"engine error: {type(e).__name__}: {e}"))
                handles.clear()


# ---------------------------------------------------------------------------------------------------- streaming


class _Channel:
    """One streamed text (the thought or the answer) sent as ``text.strip()`` grows: leading whitespace dropped,
    trailing whitespace held until more text comes; ``joiner`` goes between two parts (the answer's preamble and
    its rest) when both have text."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.lead = True
        self.pending = ""
        self.joiner = ""

    def add(self, text: str) -> str:
        if self.lead:
            text = text.lstrip()
            if not text:
                return ""
            text, self.lead = self.joiner + text, False
        text = self.pending + text
        keep = len(text.rstrip())
        self.pending = text[keep:]
        if keep:
            self.sent.append(text[:keep])
        return text[:keep]

    def new_part(self, joiner: str) -> None:
        """What comes next is a new part: its leading whitespace is dropped, and ``joiner`` leads it if this channel
        has sent text."""
        self.lead, self.pending = True, ""
        self.joiner = joiner if self.sent else ""

    def text(self) -> str:
        return "".join(self.sent)

    def reconcile(self, final: str) -> str | None:
        """The rest of ``final`` (what the non-streamed response holds) after what was sent, or None when what was
        sent is not a prefix of it (nothing more is sent then)."""
        sent = self.text()
        if not final.startswith(sent):
            return None
        if len(final) > len(sent):
            self.sent.append(final[len(sent):])
        return final[len(sent):]


class ThinkSplitter:
    """Splits a completion's streamed text into thought and answer deltas as they arrive, by the rules of
    r4b.engine.chat.parse_response (what the non-streamed response holds), except one: a stream cannot take text
    back, so its thought ends at the FIRST ``</think>`` where parse_response takes the last.

    in_thought: the completion starts inside a thought (auto / long prompts); a ``<think>`` it repeats at its start
    is dropped. Outside a thought (short), a ``<think>`` opens one, and the text before it stays at the front of the
    answer. An ending that may grow into a tag or an end-of-turn token, and trailing whitespace, are held back
    until the next text decides them, so what is sent is always a prefix of what will be. Incremental: each delta is
    scanned once."""

    _BEGIN, _PRE, _THOUGHT, _ANSWER, _STOPPED = range(5)

    def __init__(self, in_thought: bool) -> None:
        self.in_thought = in_thought
        self.text = ""
        self.done = 0  # text[:done] is decided
        self.phase = self._BEGIN
        self.thought, self.answer = _Channel(), _Channel()
        self.diverged = False  # the final parse disagreed with what was sent (a thought with two </think>)

    @property
    def sent(self) -> tuple[str, str]:
        return self.thought.text(), self.answer.text()

    def _tags(self) -> tuple[str, ...]:
        if self.phase == self._THOUGHT:
            return END_THINK, IM_END, _EOT
        if self.phase == self._PRE:
            return THINK, IM_END, _EOT
        return IM_END, _EOT

    def feed(self, delta: str) -> tuple[str, str]:
        """(thought delta, answer delta) after ``delta``."""
        self.text += delta
        t, out = self.text, ([], [])
        while self.phase != self._STOPPED:
            if self.phase == self._BEGIN:  # does the output (re)open a thought?
                head = t[self.done:].lstrip()
                if len(head) < len(THINK) and THINK.startswith(head):
                    break  # undecided: whitespace, or a piece of <think>
                if head.startswith(THINK):
                    self.done = t.index(THINK, self.done) + len(THINK)
                    self.phase = self._THOUGHT
                else:
                    self.phase = self._THOUGHT if self.in_thought else self._PRE
                continue
            tags = self._tags()
            hits = [(k, tag) for tag in tags if (k := t.find(tag, self.done)) >= 0]
            channel = self.thought if self.phase == self._THOUGHT else self.answer
            if not hits:  # decide all but an ending that may grow into a tag
                safe = len(t) - max(partial_tag(t, tag, self.done) for tag in tags)
                (out[0] if channel is self.thought else out[1]).append(channel.add(t[self.done:safe]))
                self.done = safe
                break
            k, tag = min(hits)
            (out[0] if channel is self.thought else out[1]).append(channel.add(t[self.done:k]))
            self.done = k + len(tag)
            if tag in (IM_END, _EOT):
                self.phase = self._STOPPED
            elif tag == THINK:  # short mode: the preamble ends, a thought starts
                self.phase = self._THOUGHT
            else:  # </think>: the answer starts (after the preamble, if any, with a blank line)
                self.phase = self._ANSWER
                self.answer.new_part("\n\n")
        return "".join(out[0]), "".join(out[1])

    def finish(self, thinking: str, answer: str) -> tuple[str, str]:
        """The rest, given the completion's final parse (what the non-streamed response holds)."""
        out = [channel.reconcile(final) for channel, final in ((self.thought, thinking), (self.answer, answer))]
        self.diverged |= None in out
        return out[0] or "", out[1] or ""


class ToolCallStream:
    """Splits a choice's streamed answer (ThinkSplitter's answer deltas) into content deltas and tool calls, by the
    rules of r4b.engine.chat.parse_tool_calls (what the non-streamed response holds): content up to a
    ``<tool_call>`` is sent as it comes (a tag that may be starting, and trailing whitespace, held back); a block is
    held until a ``</tool_call>`` makes it a call, then sent as one; a block that is not a call (yet) is held to the
    end, where the final parse decides. Incremental: each delta is scanned once (a long answer or a long call costs
    its length, not its length squared)."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self.answer = ""
        self.done = 0  # answer[:done] is decided (content sent or held as whitespace, or a block taken)
        self.open: int | None = None  # where an unclosed <tool_call> starts
        self.scan = 0  # where the search for the open block's </tool_call> goes on
        self.content = _Channel()  # the content: the decided text outside the calls, stripped
        self.calls = 0  # the calls sent so far
        self.diverged = False

    def _take(self, calls: list[ToolCall], new: list[ToolCall]) -> None:
        for call in calls:
            if self.parallel or self.calls == 0:
                new.append(call)
                self.calls += 1

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """(content delta, new calls) after ``delta`` of the answer."""
        before = len(self.answer)
        self.answer += delta
        a, out, new = self.answer, [], []
        while True:
            if self.open is None:
                k = a.find(TOOL_CALL, self.done)
                if k < 0:  # decide all but an ending that may grow into <tool_call>
                    safe = len(a) - partial_tag(a, TOOL_CALL, self.done)
                    out.append(self.content.add(a[self.done:safe]))
                    self.done = safe
                    break
                out.append(self.content.add(a[self.done:k]))
                self.done = self.open = k
                self.scan = k + len(TOOL_CALL)
            call, e = None, a.find(END_TOOL_CALL, max(self.scan, before - len(END_TOOL_CALL) + 1))
            while e >= 0:  # the first </tool_call> that makes the body a call closes the block
                call = tool_call_of(a[self.open + len(TOOL_CALL):e])
                if call is not None:
                    break
                self.scan = e + 1
                e = a.find(END_TOOL_CALL, self.scan)
            if call is None:  # held open: a later tag may still make it a call (finish() decides the rest)
                self.scan = max(self.scan, len(a) - len(END_TOOL_CALL) + 1)
                break
            self._take([call], new)
            self.done, self.open = e + len(END_TOOL_CALL), None
        return "".join(out), new

    def finish(self, answer: str) -> tuple[str, list[ToolCall]]:
        """The rest, given the choice's final answer (its parse, as the non-streamed response has it)."""
        content, calls, _ = parse_tool_calls(answer)
        delta = self.content.reconcile(content)
        self.diverged |= delta is None
        new: list[ToolCall] = []
        self._take(calls[self.calls:], new)
        return delta or "", new


# --------------------------------------------------------------------------------------------------------- HTTP


def _call_json(call: ToolCall, index: int | None = None) -> dict:
    """OpenAI's tool_calls item (``index`` for a streamed delta); arguments as a JSON string."""
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call.name, "arguments": call.arguments_json()}}
    return out if index is None else {"index": index, **out}


def _logprob_entry(tok, token_id: int, logprob: float, top: dict[int, float] | None) -> dict:
    """OpenAI's logprobs.content item of one generated token (its alternatives with top_logprobs)."""

    def item(i: int, lp: float) -> dict:
        raw = tok.token_bytes(i)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

    return {**item(token_id, logprob), "top_logprobs": [item(i, lp) for i, lp in (top or {}).items()]}


def _token_str(tok, token_id: int) -> str:
    """A token's text for the completions API's logprobs: its bytes as UTF-8, or ``bytes:\\xNN...`` when they hold
    part of a character (OpenAI's spelling)."""
    raw = tok.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _top_strs(tok, top: dict[int, float] | None) -> dict[str, float]:
    """Alternatives by their text (two tokens of one text: the likelier one's log-prob)."""
    out: dict[str, float] = {}
    for i, lp in (top or {}).items():
        out.setdefault(_token_str(tok, i), lp)
    return out


def _text_logprobs(tok, out: RequestOutput, c, echo: bool) -> dict:
    """The completions API's logprobs object of one choice: tokens, token_logprobs, top_logprobs and text_offset
    (character offsets in the choice's text; with echo the prompt's tokens lead, the first one without a log-prob)."""
    ids, lps, tops = [], [], []
    if echo:
        ids += out.prompt_token_ids
        lps += out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        tops += out.prompt_top_logprobs or [None] + [{}] * (len(out.prompt_token_ids) - 1)
    ids += c.token_ids
    lps += c.logprobs
    tops += c.top_logprobs or [{}] * len(c.token_ids)
    offsets, acc = [], b""
    for t in ids:
        offsets.append(len(acc.decode("utf-8", errors="ignore")))
        acc += tok.token_bytes(t)
    return {"tokens": [_token_str(tok, t) for t in ids], "token_logprobs": lps,
            "top_logprobs": [None if top is None else _top_strs(tok, top) for top in tops], "text_offset": offsets}


def _choice(c, tok=None, logprobs: bool = False, req: ChatRequest | None = None) -> dict:
    message = {"role": "assistant", "content": c.answer, "reasoning_content": c.thinking or None}
    reason = c.finish_reason
    if req is not None and req.tools:
        content, calls, _ = parse_tool_calls(c.answer)
        calls = calls if req.parallel_tool_calls else calls[:1]
        if calls:
            message["content"] = content or None
            message["tool_calls"] = [_call_json(x) for x in calls]
            reason = "tool_calls" if reason == "stop" else reason
    out = {"index": c.index, "message": message, "finish_reason": reason, "thinking_mode": c.thinking_mode,
           "mode": c.mode, "num_thinking_tokens": c.num_thinking_tokens}
    if logprobs:
        tops = c.top_logprobs or [None] * len(c.token_ids)
        out["logprobs"] = {"content": [_logprob_entry(tok, t, lp, top) for t, lp, top in
                                       zip(c.token_ids, c.logprobs, tops, strict=True)]}
    return out


def _usage(out: RequestOutput, suffix: int) -> dict:
    """Token counts; the prompt counts its mode suffix (the tokens after the assistant header the mode adds), and
    its tokens the prefix cache held (OpenAI's prompt_tokens_details.cached_tokens)."""
    done = sum(len(c.token_ids) for c in out.outputs)
    prompt = len(out.prompt_token_ids) + suffix
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": sum(c.num_thinking_tokens for c in out.outputs)}}


def client_gone(sock: socket.socket) -> bool:
    """Whether the peer closed the connection: readable with nothing to read (a pipelined next request is data, not
    a close; a client that shuts down only its sending side, which HTTP/1.1 clients do not do while waiting for the
    response, reads as gone too). poll() where there is one: select() cannot take descriptors >= 1024, which a busy
    server has."""
    if sock.fileno() < 0:  # closed here
        return True
    try:
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(sock, select.POLLIN | select.POLLPRI)
            readable = bool(p.poll(0))
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
        return readable and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # reset by the peer, or the socket is closed
        return True


_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class Server(ThreadingHTTPServer):
    """``Server((host, port), llm, model_name=...)``; ``serve_forever()`` in a thread or the foreground. With
    ``api_key``, every /v1/ request must carry ``Authorization: Bearer <api_key>`` (else 401); /health stays open."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], llm: LLM, *, model_name: str = "r4b", default_mode: str = "auto",
                 default_max_tokens: int = 1024, request_timeout: float = 3600.0,
                 disconnect_poll: float = 0.5, api_key: str | None = None) -> None:
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError(f"api_key must be None or a non-empty string, got {api_key!r}")
        api_key = api_key.strip() if api_key is not None else None  # (a key file's trailing newline is no part of it)
        if default_mode not in MODE_SUFFIX:
            raise ValueError(f"default_mode must be one of {sorted(MODE_SUFFIX)}, got {default_mode!r}")
        if llm.tokenizer is None:
            raise ValueError("the LLM needs a tokenizer to serve chats")
        self.suffix_len = {m: len(llm.mode_suffix_ids(m)) for m in MODE_SUFFIX}
        self.tokenizer = llm.tokenizer  # read-only here (token bytes for logprobs)
        self.max_n = llm.max_num_seqs
        # JSON mode's masker (seconds for a real vocabulary) built now, beside the engine: not inside the step of
        # the first JSON / forced-tool-call request, where it would stall every request in flight
        self.json_warmup = llm.warm_json_masker()
        self.engine = EngineLoop(llm).start()
        self.model_name, self.default_mode, self.default_max_tokens = model_name, default_mode, default_max_tokens
        self.request_timeout = request_timeout
        self.disconnect_poll = disconnect_poll  # how often a waiting plain request checks that its client is there
        self.api_key = api_key  # /v1/ routes then need "Authorization: Bearer <api_key>" (/health does not)
        self.responses: dict[tuple[str, int], int] = {}  # (route, status) -> count, for /metrics
        self._count_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_close(self) -> None:
        super().server_close()
        self.engine.shutdown()

    def count_response(self, path: str, status: int) -> None:
        route = path if path in _ROUTES else "other"
        with self._count_lock:
            self.responses[(route, status)] = self.responses.get((route, status), 0) + 1

    def metrics_text(self) -> str:
        """Prometheus text exposition (GET /metrics): responses by route and status, the engine's counters (tokens,
        steps, preemptions, prefix-cache hits) and gauges (requests running / waiting, KV blocks)."""
        llm = self.engine.llm
        stats, blocks = dict(llm.stats), llm.blocks
        out = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP r4b_{name} {help_}")
            out.append(f"# TYPE r4b_{name} {kind}")
            out.extend(f"r4b_{name}{labels} {value:g}" for labels, value in samples)

        with self._count_lock:
            responses = sorted(self.responses.items())
        metric("http_responses_total", "counter", "HTTP responses by route and status code.",
               [(f'{{route="{r}",code="{c}"}}', n) for (r, c), n in responses])
        for key, help_ in (("generated_tokens", "Tokens sampled."),
                           ("prompt_tokens_computed", "Prompt tokens run through the model."),
                           ("prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache."),
                           ("steps", "Engine steps."), ("graph_steps", "Decode steps replayed from CUDA graphs."),
                           ("preemptions", "Sequences preempted (recomputed later) for KV blocks.")):
            metric(f"{key}_total", "counter", help_, [("", stats.get(key, 0))])
        metric("requests_running", "gauge", "Sequences in the running batch.", [("", len(llm.running))])
        metric("requests_waiting", "gauge", "Sequences waiting for admission.", [("", len(llm.waiting))])
        metric("kv_blocks", "gauge", "KV-cache blocks, all / free (cached ones count as free) / cached.",
               [('{state="all"}', blocks.num_blocks), ('{state="free"}', blocks.num_free_blocks),
                ('{state="cached"}', blocks.num_cached_blocks)])
        return "\n".join(out) + "\n"


class _Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def send_response(self, code: int, message: str | None = None) -> None:
        self.server.count_response(getattr(self, "path", ""), code)  # (no path: a request line that did not parse)
        super().send_response(code, message)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def _authorized(self) -> bool:
        """True when the server has no key or the request carries it; else answers 401."""
        key = self.server.api_key
        if key is None or not self.path.startswith("/v1/"):
            return True
        got = self.headers.get("Authorization") or ""
        scheme, _, token = got.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return True
        data = json.dumps({"error": {"message": "a valid API key is needed: send 'Authorization: Bearer <key>'",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Connection", "close")  # a POST's body is left unread
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return False

    LINGER_SECONDS = 2.0  # how long an answered request's unread body is still read (and dropped) before the close
    body_unread = False  # _body refused to read the body (it is in the connection still)

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: a client without the key gets its 401 before it sends the body."""
        if not self._authorized():
            self.close_connection = True
            return False
        return super().handle_expect_100()

    def _linger(self) -> None:
        """Close after an answer that left the request's body unread, without resetting the connection: stop
        sending, then read and drop what the client still sends (at most MAX_BODY bytes, for at most
        LINGER_SECONDS), so a client still sending its body gets to read the answer (a lingering close; closing
        at once with unread data makes the kernel send a reset, and the client sees a broken pipe instead)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + self.LINGER_SECONDS, self.MAX_BODY
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                chunk = self.connection.recv(min(1 << 16, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:  # the client went away, or the time ran out: nothing to save
            pass

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        if not self._authorized():
            return
        if self.path == "/metrics":
            data = self.server.metrics_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/health":
            alive = self.server.engine._thread.is_alive()
            self._json(200 if alive else 503, {"status": "ok" if alive else "the engine thread is not running"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": 0, "owned_by": "r4b"}]})
        else:
            self._error(404, f"no route {self.path}")

    MAX_BODY = 64 * 2**20  # bytes; a chat with a few large base64 images fits

    def _body(self) -> Any:
        """The JSON body; raises BadRequest (and marks the connection to close when its bytes cannot be skipped)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = self.body_unread = True
            raise BadRequest("send the body with a Content-Length (chunked request bodies are not read)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > self.MAX_BODY:
            self.close_connection = self.body_unread = True
            raise BadRequest(f"Content-Length must be an integer in [0, {self.MAX_BODY}], got "
                             f"{self.headers.get('Content-Length')!r}")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not JSON: {e}") from None

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():  # before the body is parsed (not even that for a client without the key): the
            self._linger()  # connection closes, its unread body dropped
            return
        try:
            body = self._body()  # read first: a keep-alive connection's next request starts after it
        except BadRequest as e:
            self._error(400, str(e))
            if self.body_unread:  # chunked, or a bad length: its bytes cannot be skipped
                self._linger()
            return
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"no route {self.path}")
            return
        chat = self.path == "/v1/chat/completions"
        try:
            if chat:
                req = parse_chat_request(body, default_mode=self.server.default_mode,
                                         default_max_tokens=self.server.default_max_tokens)
            else:
                req = parse_completion_request(body)
            if req.params.n > self.server.max_n:
                raise BadRequest(f"'n' must be at most the server's max_num_seqs ({self.server.max_n}), got "
                                 f"{req.params.n}", "n")
            # a completion's text prompts are tokenized here (run as given: no template, no mode)
            jobs = [req] if chat else [ChatRequest(p if isinstance(p, list) else self.server.tokenizer.encode(p),
                                                   req.params, None) for p in req.prompts]
        except BadRequest as e:
            self._error(400, str(e), e.param)
            return
        except Exception as e:  # noqa: BLE001 - a bug in parsing: a 500, not a dropped connection
            log.exception("could not parse a request")
            self._error(500, f"{type(e).__name__}: {e}")
            return
        if req.model is not None and req.model != self.server.model_name:
            self._error(404, f"model {req.model!r} is not served here (this server has {self.server.model_name!r})",
                        "model")
            return
        handles = [self.server.engine.submit(job) for job in jobs]
        self._started = False  # whether a status line was sent (then errors go into the stream)
        self._checked = time.monotonic()  # when _next last checked that the client is still connected
        try:
            if chat:
                (self._stream if req.stream else self._complete)(req, handles[0])
            elif req.stream:
                self._stream_text(req, handles[0])
            else:
                self._complete_text(req, handles)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away: request aborted")
            for h in handles:
                self.server.engine.abort(h)
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - the time limit, or a bug: the client hears of it, the engine stops
            for h in handles:
                self.server.engine.abort(h)
            timeout = isinstance(e, queue.Empty)
            msg = f"no result within {self.server.request_timeout:g} s" if timeout else f"{type(e).__name__}: {e}"
            if not timeout:
                log.exception("request failed")
            if self._started:
                self.close_connection = True
                try:
                    self._sse({"error": {"message": msg, "type": "server_error", "code": 500}})
                except OSError:
                    pass
            else:
                self._error(504 if timeout else 500, msg)

    def _next(self, handle: Handle, watch: bool = False):
        """The request's next event. ``watch`` (a plain response, nothing sent yet): while waiting, check every
        ``poll`` seconds whether the client closed its connection, and raise ConnectionResetError if so (the caller
        aborts the request, as for a stream whose write fails)."""
        if not watch:
            ev = handle.events.get(timeout=self.server.request_timeout)
        else:
            poll = self.server.disconnect_poll
            deadline = time.monotonic() + self.server.request_timeout
            while True:
                now = time.monotonic()
                if now - self._checked >= poll:  # tokens may arrive faster than the poll: check by the clock
                    self._checked = now
                    if self._client_gone():
                        raise ConnectionResetError("the client closed the connection")
                try:
                    ev = handle.events.get(timeout=max(0.0, min(poll, deadline - now)))
                    break
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        raise
        if isinstance(ev, tuple):
            raise (BadRequest if ev[0] == "refused" else EngineFailure)(ev[1])
        return ev

    def _client_gone(self) -> bool:
        return client_gone(self.connection)

    def _refusal(self, e: Exception | str, param: str = "messages", prefix: str = "") -> None:
        """The error response for a request that did not run: 400 when the request is at fault, else 500 (an engine
        step that failed: the client may retry). ``param`` names the field a RequestOutput's error is about."""
        if isinstance(e, BadRequest):
            self._error(400, prefix + str(e), e.param)
        elif isinstance(e, EngineFailure) or (isinstance(e, str) and e.startswith("the engine step failed")):
            self._error(500, prefix + str(e))
        else:  # a RequestOutput's error: the engine could not run this prompt
            self._error(400, prefix + str(e), param)

    def _complete(self, req: ChatRequest, handle: Handle) -> None:
        while True:
            try:
                ev = self._next(handle, watch=True)
            except (BadRequest, EngineFailure) as e:
                self._refusal(e)
                return
            if isinstance(ev, RequestOutput):
                break
        if ev.error is not None:
            self._refusal(ev.error)
            return
        self._json(200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                         "created": int(time.time()), "model": self.server.model_name,
                         "choices": [_choice(c, self.server.tokenizer, req.logprobs, req) for c in ev.outputs],
                         "usage": _usage(ev, self.server.suffix_len[req.thinking_mode])})

    def _sse(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        chunk = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.flush()

    def _stream(self, req: ChatRequest, handle: Handle) -> None:
        try:  # the first event decides between an error response and the stream
            first = self._next(handle, watch=True)
        except (BadRequest, EngineFailure) as e:
            self._refusal(e)
            return
        if isinstance(first, RequestOutput) and first.error is not None:
            self._refusal(first.error)
            return
        self._start_sse()
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.server.model_name}
        in_thought = req.thinking_mode in ("auto", "long")
        splitters = {i: ThinkSplitter(in_thought) for i in range(req.params.n)}
        calls = {i: ToolCallStream(req.parallel_tool_calls) for i in range(req.params.n)} if req.tools else None
        finish: dict[int, str] = {}

        def chunk(i: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> None:
            choice = {"index": i, "delta": delta, "finish_reason": reason}
            if logprobs is not None:
                choice["logprobs"] = logprobs
            self._sse({**base, "choices": [choice]})

        for i in range(req.params.n):  # with tools the content may stay null (OpenAI's tool-call streams)
            chunk(i, {"role": "assistant", "content": None if req.tools else ""})
        for ev in self._sse_events(first, handle):
            if isinstance(ev, StreamEvent):
                thought, answer = splitters[ev.index].feed(ev.text)
                lp = None
                if req.logprobs and ev.token_id is not None:  # the token's entry rides on its first chunk
                    lp = {"content": [_logprob_entry(self.server.tokenizer, ev.token_id, ev.logprob,
                                                     ev.top_logprobs)]}
                new: list[ToolCall] = []
                if calls is not None and answer:
                    start = calls[ev.index].calls
                    answer, new = calls[ev.index].feed(answer)
                if thought:
                    chunk(ev.index, {"reasoning_content": thought}, logprobs=lp)
                    lp = None
                if answer:
                    chunk(ev.index, {"content": answer}, logprobs=lp)
                    lp = None
                if new:
                    chunk(ev.index, {"tool_calls": [_call_json(x, start + k) for k, x in enumerate(new)]},
                          logprobs=lp)
                    lp = None
                if lp is not None:  # its text is held back (a tag may be starting): the entry alone
                    chunk(ev.index, {}, logprobs=lp)
                if ev.finished:
                    finish[ev.index] = ev.finish_reason or "stop"
            else:  # the RequestOutput
                for c in ev.outputs:
                    thought, answer = splitters[c.index].finish(c.thinking, c.answer)
                    if splitters[c.index].diverged:
                        log.warning("request %d choice %d: the stream's thought / answer split differs from the "
                                    "final parse (a thought with more than one </think>)", ev.request_index,
                                    c.index)
                    reason = finish.get(c.index, c.finish_reason)
                    new = []
                    if calls is not None:
                        ts = calls[c.index]
                        start = ts.calls
                        answer, new = ts.finish(c.answer)
                        if ts.diverged:
                            log.warning("request %d choice %d: the stream's content differs from the final parse "
                                        "of its tool calls", ev.request_index, c.index)
                        reason = "tool_calls" if ts.calls and reason == "stop" else reason
                    delta = {k: v for k, v in (("reasoning_content", thought), ("content", answer)) if v}
                    if new:
                        delta["tool_calls"] = [_call_json(x, start + k) for k, x in enumerate(new)]
                    chunk(c.index, {**delta, "thinking_mode": c.thinking_mode, "mode": c.mode}, reason)
                if req.include_usage:
                    usage = _usage(ev, self.server.suffix_len[req.thinking_mode])
                    self._sse({**base, "choices": [], "usage": usage})
        self._end_sse()

    def _sse_events(self, ev: Any, handle: Handle) -> Iterator[StreamEvent | RequestOutput]:
        """A stream's events from ``ev`` (its first) through its RequestOutput; a failed request, or a failure on the
        way, is sent as an error event instead and ends them."""
        while True:
            if isinstance(ev, RequestOutput) and ev.error is not None:
                self._sse({"error": {"message": ev.error, "type": "server_error", "code": 500}})
                return
            yield ev
            if isinstance(ev, RequestOutput):
                return
            try:
                ev = self._next(handle)
            except (BadRequest, EngineFailure) as e:
                self._sse({"error": {"message": str(e), "type": "server_error", "code": 500}})
                return

    def _start_sse(self) -> None:
        self._started = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _end_sse(self) -> None:
        self._sse("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # ------------------------------------------------------------------------------------------ /v1/completions
    def _complete_text(self, req: CompletionRequest, handles: list[Handle]) -> None:
        outs: list[RequestOutput] = []
        for i, handle in enumerate(handles):
            try:
                ev = self._next(handle, watch=True)
                while not isinstance(ev, RequestOutput):
                    ev = self._next(handle, watch=True)
            except (BadRequest, EngineFailure) as e:
                for h in handles[i + 1 :]:
                    self.server.engine.abort(h)
                self._refusal(e)
                return
            if ev.error is not None:
                for h in handles[i + 1 :]:
                    self.server.engine.abort(h)
                self._refusal(ev.error, "prompt", f"prompt {i}: ")
                return
            outs.append(ev)
        tok, n = self.server.tokenizer, req.params.n
        choices = []
        for i, (prompt, out) in enumerate(zip(req.prompts, outs, strict=True)):
            head = (prompt if isinstance(prompt, str) else tok.decode(out.prompt_token_ids)) if req.echo else ""
            for c in out.outputs:
                choice = {"index": i * n + c.index, "text": head + c.text, "logprobs": None,
                          "finish_reason": c.finish_reason}
                if req.logprobs is not None:
                    choice["logprobs"] = _text_logprobs(tok, out, c, req.echo)
                choices.append(choice)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        done = sum(len(c.token_ids) for o in outs for c in o.outputs)
        self._json(200, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                         "model": self.server.model_name, "choices": choices,
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                                   "total_tokens": prompt_tokens + done,
                                   "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens
                                                                                  for o in outs)}}})

    def _stream_text(self, req: CompletionRequest, handle: Handle) -> None:
        try:
            first = self._next(handle, watch=True)
        except (BadRequest, EngineFailure) as e:
            self._refusal(e)
            return
        if isinstance(first, RequestOutput) and first.error is not None:
            self._refusal(first.error, "prompt", "prompt 0: ")
            return
        self._start_sse()
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.model_name}
        tok, n = self.server.tokenizer, req.params.n

        def chunk(i: int, text: str, reason: str | None = None, logprobs: dict | None = None) -> None:
            self._sse({**base, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}]})

        sent = {i: b"" for i in range(n)}  # each choice's token bytes so far (its log-probs' text offsets)
        if req.echo:
            prompt = req.prompts[0]
            head = prompt if isinstance(prompt, str) else tok.decode(prompt)
            for i in range(n):
                chunk(i, head)
                sent[i] = head.encode()
        finish: dict[int, str] = {}
        for ev in self._sse_events(first, handle):
            if isinstance(ev, StreamEvent):
                lp = None
                if req.logprobs is not None and ev.token_id is not None:
                    raw = tok.token_bytes(ev.token_id)
                    lp = {"tokens": [_token_str(tok, ev.token_id)], "token_logprobs": [ev.logprob],
                          "top_logprobs": [_top_strs(tok, ev.top_logprobs)],
                          "text_offset": [len(sent[ev.index].decode("utf-8", errors="ignore"))]}
                    sent[ev.index] += raw
                if ev.text or lp is not None:
                    chunk(ev.index, ev.text, logprobs=lp)
                if ev.finished:
                    finish[ev.index] = ev.finish_reason or "stop"
            else:  # the RequestOutput
                for c in ev.outputs:
                    chunk(c.index, "", finish.get(c.index, c.finish_reason))
                if req.include_usage:
                    done = sum(len(c.token_ids) for c in ev.outputs)
                    self._sse({**base, "choices": [], "usage": {
                        "prompt_tokens": len(ev.prompt_token_ids), "completion_tokens": done,
                        "total_tokens": len(ev.prompt_token_ids) + done}})
        self._end_sse()

