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

from .agent import Toolbox
from .chat import MODE_SUFFIX, parse_tool_calls
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
        last turn's output. An error or Ctrl-C leaves the history as it was before the message."""
        before = len(self.history)
        self.history.append({"role": "user", "content": text})
        try:
            for turn in range(1, self.max_turns + 1):
                out = self._turn(write)
                if out.error is not None:
                    del self.history[before:]
                    return out
                c = out.outputs[0]
                content, calls, _ = parse_tool_calls(c.answer) if self.toolbox else (c.answer, [], 0)
                msg = {"role": "assistant", "content": content if calls else c.answer, "reasoning_content": c.thinking}
                if not calls or turn == self.max_turns or c.finish_reason != "stop":
                    self.history.append(msg)
                    if calls:
                        write(f"[{len(calls)} tool calls not run: the reply "
                              f"{'reached its turn limit' if turn == self.max_turns else 'did not end its turn'}]\n")
                    return out
                msg["tool_calls"] = [{"type": "function", "function": {"name": k.name,
                                                                        "arguments": k.arguments_json()}}
                                     for k in calls]
                self.history.append(msg)
                for call, res in zip(calls, self.toolbox.run(calls), strict=True):
                    write(f"[tool {call.name}({call.arguments_json()}) -> {res.content[:500]}"
                          f"{'...' if len(res.content) > 500 else ''}]\n")
                    self.history.append({"role": "tool", "name": call.name, "content": res.content})
        except BaseException:
            del self.history[before:]  # the message got no reply (an error, or Ctrl-C): it is not part of the chat
            raise
        raise AssertionError("unreachable: the last turn returns")

    def _turn(self, write: Callable[[str], None]) -> RequestOutput:
        """Stream one assistant turn of the current history."""
        start = time.perf_counter()
        splitter = ThinkSplitter(self.mode in ("auto", "long"))
        out: RequestOutput | None = None
        in_thought = False
        for ev in self.llm.stream([self.messages()], self.params, thinking_mode=self.mode,
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
