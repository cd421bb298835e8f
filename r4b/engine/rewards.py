"""Rule-based rewards for BPO / GRPO rollouts: math answer equivalence, exact match, multiple-choice letter.

Every reward takes ``(answer, reference)`` and returns a float in {0.0, 1.0}. ``answer`` is the model's final
answer text (the part after ``</think>``, already split off by the caller); ``reference`` is the data set's
answer. The rollout code calls them through :func:`safe_reward`, which turns an exception (or a value that is
not a finite number) into a reward of 0 plus an error string to count, so a failing reward never kills a run
(docs/DESIGN.md, "BPO").

Pure Python; sympy (a torch dependency) is imported lazily, only when two math answers differ as strings and are
not both plain numbers.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from fractions import Fraction

__all__ = [
    "REWARDS",
    "choice_reward",
    "exact_match_reward",
    "extract_boxed",
    "get_reward",
    "math_equal",
    "math_reward",
    "normalize_math",
    "safe_reward",
]

# ----------------------------------------------------------------------------------------------------------------
# \boxed{...}

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _brace_table(s: str) -> dict[int, int]:
    """Index of each ``{`` -> index of its ``}`` (-1 when it never closes), escaped braces (``\\{``, ``\\}``)
    skipped. One pass with a stack, so every brace lookup afterwards is O(1) (hostile inputs stay linear)."""
    table: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
            table[i] = -1
        elif c == "}" and stack:
            table[stack.pop()] = i
        i += 1
    return table


def extract_boxed(text: str) -> str | None:
    """The content (stripped) of the last ``\\boxed{...}`` or ``\\fbox{...}`` whose braces balance; None if none.

    "Last" is the box that closes last, so of two boxes the second wins, and a box nested inside another is part
    of the outer one's content (``\\boxed{2 + \\boxed{1}}`` gives ``2 + \\boxed{1}``), except that a box whose
    whole content is one box gives the inner content (``\\boxed{\\boxed{1}}`` gives ``1``). Escaped braces
    (``\\{``, ``\\}``) do not count; a box that never closes is ignored. Linear in len(text), whatever the input.
    """
    table = _brace_table(text)
    boxes: dict[int, tuple[int, int]] = {}  # where a box's command starts -> (content start, closing brace)
    last: tuple[int, int] | None = None
    for m in _BOX_OPEN.finditer(text):
        close = table.get(m.end() - 1, -1)
        if close >= 0 and (m.start() == 0 or text[m.start() - 1] != "\\"):
            boxes[m.start()] = (m.end(), close)
            if last is None or close > last[1]:
                last = (m.end(), close)
    if last is None:
        return None
    start, end = last
    while True:  # a box whose whole content (spaces aside) is one box: take the inner one
        while start < end and text[start].isspace():
            start += 1
        inner = boxes.get(start)
        tail = end
        while tail > start and text[tail - 1].isspace():
            tail -= 1
        if inner is None or inner[1] != tail - 1:
            return text[start:end].strip()
        start, end = inner


# ----------------------------------------------------------------------------------------------------------------
# normalization

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|textnormal|mathrm|mathbf|mbox)\s*\{")
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?::|\bis\b:?)\s*", re.IGNORECASE)
_SIZING = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])")
_SPACING = re.compile(r"\\(?:[!,;:]|\s|q?quad(?![A-Za-z]))")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])")
_VARIABLE_PREFIX = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_(?:\w|\{\w+\}))?=")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"(?<![\d.])(\d*)\.(\d+)(?![\d.])")
_COMMAND = re.compile(r"\\[A-Za-z]+")


def _unwrap_text(s: str) -> str:
    """``\\text{...}`` (and the other wrappers in ``_TEXT_WRAPPER``) replaced by their content; an unclosed one is
    kept as it is. Linear: the braces are matched once, up front."""
    table = _brace_table(s)
    keep = [True] * len(s)
    changed = False
    for m in _TEXT_WRAPPER.finditer(s):
        close = table.get(m.end() - 1, -1)
        if close >= 0:
            keep[m.start() : m.end()] = [False] * (m.end() - m.start())
            keep[close] = False
            changed = True
    return "".join(c for c, k in zip(s, keep, strict=True) if k) if changed else s


def _brace_args(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``, ``\\sqrt[3]8`` -> ``\\sqrt[3]{8}``: the
    short argument forms (one character or one control sequence) get braces; the spaces between a command and its
    arguments go. One pass: a brace-group argument is copied as the scan goes through it, and the arguments still
    to read after it are picked up when the scan reaches its closing brace."""
    table = _brace_table(s)
    n = len(s)
    out: list[str] = []
    pending: dict[int, int] = {}  # index right after a group argument's "}" -> arguments still to read there

    def read_args(i: int, count: int) -> int:
        while count > 0:
            while i < n and s[i].isspace():
                i += 1
            if i >= n or s[i] == "}":
                return i
            if s[i] == "{":
                close = table.get(i, -1)
                if close < 0:
                    return i
                if count > 1:
                    pending[close + 1] = count - 1
                out.append("{")
                return i + 1
            m = _COMMAND.match(s, i) if s[i] == "\\" else None
            end = m.end() if m else min(i + (2 if s[i] == "\\" else 1), n)
            out.append("{" + s[i:end] + "}")
            i, count = end, count - 1
        return i

    i = 0
    while i < n:
        if i in pending:
            i = read_args(i, pending.pop(i))
            continue
        m = _COMMAND.match(s, i) if s[i] == "\\" else None
        if m is None:
            out.append(s[i])
            i += 1
            continue
        name = m.group()
        out.append(name)
        i = m.end()
        if name == "\\frac":
            i = read_args(i, 2)
        elif name == "\\sqrt":
            j = i
            while j < n and s[j].isspace():
                j += 1
            if j < n and s[j] == "[":
                close = s.find("]", j, j + 64)  # a short root index only; a long "[" is left alone
                if close < 0:
                    continue
                out.append(s[j : close + 1])
                j = close + 1
            i = read_args(j, 1)
    return "".join(out)


def _strip_decimal(m: re.Match) -> str:
    whole, frac = m.group(1) or "0", m.group(2).rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def normalize_math(s: str) -> str:
    """A canonical string for comparing math answers. The rules, applied in this order:

    1. ``\\text{...}`` is replaced by its content (also ``\\textbf``, ``\\textrm``, ``\\textit``, ``\\textnormal``,
       ``\\mathrm``, ``\\mathbf``, ``\\mbox``), braces inside allowed: ``5\\text{ cm}`` -> ``5cm``.
    2. Dollar signs go (``\\$`` and ``$``): ``$\\$5$`` -> ``5``.
    3. A leading "answer" prefix goes, case-insensitive: ``Answer: 5``, ``Final answer: 5``, ``The answer is 5``.
    4. ``\\left``, ``\\right`` and ``\\displaystyle`` go; so do the spacing commands ``\\!``, ``\\,``, ``\\;``,
       ``\\:``, ``\\ `` (backslash-space), ``\\quad`` and ``\\qquad``.
    5. ``\\dfrac`` and ``\\tfrac`` become ``\\frac``.
    6. Short arguments get braces: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}``, ``\\frac\\pi2``,
       ``\\sqrt2`` -> ``\\sqrt{2}``, ``\\sqrt[3]8`` -> ``\\sqrt[3]{8}``.
    7. All whitespace goes (inside too): ``1 + 2`` -> ``1+2``.
    8. Degree signs go: ``^\\circ``, ``^{\\circ}``, ``°``, ``\\degree``: ``30^\\circ`` -> ``30``.
    9. ``\\%`` becomes ``%``. Percentages are NOT converted: ``50\\%`` stays ``50%``, which differs from ``50``
       and from ``0.5`` (whether a percent answer means 50 or 0.5 depends on the question, so neither is assumed).
    10. A leading single variable name followed by ``=`` goes, when it is the only ``=``: ``x = 5`` -> ``5``,
        ``x_1=5``, ``\\theta=30``; ``f(x)=2x`` and ``x=y=2`` are kept.
    11. One trailing period goes: ``5.`` -> ``5``.
    12. Thousands separators go when the whole answer is one number whose comma groups are 3 digits (``{,}``
        counts as a comma): ``1,000`` -> ``1000``, ``12,345.5`` -> ``12345.5``; ``1,00``, ``(1,234)`` and
        ``1,2,3`` are kept (a tuple is not a number).
    13. Decimals lose trailing zeros and gain a leading zero: ``0.50`` -> ``0.5``, ``2.0`` -> ``2``,
        ``.5`` -> ``0.5`` (every decimal number in the string; ``1.2.3`` is not a decimal and is kept).

    Units are not stripped (``5\\text{ cm}`` is ``5cm``, not ``5``): the rules stay predictable.
    """
    s = _unwrap_text(s.strip())
    s = s.replace("\\$", "").replace("$", "").strip()
    s = _ANSWER_PREFIX.sub("", s)
    s = _SIZING.sub("", s)
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if "\\frac" in s or "\\sqrt" in s:
        s = _brace_args(s)
    s = "".join(s.split())
    s = _DEGREE.sub("", s)
    s = s.replace("\\%", "%")
    if s.count("=") == 1:
        m = _VARIABLE_PREFIX.match(s)
        if m and m.end() < len(s):
            s = s[m.end() :]
    if s.endswith("."):
        s = s[:-1]
    s = s.replace("{,}", ",")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return _DECIMAL.sub(_strip_decimal, s)


# ----------------------------------------------------------------------------------------------------------------
# math equivalence

_REL_TOL = 1e-6
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_PLAIN_NUMBER = re.compile(_NUM)
_SLASH_FRACTION = re.compile(rf"({_NUM})/({_NUM})")
_TEX_FRACTION = re.compile(rf"([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_EXPONENT = re.compile(r"[eE]([+-]?\d+)$")
_MAX_LITERAL_EXPONENT = 1000


def _fraction(text: str) -> Fraction:
    m = _EXPONENT.search(text)
    if m and abs(int(m.group(1))) > _MAX_LITERAL_EXPONENT:
        raise ValueError("exponent too large")
    return Fraction(text)


def _parse_number(s: str) -> Fraction | None:
    """A normalized answer as an exact number: an int or decimal (``-3``, ``0.5``, ``1e-3``), ``a/b`` or
    ``\\frac{a}{b}`` with a, b plain numbers (signs allowed); None otherwise (or for a zero denominator)."""
    try:
        if _PLAIN_NUMBER.fullmatch(s):
            return _fraction(s)
        m = _SLASH_FRACTION.fullmatch(s)
        if m:
            return _fraction(m.group(1)) / _fraction(m.group(2))
        m = _TEX_FRACTION.fullmatch(s)
        if m:
            value = _fraction(m.group(2)) / _fraction(m.group(3))
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _numbers_close(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= Fraction(_REL_TOL) * max(abs(a), abs(b))


# The sympy path: only LaTeX-free inputs made of these characters (no quotes, commas, brackets, braces, "=",
# "!", "%", "<", ">"), at most _SYMPY_MAX_LEN long, without "__" or the names below.
_SYMPY_CHARS = re.compile(r"[0-9A-Za-z_+\-*/^().\s]+")
_SYMPY_MAX_LEN = 200
_SYMPY_BANNED = ("eval", "exec", "import", "lambda", "open")
_SYMPY_DECIMAL = re.compile(r"\d*\.\d+|\d+\.\d*")
_SYMPY_LITERAL_EXPONENT = re.compile(r"(?<![A-Za-z_])(?:\d+\.?\d*|\.\d+)[eE][+-]?(\d+)")
_SYMPY_MAX_EXPONENT = 1000
_SYMPY_MAX_TERMS = 400
_SYMPY_FUNCTIONS = (
    "sqrt", "exp", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh",
    "tanh", "Abs", "pi", "E", "I", "oo",
)  # fmt: skip
_sympy_state: dict = {}


def _sympy():
    """(sympy, parse_expr, transformations, global namespace), built once. The namespace holds only the names the
    parser's generated code needs plus a few functions and constants, and no builtins: other names become
    Symbols (or undefined Functions when called), so nothing outside sympy's algebra can run."""
    if not _sympy_state:
        import sympy
        from sympy.parsing.sympy_parser import (
            convert_xor,
            implicit_multiplication,
            parse_expr,
            standard_transformations,
        )

        names = ("Symbol", "Function", "Integer", "Float", "Rational", "Add", "Mul", "Pow") + _SYMPY_FUNCTIONS
        namespace = {name: getattr(sympy, name) for name in names}
        namespace["abs"] = sympy.Abs
        namespace["__builtins__"] = {}
        transformations = (*standard_transformations, implicit_multiplication, convert_xor)
        _sympy_state.update(sympy=sympy, parse=parse_expr, transformations=transformations, namespace=namespace)
    st = _sympy_state
    return st["sympy"], st["parse"], st["transformations"], st["namespace"]


def _sympy_text_allowed(s: str) -> bool:
    if not s or len(s) > _SYMPY_MAX_LEN or "__" in s or not _SYMPY_CHARS.fullmatch(s):
        return False
    lower = s.lower()
    if any(name in lower for name in _SYMPY_BANNED):
        return False
    # a literal like 1e1000000 takes sympy's Float half a minute to build
    if any(int(m.group(1)) > _MAX_LITERAL_EXPONENT for m in _SYMPY_LITERAL_EXPONENT.finditer(s)):
        return False
    # a "." only inside a decimal number: no attribute access (x.evalf, 1.5.real)
    return "." not in _SYMPY_DECIMAL.sub("", s)


def _magnitude(expr, sympy) -> float:
    """An upper bound on |value| of an evaluated (exponent) expression, counting each symbol as 1: the sums and
    products of the numbers' magnitudes. Symbols cannot hide a big number (``x - x + 10**6`` evaluates to
    ``10**6``), so a big bound means the exponent's numeric part may be big."""
    try:
        if expr.is_Number:
            return float(abs(expr)) if expr.is_finite else math.inf
        if expr.is_Atom:
            return float(abs(sympy.N(expr))) if expr.is_number else 1.0
        parts = [_magnitude(arg, sympy) for arg in expr.args]
        if isinstance(expr, sympy.Add):
            return sum(parts)
        if isinstance(expr, sympy.Mul):
            return math.prod(parts)
        if isinstance(expr, sympy.Pow):
            base, exp = parts
            if expr.exp.is_Number and expr.exp > 0 and base > 1:
                return math.inf if exp * math.log(base) > 700 else base**exp
            return max(base, 1.0)
        return max([1.0, *parts])
    except (OverflowError, TypeError, ValueError):
        return math.inf


def _powers_cheap(expr, sympy, scale: float = 1.0) -> bool:
    """False when evaluating the unevaluated parse ``expr`` could compute a huge number: a power whose exponent
    (evaluated: its own powers were checked first) may exceed _SYMPY_MAX_EXPONENT in magnitude, a power tower
    (``9**9**9**9``: the inner exponent evaluates to 387420489), or nested powers whose exponents multiply past it
    (``(9**999)**999``). ``scale`` is the product of the exponents of the powers enclosing ``expr``."""
    if isinstance(expr, sympy.Pow):
        if not _powers_cheap(expr.exp, sympy):
            return False
        scale = scale * max(_magnitude(expr.exp.doit(), sympy), 1.0)
        if not scale <= _SYMPY_MAX_EXPONENT:
            return False
        return _powers_cheap(expr.base, sympy, scale)
    return all(_powers_cheap(arg, sympy, scale) for arg in expr.args)


def _expanded_terms(expr, sympy) -> int:
    """An upper bound on the number of terms simplify may produce when it expands ``expr`` over a common
    denominator (capped just past _SYMPY_MAX_TERMS): ``(x+y+z)**100`` (5151 terms), ``(x+1)**1000`` or
    ``1/(x+1)**399 - x`` take it seconds to minutes. ``b**n`` with b of k terms has at most C(n+k-1, k-1) (for
    negative n too: a denominator expands as well); a product multiplies its factors' counts; a sum adds them and,
    as over a common denominator, multiplies the total by its terms' denominators' counts; a function call counts
    as two terms (trigsimp rewrites sin(x)**n through double angles), its arguments bounded on their own."""
    cap = _SYMPY_MAX_TERMS + 1
    if expr.is_Atom:
        return 1
    if isinstance(expr, sympy.Add):
        total = sum(_expanded_terms(arg, sympy) for arg in expr.args)
        for arg in expr.args:
            den = arg.as_numer_denom()[1]
            total *= 1 if den.is_Number else _expanded_terms(den, sympy)
            if total >= cap:
                return cap
        return min(cap, total)
    if isinstance(expr, sympy.Mul):
        return min(cap, math.prod(_expanded_terms(arg, sympy) for arg in expr.args))
    if isinstance(expr, sympy.Pow):
        k = _expanded_terms(expr.base, sympy)
        if k >= cap:
            return cap
        exp = expr.exp
        if not exp.is_Number:
            return min(cap, max(k, _expanded_terms(exp, sympy)))
        n = int(abs(exp))
        return k if k == 1 or n <= 1 else min(cap, math.comb(n + k - 1, k - 1))
    return 2 if all(_expanded_terms(arg, sympy) < cap for arg in expr.args) else cap


def _sympy_parse(s: str):
    """``s`` as a sympy expression (evaluated), or None when the guards reject it. The guards come first and the
    first parse is unevaluated (nothing computed), so a rejected input costs no evaluation."""
    if not _sympy_text_allowed(s):
        return None
    sympy, parse, transformations, namespace = _sympy()
    kwargs = {"transformations": transformations, "global_dict": dict(namespace), "local_dict": {}}
    if not _powers_cheap(parse(s, evaluate=False, **kwargs), sympy):
        return None
    kwargs["global_dict"] = dict(namespace)
    return parse(s, evaluate=True, **kwargs)


def _sympy_equal(a: str, b: str) -> bool:
    """a == b by sympy: simplify(a - b) == 0, or (for expressions without free symbols) numerically equal within
    the relative tolerance. False on any guard rejection or exception."""
    try:
        ea = _sympy_parse(a)
        eb = None if ea is None else _sympy_parse(b)
        if eb is None:
            return False
        sympy = _sympy_state["sympy"]
        diff = ea - eb
        if diff == 0:
            return True
        if _expanded_terms(diff, sympy) > _SYMPY_MAX_TERMS:
            return False
        if sympy.simplify(diff) == 0:
            return True
        if diff.free_symbols:
            return False
        va, vb = sympy.N(ea, 30), sympy.N(eb, 30)
        if not (va.is_finite and vb.is_finite):
            return False
        return bool(abs(va - vb) <= _REL_TOL * max(abs(va), abs(vb)))
    except Exception:
        return False


def math_equal(pred: str, ref: str) -> bool:
    """Whether two math answers are equal.

    1. Equal after :func:`normalize_math` (an empty answer equals nothing).
    2. Else, when both are plain numbers (ints, decimals, ``a/b``, ``\\frac{a}{b}``, signs): numerically equal
       within a relative tolerance of 1e-6 (exact arithmetic, so ``1/3`` vs ``0.333333333`` is equal and ``1/3``
       vs ``0.33`` is not). Two numbers that differ are not compared further.
    3. Else sympy, for LaTeX-free inputs only: both parsed with ``parse_expr`` (standard transformations,
       implicit multiplication, ``^`` as power, evaluate=True) and equal when ``simplify(a - b) == 0``, or, with
       no free symbols, when numerically equal within the tolerance (``sqrt(2)`` vs ``1.41421356``).
       The guard rejects (returns False) inputs over 200 characters, with ``__``, with any of eval / exec /
       import / lambda / open, with characters beyond letters, digits, ``_ + - * / ^ ( ) .`` and spaces, with a
       ``.`` outside a decimal number, and power towers or exponents above 1000 (checked on an unevaluated parse,
       before anything is computed), and differences whose expansion may exceed 400 terms (``(x+1)**1000``,
       ``(x+y+z)**100``: simplify would take seconds); so a few true but big identities are missed.
       Names are parsed against a namespace without builtins; ``e`` is a symbol, not Euler's number (write ``E``
       or ``exp(1)``). Any exception in sympy gives False.
    """
    a, b = normalize_math(pred), normalize_math(ref)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _parse_number(a), _parse_number(b)
    if x is not None and y is not None:
        return _numbers_close(x, y)
    if "\\" in a or "\\" in b:
        return False
    return _sympy_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# rewards


def _as_text(x, what: str) -> str:
    """Answers and references as text: a str, or an int / float (data sets store numeric answers as numbers)."""
    if isinstance(x, str):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return str(x)
    raise TypeError(f"{what} must be a str, got {type(x).__name__}")


def math_reward(answer: str, reference: str) -> float:
    """1.0 when the answer's ``\\boxed{}`` content (else its last non-empty line) is :func:`math_equal` to the
    reference (its ``\\boxed{}`` content when it has one), else 0.0."""
    answer, reference = _as_text(answer, "answer"), _as_text(reference, "reference")
    pred = extract_boxed(answer)
    if pred is None:
        lines = [line.strip() for line in answer.splitlines() if line.strip()]
        pred = lines[-1] if lines else ""
    ref = extract_boxed(reference) if "\\boxed" in reference or "\\fbox" in reference else None
    if ref is None:
        ref = reference.strip()
    return 1.0 if math_equal(pred, ref) else 0.0


def _exact_norm(s: str) -> str:
    s = " ".join(s.split()).lower()
    return s[:-1].rstrip() if s.endswith(".") else s


def exact_match_reward(answer: str, reference: str) -> float:
    """1.0 when answer and reference are equal after collapsing whitespace (ends stripped, inner runs to one
    space), lower-casing and removing one trailing period; an empty answer scores 0.0."""
    a = _exact_norm(_as_text(answer, "answer"))
    b = _exact_norm(_as_text(reference, "reference"))
    return 1.0 if a and a == b else 0.0


# Choice letters, tried by tier (the first tier with any match decides; within it the last match wins):
#   1. a boxed letter: \boxed{B}, \boxed{(b)}, \boxed{\text{B}}
#   2. an answer cue: "answer is (B)", "Answer: B", "the answer is B because" (a bare letter after the cue must be
#      a capital and a word of its own; A and I, which are also English words, only when followed by the end,
#      a newline or punctuation, so "the answer is A prime" is no match)
#   3. a parenthesized capital "(B)" not glued to a word (f(A) is no match)
#   4. a lone capital at the end ("... so B.") or else at the start ("B", "B.", "B)", "B:"); at the end not "I"
#      ("... than I.")
_CHOICE_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{\s*\(?\s*([A-Ja-j])\s*\)?\s*\.?\s*\}")
_CHOICE_CUE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*(?:\(\s*([A-Ja-j])\s*\)|([A-J])(?=\s*$|[.,;:!?)\n])|([B-HJ])\b)"
)
_CHOICE_PAREN = re.compile(r"(?<![A-Za-z0-9_])\(([A-J])\)")
_CHOICE_START = re.compile(r"\A\s*([A-J])(?:[.):]|\s*\Z)")
_CHOICE_END = re.compile(r"(?:\A|\s)\(?([A-HJ])\)?\.?\s*\Z")
_CHOICE_REFERENCE = re.compile(r"\s*\(?\s*([A-Ja-j])\s*\)?\s*[.:)]?\s*")


_WHITESPACE_RUN = re.compile(r"\s+")


def _collapse_space(m: re.Match) -> str:
    return "\n" if "\n" in m.group() else " "


def _choice_text(s: str) -> str:
    """Markup that hides a letter goes: \\text{}-style wrappers, ``$`` and markdown ``*`` emphasis; each run of
    whitespace becomes one space (one newline if it holds one), which also keeps the patterns below linear."""
    return _WHITESPACE_RUN.sub(_collapse_space, _unwrap_text(s).replace("$", "").replace("*", ""))


def _choice_letter(answer: str) -> str | None:
    text = _choice_text(answer)
    for tier in (_CHOICE_BOX, _CHOICE_CUE, _CHOICE_PAREN):
        letters = [next(g for g in m.groups() if g) for m in tier.finditer(text)]
        if letters:
            return letters[-1].upper()
    end, start = _CHOICE_END.search(text), _CHOICE_START.match(text)
    m = end or start
    return m.group(1) if m else None


def choice_reward(answer: str, reference: str) -> float:
    """1.0 when the letter (A-J) chosen in the answer equals the reference letter (case-insensitive), else 0.0;
    0.0 when the answer names no letter. The reference must be one letter, optionally boxed or written "(C)",
    "C." or "C)"; anything else raises ValueError (a data error, counted by :func:`safe_reward`)."""
    answer, reference = _as_text(answer, "answer"), _as_text(reference, "reference")
    ref_text = _choice_text(reference)
    boxed = extract_boxed(ref_text)
    m = _CHOICE_REFERENCE.fullmatch(boxed if boxed is not None else ref_text)
    if m is None:
        raise ValueError(f"choice reference must be one letter A-J, got {reference[:50]!r}")
    letter = _choice_letter(answer)
    return 1.0 if letter is not None and letter == m.group(1).upper() else 0.0


RewardFn = Callable[[str, str], float]

REWARDS: dict[str, RewardFn] = {"math": math_reward, "exact": exact_match_reward, "choice": choice_reward}


def get_reward(name: str) -> RewardFn:
    """The reward function registered under ``name`` in :data:`REWARDS`; ValueError naming the valid ones."""
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(sorted(REWARDS))}") from None


def resolve_reward(spec: str) -> RewardFn:
    """A reward by name (:data:`REWARDS`) or ``"package.module:function"`` (ValueError naming the spec)."""
    if not isinstance(spec, str) or ":" not in spec:
        return get_reward(spec)
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - any failure to import it (a relative or empty name, the module raising)
        raise ValueError(f"reward {spec!r} cannot be imported: {type(e).__name__}: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


_REWARD_BOUND = 1e6


def safe_reward(fn: Callable[[str, str], float], answer: str, reference: str) -> tuple[float, str | None]:
    """``fn(answer, reference)`` that never raises: ``(float(value), None)`` when it returns a finite number in
    [-1e6, 1e6] (bools, numpy and 0-d torch scalars included); otherwise ``(0.0, error)`` with error
    ``"<ExceptionType>: message"`` for an exception raised by ``fn``, ``"TypeError: ..."`` for a value that is
    not a number (a str, None, a multi-element array) and ``"ValueError: ..."`` for NaN, inf or a value out of
    range. The rollout code counts the errors; KeyboardInterrupt and SystemExit still propagate."""
    try:
        value = fn(answer, reference)
    except Exception as e:
        return 0.0, f"{type(e).__name__}: {e}"
    if isinstance(value, (str, bytes, bytearray)):
        return 0.0, f"TypeError: reward returned {type(value).__name__} {value[:50]!r}, not a number"
    try:
        number = float(value)
    except Exception:
        return 0.0, f"TypeError: reward returned {type(value).__name__}, not a number"
    if not math.isfinite(number):
        return 0.0, f"ValueError: reward returned {number}, not a finite number"
    if abs(number) > _REWARD_BOUND:
        return 0.0, f"ValueError: reward {number:g} outside [-1e6, 1e6]"
    return number, None
