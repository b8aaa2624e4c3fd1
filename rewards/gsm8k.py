"""GSM8K correctness: find the final answer in a completion and compare it with the gold number.

Two modes, both deterministic (no timeouts inside, so a result never depends on load):

* **strict** reads only the answer after the last ``####`` marker, as GSM8K graders do:
  the rest of that line must start with a number (``$``, ``**`` and a leading sign allowed;
  thousands separators, decimals and ``a/b`` fractions understood; trailing units or words
  ignored) or with LaTeX (``\\frac{3}{4}``, ``\\boxed{18}``). Anything else scores 0.
* **flexible** takes the first of these that yields an answer: the strict ``####`` answer;
  the last ``\\boxed{...}``; the first number after the last "answer is" / "Answer:" /
  "final answer" phrase; the last number (or ``\\frac``) in the text. Only that one
  candidate is graded, so listing many numbers does not earn credit.

Before searching, the text is NFKC-normalised (full-width digits, non-breaking spaces),
the Unicode minus becomes ``-``, and thin/no-break spaces and LaTeX ``{,}`` / ``\\,``
between digit groups are read as thousands separators. When the completion has a
``</think>``, only the text after the last one is graded; an unclosed ``<think>`` means no
answer yet. Two plain numbers are compared as exact fractions with math-verify's rounding
rule (a test holds them to its verdict; its LaTeX parser costs ~5 ms per new string); any
other candidate (``\\frac{2400}{2}``, ``\\boxed{18 \\text{ dollars}}``) goes through math-verify.

Deliberately left out: decimal commas (``3,5`` reads as two numbers), numbers in words,
scientific notation. math-verify's own signal-based timeouts are never used: they need the
main thread and cancel any other ``SIGALRM`` (pytest-timeout's, a user's) on return. Instead,
candidates are short by construction and huge powers/factorials are refused before
comparison (they are the inputs that make sympy hang); the runner's per-call timeout is
the last line of defence.
"""
from __future__ import annotations

import functools
import logging
import re
import unicodedata
from fractions import Fraction

# math-verify warns on every call made with its timeouts off; that is our deliberate choice.
logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
logging.getLogger("math_verify.grader").setLevel(logging.ERROR)

_NUM = r"(?:(?<![\w.)\]])-)?(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?|(?:(?<![\w.)\]])-)?(?<!\d)\.\d+"
_FRAC_LATEX = r"-?\\[dt]?frac\{\s*-?[\d.,]+\s*\}\{\s*-?[\d.,]+\s*\}"
_TOKEN = re.compile(rf"{_FRAC_LATEX}|(?:{_NUM})(?:/\d+(?![\d,]))?")
_LEADING_NUMBER = re.compile(rf"^[\s*_]*+(?:\\?\$)?[\s*_]*+({_FRAC_LATEX}|(?:{_NUM})(?:/\d+)?)")
_HASH_LINE = re.compile(r"####[ \t]*([^\n]*)")
_ANCHOR = re.compile(r"\b(?:final\s+answer|answer)\b[\s*]*+(?:is|was|would\s+be|will\s+be|=|:)\s*:?",
                     re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MAX_CANDIDATE = 200  # characters handed to math-verify; GSM8K answers are short numbers
_MAX_EXPONENT = 1000  # refuse 2^(2^30), 9^9^9^9, (10^10)!: sympy hangs evaluating them


_SPACE_SEP = re.compile(r"(?<=\d)[\u00a0\u202f\u2009](?=\d{3}(?!\d))")
_LATEX_SEP = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\!|\\ )(?=\d{3}(?!\d))")


def normalise(text: str) -> str:
    """Unicode and LaTeX spellings of digits, minus and thousands separators, made plain."""
    text = unicodedata.normalize("NFKC", _SPACE_SEP.sub(",", text))
    text = text.replace("\u2212", "-").replace("\u2044", "/")
    return _LATEX_SEP.sub(",", text) if "\\" in text or "{,}" in text else text


def answer_region(text: str) -> str:
    """The part of a completion that may hold the final answer (after any reasoning block)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return ""  # still reasoning: a truncated think block has not answered
    return text


_BRACE = re.compile(r"[{}]")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` with balanced braces, in order of opening.

    One pass over the braces with a stack: scanning forward from each ``\\boxed{`` would be
    quadratic, and a completion of 5,000 unclosed ``\\boxed{`` once took 40 s that way.
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    starts = {m.end() - 1 for m in _BOXED.finditer(text)}
    stack, found = [], []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            j = stack.pop()
            if j in starts:
                found.append((j, text[j + 1:m.start()]))
    return [content for _, content in sorted(found)]


def strict_answer(text: str) -> str | None:
    """The answer written after the last ``####``, or None when there is no readable one."""
    return _strict(normalise(answer_region(text)))


def _strict(text: str) -> str | None:
    matches = _HASH_LINE.findall(text)
    if not matches:
        return None
    rest = matches[-1].strip()
    m = _LEADING_NUMBER.match(rest)
    if m:
        return m.group(1)
    if rest.startswith(("\\", "$")):
        return rest[:_MAX_CANDIDATE]  # LaTeX after the marker: math-verify reads it
    return None


def flexible_answer(text: str) -> str | None:
    """The one candidate flexible mode grades (see the module docstring for the order)."""
    text = normalise(answer_region(text))
    strict = _strict(text)
    if strict is not None:
        return strict
    boxed = _boxed_contents(text)
    if boxed:
        return "\\boxed{" + boxed[-1].strip()[:_MAX_CANDIDATE] + "}"
    for m in reversed(list(_ANCHOR.finditer(text))):
        tail = text[m.end():m.end() + 60]
        inner = _boxed_contents(tail)
        if inner:
            return "\\boxed{" + inner[0].strip() + "}"
        tok = _TOKEN.search(tail)
        if tok:
            return tok.group(0)
    tokens = _TOKEN.findall(text)
    return tokens[-1] if tokens else None


def _math_verify():
    from math_verify import parse, verify  # imported lazily: 0.5 s, and only graders need it

    return parse, verify


def warm_up() -> None:
    """Import math-verify and run its parser and grader once (about 0.4 s on a CPU). Run when a
    grader is prepared (rewards.registry.prepare): left lazy, the cost fell in whichever training
    step first met an answer that is not a plain number, every reward thread waiting on the import."""
    _, verify = _math_verify()
    verify(_parse_gold("1"), _parse_candidate("\\frac{1}{2}"), timeout_seconds=None)


@functools.lru_cache(maxsize=65536)
def _parse_candidate(candidate: str):
    parse, _ = _math_verify()
    c = candidate.strip()
    if c.startswith("\\boxed{"):
        inner = c[len("\\boxed{"):-1].strip().rstrip(".").strip()
        plain = inner.replace("\\$", "").replace("$", "").strip()
        if re.fullmatch(rf"(?:{_NUM})(?:/\d+)?", plain):
            c = plain
        else:
            return parse("$\\boxed{" + inner + "}$", parsing_timeout=None)
    if re.fullmatch(rf"(?:{_NUM})(?:/\d+)?", c):
        return parse("$" + c.replace(",", "") + "$", parsing_timeout=None)
    if re.fullmatch(_FRAC_LATEX, c):
        return parse("$" + c + "$", parsing_timeout=None)
    return parse(c, parsing_timeout=None)


@functools.lru_cache(maxsize=65536)
def _parse_gold(gold: str):
    parse, _ = _math_verify()
    return parse("$" + normalise(gold).strip().replace(",", "") + "$", parsing_timeout=None)


def _too_big(expr) -> bool:
    """True for expressions whose evaluation can run for minutes (huge powers, factorials)."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            e = node.exp
            if not e.is_Number or abs(e) > _MAX_EXPONENT:
                return True
        elif isinstance(node, sympy.factorial):
            a = node.args[0]
            if not a.is_Number or abs(a) > _MAX_EXPONENT:
                return True
    return False


_PLAIN = re.compile(rf"(?:{_NUM})(?:/\d+)?")


def plain_number(text: str) -> Fraction | None:
    """A plain number (``-1,200.5``, ``3/4``, ``$18``) as an exact fraction; None for anything else."""
    t = normalise(text).strip().replace("\\$", "").lstrip("$").strip()
    if t.startswith("\\boxed{") and t.endswith("}"):
        t = t[len("\\boxed{"):-1].strip().rstrip(".").replace("\\$", "").strip()
    if not _PLAIN.fullmatch(t):
        return None
    num, _, den = t.replace(",", "").partition("/")
    if den and int(den) == 0:
        return None
    return Fraction(num) / Fraction(den) if den else Fraction(num)


def _written_as_integer(text: str) -> bool:
    return not re.search(r"[./]|frac", text)


def matches_gold(candidate: str | None, gold: str) -> bool:
    """Does the extracted candidate equal the gold number?

    Two plain numbers are compared exactly as fractions: math-verify reaches the same verdict
    on them (a test checks this) but its LaTeX parser costs about 5 ms per new string, which
    would dominate a training step. Everything else goes through math-verify.
    """
    if candidate is None or not str(gold).strip() or len(candidate) > _MAX_CANDIDATE:
        return False  # no GSM8K answer is 200 characters long; int() refuses > 4300 digits anyway
    g, c = plain_number(str(gold)), plain_number(candidate)
    if g is not None and c is not None:
        # math-verify's rule: exact when a side is written as an integer, else equal to 6 decimals.
        if g == c or _written_as_integer(str(gold)) or _written_as_integer(candidate):
            return g == c
        return round(g, 6) == round(c, 6)
    _, verify = _math_verify()
    pred = _parse_candidate(candidate)
    if not pred or any(_too_big(p) for p in pred):
        return False
    return bool(verify(_parse_gold(str(gold)), pred, timeout_seconds=None))


def gold_of(i: int, gold: list | None, answer: list | None, who: str) -> str | None:
    """The gold number for row i: the ``gold`` column, else the ``####`` line of ``answer``."""
    if gold is not None:
        return None if gold[i] is None else str(gold[i])
    if answer is not None:
        a = answer[i]
        return a.rsplit("####", 1)[1].strip() if isinstance(a, str) and "####" in a else None
    raise ValueError(f"{who} needs a 'gold' or 'answer' dataset column; the rows passed have neither")


def completion_text(c) -> str:
    """A completion as text: a plain string, or TRL's conversational list of messages."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    return "" if c is None else str(c)


def _grade(extract, who: str, completions, gold, answer) -> list[float | None]:
    out: list[float | None] = []
    for i, c in enumerate(completions):
        g = gold_of(i, gold, answer, who)
        out.append(None if g is None else float(matches_gold(extract(completion_text(c)), g)))
    return out


def gsm8k_strict(prompts, completions, gold=None, answer=None, **kwargs) -> list[float | None]:
    """1.0 when the answer after the last ``####`` equals the gold number, else 0.0 (None: no gold)."""
    return _grade(strict_answer, "gsm8k_strict", completions, gold, answer)


gsm8k_strict.warm_up = warm_up


def gsm8k_flexible(prompts, completions, gold=None, answer=None, **kwargs) -> list[float | None]:
    """1.0 when the flexible candidate (``####``, boxed, "answer is", last number) equals the gold."""
    return _grade(flexible_answer, "gsm8k_flexible", completions, gold, answer)


gsm8k_flexible.warm_up = warm_up
