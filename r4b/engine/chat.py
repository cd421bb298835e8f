"""Tokenizer wrapper, Qwen chat template with R-4B's three thinking modes, and response parsing.

Prompt format (Qwen): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then for generation
``<|im_start|>assistant\\n`` plus the mode suffix:
  auto  -> ``<think>``                      (the model decides: ``\\n\\n</think>`` at once, or a thought)
  long  -> ``<think>\\n``                    (thinking: the model reasons, closes ``</think>``, answers)
  short -> ``<think>\\n\\n</think>\\n\\n``      (non-thinking: an empty thought, then the answer)
The names follow R-4B's ``thinking_mode`` switch. Image content parts render as ``<image>``, expanded to one
token per image feature when the chat knows the model config.
"""

from __future__ import annotations

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
SPECIAL_TOKENS = (EOT, IM_START, IM_END, THINK, END_THINK, IMAGE)
MODE_SUFFIX = {"auto": THINK, "long": THINK + "\n", "short": THINK + "\n\n" + END_THINK + "\n\n"}
ROLES = ("system", "user", "assistant")
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


class ChatTokenizer:
    """A ``tokenizers`` tokenizer.json with the chat special tokens, plus the chat template.

    ``model_config`` (an R4BConfig) lets image parts expand to the model's exact number of image tokens;
    ``image_processor`` defaults to one built from it.
    """

    def __init__(self, tokenizer: Tokenizer | str | Path, *, model_config: R4BConfig | None = None,
                 image_processor: ImageProcessor | None = None) -> None:
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(str(tokenizer))
        ids = {t: self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None and t != EOT]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.im_start_id, self.im_end_id = ids[IM_START], ids[IM_END]
        self.think_id, self.end_think_id, self.image_id = ids[THINK], ids[END_THINK], ids[IMAGE]
        self.eos_ids = [i for i in (ids[IM_END], ids[EOT]) if i is not None]
        self.model_config = model_config
        if image_processor is None and model_config is not None:
            image_processor = ImageProcessor.from_config(model_config)
        self.image_processor = image_processor
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

    def decode(self, ids: list[int] | Tensor, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _image_tokens(self, image: Any) -> int:
        if image is None or self.model_config is None:
            return 1
        h, w = self.image_processor.image_size(image)
        return num_image_tokens(h, w, self.model_config)

    def _render_content(self, content: Any, where: str, images: list) -> str:
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
                img = part.get("image")
                images.append(img)
                out.append(IMAGE * self._image_tokens(img))
            else:
                raise ValueError(f"{where}.content[{j}] must be {{'type': 'text'|'image', ...}}, got {part!r}")
        return "".join(out)

    def _render(self, messages: list[dict], thinking_mode: str, add_generation_prompt: bool) -> tuple[str, list]:
        check_mode(thinking_mode)
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        parts, images = [], []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
            text = self._render_content(m.get("content", ""), f"messages[{i}]", images)
            parts.append(f"{IM_START}{role}\n{text}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n{MODE_SUFFIX[thinking_mode]}")
        return "".join(parts), images

    def apply_chat_template(self, messages: list[dict], thinking_mode: str = "auto",
                            add_generation_prompt: bool = True) -> str:
        """The prompt string (see the module docstring); image parts become their ``<image>`` tokens."""
        return self._render(messages, thinking_mode, add_generation_prompt)[0]

    def encode_chat(self, messages: list[dict], thinking_mode: str = "auto",
                    add_generation_prompt: bool = True) -> ChatEncoding:
        """Token ids of the prompt, with the preprocessed images (in order) when there are any."""
        text, images = self._render(messages, thinking_mode, add_generation_prompt)
        enc = ChatEncoding(torch.tensor(self.encode(text), dtype=torch.int64))
        for k, img in enumerate(images):
            if img is None or self.image_processor is None:
                raise ValueError(f"image {k}: encode_chat needs the image object and a model_config "
                                 "(to preprocess it and count its tokens)")
            pix, size = self.image_processor(img)
            enc.pixel_values.append(pix)
            enc.image_sizes.append(size)
        return enc


def parse_response(output: str | list[int] | Tensor, *, thinking_mode: str | None = "auto",
                   tokenizer: ChatTokenizer | None = None) -> ParsedResponse:
    """Split a generated completion into (thinking, answer, mode).

    ``output`` is the text (or token ids, with ``tokenizer``) generated after a prompt of ``thinking_mode``;
    the mode's suffix is put back in front unless the output already starts with ``<think>``. A missing
    ``</think>`` (output cut off while thinking) gives the whole thought and an empty answer. Trailing
    ``<|im_end|>`` / ``<|endoftext|>`` are dropped. ``thinking_mode=None``: the output has no prompt suffix.
    """
    if not isinstance(output, str):
        if tokenizer is None:
            raise ValueError("parse_response got token ids: pass tokenizer= to decode them")
        output = tokenizer.decode(output)
    if thinking_mode is not None:
        check_mode(thinking_mode)
    text = output.lstrip(" ")
    if not text.startswith(THINK) and thinking_mode is not None:
        text = MODE_SUFFIX[thinking_mode] + text
    for stop in (IM_END, EOT):
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    if not text.startswith(THINK):
        return ParsedResponse("", text.strip(), "no_think")
    body = text[len(THINK):]
    end = body.find(END_THINK)
    if end < 0:
        return ParsedResponse(body.strip(), "", "think")
    thinking, answer = body[:end].strip(), body[end + len(END_THINK):].strip()
    return ParsedResponse(thinking, answer, "think" if thinking else "no_think")
