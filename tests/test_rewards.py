"""Rule-based rewards (r4b.engine.rewards): normalization rules, boxed extraction, math equivalence (numeric and
sympy paths, hostile inputs), exact match, multiple-choice letters, the registry and safe_reward."""

from __future__ import annotations

import math
import time

import pytest

from r4b.engine import rewards
from r4b.engine.rewards import (
    REWARDS,
    choice_reward,
    exact_match_reward,
    extract_boxed,
    get_reward,
    math_equal,
    math_reward,
    normalize_math,
    safe_reward,
)

# ---------------------------------------------------------------------------------------------- normalize_math


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # 1. \text{...}-style wrappers keep their content (braces inside allowed; unclosed ones are left alone)
        (r"5\text{ cm}", "5cm"),
        (r"\textbf{7}", "7"),
        (r"\mathrm{a{b}c}", "a{b}c"),
        (r"\text{unclosed", r"\text{unclosed"),
        # 2. dollar signs
        (r"$\$5$", "5"),
        # 3. a leading "answer" prefix
        ("Answer: 5", "5"),
        ("Final answer: 7", "7"),
        ("The answer is 42", "42"),
        ("answers 5", "answers5"),
        # 4. \left, \right, \displaystyle and the spacing commands
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"\displaystyle \frac{1}{2}", r"\frac{1}{2}"),
        (r"1\!2\,3\;4\:5\ 6\quad7\qquad8", "12345678"),
        (r"a \rightarrow b", r"a\rightarrowb"),
        # 5. \dfrac / \tfrac
        (r"\dfrac{3}{4}", r"\frac{3}{4}"),
        (r"\tfrac{3}{4}", r"\frac{3}{4}"),
        # 6. short arguments get braces
        (r"\frac12", r"\frac{1}{2}"),
        (r"\frac1{2}", r"\frac{1}{2}"),
        (r"\frac{1}2", r"\frac{1}{2}"),
        (r"\frac\pi2", r"\frac{\pi}{2}"),
        (r"\frac{\sqrt2}2", r"\frac{\sqrt{2}}{2}"),
        (r"\frac{\frac12}3", r"\frac{\frac{1}{2}}{3}"),
        (r"\frac 1 2 + \frac{a}{b}", r"\frac{1}{2}+\frac{a}{b}"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\sqrt[3]8", r"\sqrt[3]{8}"),
        # 7. whitespace, inside too
        ("1 +  2", "1+2"),
        # 8. degree signs
        (r"30^\circ", "30"),
        (r"30^{\circ}", "30"),
        ("30°", "30"),
        (r"30\degree", "30"),
        # 9. \% -> % (percentages are not converted)
        (r"50\%", "50%"),
        # 10. a single variable name and "=" at the start, when it is the only "="
        ("x = 5", "5"),
        ("x_1 = 3", "3"),
        ("x_{12}=3", "3"),
        (r"\theta = 30^\circ", "30"),
        ("x=y=2", "x=y=2"),
        ("f(x)=2x", "f(x)=2x"),
        ("xy=3", "xy=3"),
        ("x=", "x="),
        # 11. one trailing period
        ("5.", "5"),
        ("x = 5.", "5"),
        # 12. thousands separators, only for a whole number with 3-digit groups
        ("1,000", "1000"),
        ("1,234,567", "1234567"),
        ("-12,345.50", "-12345.5"),
        ("1{,}000", "1000"),
        ("1,00", "1,00"),
        ("1234,567", "1234,567"),
        ("(1,234)", "(1,234)"),
        ("1,2,3", "1,2,3"),
        # 13. decimals: trailing zeros go, a leading zero comes
        ("0.50", "0.5"),
        ("2.0", "2"),
        ("10.010", "10.01"),
        (".5", "0.5"),
        ("x+1.500", "x+1.5"),
        ("1.2.3", "1.2.3"),
        ("100", "100"),
    ],
)
def test_normalize_math_rules(raw, expected):
    assert normalize_math(raw) == expected


def test_percent_is_not_converted():
    assert not math_equal(r"50\%", "50")
    assert not math_equal(r"50\%", "0.5")
    assert math_equal("50%", r"50\%")


def test_units_are_kept():
    assert not math_equal(r"5\text{ cm}", "5")
    assert math_equal(r"5\text{ cm}", "5 cm")


# ----------------------------------------------------------------------------------------------- extract_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{5}.", "5"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{x^{2} + \sqrt{y_{1}}}", r"x^{2} + \sqrt{y_{1}}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"\fbox{7}", "7"),
        (r"\boxed { 8 }", "8"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\boxed{9}}", "9"),
        (r"\boxed{2 + \boxed{1}}", r"2 + \boxed{1}"),
        (r"\boxed{1} and an unclosed \boxed{2", "1"),
        (r"\boxed{abc", None),
        ("no box here", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_hostile_is_linear():
    text = "\\boxed{" * 4000 + "x" * 10000
    t0 = time.perf_counter()
    assert extract_boxed(text) is None
    assert extract_boxed(text + "}") == "x" * 10000
    assert time.perf_counter() - t0 < 1.0


# -------------------------------------------------------------------------------------------------- math_equal


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("1/2", "0.5"),
        (r"\dfrac{3}{4}", "0.75"),
        (r"\frac34", r"\frac{3}{4}"),
        (r"-\frac{1}{2}", "-0.5"),
        (r"\frac{-1}{2}", "-1/2"),
        ("x = 5", "5"),
        ("1,000", "1000"),
        ("0.50", "1/2"),
        ("1/3", "0.3333333333"),
        ("1e-3", "0.001"),
        ("+5", "5"),
        (r"30^\circ", "30"),
        # sympy path (LaTeX-free)
        ("2*sqrt(2)", "sqrt(8)"),
        ("(x+1)**2", "x**2+2*x+1"),
        ("(x+1)^2", "x^2 + 2x + 1"),
        ("sin(x)**2 + cos(x)**2", "1"),
        ("2**(1/2)", "sqrt(2)"),
        ("sqrt(2)", "1.41421356"),
        ("E**(x+1)", "exp(x+1)"),
    ],
)
def test_math_equal_positive(pred, ref):
    assert math_equal(pred, ref)
    assert math_equal(ref, pred)


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("0.5", "0.51"),
        ("1/3", "0.33"),
        ("x", "y"),
        ("2", "-2"),
        (r"\frac{1}{2}", r"\frac{1}{3}"),
        ("1/0", "1/0 + 1"),
        ("0**-1", "1"),  # zoo is not numerically close to anything
        ("sqrt(x**2)", "x"),
        ("", ""),
        ("", "0"),
        (r"\sqrt{2}", "1.41421356"),  # LaTeX never goes to sympy
        ("1e1001", "1e1001 + 1"),
    ],
)
def test_math_equal_negative(pred, ref):
    assert not math_equal(pred, ref)


def test_numeric_tolerance_is_relative_1e6():
    assert math_equal("1000000", "1000000.5")
    assert not math_equal("1000000", "1000002")
    assert math_equal("0.000001", "0.0000010000001")
    assert not math_equal("0.000001", "0.0000011")


HOSTILE = [
    ("__import__('os')", "0"),
    ("__import__('os').system('echo pwned')", "0"),
    ("9**9**9**9", "1"),
    ("9^9^9^9", "1"),
    ("9**(9**9)", "1"),
    ("2**1001", "1"),
    ("(9**999)**999", "1"),
    ("9**(x-x+999*999*999)", "1"),
    ("9**(1/(1/1000000))", "1"),
    ("(x+1)**1000", "x"),
    ("(x+y+z)**100", "x"),
    ("1/(x+1)**399", "x"),
    ("sin(x)**20*cos(x)**20", "sin(2*x)**20/2**20"),
    ("1e1000000", "1e999999"),
    ("pi.evalf(100000)", "1"),
    ("1.5.real", "1.5"),
    ("exec(1)", "1"),
    ("eval(1)", "1"),
    ("open(1)", "1"),
    ("lambda: 1", "1"),
    ("x" * 10_000, "x"),
    ("1+" * 5_000 + "1", "5001"),
    ("(" * 10_000, "1"),
    ("\\frac{" * 3_000, "1"),
    ("\\text{" * 3_000, "1"),
    ("\\sqrt[" * 3_000, "1"),
    ("\\boxed{" * 3_000 + "1" + "}" * 3_000, "1"),
    ("1," * 5_000 + "1", "1"),
]


@pytest.mark.parametrize(("pred", "ref"), HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_math_equal_hostile_inputs_false_and_quick(pred, ref):
    t0 = time.perf_counter()
    assert math_equal(pred, ref) is False
    assert math_equal(ref, pred) is False
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "answer",
    ["answer" + " " * 10_000, "answer is" + " " * 10_000 + "x", "\\boxed{" + " " * 10_000, "(" * 10_000, "B" * 10_000],
)
def test_rewards_hostile_answers_quick(answer):
    t0 = time.perf_counter()
    for name, fn in REWARDS.items():
        reference = "B" if name == "choice" else "1"
        assert safe_reward(fn, answer, reference) == (0.0, None)
    assert time.perf_counter() - t0 < 1.0


def test_sympy_guards_direct():
    assert rewards._sympy_parse("2**1000") is not None
    assert rewards._sympy_parse("x**(2*500)") is not None
    for text in ["2**1001", "2**(2*501)", "(2**100)**11", "9**9**9**9", "2**(x-x+1001)", "x**1e5"]:
        assert rewards._sympy_parse(text) is None, text
    assert math_equal("2**1000", "2**999*2")
    assert not math_equal("((x+1)*(x-1))**250", "(x**2-1)**250")  # true, but over the expansion budget


def test_sympy_namespace_has_no_builtins(capsys):
    # print / input are parsed as undefined sympy functions, never called: print(1) + 0 - print(1) == 0
    assert math_equal("print(1) + 0", "print(1)")
    assert math_equal("input(1)*2", "2*input(1)")
    assert capsys.readouterr().out == ""


def test_sympy_exception_gives_false(monkeypatch):
    assert math_equal("x*(y+1)", "x*y+x")

    def boom(*args, **kwargs):
        raise RuntimeError("simplify failed")

    monkeypatch.setattr(rewards._sympy()[0], "simplify", boom)
    assert math_equal("x*(y+1)", "x*y+x") is False


# ------------------------------------------------------------------------------------------------- math_reward


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        (r"The area is $\boxed{\dfrac{1}{2}}$.", "0.5", 1.0),
        (r"\boxed{3} or rather \boxed{4}", "4", 1.0),
        (r"\boxed{3} or rather \boxed{4}", "3", 0.0),
        ("Some work.\nThe answer is 42.\n\n", "42", 1.0),
        ("42 is what I first thought.\nActually 43", "42", 0.0),
        ("x = 5", r"The solution gives $\boxed{5}$", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        ("", "0", 0.0),
        ("   \n  ", "0", 0.0),
        (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ],
)
def test_math_reward(answer, reference, expected):
    assert math_reward(answer, reference) == expected


def test_math_reward_numeric_reference():
    assert math_reward(r"\boxed{5}", 5) == 1.0
    assert math_reward(r"\boxed{0.25}", 0.25) == 1.0
    assert math_reward(r"\boxed{5}", 6) == 0.0
    with pytest.raises(TypeError, match="reference"):
        math_reward(r"\boxed{5}", None)


# ------------------------------------------------------------------------------------------ exact_match_reward


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("  Paris. ", "paris", 1.0),
        ("New   York\n", "new york", 1.0),
        ("NEW YORK.", "New York", 1.0),
        ("Paris", "London", 0.0),
        ("New York", "NewYork", 0.0),
        ("paris..", "paris", 0.0),  # only one trailing period goes
        ("", "", 0.0),  # an empty answer never scores
    ],
)
def test_exact_match_reward(answer, reference, expected):
    assert exact_match_reward(answer, reference) == expected


# ----------------------------------------------------------------------------------------------- choice_reward


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        (r"$\boxed{C}$", "C"),
        (r"\boxed{\text{(d)}}", "D"),
        (r"I say (A), but \boxed{B}", "B"),  # the box outranks the parentheses
        ("The answer is (B).", "B"),
        ("answer is (b)", "B"),
        ("Answer: B", "B"),
        ("**Answer: D**", "D"),
        ("Answer:\nC", "C"),
        ("Answer: B because it is larger", "B"),
        ("Answer: A.", "A"),
        ("Answer: A ... wait, the answer is (C)", "C"),  # the last cue wins
        ("The answer is (B), not (C).", "B"),  # the cue outranks a later bare (C)
        ("Options (A) 2 and (B) 3; I pick (B)", "B"),
        ("(E)", "E"),
        ("B", "B"),
        ("B. Because it is.", "B"),
        ("B) 42", "B"),
        ("so it is C.", "C"),
        ("The correct answer is J.", "J"),
        ("A prime number", None),
        ("the answer is A prime number", None),
        ("f(A) is big", None),
        ("better than I.", None),
        ("Answer: Because", None),
        ("answer: K", None),
        ("nothing here", None),
        ("", None),
    ],
)
def test_choice_letter_extraction(answer, letter):
    for ref in "ABCDEFGHIJ":
        assert choice_reward(answer, ref) == (1.0 if ref == letter else 0.0), ref


@pytest.mark.parametrize("reference", ["C", "c", "(C)", "C.", " C) ", r"\boxed{C}", "C:"])
def test_choice_reference_forms(reference):
    assert choice_reward("The answer is C.", reference) == 1.0
    assert choice_reward("The answer is D.", reference) == 0.0


@pytest.mark.parametrize("reference", ["CC", "42", "", "K"])
def test_choice_bad_reference_raises(reference):
    with pytest.raises(ValueError, match="one letter A-J"):
        choice_reward("C", reference)
    value, error = safe_reward(choice_reward, "C", reference)
    assert value == 0.0 and error.startswith("ValueError: choice reference")


# -------------------------------------------------------------------------------------------- registry, safety


def test_registry():
    assert set(REWARDS) == {"math", "exact", "choice"}
    assert get_reward("math") is math_reward
    assert get_reward("exact") is exact_match_reward
    assert get_reward("choice") is choice_reward
    with pytest.raises(ValueError, match=r"'bogus'.*choice, exact, math"):
        get_reward("bogus")


def test_safe_reward_normal():
    value, error = safe_reward(lambda a, r: 1 if a == r else 0, "x", "x")
    assert (value, error) == (1.0, None) and type(value) is float
    assert safe_reward(lambda a, r: -0.25, "x", "y") == (-0.25, None)
    assert safe_reward(lambda a, r: True, "x", "y") == (1.0, None)
    assert safe_reward(math_reward, r"\boxed{2}", "2") == (1.0, None)
    assert safe_reward(math_reward, r"\boxed{2}", "3") == (0.0, None)


def test_safe_reward_scalar_objects():
    torch = pytest.importorskip("torch")
    assert safe_reward(lambda a, r: torch.tensor(0.5), "x", "y") == (0.5, None)
    value, error = safe_reward(lambda a, r: torch.tensor([0.5, 1.0]), "x", "y")
    assert value == 0.0 and error.startswith("TypeError") and "Tensor" in error


def test_safe_reward_exception():
    def raising(answer, reference):
        return 1 / 0

    assert safe_reward(raising, "a", "b") == (0.0, "ZeroDivisionError: division by zero")


def test_safe_reward_keyboard_interrupt_propagates():
    def interrupted(answer, reference):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        safe_reward(interrupted, "a", "b")


@pytest.mark.parametrize(
    ("value", "kind", "why"),
    [
        (math.nan, "ValueError", "nan"),
        (math.inf, "ValueError", "inf"),
        (-math.inf, "ValueError", "inf"),
        (2e6, "ValueError", "outside"),
        ("1.0", "TypeError", "str"),
        (None, "TypeError", "NoneType"),
        ([1.0], "TypeError", "list"),
        (1 + 2j, "TypeError", "complex"),
    ],
)
def test_safe_reward_bad_values(value, kind, why):
    result, error = safe_reward(lambda a, r: value, "a", "b")
    assert result == 0.0 and type(result) is float
    assert error.startswith(f"{kind}: ") and why in error
