"""GSM8K correctness, strict and flexible, over a table of answer formats (one row per case)."""
from __future__ import annotations

import pytest

from rewards import flexible_answer, gsm8k_flexible, gsm8k_strict, strict_answer

# (completion, gold, expected strict score, expected flexible score)
CASES = [
    # '#### N', GSM8K's own format
    ("She sells 9 eggs and makes 9 * 2 = 18 dollars.\n#### 18", "18", 1.0, 1.0),
    ("#### 18", "18", 1.0, 1.0),
    ("####18", "18", 1.0, 1.0),
    ("Work...\n#### 17", "18", 0.0, 0.0),
    ("#### 18 dollars", "18", 1.0, 1.0),
    ("#### 18.", "18", 1.0, 1.0),
    ("#### $18", "18", 1.0, 1.0),
    ("#### **18**", "18", 1.0, 1.0),
    ("#### 12\nOops, recomputing.\n#### 18", "18", 1.0, 1.0),
    ("#### 18\n#### 12", "18", 0.0, 0.0),
    ("#### 18\n\nExplanation: 9 eggs times 2 dollars.", "18", 1.0, 1.0),
    ("#### Step 1\nIt is 9 * 2 = 18\n#### Final answer: 18", "18", 0.0, 1.0),
    # thousands separators and currency
    ("#### 1,200", "1200", 1.0, 1.0),
    ("#### $1,200", "1200", 1.0, 1.0),
    ("#### 1200", "1,200", 1.0, 1.0),
    ("She paid $1,200 in total.", "1200", 0.0, 1.0),
    ("The total is 1,200,000 dollars.", "1200000", 0.0, 1.0),
    ("The total is 1,250 dollars.", "1200", 0.0, 0.0),
    ("The cost is 1{,}200.", "1200", 0.0, 1.0),
    ("The cost is 1\\,200.", "1200", 0.0, 1.0),
    # last number
    ("9 * 2 = 18", "18", 0.0, 1.0),
    ("She makes 18 dollars a day.", "18", 0.0, 1.0),
    ("She makes 18 dollars, then buys 3 more eggs.", "18", 0.0, 0.0),
    ("I think it is 12 or 18", "18", 0.0, 1.0),
    ("I think it is 18 or 12", "18", 0.0, 0.0),
    ("To find the answer we add 3 + 4 = 7 and 7 + 11 = 18", "18", 0.0, 1.0),
    ("x = 3-5 gives 5", "5", 0.0, 1.0),
    # \boxed{}
    ("So she makes \\boxed{18} dollars.", "18", 0.0, 1.0),
    ("\\boxed{18}", "18", 0.0, 1.0),
    ("\\boxed{17}", "18", 0.0, 0.0),
    ("First \\boxed{12}, no wait: \\boxed{18}", "18", 0.0, 1.0),
    ("\\boxed{18} is wrong, it is 12", "18", 0.0, 1.0),
    ("\\boxed{\\$1,200}", "1200", 0.0, 1.0),
    ("\\boxed{18 \\text{ dollars}}", "18", 0.0, 1.0),
    ("\\boxed{18.}", "18", 0.0, 1.0),
    ("#### \\boxed{18}", "18", 1.0, 1.0),
    ("\\boxed{}", "18", 0.0, 0.0),
    # 'The answer is'
    ("The answer is 18.", "18", 0.0, 1.0),
    ("The answer is 18. Check: 2 eggs were broken.", "18", 0.0, 1.0),
    ("The answer is: $18", "18", 0.0, 1.0),
    ("**Answer:** 18 apples", "18", 0.0, 1.0),
    ("Final answer: 18", "18", 0.0, 1.0),
    ("The answer is 12. Wait, the answer is 18.", "18", 0.0, 1.0),
    ("The answer is 17.", "18", 0.0, 0.0),
    ("The answer is $\\frac{36}{2}$.", "18", 0.0, 1.0),
    # LaTeX
    ("So $x = 18$.", "18", 0.0, 1.0),
    ("$\\frac{3}{4}$ of the cake", "0.75", 0.0, 1.0),
    ("#### \\frac{3}{4}", "0.75", 1.0, 1.0),
    ("#### $\\frac{3}{4}$", "0.75", 1.0, 1.0),
    ("It is \\dfrac{1}{2}", "0.5", 0.0, 1.0),
    # negatives
    ("#### -3", "-3", 1.0, 1.0),
    ("#### 3", "-3", 0.0, 0.0),
    ("The temperature falls to -3 degrees.", "-3", 0.0, 1.0),
    ("The temperature falls to (-3) degrees.", "-3", 0.0, 1.0),
    ("The change is \u22125", "-5", 0.0, 1.0),
    # decimals
    ("#### 18.00", "18", 1.0, 1.0),
    ("#### 0.5", "0.5", 1.0, 1.0),
    ("#### .5", "0.5", 1.0, 1.0),
    ("#### 18.5", "18", 0.0, 0.0),
    ("It costs 2.25 dollars.", "2.25", 0.0, 1.0),
    # fractions
    ("#### 3/4", "0.75", 1.0, 1.0),
    ("#### 1/2", "0.75", 0.0, 0.0),
    ("She ate 9/2 pizzas.", "4.5", 0.0, 1.0),
    # percent and units
    ("#### 50%", "50", 1.0, 1.0),
    ("The discount is 50%.", "50", 0.0, 1.0),
    ("It is 18 cm long.", "18", 0.0, 1.0),
    # empty and no answer
    ("", "18", 0.0, 0.0),
    ("   \n  ", "18", 0.0, 0.0),
    ("I do not know.", "18", 0.0, 0.0),
    ("####", "18", 0.0, 0.0),
    ("#### eighteen", "18", 0.0, 0.0),
    # non-ASCII
    ("\u7b54\u6848\u662f 18", "18", 0.0, 1.0),
    ("La r\u00e9ponse est 18 \u20ac.", "18", 0.0, 1.0),
    ("#### \uff11\uff18", "18", 1.0, 1.0),
    ("Total: 1\u202f200 \u20ac", "1200", 0.0, 1.0),
    ("Das macht 18\u00a0Euro \U0001F600", "18", 0.0, 1.0),
    # <think> blocks
    ("<think>9 * 2 = 18 so #### 17</think>\n#### 18", "18", 1.0, 1.0),
    ("<think>#### 18</think>\nThe answer is 17.", "18", 0.0, 0.0),
    ("<think>9 * 2 = 18, so the answer is", "18", 0.0, 0.0),
    # adversarial: huge powers are refused, not evaluated
    ("\\boxed{9^{9^{9^{9}}}}", "18", 0.0, 0.0),
    ("\\boxed{2^{2^{30}}}", "18", 0.0, 0.0),
    ("\\boxed{2^{4} + 2}", "18", 0.0, 1.0),
    ("#### " + "9" * 5000, "18", 0.0, 0.0),
    ("The answer is " + "1" * 5000, "18", 0.0, 0.0),
]


def test_table_is_large_and_covers_both_outcomes():
    assert len(CASES) >= 60
    for mode in (2, 3):
        assert {c[mode] for c in CASES} == {0.0, 1.0}


@pytest.mark.parametrize("text,gold,strict,flexible", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_answer_formats(text, gold, strict, flexible):
    got_strict = gsm8k_strict(None, [text], gold=[gold])[0]
    got_flex = gsm8k_flexible(None, [text], gold=[gold])[0]
    assert (got_strict, got_flex) == (strict, flexible), (
        f"strict candidate {strict_answer(text)!r}, flexible candidate {flexible_answer(text)!r}")


def test_gold_from_answer_column_and_missing_gold():
    sol = "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = 18.\n#### 18"
    assert gsm8k_strict(None, ["#### 18", "#### 9"], answer=[sol, sol]) == [1.0, 0.0]
    assert gsm8k_flexible(None, ["#### 18"], gold=[None]) == [None]
    with pytest.raises(ValueError, match="gsm8k_strict needs a 'gold' or 'answer'"):
        gsm8k_strict(None, ["#### 18"], question=["q"])


def test_conversational_completions_are_read():
    msgs = [[{"role": "assistant", "content": "#### 18"}], [{"role": "assistant", "content": "17"}]]
    assert gsm8k_flexible(None, msgs, gold=["18", "18"]) == [1.0, 0.0]


def test_deterministic_across_repeats():
    texts = [c[0] for c in CASES]
    golds = [c[1] for c in CASES]
    first = gsm8k_flexible(None, texts, gold=golds)
    assert all(gsm8k_flexible(None, texts, gold=golds) == first for _ in range(3))


# (candidate, gold): plain numbers that skip math-verify's parser must get its verdict anyway.
NUMERIC_PAIRS = [
    ("1,200", "1200"), ("18.00", "18"), ("-3", "-3"), ("-3", "3"), ("3/4", "0.75"), (".5", "0.5"),
    ("18.5", "18"), ("1/3", "0.333333"), ("0.333333", "1/3"), ("1/3", "0.33"), ("18.0000001", "18"),
    ("0.10000001", "0.1"), ("2.50001", "2.5"), ("0.6666667", "2/3"), ("1,000,000", "1000000"),
    ("2.250", "2.25"), ("0", "0"), ("7", "70"), ("0.5", "50"),
]


@pytest.mark.parametrize("candidate,gold", NUMERIC_PAIRS)
def test_plain_number_path_agrees_with_math_verify(candidate, gold):
    from math_verify import parse, verify

    from rewards.gsm8k import matches_gold, plain_number

    assert plain_number(candidate) is not None and plain_number(gold) is not None
    reference = verify(parse(f"${gold.replace(',', '')}$", parsing_timeout=None),
                       parse(f"${candidate.replace(',', '')}$", parsing_timeout=None), timeout_seconds=None)
    assert matches_gold(candidate, gold) == reference


def test_pathological_completions_are_graded_not_hung():
    # Inputs that once made an extractor quadratic or sympy evaluate forever; all must simply score 0.
    texts = ["\\boxed{" * 5000, "#### " + "*_ " * 20000 + "$x", ("answer " + " " * 200) * 300 + "x",
             "-" * 50000, "1," * 30000, "\\frac{1" * 5000, "\\boxed{(10^{10})!}", "#### 1\n" * 10000]
    assert gsm8k_flexible(None, texts, gold=["18"] * len(texts)) == [0.0] * len(texts)
    assert gsm8k_strict(None, texts, gold=["18"] * len(texts)) == [0.0] * len(texts)


def test_preparing_a_grader_warms_math_verify_up():
    """math-verify's import and first parse (about 0.4 s) happen when a grader is prepared, not
    in the first training step that meets an answer needing it (a fresh process shows both)."""
    import subprocess
    import sys

    code = ("import sys; from rewards import gsm8k; from rewards.registry import prepare, resolve; "
            "assert 'math_verify' not in sys.modules; prepare(resolve('gsm8k_flexible')); "
            "print('math_verify' in sys.modules, gsm8k._parse_candidate.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "1"]
