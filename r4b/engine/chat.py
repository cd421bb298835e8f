"""Tokenizer wrapper, Qwen chat template with R-4B's three thinking modes, and response parsing.

Prompt format (Qwen): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then for generation
``<|im_start|>assistant\\n`` plus the mode suffix:
  auto  -> ``<think>``                      (the model decides: ``\\n\\n</think>`` at once, or a thought)
  long  -> ``<think>\\n``                    (thinking: the model reasons, closes ``</think>``, answers)
  short -> ``<think>\\n\\n</think>\\n\\n``      (non-thinking: an empty thought, then the answer)
The names follow R-4B's ``thinking_mode`` switch. Image content parts render as ``<image>``, expanded to one
token per image feature when the chat knows the model config.

Assistant turns in the history follow Qwen3's published chat template: a turn before the last user message keeps
only its answer (the text after its last ``</think>``, leading newlines dropped); a turn after it is written
``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` when it has a thought (from ``reasoning_content`` or a
``<think>`` block in its content) or is the last message, else as its plain content.

Tools (function calling) follow the same template: ``tools`` (OpenAI's list of ``{"type": "function", "function":
{...}}``) go into the first system turn as a ``# Tools`` block (after the system message, when the chat starts with
one), each tool one JSON line inside ``<tools></tools>``; an assistant turn's ``tool_calls`` follow its content as
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` blocks; consecutive ``tool`` messages (the
results) form one user turn of ``<tool_response>`` blocks. :func:`parse_tool_calls` reads the calls back out of
a generated answer.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer
from torch import Tensor

from .model.config import R4BConfig
from .model.image import ImageProcessor, num_image_tokens

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK, END_THINK, IMAGE = "<think>", "</think>", "<image>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END, THINK, END_THINK, IMAGE)  # the demo tokenizer's
REQUIRED_TOKENS = (IM_START, IM_END, THINK, END_THINK)  # <|endoftext|> and <image> are optional
MODE_SUFFIX = {"auto": THINK, "long": THINK + "\n", "short": THINK + "\n\n" + END_THINK + "\n\n"}
ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer.json"


def check_mode(thinking_mode: str) -> None:
    if thinking_mode not in MODE_SUFFIX:
        raise ValueError(f"thinking_mode must be one of {tuple(MODE_SUFFIX)}, got {thinking_mode!r}")


class ParsedResponse(NamedTuple):
    thinking: str  # the thought ("" when the model answered directly)
    answer: str  # the text after </think> ("" when the output stopped inside the thought)
    mode: str  # "think" (a non-empty or unfinished thought) or "no_think"


@dataclass
class ChatEncoding:
    input_ids: Tensor  # (T,) int64
    pixel_values: list[Tensor] = field(default_factory=list)  # per image (1 + tiles, 3, S, S)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # per image (height, width)


@dataclass
class ToolCall:
    """One function call the model made: its name and its arguments (a JSON object)."""

    name: str
    arguments: dict

    def arguments_json(self) -> str:
        """The arguments as a JSON string (OpenAI's ``function.arguments``)."""
        return json.dumps(self.arguments, ensure_ascii=False)


def _tojson(x: Any) -> str:
    """JSON as the chat template writes it (transformers' ``tojson``: no ASCII escaping, default separators)."""
    return json.dumps(x, ensure_ascii=False)


def check_tools(tools: Any) -> list[dict] | None:
    """``tools`` checked: None / empty, or a list of JSON objects (each a tool's schema, written as given); raises
    ValueError naming the bad entry."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of tool schemas (JSON objects), got {type(tools).__name__}")
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ValueError(f"tools[{i}] must be a JSON object (a tool's schema), got {type(t).__name__}")
        try:
            _tojson(t)
        except (TypeError, ValueError) as e:
            raise ValueError(f"tools[{i}] is not JSON-serialisable: {e}") from None
    return list(tools) or None


def _render_tool_call(call: Any, where: str) -> str:
    """One history tool call (OpenAI's ``{"type": "function", "function": {"name", "arguments"}}``, or the
    function object itself) as its ``<tool_call>`` block; string arguments are written as given."""
    if isinstance(call, ToolCall):
        call = {"name": call.name, "arguments": call.arguments}
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(call).__name__}")
    fn = call.get("function") or call
    name, args = fn.get("name") if isinstance(fn, dict) else None, fn.get("arguments") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tool call needs a function name, got {call!r:.80}")
    if not isinstance(args, str):
        try:
            args = _tojson(args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.arguments is not JSON-serialisable: {e}") from None
    return f'{TOOL_CALL}\n{{"name": "{name}", "arguments": {args}}}\n{END_TOOL_CALL}'


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    x = float(text)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of a float's range")  # it would be written back as Infinity
    return x


def tool_call_of(body: str) -> ToolCall | None:
    """The call a ``<tool_call>`` block's body holds (``{"name": str, "arguments": {...}}``; arguments given as a
    JSON string of an object are read too), or None when it is not one."""
    try:  # NaN / Infinity are not JSON: their arguments could not be written back as JSON
        obj = json.loads(body, parse_constant=_not_json, parse_float=_finite)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args, parse_constant=_not_json, parse_float=_finite)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args)


def partial_tag(text: str, tag: str, start: int = 0) -> int:
    """How many characters at the end of ``text[start:]`` may be the start of ``tag`` (the longest proper prefix of
    the tag the text ends with; 0 when none): what a stream holds back until the next text decides it."""
    for k in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _block_end(answer: str, body: int) -> tuple[ToolCall | None, int]:
    """The call of the block whose body starts at ``body`` and the index after its ``</tool_call>``: the first
    closing tag that makes the body a call (a call's string may hold the tag itself); (None, -1) when none does."""
    end = answer.find(END_TOOL_CALL, body)
    while end >= 0:
        call = tool_call_of(answer[body:end])
        if call is not None:
            return call, end + len(END_TOOL_CALL)
        end = answer.find(END_TOOL_CALL, end + 1)
    return None, -1


def parse_tool_calls(answer: str, *, final: bool = True) -> tuple[str, list[ToolCall], int]:
    """The tool calls in a generated answer (the text after the thought): (content, calls, held).

    Every ``<tool_call>{json}</tool_call>`` block whose body is a call (a JSON object with a string ``name`` and an
    object ``arguments``) becomes a ToolCall, in order, and is cut out of the content; the block ends at the first
    ``</tool_call>`` that makes its body a call (an argument may hold the tag as text). A block that never closed
    (the model ended its turn without ``</tool_call>``) counts when its body is a whole call. A block that is not a
    call stays in the content as written, up to its first ``</tool_call>``. content: what is left, stripped.

    final=False (a stream's text so far): a block that is not a call yet, or an ending that may grow into
    ``<tool_call>``, is not decided: it is left out of the content and ``held`` is its length (0 when final).
    """
    pieces, calls, pos, held = [], [], 0, 0
    while True:
        start = answer.find(TOOL_CALL, pos)
        if start < 0:
            held = 0 if final else partial_tag(answer, TOOL_CALL, pos)
            pieces.append(answer[pos:len(answer) - held])
            break
        body = start + len(TOOL_CALL)
        call, after = _block_end(answer, body)
        if call is None and final:
            call, after = tool_call_of(answer[body:]), len(answer)  # never closed: a whole call counts
        if call is not None:
            pieces.append(answer[pos:start])
            calls.append(call)
            pos = after
            continue
        if not final:  # a later </tool_call> may still make it a call
            pieces.append(answer[pos:start])
            held = len(answer) - start
            break
        first = answer.find(END_TOOL_CALL, body)
        if first < 0:  # not a call, never closed: text to the end
            pieces.append(answer[pos:])
            break
        pieces.append(answer[pos:first + len(END_TOOL_CALL)])
        pos = first + len(END_TOOL_CALL)
    content = "".join(pieces)
    return (content.strip() if final else content.lstrip()), calls, held


def tool_turn(results: list[str], thinking_mode: str | None = None, image_tokens: list[int] | None = None) -> str:
    """The text that follows an assistant turn's ``<|im_end|>`` when tool results answer it, as the chat template
    renders it: the user turn of ``<tool_response>`` blocks (one per result, in order), then the next assistant
    turn's header and, with ``thinking_mode``, its mode suffix. Appended to the generated tokens, it continues a
    conversation token for token (r4b.engine.agent). image_tokens: per result, the ``<image>`` tokens of its images
    (a tool message whose content is its image parts, then its text)."""
    if not results:
        raise ValueError("tool_turn needs at least one result")
    if thinking_mode is not None:
        check_mode(thinking_mode)
    counts = image_tokens or [0] * len(results)
    if len(counts) != len(results):
        raise ValueError(f"image_tokens must hold one count per result ({len(results)}), got {len(counts)}")
    blocks = "".join(f"\n{TOOL_RESPONSE}\n{IMAGE * n}{r}\n{END_TOOL_RESPONSE}"
                     for r, n in zip(results, counts, strict=True))
    return f"\n{IM_START}user{blocks}{IM_END}\n{IM_START}assistant\n" + MODE_SUFFIX.get(thinking_mode, "")


def _split_thought(content: str) -> tuple[str, str]:
    """Qwen3's template split of an assistant message holding ``</think>``: (reasoning, answer).

    reasoning: the text before the first ``</think>``, after the last ``<think>`` before it, newlines stripped
    at both ends; answer: the text after the last ``</think>``, leading newlines stripped.
    """
    reasoning = content.split(END_THINK)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
    return reasoning, content.split(END_THINK)[-1].lstrip("\n")


def _is_query(role: str, text: str) -> bool:
    """A user message that is not a tool response (Qwen3's rule for the last query)."""
    return role == "user" and not (text.startswith("<tool_response>") and text.endswith("</tool_response>"))


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes, inverted: the printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    stand for themselves, every other byte for the character 256 + its rank among those others."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(others)}}


class ChatTokenizer:
    """A ``tokenizers`` tokenizer.json with the chat special tokens, plus the chat template.

    The tokenizer must know ``<|im_start|>``, ``<|im_end|>``, ``<think>`` and ``</think>`` (special or plain
    added tokens, as in Qwen3's). ``<image>`` is needed only to render image parts or with ``model_config``.
    ``model_config`` (an R4BConfig) lets image parts expand to the model's exact number of image tokens;
    ``image_processor`` defaults to one built from it.
    """

    def __init__(self, tokenizer: Tokenizer | str | Path, *, model_config: R4BConfig | None = None,
                 image_processor: ImageProcessor | None = None) -> None:
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(str(tokenizer))
        ids = {t: self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t in REQUIRED_TOKENS if ids[t] is None]
        if missing:
            raise ValueError(f"tokenizer lacks the chat tokens {missing}")
        self.im_start_id, self.im_end_id = ids[IM_START], ids[IM_END]
        self.think_id, self.end_think_id, self.image_id = ids[THINK], ids[END_THINK], ids[IMAGE]
        self.eos_ids = [i for i in (ids[IM_END], ids[EOT]) if i is not None]
        self.model_config = model_config
        self._plain: Tokenizer | None = None  # the tokenizer without its added tokens (encode_plain)
        if image_processor is None and model_config is not None:
            image_processor = ImageProcessor.from_config(model_config)
        self.image_processor = image_processor
        if model_config is not None and self.image_id is None:
            raise ValueError(f"the tokenizer has no {IMAGE} token, which the model config needs "
                             f"(image_token_index {model_config.image_token_index})")
        if model_config is not None and model_config.image_token_index != self.image_id:
            raise ValueError(f"the model's image_token_index ({model_config.image_token_index}) is not the "
                             f"tokenizer's {IMAGE} id ({self.image_id})")

    @classmethod
    def demo(cls, **kwargs: Any) -> ChatTokenizer:
        """The small byte-level BPE tokenizer shipped in r4b/assets (tests and the demo)."""
        return cls(DEMO_TOKENIZER, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: a chat token's spelling in it (``<|im_end|>``, ``<image>``,
        ``<tool_call>``, ...) is encoded as its characters, not as the control token. Text without such
        spellings gets :meth:`encode`'s ids."""
        if self._plain is None:
            spec = json.loads(self.tokenizer.to_str())
            spec["added_tokens"] = []
            self._plain = Tokenizer.from_str(json.dumps(spec))
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_tool_turn(self, results: list[str], thinking_mode: str | None = None,
                         image_tokens: list[int] | None = None) -> list[int]:
        """Token ids of :func:`tool_turn`: the template's tokens, except that the results' text is encoded as
        plain text (:meth:`encode_plain`), so a tool's output cannot end the turn, open a thought or claim an
        image (its text sits between two chat tokens, so its ids are the template's whenever it spells none).
        image_tokens: per result, how many ``<image>`` tokens its images take (before its text)."""
        counts = image_tokens or [0] * len(results)
        if not all(isinstance(n, int) and n >= 0 for n in counts):
            raise ValueError(f"image_tokens must be ints >= 0, got {counts!r:.80}")
        if any(counts) and self.image_id is None:
            raise ValueError(f"tool results with images need a tokenizer with the {IMAGE} token")
        text = tool_turn(results, thinking_mode, counts)
        head = f"\n{TOOL_RESPONSE}\n"
        ids, pos = [], 0
        for r, n in zip(results, counts, strict=True):  # the structure through encode, the text through encode_plain
            start = text.index(head, pos) + len(TOOL_RESPONSE) + 1  # at the "\n" before the result
            ids += self.encode(text[pos:start])
            if n:
                ids += self.encode("\n") + [self.image_id] * n
                start += 1 + n * len(IMAGE)
                end = start + len(r) + 1  # result + "\n"
            else:
                end = start + 1 + len(r) + 1  # "\n" + result + "\n"
            ids += self.encode_plain(text[start:end])
            pos = end
        return ids + self.encode(text[pos:])

    def decode(self, ids: list[int] | Tensor, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. A byte-level BPE token may hold part of a UTF-8 character, which decodes
        to U+FFFD alone: its bytes then come from its byte-level spelling (GPT-2's byte-to-character table)."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.tokenizer.id_to_token(token_id)
        table = _byte_of_char()
        if piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return text.encode("utf-8")

    def _image_tokens(self, image: Any) -> int:
        if image is None or self.model_config is None:
            return 1
        h, w = self.image_processor.image_size(image)
        return num_image_tokens(h, w, self.model_config)

    def _render_content(self, content: Any, where: str, images: list) -> str:
        if content is None:  # an assistant turn of tool calls only (OpenAI sends content null)
            return ""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise TypeError(f"{where}.content must be a str or a list of parts, got {type(content).__name__}")
        out = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out.append(part["text"])
            elif kind == "image":
                if self.image_id is None:
                    raise ValueError(f"{where}.content[{j}] is an image, but the tokenizer has no {IMAGE} token")
                img = part.get("image")
                images.append(img)
                out.append(IMAGE * self._image_tokens(img))
            else:
                raise ValueError(f"{where}.content[{j}] must be {{'type': 'text'|'image', ...}}, got {part!r}")
        return "".join(out)

    def _render(self, messages: list[dict], thinking_mode: str, add_generation_prompt: bool,
                tools: list[dict] | None = None) -> tuple[str, list, list[tuple[int, int, int]]]:
        """(text, images, spans): spans holds (message index, start, end) character offsets of each assistant
        turn's content, from after ``<|im_start|>assistant\\n`` to after its ``<|im_end|>``."""
        check_mode(thinking_mode)
        tools = check_tools(tools)
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        turns, images = [], []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
            turns.append((role, self._render_content(m.get("content", ""), f"messages[{i}]", images)))
        # Qwen3: thoughts are kept only in assistant turns after the last user query
        last_query = next((i for i in reversed(range(len(turns))) if _is_query(*turns[i])), len(turns) - 1)
        parts, spans, pos = [], [], 0

        def add(piece: str) -> None:
            nonlocal pos
            parts.append(piece)
            pos += len(piece)

        if tools:
            system = turns[0][1] + "\n\n" if turns[0][0] == "system" else ""
            add(f"{IM_START}system\n{system}{TOOLS_HEADER}" + "".join("\n" + _tojson(t) for t in tools)
                + f"{TOOLS_FOOTER}{IM_END}\n")
        for i, (role, text) in enumerate(turns):
            if tools and i == 0 and role == "system":
                continue  # in the tools block
            if role == "tool":  # consecutive results: one user turn of <tool_response> blocks
                first, last = i == 0 or turns[i - 1][0] != "tool", i == len(turns) - 1 or turns[i + 1][0] != "tool"
                add((f"{IM_START}user" if first else "") + f"\n{TOOL_RESPONSE}\n{text}\n{END_TOOL_RESPONSE}"
                    + (f"{IM_END}\n" if last else ""))
                continue
            if role == "assistant":
                reasoning = messages[i].get("reasoning_content")
                if not isinstance(reasoning, str):
                    reasoning = ""
                    if END_THINK in text:
                        reasoning, text = _split_thought(text)
                answer = text
                if i > last_query and (i == len(turns) - 1 or reasoning):
                    text = THINK + "\n" + reasoning.strip("\n") + "\n" + END_THINK + "\n\n" + text.lstrip("\n")
                calls = messages[i].get("tool_calls") or []
                if not isinstance(calls, (list, tuple)):
                    raise ValueError(f"messages[{i}].tool_calls must be a list, got {type(calls).__name__}")
                for k, call in enumerate(calls):
                    sep = "\n" if k > 0 or answer else ""
                    text += sep + _render_tool_call(call, f"messages[{i}].tool_calls[{k}]")
            head, piece = f"{IM_START}{role}\n", f"{IM_START}{role}\n{text}{IM_END}\n"
            if role == "assistant":
                spans.append((i, pos + len(head), pos + len(piece) - 1))
            add(piece)
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n{MODE_SUFFIX[thinking_mode]}")
        return "".join(parts), images, spans

    def apply_chat_template(self, messages: list[dict], thinking_mode: str = "auto",
                            add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt string (see the module docstring); image parts become their ``<image>`` tokens; ``tools``:
        the functions the model may call (OpenAI's tool schemas)."""
        return self._render(messages, thinking_mode, add_generation_prompt, tools)[0]

    def encode_chat(self, messages: list[dict], thinking_mode: str = "auto",
                    add_generation_prompt: bool = True, tools: list[dict] | None = None) -> ChatEncoding:
        """Token ids of the prompt, with the preprocessed images (in order) when there are any."""
        text, images, _ = self._render(messages, thinking_mode, add_generation_prompt, tools)
        return self._with_images(ChatEncoding(torch.tensor(self.encode(text), dtype=torch.int64)), images,
                                 "encode_chat")

    def _with_images(self, enc: ChatEncoding, images: list, caller: str) -> ChatEncoding:
        """``enc`` with its images preprocessed (in order)."""
        for k, img in enumerate(images):
            if img is None or self.image_processor is None:
                raise ValueError(f"image {k}: {caller} needs the image object and a model_config "
                                 "(to preprocess it and count its tokens)")
            pix, size = self.image_processor(img)
            enc.pixel_values.append(pix)
            enc.image_sizes.append(size)
        return enc

    def encode_chat_for_training(self, messages: list[dict], *, train_on: str = "all", pixels: bool = True,
                                 tools: list[dict] | None = None) -> tuple[ChatEncoding, Tensor]:
        """A whole conversation (ending with an assistant turn) as training tokens: (encoding, labels).

        The text is ``apply_chat_template(messages, add_generation_prompt=False)``, encoded once; labels (L,) bool
        marks the tokens of the trained assistant turns' content, from the first token after
        ``<|im_start|>assistant\\n`` through that turn's ``<|im_end|>`` (a token is in a turn when any of its
        characters is). train_on: "all" (every assistant turn) or "last" (the final one). The last turn has the
        template's ``<think>`` block, so a turn without a thought trains ``<think>\\n\\n</think>\\n\\n{answer}``.
        pixels=False: the images' sizes only (``image_sizes``; ``pixel_values`` empty), for a dataset that
        preprocesses them when a batch needs them. tools: the functions offered (the system turn's tools block);
        an assistant turn's tool calls are part of its trained content, the tool results (user turns) are not.
        """
        if train_on not in ("all", "last"):
            raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
        text, images, spans = self._render(messages, "auto", False, tools)
        last_role = messages[-1].get("role") if isinstance(messages[-1], dict) else None
        if last_role != "assistant":
            raise ValueError(f"messages[-1] must be the assistant turn to train on, got role {last_role!r}")
        if train_on == "last":
            spans = spans[-1:]
        enc_text = self.tokenizer.encode(text, add_special_tokens=False)
        offsets = torch.tensor(enc_text.offsets, dtype=torch.int64).view(-1, 2)  # (L, 2) character [start, end)
        labels = torch.zeros(len(enc_text.ids), dtype=torch.bool)
        for _, a, b in spans:
            labels |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        enc = ChatEncoding(torch.tensor(enc_text.ids, dtype=torch.int64))
        if not pixels:
            for k, img in enumerate(images):
                if img is None or self.image_processor is None:
                    raise ValueError(f"image {k}: encode_chat_for_training needs the image object and a model_config "
                                     "(to count its tokens)")
                enc.image_sizes.append(self.image_processor.image_size(img))
            return enc, labels
        return self._with_images(enc, images, "encode_chat_for_training"), labels


def parse_response(output: str | list[int] | Tensor, *, thinking_mode: str | None = "auto",
                   tokenizer: ChatTokenizer | None = None) -> ParsedResponse:
    """Split a generated completion into (thinking, answer, mode).

    ``output`` is the text (or token ids, with ``tokenizer``) generated after a prompt of ``thinking_mode``;
    ``thinking_mode=None``: the output has no prompt suffix. Everything from the first ``<|im_end|>`` /
    ``<|endoftext|>`` on is dropped. After an ``auto`` / ``long`` prompt the output starts inside the thought
    (a ``<think>`` the output repeats after leading whitespace is skipped); after ``short`` or None it starts
    outside one, and a ``<think>`` it opens starts a thought, the text before it being a preamble that stays
    at the front of the answer (joined to the rest by a blank line). A thought ends at the LAST ``</think>``
    (as Qwen3's template takes the answer), so an earlier ``</think>`` stays in the thinking text. A missing
    ``</think>`` (output cut off while thinking) gives the whole thought and no answer beyond the preamble.
    mode is "think" for a non-empty or unfinished thought, else "no_think".
    """
    if not isinstance(output, str):
        if tokenizer is None:
            raise ValueError("parse_response got token ids: pass tokenizer= to decode them")
        output = tokenizer.decode(output)
    if thinking_mode is not None:
        check_mode(thinking_mode)
    text = output
    for stop in (IM_END, EOT):
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    preamble = ""
    if text.lstrip().startswith(THINK):  # the output (re)opens the thought itself
        text = text.lstrip()[len(THINK):]
    elif thinking_mode not in ("auto", "long"):  # "short" (its thought closed in the prompt) or no suffix
        start = text.find(THINK)
        if start < 0:
            return ParsedResponse("", text.strip(), "no_think")
        preamble, text = text[:start].strip(), text[start + len(THINK):]
    end = text.rfind(END_THINK)
    if end < 0:
        thinking, answer, finished = text.strip(), "", False
    else:
        thinking, answer, finished = text[:end].strip(), text[end + len(END_THINK):].strip(), True
    answer = "\n\n".join(t for t in (preamble, answer) if t)
    return ParsedResponse(thinking, answer, "think" if thinking or not finished else "no_think")
