"""Synthetic verifiable reasoning tasks, generated locally and deterministically from a seed.

Two verifiable task families, sized so a model of a few hundred K to a few M parameters learns
them on CPU (and "wordpref", the RLHF demo's task, below):

- "arithmetic": `What is 47 + 85?` -> `132`. difficulty = digits per operand; operations are
  drawn from a string of "+", "-", "*". Subtraction orders its operands so the answer is never
  negative (one less thing for a tiny model to learn).
- "countdown": `Use 3, 5, 2 to make 16.` -> `(3+5)*2`. difficulty = how many numbers. The
  canonical answer is one expression that uses every number exactly once; any expression that
  uses the given numbers at most once each and evaluates to the target is correct (the verifier
  in trustrl.data.rewards reads the numbers and the target back from the canonical answer).
- "wordpref" (no verifier: RLHF against a learned reward model): `Write about zu and tira.` ->
  a few words of a pseudo-word lexicon. difficulty = the lexicon size (make_lexicon(difficulty,
  rule_seed)); the answer is a REFERENCE response (3-8 lexicon words drawn uniformly, what the
  supervised warm start trains on), not a gold answer. A hidden per-word weight
  (wordpref_rule) defines the ground-truth score, trustrl.data.preferences.ground_truth.

Every example is a dict {"id", "prompt", "answer", "task"} of strings. "prompt" is the bare
question; trustrl.data.datasets.format_prompt wraps it in a template. The response format the
verifiers
expect is documented in trustrl.data.rewards: the response ends with `Answer: <x>` or `\\boxed{x}`.

The test split is drawn first and the train split excludes its prompts, so eval is held out
whenever the problem space allows it (it fails loudly when it does not).
"""
from __future__ import annotations

import fractions
import functools
import re

import numpy as np

TASK_NAMES = ("arithmetic", "countdown", "wordpref")
OPERATIONS = "+-*"
SPLITS = ("train", "test")
# Tries per example to draw a prompt not in the held-out set before declaring the space too small.
_MAX_TRIES = 64
# Largest intermediate / final value in a countdown expression: keeps targets short (<= 3 digits).
_COUNTDOWN_LIMIT = 999


# --- arithmetic ------------------------------------------------------------------------------------

def _operand(rng: np.random.Generator, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10 ** digits))


def arithmetic_example(rng: np.random.Generator, digits: int, operations: str = "+") -> dict:
    """One arithmetic problem with `digits`-digit operands; returns {"prompt", "answer"}."""
    op = operations[int(rng.integers(len(operations)))]
    a, b = _operand(rng, digits), _operand(rng, digits)
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"prompt": f"What is {a} {op} {b}?", "answer": str(value)}


# --- countdown -------------------------------------------------------------------------------------

# Precedence of a (sub-)expression's top operator: atoms bind tightest. Used for minimal brackets.
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "atom": 3}


def _combine(left, right, op):
    """Joins (value, text, precedence) items with minimal brackets ("-" and "/" are not associative
    on the right, so an equal-precedence right operand keeps its brackets)."""
    (lv, lt, lp), (rv, rt, rp) = left, right
    p = _PREC[op]
    if lp < p:
        lt = f"({lt})"
    if rp < p or (rp == p and op in "-/"):
        rt = f"({rt})"
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv // rv if rv else 0}[op]
    return value, f"{lt}{op}{rt}", p


def countdown_example(rng: np.random.Generator, num_numbers: int, max_number: int = 20) -> dict:
    """One countdown puzzle: `num_numbers` numbers in [1, max_number] and a target reachable by
    combining all of them with + - * / (every intermediate a positive integer <= 999)."""
    while True:  # rejection: a few percent of random trees end on a trivial target
        numbers = [int(x) for x in rng.integers(1, max_number + 1, size=num_numbers)]
        items = [(n, str(n), _PREC["atom"]) for n in numbers]
        while len(items) > 1:
            i, j = (int(k) for k in rng.choice(len(items), size=2, replace=False))
            a, b = items[i], items[j]
            ops = ["+"]
            if a[0] > b[0]:
                ops.append("-")
            if a[0] * b[0] <= _COUNTDOWN_LIMIT and a[0] > 1 and b[0] > 1:
                ops.append("*")
            if b[0] > 1 and a[0] % b[0] == 0 and a[0] != b[0]:
                ops.append("/")
            op = ops[int(rng.integers(len(ops)))]
            merged = _combine(a, b, op)
            items = [x for k, x in enumerate(items) if k not in (i, j)] + [merged]
        target, expr, _ = items[0]
        # A target equal to a given number is solved without arithmetic: skip it.
        if 0 < target <= _COUNTDOWN_LIMIT and (num_numbers == 1 or target not in numbers):
            break
    shown = ", ".join(str(n) for n in numbers)
    return {"prompt": f"Use {shown} to make {target}.", "answer": expr}


# --- wordpref --------------------------------------------------------------------------------------

WORDPREF_SIZE = 24  # default lexicon size (task.difficulty)
WORDPREF_WORDS = (3, 8)  # a drawn response has 3 to 8 words (inclusive)
WORDPREF_PROMPT = "Write about {a} and {b}."
WORDPREF_TOPICS = re.compile(r"Write about (\S+) and (\S+)\.")


def wordpref_rule(size: int = WORDPREF_SIZE, rule_seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(lexicon, weights): make_lexicon(size, seed=rule_seed) and the hidden per-word weights
    np.random.default_rng([rule_seed, 7]).normal(size=size) (float64, weights[i] of lexicon[i])."""
    lexicon = make_lexicon(int(size), seed=int(rule_seed))
    return lexicon, np.random.default_rng([int(rule_seed), 7]).normal(size=int(size))


def wordpref_response(rng: np.random.Generator, lexicon) -> str:
    """WORDPREF_WORDS[0]..[1] words drawn uniformly (with replacement), joined by spaces."""
    n = int(rng.integers(WORDPREF_WORDS[0], WORDPREF_WORDS[1] + 1))
    return " ".join(lexicon[int(i)] for i in rng.integers(len(lexicon), size=n))


def wordpref_example(rng: np.random.Generator, lexicon) -> dict:
    """One wordpref prompt (two distinct lexicon words as topics) and a reference response."""
    a, b = (lexicon[int(i)] for i in rng.choice(len(lexicon), size=2, replace=False))
    return {"prompt": WORDPREF_PROMPT.format(a=a, b=b), "answer": wordpref_response(rng, lexicon)}


# --- safe expression evaluation (shared with the countdown verifier) -------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


def evaluate_expression(text: str, max_len: int = 200):
    """Evaluates an integer expression with + - * / and brackets exactly (fractions), without eval().

    Returns (value: Fraction, numbers: list[int]) or None when the text is not such an expression
    (unknown characters, unary minus, division by zero, unbalanced brackets, too long).
    """
    if len(text) > max_len:
        return None
    text = text.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    tokens = []
    for number, other in _TOKEN.findall(text.strip()):
        if number:
            tokens.append(int(number))
        elif other in "+-*/()":
            tokens.append(other)
        elif not other.isspace():
            return None
    numbers, pos = [], 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    # Recursive descent: expr := term (("+"|"-") term)*; term := atom (("*"|"/") atom)*;
    # atom := int | "(" expr ")". Depth is bounded by max_len, far below Python's recursion limit.
    def expr():
        nonlocal pos
        value = term()
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            rhs = term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term():
        nonlocal pos
        value = atom()
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            rhs = atom()
            if op == "/" and rhs == 0:
                raise ZeroDivisionError
            value = value * rhs if op == "*" else value / rhs
        return value

    def atom():
        nonlocal pos
        tok = peek()
        if isinstance(tok, int):
            pos += 1
            numbers.append(tok)
            return fractions.Fraction(tok)
        if tok == "(":
            pos += 1
            value = expr()
            if peek() != ")":
                raise SyntaxError
            pos += 1
            return value
        raise SyntaxError

    if not tokens:
        return None
    try:
        value = expr()
    except (SyntaxError, ZeroDivisionError):
        return None
    if pos != len(tokens):
        return None
    return value, numbers


# --- split generation ------------------------------------------------------------------------------

def check_task(task: str, difficulty: int, operations: str) -> None:
    """The generator's limits of a synthetic task (raises ValueError naming the valid range)."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {list(TASK_NAMES)}")
    if task == "arithmetic":
        if not 1 <= difficulty <= 12:
            raise ValueError(f"arithmetic difficulty (digits per operand) must be in [1, 12], "
                             f"got {difficulty}")
        bad = sorted(set(operations) - set(OPERATIONS))
        if not operations or bad:
            raise ValueError(f"arithmetic operations={operations!r} must be a non-empty string of "
                             f"{list(OPERATIONS)}; invalid: {bad}")
    elif task == "wordpref":
        if not 2 <= difficulty <= 4096:
            raise ValueError(f"wordpref difficulty (the lexicon size) must be in [2, 4096], "
                             f"got {difficulty}")
    elif not 2 <= difficulty <= 6:
        raise ValueError(f"countdown difficulty (how many numbers) must be in [2, 6], "
                         f"got {difficulty}")


def _draw(task, rng, difficulty, operations, lexicon=None):
    if task == "arithmetic":
        return arithmetic_example(rng, difficulty, operations)
    if task == "wordpref":
        return wordpref_example(rng, lexicon)
    return countdown_example(rng, difficulty)


def generate_splits(task: str, *, difficulty: int, num_train: int, num_test: int, seed: int = 0,
                    operations: str = "+", rule_seed: int = 0) -> dict:
    """Both splits of a synthetic task: {"train": [example, ...], "test": [...]}.

    Deterministic in (task, difficulty, operations, sizes, seed; for wordpref rule_seed, the
    lexicon's seed). Test prompts are distinct where possible and never appear in train; raises
    ValueError when the problem space is too small for that (e.g. 1-digit addition has 100
    problems; wordpref has difficulty * (difficulty - 1) prompts).
    """
    check_task(task, difficulty, operations)
    draw = functools.partial(_draw, task, difficulty=difficulty, operations=operations,
                             lexicon=make_lexicon(difficulty, rule_seed)
                             if task == "wordpref" else None)
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    test_rng = np.random.default_rng([seed, 1])
    test, held_out = [], set()
    for _ in range(num_test):
        for _ in range(_MAX_TRIES):  # distinct test prompts when the space has room for them
            ex = draw(test_rng)
            if ex["prompt"] not in held_out:
                break
        held_out.add(ex["prompt"])
        test.append(ex)
    train_rng = np.random.default_rng([seed, 0])
    train = []
    for _ in range(num_train):
        for _ in range(_MAX_TRIES):
            ex = draw(train_rng)
            if ex["prompt"] not in held_out:
                break
        else:
            raise ValueError(
                f"{task} difficulty={difficulty} operations={operations!r}: the {len(held_out)} "
                f"held-out test prompts cover almost the whole problem space; lower num_test or "
                f"raise the difficulty")
        train.append(ex)
    out = {}
    for split, examples in (("train", train), ("test", test)):
        width = len(str(max(len(examples) - 1, 0)))
        out[split] = [{"id": f"{task}-{split}-{i:0{width}d}", "prompt": ex["prompt"],
                       "answer": ex["answer"], "task": task} for i, ex in enumerate(examples)]
    return out


# --- long-tailed filler ----------------------------------------------------------------------------
# Reasoning traces of real models are mostly free text over a large vocabulary with a long tail of
# rare tokens; the paper's argument (the ratio is noisy on rare tokens) is about exactly those.
# A synthetic task gets the same shape from "filler": before its answer, the worked example says a
# few pseudo-words drawn from a Zipf law over a fixed lexicon. The reward ignores the filler, so it
# is reward-irrelevant text the policy must still generate, as in a real reasoning trace.

_ONSETS = ("", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


def make_lexicon(size: int, seed: int = 0) -> list[str]:
    """``size`` distinct pronounceable lowercase pseudo-words (1-4 syllables), deterministic in
    (size, seed); index 0 is the most frequent under `filler_text`'s Zipf law."""
    if size < 1:
        raise ValueError(f"lexicon size must be >= 1, got {size}")
    rng = np.random.default_rng([seed, 7])
    words, seen = [], set()
    while len(words) < size:
        n_syl = int(rng.integers(1, 5))
        w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                    for _ in range(n_syl))
        if w not in seen:
            seen.add(w)
            words.append(w)
    words.sort(key=len)  # short words frequent, long ones rare (as in natural text)
    return words


def filler_text(rng: np.random.Generator, lexicon: list[str], *, zipf: float, min_words: int,
                max_words: int) -> str:
    """Between min_words and max_words pseudo-words, word i drawn with probability ~ (i+1)^-zipf."""
    if not 0 <= min_words <= max_words:
        raise ValueError(f"need 0 <= min_words <= max_words, got {min_words}, {max_words}")
    n = int(rng.integers(min_words, max_words + 1))
    p = _zipf_probs(len(lexicon), float(zipf))
    return " ".join(lexicon[i] for i in rng.choice(len(lexicon), size=n, p=p))


@functools.lru_cache(maxsize=8)
def _zipf_probs(size: int, zipf: float) -> np.ndarray:
    """P(i) ~ (i+1)^-zipf over `size` items; computed once per (size, zipf), not per draw."""
    p = np.arange(1, size + 1, dtype=np.float64) ** -zipf
    p /= p.sum()
    p.setflags(write=False)
    return p


def filler_config(task_cfg):
    """The filler keyword arguments of a task config (``filler_words`` lexicon size, 0 = none,
    ``filler_zipf``, ``filler_min`` / ``filler_max`` words), or None when it has no filler."""
    n = int(task_cfg.get("filler_words", 0))
    if n == 0:
        return None
    if n < 0:
        raise ValueError(f"task.filler_words must be >= 0 (0 = no filler), got {n}")
    return dict(lexicon=make_lexicon(n, int(task_cfg.seed)), zipf=float(task_cfg.filler_zipf),
                min_words=int(task_cfg.filler_min), max_words=int(task_cfg.filler_max))
