"""JSON mode and JSON-schema outputs: constrained decoding that makes an answer one JSON object (OpenAI's
``response_format`` ``{"type": "json_object"}`` / ``{"type": "json_schema", ...}``; ``SamplingParams(
response_format="json_object")`` / ``SamplingParams(json_schema={...})``).

A byte-level pushdown automaton recognises the prefixes of the JSON texts a schema allows (RFC 8259; an object at
the top level). Its state is a hashable tuple (the compiled schema, the open containers with what each has seen, the
lexer's position, the current run of whitespace), advanced one byte at a time by :func:`step`. At each step of a
constrained completion the engine masks every token whose bytes would leave the language: :class:`JsonMasker` walks
a byte trie of the vocabulary from the current state, pruning a branch at its first invalid byte, and caches the
allowed set per state. Inside a free string almost every token is allowed, so that state takes a shortcut: the
tokens whose bytes are all string-safe (no quote, no backslash, no control byte) pass at once, and only the others
are run through the automaton. Once the object is closed only the end-of-turn tokens are allowed.

What a schema constrains (:func:`compile_schema`): ``type`` (object, array, string, number, integer, boolean,
null, or a list of them), ``properties`` with ``required`` (an object that lists properties takes only those,
each at most once, in any order: additionalProperties is taken as false, as OpenAI's strict mode asks), an object
without properties (``additionalProperties``: a schema for every value, or false for ``{}`` only), ``items``,
``minItems`` / ``maxItems``, ``enum`` / ``const`` (scalars; strings and property names as json.dumps writes them,
UTF-8 or ASCII-escaped), ``anyOf`` / ``oneOf`` whose alternatives start differently (e.g. a string or null), and
local ``$ref`` (``#`` or ``#/$defs/...``, recursion included). Not enforced (the text is valid JSON of the right
shape, these are left to the model): string ``pattern`` / ``format`` / lengths, number ranges, ``uniqueItems``.
A schema this cannot enforce is refused with :class:`SchemaError`, never loosened silently: among them a schema
with no finite value (required recursion) or whose smallest value nests deeper than ``MAX_DEPTH``; values are only
offered where they fit under ``MAX_DEPTH``, so no reachable state is a dead end (and should a vocabulary lack a
byte some continuation needs, the engine drops the constraint with a warning rather than sample from nothing).

The constraint covers the answer only: a thinking completion thinks freely and its answer, after ``</think>``, is
the JSON (the engine starts the automaton when the thought closes). Whitespace runs are capped at ``WS_MAX`` bytes,
``WS_MAX_START`` before the opening brace (a model left free to emit whitespace inside JSON can loop on it until
max_tokens); bytes >= 0x80 in free strings are taken as they come (the text is decoded with replacement, so the JSON
stays valid either way). An array's item count is kept only up to what its limits need, so long arrays repeat
states and their cached masks (a 1,425-token JSON answer: 24 new states).
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from .chat import ChatTokenizer, _byte_of_char

WS_MAX = 32  # the longest run of whitespace between tokens of the JSON
WS_MAX_START = 4  # ... and before its opening brace (after a thought the model writes "\n\n" there)
MAX_DEPTH = 64  # the deepest nesting of objects / arrays

# lexer modes
START, OBJ_FIRST, OBJ_KEY, COLON, VALUE, ARR_FIRST, AFTER, STR, NUM, LIT, DONE, LITERAL = range(12)
# number sub-states
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
_NUM_END = frozenset((N_ZERO, N_INT, N_FRAC, N_EXP))  # a number may end here
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_STRUCTURAL = frozenset((START, OBJ_FIRST, OBJ_KEY, COLON, VALUE, ARR_FIRST, AFTER))

# built-in schema nodes: any value, an object of any keys and values, an array of any values, any number
ANY, OBJ_ANY, ARR_ANY, NUM_ANY = 0, 1, 2, 3
_LITERALS = (b"true", b"false", b"null")


class SchemaError(ValueError):
    """A JSON schema that JSON mode cannot enforce (the message names where)."""


class Schema:
    """A compiled schema: ``nodes[i]`` is one of ("any",), ("object", props, required, additional, spellings),
    ("array", items, min_items, max_items), ("string", enum spellings or None), ("number", integer),
    ("lits", texts), ("union", alternatives); props: ((encoded name, name, node), ...), required: frozenset of
    encoded names, additional: a node or None, spellings: {a name's spelling (UTF-8 or ASCII-escaped): its encoded
    name}. Compared by identity (``compile_schema`` caches one per schema text).

    ``depth[i]``: the fewest containers a value of node i opens (an object or array counts itself and what its
    required content needs; inf: no finite value); the automaton offers a value only where it fits under
    MAX_DEPTH, so no state it reaches is a dead end."""

    def __init__(self, nodes: list[tuple], root: int, text: str) -> None:
        self.nodes, self.root, self.text = nodes, root, text
        self.depth = _min_depths(nodes)
        self.starts = [_starts(nodes, i) for i in range(len(nodes))]  # the bytes each node's value starts with
        for node in nodes:
            if node[0] == "union":
                seen: set[int] = set()
                for alt in node[1]:
                    if seen & self.starts[alt]:
                        raise SchemaError("schema: alternatives that start alike (e.g. two objects, or a number "
                                          "and a numeric enum) are not supported: JSON mode picks an alternative "
                                          "by its first byte")
                    seen |= self.starts[alt]

    def __repr__(self) -> str:
        return f"Schema({self.text[:60]})"


def _encode(s: str) -> bytes:
    """A string's JSON spelling without its quotes (json.dumps', no ASCII escaping)."""
    return json.dumps(s, ensure_ascii=False)[1:-1].encode()


def _spellings(s: str) -> tuple[bytes, ...]:
    """The spellings a model may write for a string: UTF-8 as is, and with non-ASCII escaped (json.dumps' two)."""
    return tuple(dict.fromkeys((_encode(s), json.dumps(s)[1:-1].encode())))


def _min_depths(nodes: list[tuple]) -> list[float]:
    """Per node, the fewest containers a value of it opens (inf: none exists): a fixed point from inf down."""
    inf = float("inf")
    depth = [inf] * len(nodes)
    changed = True
    while changed:
        changed = False
        for i, node in enumerate(nodes):
            kind = node[0]
            if kind == "object":
                v = 1 + max((depth[n] for enc, _, n in node[1] if enc in node[2]), default=0)
            elif kind == "array":
                v = 1 + (depth[node[1]] if node[2] > 0 else 0)
            elif kind == "union":
                v = min((depth[a] for a in node[1]), default=inf)
            else:  # any (a scalar will do), string, number, lits
                v = 0
            if v < depth[i]:
                depth[i], changed = v, True
    return depth


def _starts(nodes: list[tuple], nid: int, seen: frozenset = frozenset()) -> frozenset[int]:
    """The bytes a value of node ``nid`` can start with."""
    node = nodes[nid]
    kind = node[0]
    if kind == "any":
        return frozenset(b'{["-0123456789tfn')
    if kind == "object":
        return frozenset(b"{")
    if kind == "array":
        return frozenset(b"[")
    if kind == "string":
        return frozenset(b'"')
    if kind == "number":
        return frozenset(b"-0123456789")
    if kind == "lits":
        return frozenset(t[0] for t in node[1])
    if nid in seen:
        return frozenset()
    return frozenset().union(*(_starts(nodes, a, seen | {nid}) for a in node[1]))


class _Compiler:
    def __init__(self, schema: dict) -> None:
        self.doc = schema
        self.nodes: list[tuple] = [("any",), ("object", (), frozenset(), ANY, {}), ("array", ANY, 0, None),
                                   ("number", False)]
        self.refs: dict[str, int] = {}

    def add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def ref(self, ref: Any, path: str) -> int:
        if ref in self.refs:
            return self.refs[ref]
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"{path}: only local $ref ('#' or '#/$defs/...') is supported, got {ref!r}")
        target: Any = self.doc
        for part in ref[2:].split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{path}: $ref {ref!r} points nowhere")
            target = target[part]
        nid = self.add(("union", ()))  # a placeholder, so a recursive reference finds it
        self.refs[ref] = nid
        self.nodes[nid] = ("union", (self.node(target, ref),))
        return nid

    def union(self, alts: list[int], path: str) -> int:
        if len(alts) == 1:
            return alts[0]
        starts = [_starts(self.nodes, a) for a in alts]
        for i in range(len(alts)):
            for j in range(i):
                if starts[i] & starts[j]:
                    raise SchemaError(f"{path}: alternatives that start alike (e.g. two objects, or a number and a "
                                      "numeric enum) are not supported: JSON mode picks an alternative by its "
                                      "first byte")
        return self.add(("union", tuple(alts)))

    def enum(self, values: list, path: str) -> int:
        strings, lits = [], []
        for v in values:
            if isinstance(v, str):
                strings.extend(_spellings(v))
            elif v is None or isinstance(v, (bool, int, float)):
                lits.append(json.dumps(v).encode())
            else:
                raise SchemaError(f"{path}: enum / const values must be strings, numbers, booleans or null, got {v!r}")
        alts = []
        if strings:
            alts.append(self.add(("string", tuple(dict.fromkeys(strings)))))
        if lits:
            alts.append(self.add(("lits", tuple(dict.fromkeys(lits)))))
        if not alts:
            raise SchemaError(f"{path}: an empty enum allows no value")
        return self.union(alts, path)

    def node(self, s: Any, path: str) -> int:
        if s is True or s == {}:
            return ANY
        if s is False:
            raise SchemaError(f"{path}: a false schema allows no value")
        if not isinstance(s, dict):
            raise SchemaError(f"{path}: a schema must be an object, got {type(s).__name__}")
        if "$ref" in s:
            return self.ref(s["$ref"], path)
        if "const" in s:
            return self.enum([s["const"]], path)
        if "enum" in s:
            if not isinstance(s["enum"], list):
                raise SchemaError(f"{path}.enum must be a list")
            return self.enum(s["enum"], path)
        for key in ("anyOf", "oneOf"):
            if key in s:
                alts = s[key]
                if not isinstance(alts, list) or not alts:
                    raise SchemaError(f"{path}.{key} must be a non-empty list of schemas")
                return self.union([self.node(a, f"{path}.{key}[{i}]") for i, a in enumerate(alts)], path)
        if "allOf" in s:
            raise SchemaError(f"{path}: allOf is not supported")
        t = s.get("type")
        if isinstance(t, list):
            if not t:
                raise SchemaError(f"{path}.type must not be empty")
            return self.union([self.node({**s, "type": x}, f"{path}.type[{i}]") for i, x in enumerate(t)], path)
        if t is None:
            if "properties" in s:
                t = "object"
            elif "items" in s:
                t = "array"
            else:
                return ANY
        if t == "object":
            props = s.get("properties") or {}
            if not isinstance(props, dict):
                raise SchemaError(f"{path}.properties must be an object")
            required = s.get("required") or []
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise SchemaError(f"{path}.required must be a list of property names")
            if props:
                missing = [r for r in required if r not in props]
                if missing:
                    raise SchemaError(f"{path}.required names {missing}, which are not in its properties")
                nid = self.add(("object", (), frozenset(), None, {}))  # filled below (a property may refer back)
                entries = tuple((_encode(name), name, self.node(sub, f"{path}.properties.{name}"))
                                for name, sub in props.items())
                spell = {sp: _encode(name) for name in props for sp in _spellings(name)}
                self.nodes[nid] = ("object", entries, frozenset(_encode(r) for r in required), None, spell)
                return nid
            if required:
                raise SchemaError(f"{path}.required names {required} without properties to take them from")
            extra = s.get("additionalProperties", True)
            return self.add(("object", (), frozenset(),
                             None if extra is False else self.node(extra, f"{path}.additionalProperties"), {}))
        if t == "array":
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise SchemaError(f"{path}: minItems / maxItems must be integers with 0 <= minItems <= maxItems")
            if "prefixItems" in s:
                raise SchemaError(f"{path}: prefixItems is not supported")
            nid = self.add(("array", ANY, lo, hi))
            self.nodes[nid] = ("array", self.node(s.get("items", True), f"{path}.items"), lo, hi)
            return nid
        if t == "string":
            return self.add(("string", None))
        if t in ("number", "integer"):
            return self.add(("number", t == "integer"))
        if t == "boolean":
            return self.add(("lits", (b"true", b"false")))
        if t == "null":
            return self.add(("lits", (b"null",)))
        raise SchemaError(f"{path}.type must be one of object, array, string, number, integer, boolean, null; got "
                          f"{t!r}")


@functools.lru_cache(maxsize=64)
def _compile(text: str) -> Schema:
    if text == "":  # JSON mode: any object
        return Schema(_Compiler({}).nodes, OBJ_ANY, "")
    schema = json.loads(text)
    c = _Compiler(schema)
    try:
        root = c.node(schema, "schema")
    except RecursionError:
        raise SchemaError("schema: nested too deeply to compile") from None
    except UnicodeEncodeError:
        raise SchemaError("schema: a name or an enum string is not valid Unicode (a lone surrogate)") from None
    seen = set()
    while c.nodes[root][0] == "union" and len(c.nodes[root][1]) == 1:  # a $ref at the top
        if root in seen:
            raise SchemaError("schema: a $ref that refers to itself allows no value")
        seen.add(root)
        root = c.nodes[root][1][0]
    if c.nodes[root][0] != "object":
        raise SchemaError("schema: the top level must be an object (type 'object')")
    compiled = Schema(c.nodes, root, text)
    if compiled.depth[root] > MAX_DEPTH:
        raise SchemaError("schema: it allows no JSON value (its required properties or items recurse without end)"
                          if compiled.depth[root] == float("inf") else
                          f"schema: its smallest value nests deeper than {MAX_DEPTH} levels")
    return compiled


def compile_schema(schema: dict | str | None) -> Schema:
    """The compiled schema (None: JSON mode, any object); cached by its canonical text. Raises SchemaError."""
    if schema is None:
        return _compile("")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise SchemaError(f"schema: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise SchemaError(f"schema: must be a JSON object, got {type(schema).__name__}")
    return _compile(json.dumps(schema, sort_keys=True, ensure_ascii=False))


State = tuple  # (schema, frames, mode, aux, whitespace run)


def initial(schema: Schema) -> State:
    """The state before the answer's first byte."""
    return (schema, (), START, schema.root, 0)


INITIAL: State = initial(compile_schema(None))  # JSON mode

TOOL_CALL_HEAD = b'<tool_call>\n{"name": "'
TOOL_CALL_MID = b', "arguments": '
TOOL_CALL_TAIL = b"}\n</tool_call>"


class CallSchema:
    """One forced tool call, as Qwen3's template writes it: ``<tool_call>\\n{"name": "NAME", "arguments": ARGS}
    \\n</tool_call>``, NAME one of the tools (either json.dumps spelling), ARGS an object that follows that tool's
    ``parameters`` (compiled like a json_schema). Compared by identity (``compile_tool_call`` caches them)."""

    nodes: list = []  # no schema nodes of its own (step never reads them in the call's literal / name states)

    def __init__(self, tools: dict[bytes, Schema], spell: dict[bytes, bytes], text: str) -> None:
        self.tools, self.spell, self.text = tools, spell, text

    def __repr__(self) -> str:
        return f"CallSchema({sorted(self.tools)})"


@functools.lru_cache(maxsize=64)
def _compile_call(text: str) -> CallSchema:
    tools, spell = {}, {}
    for i, (name, params) in enumerate(json.loads(text)):
        try:
            sub = compile_schema(params)
        except SchemaError as e:
            raise SchemaError(f"tools[{i}] ({name}).parameters: {e}") from None
        try:
            enc, spellings = _encode(name), _spellings(name)
        except UnicodeEncodeError:
            raise SchemaError(f"tools[{i}]: its name is not valid Unicode (a lone surrogate)") from None
        if enc in tools:
            raise SchemaError(f"tools[{i}]: a second tool named {name!r}")
        if sub.depth[sub.root] + 1 > MAX_DEPTH:  # the call's arguments sit one level down
            raise SchemaError(f"tools[{i}] ({name}).parameters: its smallest value nests deeper than "
                              f"{MAX_DEPTH - 1} levels")
        tools[enc] = sub
        spell.update({sp: enc for sp in spellings})
    return CallSchema(tools, spell, text)


def compile_tool_call(tools: list[dict], name: str | None = None) -> CallSchema:
    """The grammar of one call of ``name`` (None: any of ``tools``), OpenAI function tools. A tool without
    ``parameters`` takes any object. Raises SchemaError (naming the tool) for parameters it cannot enforce, or a
    name not among the tools."""
    pairs = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not fn["name"]:
            raise SchemaError(f"tools[{i}] is not a function tool with a name")
        if name is None or fn["name"] == name:
            params = fn.get("parameters")
            pairs.append((fn["name"], {"type": "object"} if params is None or params == {} else params))
    if not pairs:
        raise SchemaError(f"no tool is named {name!r}")
    return _compile_call(json.dumps(pairs, sort_keys=True, ensure_ascii=False))


def initial_call(call: CallSchema) -> State:
    """The state before a forced call's first byte."""
    return (call, (), LITERAL, (TOOL_CALL_HEAD, ("name",)), 0)


def _literal_end(call: CallSchema, then: tuple) -> State:
    if then[0] == "name":
        return (call, (), STR, ("n", 0, tuple(call.spell), b""), 0)
    if then[0] == "args":
        sub = call.tools[then[1]]
        return (sub, (("w", call),), START, sub.root, 0)
    return (call, (), DONE, None, 0)


def _num(sub: int, b: int, integer: bool) -> int | None:
    """The number sub-state after byte b, or None when b does not continue the number."""
    digit = b in _DIGITS
    if sub == N_MINUS:
        return N_ZERO if b == 0x30 else N_INT if digit else None
    if sub in (N_ZERO, N_INT, N_FRAC):
        if digit and sub != N_ZERO:
            return sub
        if integer:
            return None
        if b == 0x2E and sub != N_FRAC:
            return N_DOT
        return N_E if b in (0x65, 0x45) else None
    if sub == N_DOT:
        return N_FRAC if digit else None
    if sub == N_E:
        return N_ESIGN if b in (0x2B, 0x2D) else N_EXP if digit else None
    return N_EXP if digit else None  # N_ESIGN, N_EXP


def _after_value(schema: Schema, frames: tuple) -> State:
    """The state after a value ends inside ``frames`` (its container counts it; nothing left: done; a forced
    call's arguments: the call's tail)."""
    if not frames:
        return (schema, (), DONE, None, 0)
    top = frames[-1]
    if top[0] == "w":
        return (top[1], (), LITERAL, (TOOL_CALL_TAIL, ("done",)), 0)
    if top[0] == "o":
        top = ("o", top[1], top[2] | {top[3]} if top[3] is not None else top[2], None)
    else:  # the count matters only up to maxItems (or minItems): capped there, so states (and masks) repeat
        _, _, lo, hi = schema.nodes[top[1]]
        top = ("a", top[1], min(top[2] + 1, hi if hi is not None else lo))
    return (schema, frames[:-1] + (top,), AFTER, None, 0)


def _start_value(schema: Schema, frames: tuple, nid: int, b: int) -> State | None:
    """The state after byte ``b`` starts a value of node ``nid``."""
    node = schema.nodes[nid]
    kind = node[0]
    if kind == "union":
        for alt in node[1]:
            if b in schema.starts[alt]:
                return _start_value(schema, frames, alt, b)
        return None
    if kind == "any":
        if b == 0x7B:
            return _start_value(schema, frames, OBJ_ANY, b)
        if b == 0x5B:
            return _start_value(schema, frames, ARR_ANY, b)
        if b == 0x22:
            return (schema, frames, STR, ("v", 0, None, b""), 0)
        if b == 0x2D or b in _DIGITS:
            return _start_value(schema, frames, NUM_ANY, b)
        cands = tuple(t for t in _LITERALS if t[0] == b)
        return (schema, frames, LIT, (cands, bytes([b])), 0) if cands else None
    if kind == "object":
        if b != 0x7B or len(frames) + schema.depth[nid] > MAX_DEPTH:
            return None
        return (schema, frames + (("o", nid, frozenset(), None),), OBJ_FIRST, None, 0)
    if kind == "array":
        if b != 0x5B or len(frames) + schema.depth[nid] > MAX_DEPTH:
            return None
        return (schema, frames + (("a", nid, 0),), ARR_FIRST, None, 0)
    if kind == "string":
        return (schema, frames, STR, ("v", 0, node[1], b""), 0) if b == 0x22 else None
    if kind == "number":
        if b == 0x2D:
            return (schema, frames, NUM, (N_MINUS, node[1]), 0)
        if b in _DIGITS:
            return (schema, frames, NUM, (N_ZERO if b == 0x30 else N_INT, node[1]), 0)
        return None
    cands = tuple(t for t in node[1] if t[0] == b)  # lits
    return (schema, frames, LIT, (cands, bytes([b])), 0) if cands else None


def _string_end(schema: Schema, frames: tuple, role: str, typed: bytes | None) -> State:
    if role == "n":  # a forced call's name: its arguments' schema follows
        return (schema, (), LITERAL, (TOOL_CALL_MID, ("args", schema.spell[typed])), 0)
    if role == "k":  # the key's property decides the value's schema
        top = frames[-1]
        key = schema.nodes[top[1]][4][typed] if typed is not None else None  # its encoded name
        return (schema, frames[:-1] + (("o", top[1], top[2], key),), COLON, None, 0)
    return _after_value(schema, frames)


def _keys_left(schema: Schema, frames: tuple) -> tuple[bytes, ...] | None:
    """The spellings of the top object's properties that may still come (not seen, and their value fits under
    MAX_DEPTH); None for an object of free keys."""
    top = frames[-1]
    node = schema.nodes[top[1]]
    if not node[1]:
        return None
    room = MAX_DEPTH - len(frames)
    fits = {enc for enc, _, n in node[1] if enc not in top[2] and schema.depth[n] <= room}
    return tuple(sp for sp, enc in node[4].items() if enc in fits)


def _free_keys(schema: Schema, frames: tuple) -> bool:
    """Whether the top object (of free keys) may take another key: it has a value schema that fits."""
    extra = schema.nodes[frames[-1][1]][3]
    return extra is not None and len(frames) + schema.depth[extra] <= MAX_DEPTH


def step(state: State, b: int) -> State | None:
    """The state after byte ``b``, or None when ``b`` cannot continue a text the schema allows from ``state``."""
    schema, frames, mode, aux, ws = state
    nodes = schema.nodes
    if mode == STR:
        role, esc, cands, typed = aux
        if cands is not None:  # a key or an enum: the bytes must spell one of the candidates
            if b == 0x22 and not any(c.startswith(typed + b'"') for c in cands):
                return _string_end(schema, frames, role, typed) if typed in cands else None
            if b < 0x20:
                return None
            nt = typed + bytes((b,))
            keep = tuple(c for c in cands if c.startswith(nt))
            return (schema, frames, STR, (role, 0, keep, nt), 0) if keep else None
        if esc == 0:
            if b == 0x22:
                return _string_end(schema, frames, role, None)
            if b == 0x5C:
                return (schema, frames, STR, (role, -1, None, b""), 0)
            return None if b < 0x20 else state
        if esc == -1:
            if b in _ESCAPES:
                return (schema, frames, STR, (role, 0, None, b""), 0)
            return (schema, frames, STR, (role, 4, None, b""), 0) if b == 0x75 else None
        return (schema, frames, STR, (role, esc - 1, None, b""), 0) if b in _HEX else None
    if mode == NUM:
        sub, integer = aux
        nxt = _num(sub, b, integer)
        if nxt is not None:
            return (schema, frames, NUM, (nxt, integer), 0)
        return step(_after_value(schema, frames), b) if sub in _NUM_END else None
    if mode == LIT:
        cands, typed = aux
        nt = typed + bytes((b,))
        keep = tuple(c for c in cands if c.startswith(nt))
        if keep:
            return (schema, frames, LIT, (keep, nt), 0)
        return step(_after_value(schema, frames), b) if typed in cands else None
    if mode == DONE:
        return None
    if mode == LITERAL:
        rest, then = aux
        if b != rest[0]:  # before a call's head, a little whitespace (the model's "\n\n" after </think>)
            if b in _WS and rest == TOOL_CALL_HEAD and then == ("name",) and ws < WS_MAX_START:
                return (schema, frames, mode, aux, ws + 1)
            return None
        return (schema, frames, LITERAL, (rest[1:], then), 0) if len(rest) > 1 else _literal_end(schema, then)
    if b in _WS:
        return (schema, frames, mode, aux, ws + 1) if ws < (WS_MAX_START if mode == START else WS_MAX) else None
    if mode == START:
        return _start_value(schema, frames, aux, b)
    top = frames[-1]
    node = nodes[top[1]]
    if mode in (OBJ_FIRST, OBJ_KEY):
        if b == 0x22:
            left = _keys_left(schema, frames)
            if left is not None:
                return (schema, frames, STR, ("k", 0, left, b""), 0) if left else None
            return (schema, frames, STR, ("k", 0, None, b""), 0) if _free_keys(schema, frames) else None
        if b == 0x7D and mode == OBJ_FIRST and node[2] <= top[2]:
            return _after_value(schema, frames[:-1])
        return None
    if mode == COLON:
        if b != 0x3A:
            return None
        key = top[3]
        value = next(n for enc, _, n in node[1] if enc == key) if key is not None else node[3]
        return (schema, frames, VALUE, value, 0)
    if mode == VALUE:
        return _start_value(schema, frames, aux, b)
    if mode == ARR_FIRST:
        if b == 0x5D:
            return _after_value(schema, frames[:-1]) if node[2] == 0 else None
        if node[3] == 0:  # maxItems 0
            return None
        return _start_value(schema, frames, node[1], b)
    # AFTER: a value ended inside the top container
    if top[0] == "o":
        if b == 0x2C:
            left = _keys_left(schema, frames)
            more = bool(left) if left is not None else _free_keys(schema, frames)
            return (schema, frames, OBJ_KEY, None, 0) if more else None
        if b == 0x7D and node[2] <= top[2]:
            return _after_value(schema, frames[:-1])
        return None
    items, lo, hi = node[1], node[2], node[3]
    if b == 0x2C:
        return (schema, frames, VALUE, items, 0) if hi is None or top[2] < hi else None
    if b == 0x5D and top[2] >= lo:
        return _after_value(schema, frames[:-1])
    return None


def advance(state: State | None, data: bytes) -> State | None:
    """The state after ``data`` (None once a byte is invalid)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def is_complete(state: State | None) -> bool:
    """Whether the bytes so far are one whole JSON object the schema allows."""
    return state is not None and state[2] == DONE


def _string_safe(data: bytes) -> bool:
    return all(b >= 0x20 and b not in (0x22, 0x5C) for b in data)


class _Node:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.ids: list[int] = []


# added tokens a constrained answer may use, as their text: the call tags (Qwen3's are single added tokens, which
# the model writes; spelling them out byte by byte would push it off its own tokenization)
_ADDED_AS_TEXT = frozenset(("<tool_call>", "</tool_call>"))


def vocab_bytes(tok: ChatTokenizer, size: int) -> list[bytes | None]:
    """Each token id's bytes (None for the added / special tokens, but the call tags, and for ids past the
    tokenizer's vocabulary)."""
    raw = tok.tokenizer
    added = raw.get_added_tokens_decoder()
    table = _byte_of_char()
    out: list[bytes | None] = []
    for i in range(size):
        piece = raw.id_to_token(i) if i < tok.vocab_size else None
        if i in added:
            text = added[i].content
            out.append(text.encode() if text in _ADDED_AS_TEXT and not added[i].special else None)
        elif piece is None:
            out.append(None)
        elif all(ch in table for ch in piece):  # byte-level BPE: the piece spells the bytes
            out.append(bytes(table[ch] for ch in piece))
        else:
            out.append(tok.token_bytes(i))
    return out


class JsonMasker:
    """Allowed-token masks of JSON mode for one tokenizer and vocabulary size, cached per automaton state.

    ``mask(state, eos_ids)``: a bool (V,) tensor on ``device`` of the tokens that keep the text a prefix of an
    allowed JSON text (once it is complete: the end-of-turn tokens ``eos_ids`` only). Building the trie reads every
    token's bytes once; a new state costs a walk of the trie's valid branches (a free string: one pass over the
    tokens that hold a quote, a backslash or a control byte).
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
        self._cache: OrderedDict[tuple, Tensor | None] = OrderedDict()
        self.stats = {"states": 0, "hits": 0}

    def allowed(self, state: State) -> Tensor:
        """A bool (V,) CPU mask of the tokens that keep the text allowed from ``state`` (not the end-of-turn
        tokens)."""
        mode, aux = state[2], state[3]
        if mode == STR and aux[2] is None and aux[1] == 0:  # a free string, no escape open: the string-safe
            m = self.plain.clone()  # tokens leave the state as it is; the others are run
            m[[i for i, k in self.special if advance(state, self.bytes[i][k:]) is not None]] = True
            return m
        ids: list[int] = []  # a walk of the trie's valid branches
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
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        m[ids] = True
        return m

    def mask(self, state: State, eos_ids: list[int] | tuple[int, ...]) -> Tensor | None:
        """The mask, or None when no token of the vocabulary continues the text from ``state`` (a vocabulary
        without the byte a continuation needs, e.g. not byte-level): the caller then drops the constraint rather
        than sample from nothing."""
        key = (state, tuple(eos_ids))
        if key in self._cache:
            self._cache.move_to_end(key)
            self.stats["hits"] += 1
            return self._cache[key]
        self.stats["states"] += 1
        if state[2] == DONE:
            m = torch.zeros(self.vocab_size, dtype=torch.bool)
            m[[i for i in eos_ids if 0 <= i < self.vocab_size]] = True
        else:
            m = self.allowed(state)
        m = m.to(self.device) if bool(m.any()) else None
        self._cache[key] = m
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return m
