"""JSON-schema outputs: the schema automaton against a validator of the same rules on random instances and edited
texts, its refusals, the token masks against brute force, and the engine and server answers."""

from __future__ import annotations

import json
import random

import pytest
from test_llm import TOK, tiny_model
from test_structured import _json_tokenizer
from tiny_models import torch_kernels_on_cpu  # noqa: F401  (fixture)

from r4b.engine import structured as S
from r4b.engine.llm import LLM
from r4b.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")

PET = {"type": "object", "properties": {
    "species": {"enum": ["cat", "dog"]},
    "friend": {"anyOf": [{"$ref": "#/$defs/pet"}, {"type": "null"}]}}, "required": ["species"]}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"},
    "age": {"type": "integer"},
    "height": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", 'b"c', "é", "\\"]}, "minItems": 1,
             "maxItems": 3},
    "nick": {"type": ["string", "null"]},
    "ok": {"type": "boolean"},
    "kind": {"const": "person"},
    "level": {"enum": [1, 2, 10, "high", None]},
    "pet": {"$ref": "#/$defs/pet"},
    "extra": {"type": "object"},
    "none": {"type": "object", "additionalProperties": False},
    "scores": {"type": "object", "additionalProperties": {"type": "integer"}},
    "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "maxItems": 2}}},
    "required": ["name", "age", "kind"], "$defs": {"pet": PET}}
SCHEMAS = {"person": PERSON,
           "flat": {"type": "object", "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}},
                    "required": ["answer", "why"]},
           "ref root": {"$ref": "#/$defs/pet", "$defs": {"pet": PET}}}


def _resolve(s: dict, root: dict) -> dict:
    while isinstance(s, dict) and "$ref" in s:
        s = root["$defs"][s["$ref"].split("/")[-1]]
    return s


def valid(x, s, root) -> bool:
    """The rules JSON mode enforces (structured.py's docstring), written out plainly."""
    s = _resolve(s, root)
    if s is True or s == {}:
        return True
    if "const" in s:
        return type(x) is type(s["const"]) and x == s["const"]
    if "enum" in s:
        return any(type(x) is type(v) and x == v for v in s["enum"])
    if "anyOf" in s:
        return any(valid(x, a, root) for a in s["anyOf"])
    t = s.get("type")
    if isinstance(t, list):
        return any(valid(x, {**s, "type": u}, root) for u in t)
    if t == "object":
        if not isinstance(x, dict):
            return False
        props = s.get("properties")
        if props:
            return set(x) <= set(props) and set(s.get("required", [])) <= set(x) and all(
                valid(v, props[k], root) for k, v in x.items())
        extra = s.get("additionalProperties", True)
        return (not x) if extra is False else all(valid(v, extra, root) for v in x.values())
    if t == "array":
        return isinstance(x, list) and s.get("minItems", 0) <= len(x) <= s.get("maxItems", 10**9) and all(
            valid(v, s.get("items", True), root) for v in x)
    if t == "string":
        return isinstance(x, str)
    if t == "integer":
        return isinstance(x, int) and not isinstance(x, bool)
    if t == "number":
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if t == "boolean":
        return isinstance(x, bool)
    if t == "null":
        return x is None
    return True


def gen(s, root, rng: random.Random, depth: int = 0):
    """A random instance of ``s``."""
    s = _resolve(s, root)
    if s is True or s == {}:
        return rng.choice([1, "x", None, [], {"k": [True]}, -2.5])
    if "const" in s:
        return s["const"]
    if "enum" in s:
        return rng.choice(s["enum"])
    if "anyOf" in s:
        alts = s["anyOf"] if depth < 3 else [a for a in s["anyOf"] if "$ref" not in a]
        return gen(rng.choice(alts), root, rng, depth + 1)
    t = s.get("type")
    if isinstance(t, list):
        return gen({**s, "type": rng.choice(t)}, root, rng, depth)
    if t == "object":
        props = s.get("properties")
        if props:
            keys = [k for k in props if k in s.get("required", []) or rng.random() < 0.5]
            rng.shuffle(keys)
            return {k: gen(props[k], root, rng, depth + 1) for k in keys}
        extra = s.get("additionalProperties", True)
        if extra is False:
            return {}
        return {f"k{i}": gen(extra, root, rng, depth + 1) for i in range(rng.randrange(3))}
    if t == "array":
        lo, hi = s.get("minItems", 0), s.get("maxItems", 3)
        return [gen(s.get("items", True), root, rng, depth + 1) for _ in range(rng.randint(lo, hi))]
    if t == "string":
        return rng.choice(["", "Ada", 'q"uote', "line\nbreak", "ü😀", "\\"])
    if t == "integer":
        return rng.choice([0, -3, 42, 10**12])
    if t == "number":
        return rng.choice([0, 1.5, -2e-5, 7, 1e21])
    if t == "boolean":
        return rng.random() < 0.5
    return None


def _texts(name: str, count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    schema = SCHEMAS[name]
    return [json.dumps(gen(schema, schema, rng), ensure_ascii=False, indent=rng.choice([None, 2]),
                       separators=rng.choice([None, (",", ":")])) for _ in range(count)]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_instances_are_accepted_prefix_by_prefix(name):
    compiled = S.compile_schema(SCHEMAS[name])
    for text in _texts(name, 200):
        state = S.initial(compiled)
        data = text.encode()
        for k, b in enumerate(data):
            state = S.step(state, b)
            assert state is not None, (text, k, data[:k + 1])
            assert S.is_complete(state) == (k == len(data) - 1)
        assert valid(json.loads(text), SCHEMAS[name], SCHEMAS[name])


def _has_twin_keys(text: str) -> bool:
    twins = []
    json.loads(text, object_pairs_hook=lambda kv: twins.append(len(kv) - len({k for k, _ in kv})) or {})
    return any(twins)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_what_the_automaton_completes_is_valid(name):
    """Edited instances: every text the automaton calls complete parses and follows the schema (and the edits do
    reach both outcomes)."""
    schema = SCHEMAS[name]
    compiled = S.compile_schema(schema)
    rng = random.Random(3)
    pieces = list('{}[]:,"\\ 0123456789-.etrufalsn') + ['"a"', '"age"', '"name"', '"kind"', '"person"', "null",
                                                           '"cat"', '"species"', "1.5", '"é"']
    texts = _texts(name, 100, seed=4)
    complete = rejected = 0
    for _ in range(6000):
        text = rng.choice(texts)
        for _ in range(rng.randrange(1, 3)):
            k = rng.randrange(len(text) + 1)
            edit = rng.randrange(3)
            text = text[:k] + (rng.choice(pieces) if edit else "") + text[k + (edit != 1):]
        state = S.advance(S.initial(compiled), text.encode())
        if S.is_complete(state):
            complete += 1
            obj = json.loads(text)
            assert valid(obj, schema, schema), text
            assert not _has_twin_keys(text), text  # no property twice
        elif state is None:
            rejected += 1
    assert complete > 200 and rejected > 1000


@pytest.mark.parametrize("text", [
    '{"name": "x", "age": 1}',  # kind is required
    '{"name": "x", "age": 1, "kind": "person", "zzz": 1}',  # not a property
    '{"name": "x", "name": "y", "age": 1, "kind": "person"}',  # a property twice
    '{"name": "x", "age": 1.5, "kind": "person"}',  # not an integer
    '{"name": "x", "age": 1, "kind": "people"}',  # not the const
    '{"name": "x", "age": 1, "kind": "person", "tags": []}',  # minItems 1
    '{"name": "x", "age": 1, "kind": "person", "tags": ["a", "a", "a", "a"]}',  # maxItems 3
    '{"name": "x", "age": 1, "kind": "person", "level": 3}',
    '{"name": "x", "age": 1, "kind": "person", "level": 100}',
    '{"name": "x", "age": 1, "kind": "person", "none": {"a": 1}}',
    '{"name": "x", "age": 1, "kind": "person", "scores": {"a": 0.5}}',
    '{"name": "x", "age": 1, "kind": "person", "pet": {"friend": null}}',  # species is required
    '{"name": "x", "age": 1, "kind": "person", "pet": {"species": "cow"}}',
    '{"name": "x", "age": 1, "kind": "person", "nick": 3}',
    '{"name": "x", "age": 1, "kind": "person", "matrix": [[1, 2, 3]]}',
    '{"name": 5, "age": 1, "kind": "person"}',
    '[]'])
def test_invalid_texts_are_rejected(text):
    assert not S.is_complete(S.advance(S.initial(S.compile_schema(PERSON)), text.encode()))
    assert not valid(json.loads(text), PERSON, PERSON) or _has_twin_keys(text)  # json.loads keeps a last twin


def test_an_enum_string_has_json_dumps_spellings():
    """Enum strings and property names are matched as json.dumps spells them, UTF-8 or ASCII-escaped: another
    spelling of the same value is refused (the mask never offers it)."""
    compiled = S.compile_schema(PERSON)
    for tags in ('["b\\"c"]', '["b\\u0022c"]'):
        text = '{"name": "x", "age": 1, "kind": "person", "tags": ' + tags + "}"
        assert json.loads(text)["tags"] == ['b"c']
        assert S.is_complete(S.advance(S.initial(compiled), text.encode())) == ("u0022" not in tags)
    assert not S.advance(S.initial(compiled), b'{"n\\u0061me"')
    for tag in ("é", "\\u00e9"):  # both of json.dumps' spellings of "é"
        text = '{"name": "x", "age": 1, "kind": "person", "tags": ["' + tag + '"]}'
        assert S.is_complete(S.advance(S.initial(compiled), text.encode())), text
    accents = S.compile_schema({"type": "object", "properties": {"café": {"type": "integer"}}, "required": ["café"]})
    for key in ("café", "caf\\u00e9"):
        assert S.is_complete(S.advance(S.initial(accents), ('{"' + key + '": 1}').encode())), key
    assert not S.is_complete(S.advance(S.initial(accents), '{"café": 1, "caf\\u00e9": 2}'.encode()))  # twice


def test_the_valid_counterparts_are_accepted():
    for text in ('{"kind": "person", "age": -1, "name": "x", "level": 10, "tags": ["b\\"c", "\\\\"], "nick": null,'
                 ' "pet": {"species": "dog", "friend": {"species": "cat", "friend": null}}, "none": {},'
                 ' "scores": {"a": 3, "b": -4}, "extra": {"q": [1, {"r": null}]}, "matrix": [[], [1.5, -2]],'
                 ' "level": null}'.replace(', "level": null', ""),
                 '{"name": "", "age": 0, "kind": "person", "level": "high", "height": 1e-3, "ok": false}'):
        assert S.is_complete(S.advance(S.initial(S.compile_schema(PERSON)), text.encode())), text
        assert valid(json.loads(text), PERSON, PERSON)


@pytest.mark.parametrize("schema, match", [
    ({"type": "array"}, "top level must be an object"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "object"}, {"type": "object"}]}}}, "start alike"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "number"}, {"enum": [1]}]}}}, "start alike"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "points nowhere"),
    ({"type": "object", "properties": {"a": {"$ref": "https://x/y"}}}, "only local"),
    ({"type": "object", "properties": {"a": {"enum": [[1]]}}}, "enum / const values"),
    ({"type": "object", "properties": {"a": {"allOf": [{}]}}}, "allOf"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "type must be one of"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "not in its properties"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}}, "minItems"),
    ({"type": "object", "properties": {"a": False}}, "false schema"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, "refers to itself"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}, "refers to itself"),
    ({"type": "object", "properties": {"n": {"$ref": "#"}}, "required": ["n"]}, "allows no JSON value"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/x"}}},
      "required": ["a"], "$defs": {"x": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/x"}}}},
     "allows no JSON value"),
    ({"type": "object", "properties": {"a": {"enum": ["\ud800"]}}}, "not valid Unicode"),
])
def test_schemas_that_cannot_be_enforced_are_refused(schema, match):
    with pytest.raises(S.SchemaError, match=match):
        S.compile_schema(schema)
    with pytest.raises(ValueError, match="SamplingParams.json_schema"):
        SamplingParams(json_schema=schema)


def test_deep_nesting_is_refused_at_compile_time_or_never_offered():
    deep: dict = {"type": "object"}
    for _ in range(70):  # a required chain deeper than MAX_DEPTH: no value fits
        deep = {"type": "object", "properties": {"n": deep}, "required": ["n"]}
    with pytest.raises(S.SchemaError, match="nests deeper than 64"):
        S.compile_schema(deep)
    # an optional recursion: at the depth limit the recursive key is no longer offered, and the object can close
    chain = S.compile_schema({"type": "object", "properties": {"next": {"$ref": "#"}, "v": {"type": "integer"}}})
    state = S.advance(S.initial(chain), b'{"next":' * (S.MAX_DEPTH - 1))
    assert state is not None and S.advance(state, b'{"next"') is None
    assert S.advance(state, b'{"v"') is not None
    assert S.is_complete(S.advance(state, b"{}" + b"}" * (S.MAX_DEPTH - 1)))
    # array counts are capped in the state (at maxItems, or at minItems): items past them repeat the same states
    arr = S.compile_schema({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"},
                                                                   "minItems": 2}}})
    states = set()
    state = S.advance(S.initial(arr), b'{"a": [')
    for k in range(50):
        state = S.advance(state, b"1" if k == 0 else b", 1")
        states.add(state)
    assert len(states) == 3 and S.is_complete(S.advance(state, b"]}"))
    assert not S.is_complete(S.advance(S.initial(arr), b'{"a": [1]}'))  # minItems 2


def _random_walks(compiled, rng: random.Random, walks: int, steps: int) -> int:
    """Walk from the initial state by random valid bytes (biased to open containers and to close them); return how
    many walks completed. Fails on a state from which no byte goes on (a dead end)."""
    done = 0
    for _ in range(walks):
        state = S.initial(compiled)
        for _ in range(steps):
            if S.is_complete(state):
                done += 1
                break
            options = [b for b in range(256) if S.step(state, b) is not None]
            assert options, state  # never stuck
            opens = [b for b in options if b in b'{["']
            closes = [b for b in options if b in b"}]"]
            pick = rng.random()
            b = rng.choice(opens if opens and pick < 0.45 else closes if closes and pick > 0.8 else options)
            state = S.step(state, b)
    return done


@pytest.mark.parametrize("schema", [None, PERSON, {"$ref": "#/$defs/t", "$defs": {"t": {
    "type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/t"}}, "x": {}}}}}])
def test_no_reachable_state_is_a_dead_end(schema):
    compiled = S.compile_schema(schema)
    assert _random_walks(compiled, random.Random(5), walks=60, steps=3000) > 0


def test_masks_are_the_brute_force_sets_under_a_schema():
    tok = _json_tokenizer()
    masker = S.JsonMasker(tok, tok.vocab_size)
    compiled = S.compile_schema(PERSON)
    states = set()
    for text in _texts("person", 12, seed=9):
        state = S.initial(compiled)
        for b in text.encode():
            states.add(state)
            state = S.step(state, b)
    for state in sorted(states, key=repr)[::3]:
        want = [i for i, d in enumerate(masker.bytes) if d and S.advance(state, d) is not None]
        got = masker.mask(state, (0,)).nonzero()[:, 0].tolist()
        assert got == want, state


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


def test_engine_answers_follow_the_schema(model):
    llm = LLM(model, TOK, num_kv_blocks=512, block_size=8)
    schema = SCHEMAS["flat"]
    params = SamplingParams(temperature=1.0, max_tokens=150, n=6, seed=2, json_schema=schema)
    assert params.response_format == "json_schema" and isinstance(params.json_schema, str)
    assert hash(params) == hash(SamplingParams(temperature=1.0, max_tokens=150, n=6, seed=2,
                                               json_schema=json.dumps(schema)))
    out = llm.generate(["Answer as JSON."], params, thinking_mode="auto", max_thinking_tokens=3, use_tqdm=False)[0]
    done = 0
    for c in out.outputs:
        k = c.token_ids.index(TOK.end_think_id) + 2
        answer = b"".join(TOK.token_bytes(t) for t in c.token_ids[k:] if t not in (TOK.im_end_id, 0))
        state = S.advance(S.initial(S.compile_schema(schema)), answer)
        assert state is not None
        if c.finish_reason == "stop":
            done += 1
            obj = json.loads(c.answer)
            assert valid(obj, schema, schema) and set(obj) == {"answer", "why"}
    assert done >= 1


def test_server_json_schema(model):
    from test_server import serving

    llm = LLM(model, TOK, num_kv_blocks=512, block_size=8)
    with serving(llm, default_max_tokens=150) as (_, client):
        schema = SCHEMAS["flat"]
        body = {"messages": [{"role": "user", "content": "JSON"}], "thinking_mode": "short", "n": 6, "seed": 2,
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema,
                                                                           "strict": True}}}
        status, r = client.request("POST", "/v1/chat/completions", body)
        assert status == 200, r
        done = [c for c in r["choices"] if c["finish_reason"] == "stop"]
        assert done and all(valid(json.loads(c["message"]["content"]), schema, schema) for c in done)
        for bad, word in (({"type": "json_schema"}, "json_schema"),
                          ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "array"}}},
                           "top level")):
            status, err = client.request("POST", "/v1/chat/completions", {**body, "response_format": bad})
            assert status == 400 and err["error"]["param"] == "response_format" and word in err["error"]["message"]


def test_a_forced_tool_call_grammar():
    """compile_tool_call: the text of one call as Qwen3's template writes it (r4b's renderer), name among the tools
    (either spelling), arguments by the tool's parameters schema, then nothing."""
    from r4b.engine.chat import _render_tool_call

    tools = [{"type": "function", "function": {"name": "person", "parameters": PERSON}},
             {"type": "function", "function": {"name": "café"}}]  # no parameters: any object
    call = S.compile_tool_call(tools)
    rng = random.Random(8)
    for _ in range(100):
        args = gen(PERSON, PERSON, rng) if rng.random() < 0.7 else {"x": [1, None]}
        name = "person" if "kind" in args else "café"
        text = _render_tool_call({"name": name, "arguments": args}, "t").encode()
        state = S.initial_call(call)
        for k, b in enumerate(text):
            state = S.step(state, b)
            assert state is not None, (text, k)
        assert S.is_complete(state) and S.step(state, ord(" ")) is None
    ok = '<tool_call>\n{"name": "café", "arguments": {}}\n</tool_call>'
    assert S.is_complete(S.advance(S.initial_call(call), ("\n\n" + ok).encode()))  # whitespace before the head
    assert S.is_complete(S.advance(S.initial_call(call), ok.replace("café", "caf\\u00e9").encode()))
    for bad in (ok.replace("café", "cafe"), ok.replace("{}}", "[]}"), ok.replace("\n</tool_call>", "</tool_call>"),
                '<tool_call>\n{"name": "person", "arguments": {"name": "x"}}\n</tool_call>',  # age, kind required
                "Sure. " + ok):
        assert not S.is_complete(S.advance(S.initial_call(call), bad.encode())), bad
    named = S.compile_tool_call(tools, "café")
    assert S.advance(S.initial_call(named), b'<tool_call>\n{"name": "p') is None  # only the named tool
    with pytest.raises(S.SchemaError, match=r"tools\[0\] \(person\).parameters: schema: allOf"):
        S.compile_tool_call([{"type": "function", "function": {"name": "person", "parameters": {"allOf": []}}}])


def test_masks_are_the_brute_force_sets_in_a_forced_call():
    tok = _json_tokenizer()
    masker = S.JsonMasker(tok, tok.vocab_size)
    call = S.compile_tool_call([{"type": "function", "function": {"name": "f", "parameters": SCHEMAS["flat"]}},
                                {"type": "function", "function": {"name": "g"}}])
    text = b'  <tool_call>\n{"name": "f", "arguments": {"why": "x", "answer": 12}}\n</tool_call>'
    state, states = S.initial_call(call), []
    for b in text:
        states.append(state)
        state = S.step(state, b)
    states.append(state)
    tags = [tok.tokenizer.token_to_id(t) for t in ("<tool_call>", "</tool_call>", "<think>", "</think>")]
    assert [masker.bytes[i] for i in tags] == [b"<tool_call>", b"</tool_call>", None, None]
    assert masker.mask(S.initial_call(call), (0,))[tags[0]]  # the model's own single <tool_call> token
    assert masker.mask(S.advance(S.initial_call(call), text[2:-len("</tool_call>")]), (0,))[tags[1]]
    for state in states[::2]:
        want = [i for i, d in enumerate(masker.bytes) if d and S.advance(state, d) is not None]
        m = masker.mask(state, (0,))
        got = [] if m is None else [i for i in m.nonzero()[:, 0].tolist() if i != 0]
        assert got == [i for i in want if i != 0], state
