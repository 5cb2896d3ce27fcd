"""Verifiable rewards: exact-answer checks for the synthetic tasks, math-verify for math sets.

Response format (what every verifier reads): the response states its final answer last, either as
a line `Answer: <x>` or as `\\boxed{x}`; whichever marker comes LAST in the text wins, so a response
may reason first and may mention intermediate boxes. No marker -> missing answer -> wrong.
The plain prompt template (trustrl.data.datasets.PLAIN_TEMPLATE) already ends with "Answer:", so a
tiny
model answers directly; score those responses with
prefix=trustrl.data.datasets.response_prefix("plain").

Reward scale: `correct` for a correct answer, `wrong` for a wrong, malformed or missing one. The
paper uses 1 / 0 (the default); pass correct=1, wrong=-1 for the symmetric scale. With the
group-mean baseline (no std division) the scale only multiplies the advantages.

Which verifier a dataset uses: TASKS maps every dataset / task name to a key of REWARD_FNS, or
to REWARD_MODEL for the RLHF prompt sets (ultrafeedback, hh_rlhf, wordpref: trustrl.data.
preferences), which have no verifier: get_reward_fn / score raise for them, naming the task,
because their reward comes from a learned reward model (reward_model.hf_dir).
"""
from __future__ import annotations

import functools
import re
import threading

import numpy as np

from trustrl.data import tasks

# --- answer extraction -----------------------------------------------------------------------------

_ANSWER_LINE = re.compile(r"answer\s*:", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def boxed_spans(text: str):
    """(start, content) of every \\boxed{...} with balanced braces; unbalanced ones are skipped."""
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            yield m.start(), text[m.end():i - 1]


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the content of the last `\\boxed{...}` or the rest of the
    line after the last `Answer:`, whichever comes later; None when there is neither.

    Surrounding `$...$`, `\\( \\)`, `**` (markdown bold) and a trailing period are removed.
    """
    if not isinstance(text, str):
        return None
    candidates = [(start, content) for start, content in boxed_spans(text)]
    lines = list(_ANSWER_LINE.finditer(text))
    if lines:
        m = lines[-1]
        rest = text[m.end():].split("\n", 1)[0]
        candidates.append((m.start(), rest))
    if not candidates:
        return None
    answer = max(candidates, key=lambda c: c[0])[1].strip()
    # Peel decoration layers until nothing changes ("**$5$.**" -> "5").
    previous = None
    while answer != previous:
        previous = answer
        answer = answer.strip().rstrip(".").strip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
                answer = answer[len(left):len(answer) - len(right)]
    return answer or None


_NUMBER = re.compile(r"[+-]?\d+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+")


def normalize_integer(text: str | None) -> str | None:
    """Canonical integer string ("1,234" / " 007 " / "+5" / "12.0" -> "1234" / "7" / "5" / "12"),
    or None when the text is not a single integer."""
    if text is None:
        return None
    s = re.sub(r"\s+", "", text)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"\.0*$", "", s)  # "12.0" is the integer 12 (a common model habit)
    if not _NUMBER.fullmatch(s):
        return None
    return str(int(s))  # int() drops leading zeros and the sign of zero


# --- verifiers: (response, answer) -> bool ---------------------------------------------------------

def arithmetic_correct(response: str, answer: str) -> bool:
    """Exact integer match of the extracted final answer (after normalisation)."""
    pred = normalize_integer(extract_answer(response))
    return pred is not None and pred == normalize_integer(answer)


@functools.lru_cache(maxsize=4096)
def _countdown_spec(answer: str):
    """(target, sorted numbers) from a canonical countdown answer (an expression using them all)."""
    parsed = tasks.evaluate_expression(answer)
    if parsed is None:
        raise ValueError(f"countdown answer {answer!r} is not an arithmetic expression")
    return parsed[0], parsed[1]


def countdown_correct(response: str, answer: str) -> bool:
    """The final answer is an expression over the puzzle's numbers, each used at most once, that
    evaluates exactly to the target. The puzzle is read back from `answer`, the canonical
    expression (trustrl.data.tasks), which uses every number once. `expr = target` is accepted."""
    target, numbers = _countdown_spec(answer)
    pred = extract_answer(response)
    if pred is None:
        return False
    if "=" in pred:  # "(3+5)*2 = 16": judge the left-hand side
        pred = pred.split("=", 1)[0]
    parsed = tasks.evaluate_expression(pred)
    if parsed is None:
        return False
    value, used = parsed
    available = list(numbers)
    for n in used:
        if n not in available:
            return False
        available.remove(n)
    return value == target


def _math_timeouts():
    # math-verify's timeouts use signal.alarm, which raises off the main thread; there we turn
    # them off (None) and rely on the short extracted answer (<= _MAX_MATH_ANSWER chars) to bound
    # the sympy work instead.
    on_main = threading.current_thread() is threading.main_thread()
    return (5, 5) if on_main else (None, None)


_MAX_MATH_ANSWER = 300


@functools.lru_cache(maxsize=4096)
def _parse_math(text: str, parsing_timeout):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse  # sympy: slow import
    return parse(f"\\boxed{{{text}}}", extraction_config=[LatexExtractionConfig(),
                                                         ExprExtractionConfig()],
                 parsing_timeout=parsing_timeout)


def math_correct(response: str, answer: str) -> bool:
    """math-verify equivalence of the extracted final answer and the gold answer (latex or plain:
    `\\frac{1}{2}` == `0.5` == `1/2`; `1,000` == `1000`)."""
    from math_verify import verify
    pred = extract_answer(response)
    if pred is None or len(pred) > _MAX_MATH_ANSWER:
        return False
    parse_timeout, verify_timeout = _math_timeouts()
    # Thousands separators would read as a tuple; drop them when the answer is a plain integer.
    gold = _parse_math(answer.replace(",", "") if _THOUSANDS.fullmatch(answer.strip()) else answer,
                       parse_timeout)
    pred = pred.replace(",", "") if _THOUSANDS.fullmatch(pred.strip()) else pred
    target = _parse_math(pred, parse_timeout)
    if not gold or not target:
        return False
    try:
        return bool(verify(gold, target, timeout_seconds=verify_timeout))
    except Exception:  # a sympy corner case in a model's answer is a wrong answer, not a crash
        return False


REWARD_FNS = {
    "arithmetic": arithmetic_correct,
    "countdown": countdown_correct,
    "math": math_correct,
}

# The TASKS value of a dataset without a verifier: its rewards come from a reward model.
REWARD_MODEL = "reward_model"

# Dataset / task name (config task.name) -> verifier key in REWARD_FNS (or REWARD_MODEL).
TASKS = {
    "arithmetic": "arithmetic",
    "countdown": "countdown",
    "gsm8k": "math",
    "math": "math",
    "dapo_math": "math",
    "aime": "math",
    "ultrafeedback": REWARD_MODEL,
    "hh_rlhf": REWARD_MODEL,
    "wordpref": REWARD_MODEL,
}


def get_reward_fn(name: str):
    """The verifier (response, answer) -> bool for a REWARD_FNS key or a TASKS name; raises for
    a task without one (TASKS value REWARD_MODEL)."""
    key = TASKS.get(name, name)
    if key == REWARD_MODEL:
        raise ValueError(f"{name} has no verifier: it needs a reward model, set "
                         f"reward_model.hf_dir")
    if key not in REWARD_FNS:
        raise ValueError(f"unknown reward / task {name!r}; choose one of "
                         f"{sorted(set(REWARD_FNS) | set(TASKS))}")
    return REWARD_FNS[key]


def score(task: str, responses, answers, *, correct: float = 1.0, wrong: float = 0.0,
          prefix: str = "") -> np.ndarray:
    """Rewards [B] float32 of responses against gold answers (one answer per response).

    prefix is prepended to every response before extraction: the part of the answer format the
    prompt already wrote (trustrl.data.datasets.response_prefix(template)).
    """
    fn = get_reward_fn(task)
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    hits = [fn(prefix + r, a) for r, a in zip(responses, answers)]
    return np.where(np.asarray(hits, dtype=bool), correct, wrong).astype(np.float32)
