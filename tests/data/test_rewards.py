"""trustrl.data.rewards: answer extraction, the three verifiers on worked examples, score()."""
import threading

import numpy as np
import pytest

from trustrl.data import rewards, tasks


@pytest.mark.parametrize("text,expected", [
    ("Answer: 42", "42"),
    ("answer :  42  \nmore text after the line", "42"),
    ("reasoning... \\boxed{7}", "7"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),               # nested braces
    ("\\boxed{1} first, then Answer: 2", "2"),               # the later marker wins
    ("Answer: 2, so \\boxed{3}", "3"),
    ("\\boxed{1} and \\boxed{2", "1"),                       # unbalanced last box is skipped
    ("Answer: **$5$.**", "5"),                               # decoration peeled
    ("Answer: \\(7\\)", "7"),
    ("\\fbox{9}", "9"),
    ("The answer is 42", None),                              # no marker
    ("\\boxed{3", None),                                     # only an unbalanced box
    ("Answer:   \n42", None),                                # empty answer line
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert rewards.extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("1,234", "1234"), (" 007 ", "7"), ("+5", "5"), ("12.0", "12"), ("-0", "0"), ("-12", "-12"),
    ("12.5", None), ("1,23", None), ("12a", None), ("", None), (None, None),
])
def test_normalize_integer(text, expected):
    assert rewards.normalize_integer(text) == expected


@pytest.mark.parametrize("response,ok", [
    ("Answer: 132", True), ("Answer:132", True), ("Answer: 132.", True), ("Answer: 0132", True),
    ("Answer: 132.0", True), ("\\boxed{132}", True), ("I think... Answer: 131\nAnswer: 132", True),
    ("Answer: 131", False), ("Answer: 132 apples", False),   # extra text on the answer line
    ("132", False),                                          # no marker
    ("\\boxed{132", False),                                  # unbalanced box
    ("Answer: 1.32e2", False), ("Answer: 132\n\\boxed{131}", False),
])
def test_arithmetic_correct(response, ok):
    assert rewards.arithmetic_correct(response, "132") is ok


# Puzzle 3, 5, 2 -> 16, read back from the canonical answer.
@pytest.mark.parametrize("response,ok", [
    ("Answer: (3+5)*2", True),
    ("Answer: 2*(5+3)", True),                   # any order / form
    ("Answer: (3+5)*2 = 16", True),              # "= target" accepted
    ("\\boxed{(3 + 5) \\times 2}", True),        # latex operators
    ("Answer: (3+5)*2*1", False),                # 1 was not given
    ("Answer: (3+3)*2", False),                  # 3 used twice
    ("Answer: (5+5)*2-4", False),
    ("Answer: 3*5+2", False),                    # wrong target (17)
    ("Answer: 3+5", False),                      # wrong target (8)
    ("Answer: 16", False),                       # just the target
    ("Answer: (3+5*2", False),                   # unbalanced brackets
    ("Answer: -3+5*2", False),                   # unary minus
    ("Answer: (3+5)*2 apples", False),           # extra text
    ("Answer: 2^3*2", False),                    # unknown operator
    ("(3+5)*2", False),                          # no marker
])
def test_countdown_correct(response, ok):
    assert rewards.countdown_correct(response, "(3+5)*2") is ok


def test_countdown_division_by_zero_and_fractions():
    assert tasks.evaluate_expression("8/(4-4)") is None
    # Puzzle 4, 4, 8 -> 64: a response dividing by zero is wrong, not a crash.
    assert rewards.countdown_correct("Answer: 8/(4-4)", "(4+4)*8") is False
    assert rewards.countdown_correct("Answer: 8*(4+4)", "(4+4)*8") is True
    # Exact fractions: 8/(4/4) * ... intermediate non-integers are evaluated exactly.
    assert rewards.countdown_correct("Answer: (8+8/4)*4", "(4+4)*8") is False  # 40
    assert rewards.countdown_correct("Answer: 4/8*4", "(4+4)*8") is False       # 2
    with pytest.raises(ValueError, match="not an arithmetic expression"):
        rewards.countdown_correct("Answer: 1", "x+1")


@pytest.mark.parametrize("response,answer,ok", [
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("Answer: 1/2", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{2}", "2", True),
    ("Answer: 10", "\\boxed{10}", True),
    ("\\boxed{\\sqrt{4}}", "2", True),
    ("Answer: 1,000", "1000", True),
    ("Answer: 1234", "1,234", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{(1,2)}", "(1, 2)", True),
    ("Answer: 1", "\\frac{1}{2}", False),
    ("Answer: 6.28", "2\\pi", False),
    ("\\boxed{2", "2", False),                  # unbalanced
    ("The answer is 2", "2", False),            # no marker
    ("Answer: " + "1" * 400, "1", False),       # too long to parse
])
def test_math_correct(response, answer, ok):
    assert rewards.math_correct(response, answer) is ok


def test_math_correct_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(
        (rewards.math_correct("\\boxed{0.5}", "\\frac{1}{2}"),
         rewards.math_correct("\\boxed{3}", "\\frac{1}{2}"))))
    t.start()
    t.join()
    assert out == [(True, False)]


def test_score_scale_prefix_and_registry():
    responses = ["Answer: 4", "Answer: 5", "no answer", "\\boxed{4}"]
    answers = ["4"] * 4
    assert rewards.score("arithmetic", responses, answers).tolist() == [1, 0, 0, 1]
    got = rewards.score("arithmetic", responses, answers, correct=1, wrong=-1)
    assert got.dtype == np.float32 and got.tolist() == [1, -1, -1, 1]
    got = rewards.score("arithmetic", [" 4", " 5"], ["4", "4"], prefix="Answer:")
    assert got.tolist() == [1, 0]
    assert rewards.score("aime", ["\\boxed{0.5}"], ["\\frac{1}{2}"], correct=2.0).tolist() == [2.0]
    assert rewards.get_reward_fn("gsm8k") is rewards.math_correct
    assert rewards.get_reward_fn("countdown") is rewards.countdown_correct
    with pytest.raises(ValueError, match=r"unknown reward / task 'chess'.*'arithmetic'"):
        rewards.score("chess", ["Answer: 1"], ["1"])
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        rewards.score("arithmetic", ["a", "b"], ["1"])


@pytest.mark.parametrize("task,difficulty,operations", [("arithmetic", 3, "+-*"),
                                                       ("countdown", 4, "+")])
def test_generated_answers_verify_and_perturbed_ones_do_not(task, difficulty, operations):
    examples = tasks.generate_splits(task, difficulty=difficulty, operations=operations,
                                     num_train=100, num_test=0, seed=0)["train"]
    answers = [ex["answer"] for ex in examples]
    assert rewards.score(task, [f"Answer: {a}" for a in answers], answers).all()
    if task == "arithmetic":
        wrong = [f"Answer: {int(a) + 1}" for a in answers]
    else:
        wrong = [f"Answer: {a}+1" for a in answers]  # changes the value and adds a number
    assert not rewards.score(task, wrong, answers).any()
