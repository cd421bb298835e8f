"""``r4b chat``: a multi-turn chat in the terminal, streamed, in any thinking mode.

Each line is a user message; the reply streams as it is generated (the thought between ``<think>`` and
``</think>``, then the answer), followed by a line of what the model did. The history keeps each reply's answer and
thought (the chat template drops thoughts before the last user message, as Qwen3's does). Commands:
``/mode auto|long|short``, ``/budget N|off`` (max thinking tokens), ``/system TEXT``, ``/reset``, ``/help``,
``/exit`` (or end of input).

With a Toolbox (``r4b chat --tools my_tools.py:fn``) the model may call its functions: each call and its result
is shown, the results go back as tool messages and the model goes on, up to ``max_turns`` turns a message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from .agent import MALFORMED, Toolbox, prepare_images, turn_calls, turn_seed
from .chat import MODE_SUFFIX
from .llm import LLM, RequestOutput, StreamEvent
from .sampling import SamplingParams
from .server import ThinkSplitter

HELP = ("commands: /mode auto|long|short  /budget N|off  /system TEXT  /reset  /help  /exit\n"
        "anything else is your message")


class ChatSession:
    """The conversation and its settings; ``send(text, write)`` streams one reply through ``write`` and returns it."""

    def __init__(self, llm: LLM, params: SamplingParams, *, thinking_mode: str = "auto",
                 max_thinking_tokens: int | None = None, system: str | None = None,
                 toolbox: Toolbox | None = None, max_turns: int = 4) -> None:
        if params.n != 1:
            raise ValueError(f"r4b chat streams one reply: SamplingParams.n must be 1, got {params.n}")
        if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
            raise ValueError(f"max_turns must be an int >= 1, got {max_turns!r}")
        self.toolbox, self.max_turns = toolbox, max_turns
        self.llm, self.params = llm, params
        self.mode, self.budget, self.system = thinking_mode, max_thinking_tokens, system
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, line: str) -> str | None:
        """Apply a /command; its reply (None: /exit)."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit"):
            return None
        if name == "mode" and arg in MODE_SUFFIX:
            self.mode = arg
            return f"[thinking mode: {arg}]"
        if name == "budget" and (arg == "off" or arg.isdigit()):
            self.budget = None if arg == "off" else int(arg)
            return f"[thinking budget: {arg}]"
        if name == "system":
            self.system = arg or None
            return f"[system message {'set' if arg else 'cleared'}]"
        if name == "reset":
            self.history.clear()
            return "[history cleared]"
        return HELP

    def send(self, text: str, write: Callable[[str], None]) -> RequestOutput:
        """Stream the reply to one user message (with tools: every turn of it, each call and result shown); the
        last turn's output. An error in the first turn, or Ctrl-C, leaves the history as it was before the message;
        an error in a later turn keeps the turns and the tool results before it (the tools ran).

        With tools, the turns follow r4b.engine.agent's rules: calls run only when the turn ended with its end of
        turn; a ``<tool_call>`` block that is no call gets the format as an error result; a seeded session's later
        turns draw from derived seeds. The history is re-rendered by the chat template at every turn (as the
        server does), so an earlier turn's empty thought is dropped, as Qwen3's template drops it."""
        before = len(self.history)
        self.history.append({"role": "user", "content": text})
        try:
            for turn in range(1, self.max_turns + 1):
                out = self._turn(write, turn)
                if out.error is not None:
                    if turn == 1:
                        del self.history[before:]
                    return out
                c = out.outputs[0]
                content, calls, malformed, ended = turn_calls(c, self.llm.tokenizer.im_end_id) if self.toolbox \
                    else (c.answer, [], False, False)
                msg = {"role": "assistant", "content": c.answer, "reasoning_content": c.thinking}
                self.history.append(msg)
                if not (calls or malformed) or turn == self.max_turns or not ended:
                    if calls or malformed:
                        n = len(calls) or 1
                        write(f"[{n} tool call{'s' if n > 1 else ''} not run: the reply "
                              f"{'reached its turn limit' if turn == self.max_turns else 'did not end its turn'}]\n")
                    return out
                if malformed:  # the block as written stays in the history; the error shows the format
                    write(f"[tool call not understood -> Error: {MALFORMED}]\n")
                    self.history.append({"role": "tool", "content": f"Error: {MALFORMED}"})
                    continue
                msg["content"] = content  # the calls go as tool_calls
                msg["tool_calls"] = [{"type": "function", "function": {"name": k.name, "arguments": k.arguments_json()}}
                                     for k in calls]
                for call, res in zip(calls, self.toolbox.run(calls), strict=True):
                    prepare_images(self.llm.tokenizer, res)  # a model that takes no images reads an error
                    shown = "".join(f"<image {w}x{h}> " for h, w in res.image_sizes)
                    write(f"[tool {call.name}({call.arguments_json()}) -> {shown}{res.content[:500]}"
                          f"{'...' if len(res.content) > 500 else ''}]\n")
                    content = [*({"type": "image", "image": img} for img in res.images),
                               {"type": "text", "text": res.content}] if res.images else res.content
                    self.history.append({"role": "tool", "name": call.name, "content": content})
        except BaseException:
            del self.history[before:]  # the message got no reply (Ctrl-C, an exception): it is not part of the chat
            raise
        raise AssertionError("unreachable: the last turn returns")

    def _turn(self, write: Callable[[str], None], turn: int = 1) -> RequestOutput:
        """Stream one assistant turn of the current history (turn > 1: with its derived seed)."""
        start = time.perf_counter()
        params = self.params if turn == 1 else replace(self.params, seed=turn_seed(self.params.seed, 0, turn - 1))
        splitter = ThinkSplitter(self.mode in ("auto", "long"))
        out: RequestOutput | None = None
        in_thought = False
        for ev in self.llm.stream([self.messages()], params, thinking_mode=self.mode,
                                  max_thinking_tokens=self.budget,
                                  tools=self.toolbox.schemas if self.toolbox else None):
            if isinstance(ev, StreamEvent):
                thought, answer = splitter.feed(ev.text)
                if thought:
                    if not in_thought:
                        write("<think>\n")
                        in_thought = True
                    write(thought)
                if answer:
                    if in_thought:
                        write("\n</think>\n\n")
                        in_thought = False
                    write(answer)
            else:
                out = ev
        assert out is not None
        if out.error is not None:
            write(f"[error: {out.error}]\n")
            return out
        c = out.outputs[0]
        thought, answer = splitter.finish(c.thinking, c.answer)
        if thought:
            write(("" if in_thought else "<think>\n") + thought)
            in_thought = True
        if in_thought:
            write("\n</think>\n\n")
        write(answer)
        secs = time.perf_counter() - start
        write(f"\n[{c.thinking_mode} -> {c.mode}, {len(c.token_ids)} tokens ({c.num_thinking_tokens} thinking), "
              f"{c.finish_reason}, {secs:.1f} s, {len(c.token_ids) / max(secs, 1e-9):.1f} tokens/s]\n")
        return out


def run(session: ChatSession, lines: Iterable[str], write: Callable[[str], None],
        prompt: Callable[[], None] = lambda: None) -> int:
    """The loop over input lines (commands and messages); returns the number of replies."""
    replies = 0
    prompt()
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            prompt()
            continue
        if line.startswith("/"):
            reply = session.command(line)
            if reply is None:
                break
            write(reply + "\n")
        else:
            try:
                session.send(line, write)
                replies += 1
            except KeyboardInterrupt:  # Ctrl-C stops this reply (the engine is reset), not the chat
                write("\n[interrupted]\n")
        prompt()
    return replies
