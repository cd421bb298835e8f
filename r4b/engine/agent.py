"""Multi-turn tool use: the model calls Python functions, their results come back as tool messages, and it goes on
until it answers without a call (or the turns run out). BPO trains over such conversations
(``bpo_rollouts(toolbox=...)``, ``r4b bpo --tools``), and :func:`run_tool_loop` is the loop itself.

A conversation is kept as tokens, not re-rendered: each turn's generated tokens (they end with ``<|im_end|>``) are
followed by the template's tool turn (:func:`r4b.engine.chat.tool_turn`: the ``<tool_response>`` blocks as a user
turn, the next assistant header and the mode suffix), and the engine goes on from there. So the tokens a trainer
scores are exactly the ones the engine sampled, and the prefix cache serves each turn's prompt from the last.

Modes: a conversation rolled out in a forced mode gets that mode's suffix at every turn (forced thinking: every turn
opens a thought; forced non-thinking: every turn starts with the empty thought); in auto mode the model decides at
every turn.

Tools are plain Python functions (:class:`Toolbox`). Their schema comes from the signature and the docstring
(:func:`function_schema`), or is given. A call that fails (an unknown name, arguments that do not fit the schema,
an exception, a timeout) is never raised: the model reads ``Error: ...`` as the result, and the result records
the error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import re
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .chat import TOOL_CALL, ToolCall, check_mode, check_tools, parse_tool_calls
from .llm import LLM, CompletionOutput, RequestOutput
from .model.image import num_image_tokens
from .sampling import SamplingParams

log = logging.getLogger(__name__)

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", tuple: "array",
               dict: "object", type(None): "null"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
# the result a turn gets for a <tool_call> block that is no call (so the model learns the format, not silence)
MALFORMED = ('the <tool_call> block is not a call: write <tool_call>\n{"name": <function-name>, "arguments": '
             '<args-json-object>}\n</tool_call>')


# ---------------------------------------------------------------------------------------------------- schemas
def _type_schema(tp: Any, where: str) -> dict:
    """The JSON schema of a Python annotation (str, int, float, bool, list[...], tuple[...], dict[...], Literal,
    Optional / unions of those; Any or no annotation: any value)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        kinds = {_JSON_TYPES.get(type(a)) for a in args}
        if None in kinds:
            raise ValueError(f"{where}: Literal values must be str, int, float, bool or None, got {args!r}")
        out: dict = {"enum": list(args)}
        if len(kinds) == 1:
            out["type"] = kinds.pop()
        return out
    if origin in (list, tuple, Sequence) or origin is typing.get_origin(Sequence[int]):
        items = [a for a in args if a is not Ellipsis]
        out = {"type": "array"}
        if len(items) == 1:
            out["items"] = _type_schema(items[0], where)
        return out
    if origin is dict:
        return {"type": "object"}
    if origin is typing.Union or origin is types.UnionType:
        subs = [_type_schema(a, where) for a in args]
        if all(set(s) == {"type"} and isinstance(s["type"], str) for s in subs):
            return {"type": [s["type"] for s in subs]}
        return {"anyOf": subs}
    raise ValueError(f"{where}: annotation {tp!r} has no JSON schema (use str, int, float, bool, list, dict, "
                     f"Literal or Optional of them, or give the tool's schema)")


def _doc_args(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) of a Google-style docstring: the text before its sections, and the
    ``name (type): text`` / ``name: text`` lines of its ``Args:`` section (continuation lines indented deeper)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    head, args, i = [], {}, 0
    while i < len(lines) and not re.match(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?):\s*$",
                                          lines[i].strip()):
        head.append(lines[i])
        i += 1
    current, indent = None, None
    in_args = False
    for line in lines[i:]:
        if re.match(r"^\S.*:\s*$", line):  # a section header
            in_args = line.strip().rstrip(":") in ("Args", "Arguments", "Parameters")
            current = None
            continue
        if not in_args or not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        m = re.match(r"^\s*(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
        if m and (indent is None or depth <= indent):
            indent, current = depth, m.group(1).lstrip("*")
            args[current] = m.group(3).strip()
        elif current is not None:
            args[current] = (args[current] + " " + line.strip()).strip()
    return " ".join(" ".join(head).split()), args


def function_schema(fn: Callable, name: str | None = None) -> dict:
    """OpenAI's tool schema of a Python function: ``{"type": "function", "function": {"name", "description",
    "parameters"}}``, from its signature (annotations -> JSON types; parameters without a default are required)
    and its docstring (the text before the sections is the description; ``Args:`` lines describe the
    parameters). ``*args`` / ``**kwargs`` and positional-only parameters are refused (a call passes keywords)."""
    name = name or getattr(fn, "__name__", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"a tool's name must match {_NAME.pattern}, got {name!r}")
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError) as e:
        raise ValueError(f"tool {name!r}: cannot read its signature ({e}); give its schema") from None
    description, docs = _doc_args(inspect.getdoc(fn) or "")
    props, required = {}, []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ValueError(f"tool {name!r}: parameter {p.name!r} is {p.kind.description}; a tool takes keyword "
                             f"arguments only")
        prop = _type_schema(hints.get(p.name, p.annotation), f"tool {name!r} parameter {p.name!r}")
        if p.name in docs:
            prop["description"] = docs[p.name]
        props[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    params: dict = {"type": "object", "properties": props}
    if required:
        params["required"] = required
    fn_schema: dict = {"name": name}
    if description:
        fn_schema["description"] = description
    fn_schema["parameters"] = params
    return {"type": "function", "function": fn_schema}


_PY_OF = {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}


def _is_kind(value: Any, kind: str) -> bool:
    """Whether a JSON value is of a JSON-schema type (an integral float counts as an integer; a bool is no
    number; an unknown type name accepts anything)."""
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _PY_OF.get(kind, object))


def _kinds(schema: dict) -> list[str]:
    """A schema's ``type`` as a list (empty when it names none)."""
    kinds = schema.get("type")
    return [kinds] if isinstance(kinds, str) else list(kinds or [])


def _fits(value: Any, schema: Any, where: str) -> str | None:
    """Why ``value`` does not fit ``schema`` (None when it does). Checks type, enum, items, properties, required
    and additionalProperties: false (the keywords function_schema writes and tools commonly use); other keywords
    are not checked."""
    if not isinstance(schema, dict):
        return None
    kinds = _kinds(schema)
    if kinds and not any(_is_kind(value, k) for k in kinds):
        return f"{where} must be {' or '.join(kinds)}, got {json.dumps(value)[:60]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {json.dumps(schema['enum'])[:80]}, got {json.dumps(value)[:60]}"
    if "anyOf" in schema and all(_fits(value, s, where) for s in schema["anyOf"]):
        return f"{where} fits none of its anyOf schemas"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for k, v in enumerate(value):
            if (why := _fits(v, schema["items"], f"{where}[{k}]")) is not None:
                return why
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or []:
            if key not in value:
                return f"{where} is missing the required {key!r}"
        for key, v in value.items():
            if key in props:
                if (why := _fits(v, props[key], f"{where}.{key}")) is not None:
                    return why
            elif schema.get("additionalProperties") is False:
                return f"{where} has no parameter {key!r} (it takes {sorted(props)})"
    return None


def _ints(value: Any, schema: Any) -> Any:
    """``value`` (checked by _fits) with the integral floats where the schema says integer made ints."""
    if not isinstance(schema, dict):
        return value
    kinds = _kinds(schema)
    if isinstance(value, float) and "integer" in kinds and "number" not in kinds and value.is_integer():
        return int(value)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_ints(v, schema["items"]) for v in value]
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        props = schema["properties"]
        return {k: _ints(v, props[k]) if k in props else v for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------- tools
@dataclass
class ToolResult:
    """One executed call: what the model reads (``content``, after its ``images`` when the tool returned any) and,
    when the call failed, why (``error``; the content is then ``"Error: " + error``)."""

    name: str
    arguments: dict
    content: str
    error: str | None = None
    seconds: float = 0.0
    images: list = field(default_factory=list, repr=False)  # PIL images / uint8 (3, H, W) tensors the tool returned
    # the images preprocessed for the model (set by run_tool_loop)
    pixel_values: list[Tensor] = field(default_factory=list, repr=False)
    image_sizes: list[tuple[int, int]] = field(default_factory=list, repr=False)


def _image_shaped(x: Any) -> bool:
    """A tensor or numpy array shaped like an image: (3, H, W) or (H, W, 3)."""
    if not (isinstance(x, Tensor) or type(x).__module__ == "numpy"):
        return False
    shape = tuple(x.shape)
    return len(shape) == 3 and 3 in (shape[0], shape[-1])


def _is_image(x: Any) -> bool:
    """A tool's image: a PIL image, or a uint8 tensor / numpy array (3, H, W) or (H, W, 3)."""
    if _image_shaped(x):
        return str(x.dtype) in ("torch.uint8", "uint8")
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(x, Image.Image)


def _as_image(x: Any) -> Any:
    """A numpy image as a tensor (the image processor takes PIL images and uint8 tensors)."""
    return torch.from_numpy(x.copy()) if type(x).__module__ == "numpy" else x


class Toolbox:
    """Python functions the model may call, with their schemas.

    tools: each a callable (its schema from :func:`function_schema`), or a ``(schema, callable)`` pair (OpenAI's
    ``{"type": "function", "function": {...}}`` or the function object itself). A call runs ``fn(**arguments)``
    after its arguments are checked against the schema; the value becomes the result's text (a str as it is,
    anything else as JSON), cut to ``max_result_chars``; an image (a PIL image or a uint8 (3, H, W) tensor), or a
    list holding images and other values, gives the model the images and then the rest as text (for a multimodal
    model: a tool that crops or zooms, "thinking with images"); an integer argument written as an integral float (2.0)
    reaches the function as an int. timeout: seconds a call may take; a call over it reads as an error (its thread
    cannot be stopped: it finishes in the background, a daemon); max_workers: calls run at once (a turn's calls,
    and the calls of every conversation in a step, run in parallel), and the most calls left running after their
    timeout: past that many, new calls are refused as errors until some finish (a tool that hangs cannot pile up
    threads without bound). Only KeyboardInterrupt raised in a tool propagates; anything else (SystemExit from
    model-written code included) is the call's error.
    """

    def __init__(self, tools: Sequence[Any], *, timeout: float = 30.0, max_result_chars: int = 8192,
                 max_workers: int = 16) -> None:
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence) or not tools:
            raise ValueError(f"tools must be a non-empty list of functions or (schema, function) pairs, got "
                             f"{tools!r:.80}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        for name, v in (("max_result_chars", max_result_chars), ("max_workers", max_workers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.timeout, self.max_result_chars, self.max_workers = float(timeout), max_result_chars, max_workers
        self._stuck: list[threading.Thread] = []  # calls still running after their timeout
        self.functions: dict[str, Callable] = {}
        self.schemas: list[dict] = []
        self._params: dict[str, dict] = {}
        for i, t in enumerate(tools):
            if callable(t):
                schema, fn = function_schema(t), t
            elif isinstance(t, (tuple, list)) and len(t) == 2 and callable(t[1]):
                schema, fn = t
                check_tools([schema])
            else:
                raise ValueError(f"tools[{i}] must be a function or a (schema, function) pair, got {t!r:.80}")
            spec = schema.get("function", schema) if isinstance(schema, dict) else None
            name = spec.get("name") if isinstance(spec, dict) else None
            if not isinstance(name, str) or not name:
                raise ValueError(f"tools[{i}]'s schema needs a function name, got {schema!r:.80}")
            if name in self.functions:
                raise ValueError(f"tools[{i}]: two tools are named {name!r}")
            params = spec.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise ValueError(f"tools[{i}] ({name!r}): parameters must be a JSON schema object, got {params!r:.80}")
            self.functions[name] = fn
            self._params[name] = params
            self.schemas.append(schema if "function" in schema else {"type": "function", "function": schema})

    @classmethod
    def load(cls, spec: str, **kwargs: Any) -> Toolbox:
        """Tools named on a command line: ``"package.module:fn1,fn2"``, ``"path/to/tools.py:fn"``, or a module
        attribute that is a list of tools (``"package.module:TOOLS"``); kwargs go to Toolbox."""
        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(f"tools must be 'module:function[,function...]' or 'file.py:function', got {spec!r}")
        where, _, names = spec.rpartition(":")
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ValueError(f"tools: no file {where}")
            mod_name = f"_r4b_tools_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[mod_name] = module
                try:
                    loader.loader.exec_module(module)
                except Exception as e:  # noqa: BLE001 - a broken tools file is a bad argument, not a crash
                    del sys.modules[mod_name]  # not kept half-initialised for the next load
                    raise ValueError(f"tools: {where} failed to load: {type(e).__name__}: {e}") from None
        else:
            try:
                module = importlib.import_module(where)
            except Exception as e:  # noqa: BLE001 - ImportError, or the module failing as it runs
                raise ValueError(f"tools: cannot import {where!r}: {type(e).__name__}: {e}") from None
        tools: list = []
        for n in (x.strip() for x in names.split(",")):
            if not hasattr(module, n):
                raise ValueError(f"tools: {where} has no {n!r}")
            obj = getattr(module, n)
            tools.extend(obj if isinstance(obj, (list, tuple)) and not callable(obj) else [obj])
        return cls(tools, **kwargs)

    @staticmethod
    def source_digest(spec: str) -> str | None:
        """sha256 of the source file a :meth:`load` spec names (a resume key's record of the tools' code), or None
        when it has none (a built-in or namespace module)."""
        where = spec.rpartition(":")[0]
        path: str | None = where if where.endswith(".py") else None
        if path is None:
            try:
                found = importlib.util.find_spec(where)
            except (ImportError, ValueError):
                found = None
            path = found.origin if found is not None and found.has_location else None
        if path is None or not Path(path).is_file():
            return None
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    @property
    def names(self) -> list[str]:
        return list(self.functions)

    def _text(self, value: Any) -> str:
        """The result's text (a str as it is, else JSON, else str()), cut to max_result_chars; raises when the
        value has no text (run in the call's thread, where that is the call's error)."""
        if isinstance(value, str):
            text = value
        else:
            try:
                text = json.dumps(value, ensure_ascii=False, default=str)
            except (TypeError, ValueError, RecursionError):
                text = str(value)
        if len(text) > self.max_result_chars:
            cut = len(text) - self.max_result_chars
            text = text[: self.max_result_chars] + f"\n... [{cut} more characters cut]"
        return text

    def _split(self, value: Any) -> tuple[str, list]:
        """(text, images) of a tool's return value: images and the rest (as text). An image-shaped array that is
        not uint8 (e.g. floats in [0, 1]) raises (the call's error) rather than reach the model as numbers."""
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if _image_shaped(v) and "float" in str(v.dtype):  # (integers of that shape stay numbers)
                raise TypeError(f"an image must be uint8 (0-255), got a {type(v).__name__} of {v.dtype} "
                                f"{tuple(v.shape)}")
        if not any(_is_image(v) for v in items):
            return self._text(value), []
        rest = [v if isinstance(v, str) else self._text(v) for v in items if not _is_image(v)]
        return self._text("\n".join(rest)), [_as_image(v) for v in items if _is_image(v)]

    def _check(self, call: ToolCall) -> str | None:
        if call.name not in self.functions:
            return f"no tool named {call.name!r} (the tools are {self.names})"
        return _fits(call.arguments, self._params[call.name], "arguments")

    def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Execute the calls (at most ``max_workers`` at once, each within ``timeout``); one result per call, in
        order. Never raises for a failing call (only a KeyboardInterrupt in a tool propagates)."""
        results: list[ToolResult | None] = [None] * len(calls)

        def failed(k: int, why: str, seconds: float = 0.0) -> None:
            results[k] = ToolResult(calls[k].name, calls[k].arguments, f"Error: {why}", why, seconds)

        for lo in range(0, len(calls), self.max_workers):
            self._stuck = [t for t in self._stuck if t.is_alive()]
            threads = []
            for k in range(lo, min(lo + self.max_workers, len(calls))):
                call = calls[k]
                why = self._check(call)
                if why is not None:
                    failed(k, why)
                elif len(self._stuck) >= self.max_workers:
                    failed(k, f"{len(self._stuck)} earlier tool calls are still running past their timeout; "
                              f"no new call runs until they finish")
                else:
                    box = {"t0": time.perf_counter()}
                    th = threading.Thread(target=self._invoke, args=(call, box), daemon=True,
                                          name=f"r4b-tool-{call.name}")
                    th.start()
                    threads.append((k, th, box))
            deadline = time.perf_counter() + self.timeout
            for k, th, box in threads:
                th.join(max(0.0, deadline - time.perf_counter()))
                name = calls[k].name
                if th.is_alive():
                    self._stuck.append(th)
                    failed(k, f"{name} timed out after {self.timeout:g} s", time.perf_counter() - box["t0"])
                elif "raised" in box:
                    exc = box["raised"]
                    if isinstance(exc, KeyboardInterrupt):
                        raise exc
                    try:
                        said = str(exc)
                    except Exception:  # noqa: BLE001 - an exception that cannot say what it is
                        said = "(its message could not be read)"
                    failed(k, f"{name} raised {type(exc).__name__}: {said}", box["seconds"])
                else:
                    results[k] = ToolResult(name, calls[k].arguments, box["text"], None, box["seconds"],
                                            box["images"])
        for r in results:
            if r is not None and r.error is not None:
                log.warning("tool call failed (the model reads the error): %s", r.error)
        return results  # type: ignore[return-value]

    def _invoke(self, call: ToolCall, box: dict) -> None:
        try:
            args = _ints(call.arguments, self._params[call.name])
            box["text"], box["images"] = self._split(self.functions[call.name](**args))
        except BaseException as e:  # noqa: BLE001 - reported as the call's result (SystemExit included)
            box["raised"] = e
        box["seconds"] = time.perf_counter() - box["t0"]


# ---------------------------------------------------------------------------------------------------- the loop
@dataclass
class Turn:
    """One assistant turn of a conversation. ``start``: where its mode suffix starts in the conversation's
    token_ids; ``gen_start``: its first generated token there; ``calls`` / ``results``: the calls executed after
    it and their results (one per call; or no call and one error result for a ``<tool_call>`` block that is no
    call). Empty for the last turn, except when its results ran but did not fit max_model_len (stop_reason
    "length"): then the model never read them."""

    start: int
    gen_start: int
    output: CompletionOutput
    calls: list[ToolCall] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)


@dataclass
class Trajectory:
    """One conversation: the prompt, then per turn the mode suffix and the generated tokens, with the tool turn
    between turns. ``stop_reason``: "answer" (the last turn made no call), "max_turns" (it made calls when the
    turns ran out), "length" (a turn hit max_tokens, or the next turn would not fit max_model_len), "no_end" (a
    turn made calls but did not end with ``<|im_end|>``, e.g. a stop string), "error" (the engine refused the
    next turn, e.g. for want of KV cache; ``error`` says why)."""

    prompt_index: int
    index: int  # within its prompt: mode-major, then sample (as CompletionOutput.index)
    mode: str | None  # the mode every turn was forced in ("long" / "short" / "auto")
    token_ids: list[int]
    prompt_len: int
    turns: list[Turn]
    stop_reason: str = "answer"
    error: str | None = None
    # the images its tokens show, in order: the prompt's, then those of the tool results it read
    pixel_values: list[Tensor] = field(default_factory=list, repr=False)
    image_sizes: list[tuple[int, int]] = field(default_factory=list, repr=False)

    @property
    def final(self) -> CompletionOutput:
        """The last turn's output (its ``answer`` is the conversation's answer)."""
        return self.turns[-1].output

    @property
    def answer(self) -> str:
        return self.final.answer

    @property
    def num_tool_calls(self) -> int:
        return sum(len(t.calls) for t in self.turns)

    @property
    def tool_errors(self) -> int:
        return sum(r.error is not None for t in self.turns for r in t.results)

    @property
    def generated_tokens(self) -> int:
        return sum(len(t.output.token_ids) for t in self.turns)

    def messages(self, images: bool = True) -> list[dict]:
        """The turns as chat messages after the prompt (OpenAI's form: assistant messages with
        ``reasoning_content`` and ``tool_calls``, then ``tool`` messages), for logs and for going on as a chat:
        what the model read (results that did not fit are left out). A result with images is a tool message of
        image parts, then its text; ``images=False`` (JSON logs) gives each image part its size instead of the
        image."""
        out: list[dict] = []
        for i, t in enumerate(self.turns):
            content, calls, _ = parse_tool_calls(t.output.answer)
            msg: dict = {"role": "assistant", "content": content if calls else t.output.answer}
            if t.output.thinking:
                msg["reasoning_content"] = t.output.thinking
            if calls:
                msg["tool_calls"] = [{"type": "function", "function": {"name": c.name,
                                                                        "arguments": c.arguments_json()}}
                                     for c in calls]
            out.append(msg)
            if i + 1 < len(self.turns):
                for r in t.results:
                    content: Any = r.content
                    if r.images:
                        parts = [{"type": "image", "image": img} if images else
                                 {"type": "image", "size": list(size)}
                                 for img, size in zip(r.images, r.image_sizes or [()] * len(r.images), strict=True)]
                        content = [*parts, {"type": "text", "text": r.content}]
                    out.append({"role": "tool", "name": r.name, "content": content})
        return out


@dataclass
class AgentOutput:
    """A prompt's conversations (``error``: why the prompt did not run; then there are none)."""

    prompt_index: int
    prompt_token_ids: list[int]
    trajectories: list[Trajectory] = field(default_factory=list)
    error: str | None = None
    pixel_values: list[Tensor] = field(default_factory=list, repr=False)
    image_sizes: list[tuple[int, int]] = field(default_factory=list, repr=False)


def takes_trajectory(reward: Callable) -> bool:
    """Whether a reward function takes the whole conversation: a ``trajectory`` parameter (or ``**kwargs``)."""
    try:
        params = inspect.signature(reward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "trajectory" and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD for p in params)


def score(reward: Callable, trajectory: Trajectory, reference: Any) -> tuple[float, str | None]:
    """``safe_reward`` of the conversation's last answer; a reward with a ``trajectory`` parameter also gets the
    conversation (its turns, calls and results: e.g. to charge for tool calls or failed ones)."""
    from .rewards import safe_reward

    if takes_trajectory(reward):
        return safe_reward(lambda answer, ref: reward(answer, ref, trajectory=trajectory), trajectory.answer,
                           reference)
    return safe_reward(reward, trajectory.answer, reference)


def turn_calls(out: CompletionOutput, end_of_turn: int) -> tuple[str, list[ToolCall], bool, bool]:
    """What a turn asks for: (its answer without the call blocks, its calls, whether its only ``<tool_call>``
    block is no call, whether it ended with its end of turn, the condition for running them: finished "stop" on
    ``end_of_turn``, not cut by a stop string or max_tokens)."""
    content, calls, _ = parse_tool_calls(out.answer)
    malformed = not calls and TOOL_CALL in content
    ended = out.finish_reason == "stop" and bool(out.token_ids) and out.token_ids[-1] == end_of_turn
    return content, calls, malformed, ended


def tool_config_error(tools: Any, tool_timeout: Any) -> tuple[str, str] | None:
    """(field, what it must be) of the first bad tool setting of a trainer's or evaluation's config, or None."""
    if tools is not None and (not isinstance(tools, str) or ":" not in tools):
        return "tools", "None or 'package.module:function[,function...]' / 'path/tools.py:function'"
    if isinstance(tool_timeout, bool) or not isinstance(tool_timeout, (int, float)) or not tool_timeout > 0:
        return "tool_timeout", "a number of seconds > 0"
    return None


def converse(llm: LLM, prompts: Sequence[Any], params: SamplingParams | Sequence[SamplingParams], *,
             toolbox: Toolbox | None = None, thinking_mode: str | Sequence[str] = "auto", max_turns: int = 4,
             max_thinking_tokens: int | None = None) -> list[AgentOutput]:
    """Every prompt's completions as conversations: with ``toolbox``, :func:`run_tool_loop`'s; without, one turn
    each (:func:`single_turn` of ``llm.generate``). The one entry of BPO rollouts, the probe and eval."""
    if toolbox is not None:
        return run_tool_loop(llm, prompts, toolbox, params, thinking_mode=thinking_mode, max_turns=max_turns,
                             max_thinking_tokens=max_thinking_tokens)
    outs = llm.generate(list(prompts), params, thinking_mode=thinking_mode, max_thinking_tokens=max_thinking_tokens,
                        use_tqdm=False)
    return [single_turn(llm, q, out) for q, out in enumerate(outs)]


def single_turn(llm: LLM, q: int, out: RequestOutput) -> AgentOutput:
    """A RequestOutput of chat prompt ``q`` as conversations of one turn each (what a rollout without tools
    packs): the prompt, the completion's mode suffix, its tokens."""
    res = AgentOutput(q, out.prompt_token_ids, error=out.error, pixel_values=out.pixel_values,
                      image_sizes=out.image_sizes)
    start = len(out.prompt_token_ids)
    for c in out.outputs:
        suffix = llm.mode_suffix_ids(c.thinking_mode)
        res.trajectories.append(Trajectory(q, c.index, c.thinking_mode, out.prompt_token_ids + suffix + c.token_ids,
                                           start, [Turn(start, start + len(suffix), c)],
                                           pixel_values=list(out.pixel_values), image_sizes=list(out.image_sizes)))
    return res


def prepare_images(tok: Any, result: ToolResult) -> int:
    """Preprocess a result's images for the model (``pixel_values`` / ``image_sizes``); the number of ``<image>``
    tokens they take. Images the model cannot take (a text-only model, an image that fails to preprocess) turn
    the result into an error the model reads."""
    if not result.images or result.error is not None:
        return 0
    if tok.image_processor is None or tok.model_config is None or tok.image_id is None:
        why = f"{result.name} returned images, which this model cannot read"
    else:
        try:
            pairs = [tok.image_processor(img) for img in result.images]
        except Exception as e:  # noqa: BLE001 - a bad image is the call's error, not the run's
            why = f"{result.name} returned an image that cannot be read: {type(e).__name__}: {e}"
        else:
            result.pixel_values = [p for p, _ in pairs]
            result.image_sizes = [tuple(z) for _, z in pairs]
            return sum(num_image_tokens(h, w, tok.model_config) for h, w in result.image_sizes)
    log.warning("tool call failed (the model reads the error): %s", why)
    result.content, result.error, result.images = f"Error: {why}", why, []
    return 0


def turn_seed(seed: int | None, index: int, turn: int) -> int | None:
    """The seed of completion ``index``'s turn ``turn + 1`` (turn 1 draws from the request's own seed): from the
    request's seed, not from where the prompt sits in a call, so a prompt with its own seed (as r4b eval gives
    each) samples the same conversations in any batch, process or resumed run."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}:{turn}".encode()).digest()[:8], "little") & (2**62 - 1)


def run_tool_loop(
    llm: LLM,
    prompts: Sequence[Any],
    toolbox: Toolbox,
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    thinking_mode: str | Sequence[str] = "auto",
    max_turns: int = 4,
    max_thinking_tokens: int | None = None,
    use_tqdm: bool = False,
) -> list[AgentOutput]:
    """Roll out every prompt (a str or a chat, offered ``toolbox``'s tools) ``params.n`` times in each thinking
    mode, each completion a conversation of at most ``max_turns`` assistant turns: a turn that makes tool calls
    (and ends its turn) gets their results and the next turn. All conversations advance together: a turn of every
    one that goes on is one engine call. params: one SamplingParams, or one per prompt; ``max_tokens`` and
    ``max_thinking_tokens`` hold per turn; a seeded prompt's later turns draw from seeds derived from (its seed,
    completion, turn) (:func:`turn_seed`). A turn whose only ``<tool_call>`` block is no call gets an error result
    that shows the format (``MALFORMED``) and goes on."""
    if not isinstance(toolbox, Toolbox):
        raise ValueError(f"toolbox must be a Toolbox, got {type(toolbox).__name__}")
    if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
        raise ValueError(f"max_turns must be an int >= 1, got {max_turns!r}")
    if llm.tokenizer is None:
        raise ValueError("run_tool_loop needs the LLM's tokenizer (chat template, tool turns, answers)")
    modes = (thinking_mode,) if isinstance(thinking_mode, str) else tuple(thinking_mode)
    for m in modes:
        check_mode(m)
    prompts = list(prompts)
    params = params if params is not None else SamplingParams()
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts) or not all(isinstance(p, SamplingParams) for p in plist):
        raise ValueError(f"params must be a SamplingParams or one per prompt ({len(prompts)}), got {params!r:.80}")
    if any(p.prompt_logprobs is not None for p in plist):
        raise ValueError("run_tool_loop: SamplingParams.prompt_logprobs is not supported (later turns' prompts "
                         "are the conversation so far)")
    tok = llm.tokenizer
    outs = llm.generate(prompts, plist, thinking_mode=modes, max_thinking_tokens=max_thinking_tokens,
                        tools=toolbox.schemas, use_tqdm=use_tqdm)
    results = [single_turn(llm, q, out) for q, out in enumerate(outs)]
    live = [t for res in results for t in res.trajectories]
    for turn in range(1, max_turns + 1):
        going: list[Trajectory] = []
        for traj in live:
            out = traj.final
            _, calls, malformed, ended = turn_calls(out, tok.im_end_id)
            if not calls and not malformed:
                traj.stop_reason = "length" if out.finish_reason == "length" else "answer"
            elif out.finish_reason == "length":
                traj.stop_reason = "length"
            elif not ended:
                traj.stop_reason = "no_end"
            elif turn == max_turns:
                traj.stop_reason = "max_turns"
            elif len(traj.token_ids) + len(tok.encode_tool_turn([""] * max(1, len(calls)), traj.mode)) \
                    >= llm.max_model_len:  # not even empty results would leave room for a token
                traj.stop_reason = "length"
            else:
                traj.turns[-1].calls = calls
                going.append(traj)
        if not going:
            break
        ran = iter(toolbox.run([c for traj in going for c in traj.turns[-1].calls]))
        requests, turn_params, nxt = [], [], []
        for traj in going:
            last = traj.turns[-1]
            last.results = [next(ran) for _ in last.calls] or [ToolResult("", {}, f"Error: {MALFORMED}", MALFORMED)]
            counts = [prepare_images(tok, r) for r in last.results]
            head = tok.encode_tool_turn([r.content for r in last.results], image_tokens=counts)
            start = len(traj.token_ids) + len(head)
            ids = traj.token_ids + head + llm.mode_suffix_ids(traj.mode)
            if len(ids) >= llm.max_model_len:  # the results ran but do not fit: the model never reads them
                traj.stop_reason = "length"
                continue
            pix = traj.pixel_values + [p for r in last.results for p in r.pixel_values]
            sizes = traj.image_sizes + [z for r in last.results for z in r.image_sizes]
            requests.append({"prompt_token_ids": ids, "pixel_values": pix, "image_sizes": sizes})
            p = plist[traj.prompt_index]
            turn_params.append(replace(p, n=1, seed=turn_seed(p.seed, traj.index, turn)))
            nxt.append((traj, ids, start, pix, sizes))
        if not requests:
            break
        outs = llm.generate(requests, turn_params, max_thinking_tokens=max_thinking_tokens, use_tqdm=False)
        live = []
        for (traj, ids, start, pix, sizes), out in zip(nxt, outs, strict=True):
            if out.error is not None:
                traj.stop_reason, traj.error = "error", out.error
                log.warning("prompt %d conversation %d: turn %d refused: %s", traj.prompt_index, traj.index,
                            turn + 1, out.error)
                continue
            c = out.outputs[0]
            c = replace(c, index=traj.index, thinking_mode=traj.mode, tool_calls=parse_tool_calls(c.answer)[1])
            traj.token_ids = ids + c.token_ids
            traj.pixel_values, traj.image_sizes = pix, sizes
            traj.turns.append(Turn(start, len(ids), c))
            live.append(traj)
    return results
