"""JSON mode: constrained decoding that makes an answer one JSON object (OpenAI's ``response_format: {"type":
"json_object"}``; ``SamplingParams(response_format="json_object")``).

A byte-level pushdown automaton recognises the prefixes of a JSON object (RFC 8259, an object at the top level):
its state is a small tuple (the open containers, the lexer's position, the current run of whitespace), advanced
one byte at a time by :func:`step`. At each step of a constrained completion the engine masks every token whose
bytes would leave the language: :class:`JsonMasker` walks a byte trie of the vocabulary from the current state,
pruning a branch at its first invalid byte, and caches the allowed set per state. Inside a string almost every
token is allowed, so that state takes a shortcut: the tokens whose bytes are all string-safe (no quote, no
backslash, no control byte) are allowed at once, and only the others are run through the automaton. Once the object
is closed only the end-of-turn tokens are allowed.

The constraint covers the answer only: a thinking completion thinks freely and its answer, after ``</think>``, is
the JSON (the engine starts the automaton when the thought closes). Whitespace runs are capped at ``WS_MAX`` bytes,
``WS_MAX_START`` before the opening brace (a model left free to emit whitespace inside JSON can loop on it until
max_tokens); bytes >= 0x80 in strings are taken as
they come (the text is decoded with replacement, so the JSON stays valid either way).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from .chat import ChatTokenizer, _byte_of_char

WS_MAX = 32  # the longest run of whitespace between tokens of the JSON
WS_MAX_START = 4  # ... and before its opening brace (after a thought the model writes "\n\n" there)
MAX_DEPTH = 64  # the deepest nesting of objects / arrays

# lexer modes
START, OBJ_FIRST, OBJ_KEY, COLON, VALUE, ARR_FIRST, AFTER, STR, NUM, LIT, DONE = range(11)
# number sub-states
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
_NUM_END = frozenset((N_ZERO, N_INT, N_FRAC, N_EXP))  # a number may end here
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

State = tuple  # (stack: str of "o" / "a", mode, aux, whitespace run)
INITIAL: State = ("", START, None, 0)


def _num(sub: int, b: int) -> int | None:
    """The number sub-state after byte b, or None when b does not continue the number."""
    digit = b in _DIGITS
    if sub == N_MINUS:
        return N_ZERO if b == 0x30 else N_INT if digit else None
    if sub in (N_ZERO, N_INT, N_FRAC):
        if digit and sub != N_ZERO:
            return sub
        if b == 0x2E and sub != N_FRAC:
            return N_DOT
        return N_E if b in (0x65, 0x45) else None
    if sub == N_DOT:
        return N_FRAC if digit else None
    if sub == N_E:
        return N_ESIGN if b in (0x2B, 0x2D) else N_EXP if digit else None
    return N_EXP if digit else None  # N_ESIGN, N_EXP


def _after_value(stack: str) -> State:
    return (stack, AFTER, None, 0) if stack else ("", DONE, None, 0)


def _close(stack: str) -> State:
    return _after_value(stack[:-1])


def step(state: State, b: int) -> State | None:
    """The state after byte ``b``, or None when ``b`` cannot continue a JSON object from ``state``."""
    stack, mode, aux, ws = state
    if mode == STR:
        is_key, esc = aux
        if esc == 0:
            if b == 0x22:
                return (stack, COLON, None, 0) if is_key else _after_value(stack)
            if b == 0x5C:
                return (stack, STR, (is_key, -1), 0)
            return None if b < 0x20 else state
        if esc == -1:
            if b in _ESCAPES:
                return (stack, STR, (is_key, 0), 0)
            return (stack, STR, (is_key, 4), 0) if b == 0x75 else None
        return (stack, STR, (is_key, esc - 1), 0) if b in _HEX else None
    if mode == NUM:
        sub = _num(aux, b)
        if sub is not None:
            return (stack, NUM, sub, 0)
        return step(_after_value(stack), b) if aux in _NUM_END else None
    if mode == LIT:
        if b != aux[0]:
            return None
        return (stack, LIT, aux[1:], 0) if len(aux) > 1 else _after_value(stack)
    if mode == DONE:
        return None
    if b in _WS:
        return (stack, mode, aux, ws + 1) if ws < (WS_MAX_START if mode == START else WS_MAX) else None
    if mode == START:
        return ("o", OBJ_FIRST, None, 0) if b == 0x7B else None
    if mode in (OBJ_FIRST, OBJ_KEY):
        if b == 0x22:
            return (stack, STR, (True, 0), 0)
        return _close(stack) if b == 0x7D and mode == OBJ_FIRST else None
    if mode == COLON:
        return (stack, VALUE, None, 0) if b == 0x3A else None
    if mode in (VALUE, ARR_FIRST):
        if b == 0x5D and mode == ARR_FIRST:
            return _close(stack)
        if b in (0x7B, 0x5B):
            if len(stack) >= MAX_DEPTH:
                return None
            return (stack + ("o" if b == 0x7B else "a"), OBJ_FIRST if b == 0x7B else ARR_FIRST, None, 0)
        if b == 0x22:
            return (stack, STR, (False, 0), 0)
        if b == 0x2D:
            return (stack, NUM, N_MINUS, 0)
        if b in _DIGITS:
            return (stack, NUM, N_ZERO if b == 0x30 else N_INT, 0)
        lit = _LITERALS.get(b)
        return (stack, LIT, lit, 0) if lit is not None else None
    # AFTER: a value ended inside a container
    top = stack[-1]
    if b == 0x2C:
        return (stack, OBJ_KEY if top == "o" else VALUE, None, 0)
    if (b == 0x7D and top == "o") or (b == 0x5D and top == "a"):
        return _close(stack)
    return None


def advance(state: State | None, data: bytes) -> State | None:
    """The state after ``data`` (None once a byte is invalid)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def is_complete(state: State | None) -> bool:
    """Whether the bytes so far are one whole JSON object."""
    return state is not None and state[1] == DONE


def _string_safe(data: bytes) -> bool:
    return all(b >= 0x20 and b not in (0x22, 0x5C) for b in data)


class _Node:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.ids: list[int] = []


def vocab_bytes(tok: ChatTokenizer, size: int) -> list[bytes | None]:
    """Each token id's bytes (None for the added / special tokens and for ids past the tokenizer's vocabulary)."""
    raw = tok.tokenizer
    added = set(raw.get_added_tokens_decoder())
    table = _byte_of_char()
    out: list[bytes | None] = []
    for i in range(size):
        piece = raw.id_to_token(i) if i < tok.vocab_size else None
        if piece is None or i in added:
            out.append(None)
        elif all(ch in table for ch in piece):  # byte-level BPE: the piece spells the bytes
            out.append(bytes(table[ch] for ch in piece))
        else:
            out.append(tok.token_bytes(i))
    return out


class JsonMasker:
    """Allowed-token masks of JSON mode for one tokenizer and vocabulary size, cached per automaton state.

    ``mask(state, eos_ids)``: a bool (V,) tensor on ``device`` of the tokens that keep the text a prefix of a JSON
    object (after it is complete: the end-of-turn tokens ``eos_ids`` only). Building the trie reads every token's
    bytes once (about a second at Qwen3's 151k vocabulary); a new state costs a walk of the trie's valid branches
    (a string state: one pass over the few thousand tokens that hold a quote, a backslash or a control byte).
    """

    def __init__(self, tok: ChatTokenizer, vocab_size: int, device: torch.device | str = "cpu",
                 cache_size: int = 256) -> None:
        self.vocab_size, self.device, self.cache_size = vocab_size, torch.device(device), cache_size
        self.bytes = vocab_bytes(tok, vocab_size)
        self.root = _Node()
        plain, special = [], []
        for i, data in enumerate(self.bytes):
            if not data:
                continue
            node = self.root
            for b in data:
                node = node.children.setdefault(b, _Node())
            node.ids.append(i)
            if _string_safe(data):
                plain.append(i)
            else:
                first = next(k for k, b in enumerate(data) if b < 0x20 or b in (0x22, 0x5C))
                special.append((i, first))
        self.plain = torch.zeros(vocab_size, dtype=torch.bool)
        self.plain[plain] = True
        self.special = special  # (token id, index of its first byte a string cannot take as is)
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self.stats = {"states": 0, "hits": 0}

    def allowed_ids(self, state: State) -> list[int]:
        """The token ids that keep the text a JSON-object prefix from ``state`` (not the end-of-turn tokens)."""
        stack, mode, aux, _ = state
        if mode == DONE:
            return []
        if mode == STR and aux[1] == 0:  # a string, no escape open: the string-safe tokens leave the state as is
            ids = self.plain.nonzero()[:, 0].tolist()
            ids += [i for i, k in self.special if advance(state, self.bytes[i][k:]) is not None]
            return ids
        ids: list[int] = []
        todo = [(self.root, state)]
        while todo:
            node, st = todo.pop()
            for b, child in node.children.items():
                nxt = step(st, b)
                if nxt is None:
                    continue
                ids.extend(child.ids)
                if child.children:
                    todo.append((child, nxt))
        return ids

    def mask(self, state: State, eos_ids: list[int] | tuple[int, ...]) -> Tensor:
        key = (state, tuple(eos_ids))
        m = self._cache.get(key)
        if m is not None:
            self._cache.move_to_end(key)
            self.stats["hits"] += 1
            return m
        self.stats["states"] += 1
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        if state[1] == DONE:
            m[[i for i in eos_ids if 0 <= i < self.vocab_size]] = True
        else:
            m[self.allowed_ids(state)] = True
        m = m.to(self.device)
        self._cache[key] = m
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return m
