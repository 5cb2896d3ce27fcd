"""trustrl.data.gem_env: GEM games and reasoning-gym datasets behind the text protocol, played by
scripted actions (no model), and through environments.make / TokenEnv with a tiny tokenizer.

The GEM / reasoning-gym tests need the optional `envs` extra (the 3.11 CI leg has it; on 3.12.1+
pip does not install gem-llm, so they skip there); the missing-extra test runs everywhere."""
import random
import re
import sys

import numpy as np
import pytest

from trustrl.data import environments, gem_env

GUESS, SUDOKU = "game:GuessTheNumber-v0-easy", "game:Sudoku-v0-easy"


@pytest.fixture(scope="module")
def gem():
    return pytest.importorskip("gem")


@pytest.fixture(scope="module")
def rg():
    return pytest.importorskip("reasoning_gym")


def test_missing_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gem", None)  # `import gem` now raises ImportError
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    for env_id in (GUESS, "gem:game:Sudoku-v0-easy", "reasoning_gym:arc_1d"):
        with pytest.raises(ImportError, match=r"optional 'envs' extra") as e:
            environments.make(env_id)
        assert isinstance(e.value, gem_env.MissingExtraError)
        msg = str(e.value)
        assert repr(env_id) in msg and "pip install -e '.[envs]'" in msg
        assert "Requires-Python <=3.12" in msg and "--ignore-requires-python" in msg


# --- GEM: Guess the number ---------------------------------------------------------------------

def _binary_search(env, seed, lo=1, hi=10):
    """Plays GuessTheNumber by bisection on the "higher" / "lower" hints: the episode's
    (guess, observation, reward, terminated, truncated) steps."""
    obs, _ = env.reset(seed)
    assert "between 1 and 10" in obs and obs.endswith("Enter your next guess.")
    steps = []
    while True:
        guess = (lo + hi) // 2
        obs, reward, term, trunc, info = env.step(f"I guess \\boxed{{{guess}}}")
        assert type(obs) is str and type(reward) is float
        assert type(term) is bool and type(trunc) is bool and isinstance(info, dict)
        steps.append((guess, obs, reward, term, trunc))
        if term or trunc:
            return steps
        hint = re.search(r"target number is (higher|lower) than", obs).group(1)
        lo, hi = (guess + 1, hi) if hint == "higher" else (lo, guess - 1)


def test_guess_the_number_binary_search(gem):
    env = environments.make(GUESS)
    assert isinstance(env, gem_env.GemEnv)
    steps = _binary_search(env, seed=3)
    secret = env.env.game_number  # GEM's own record of the secret
    guess, obs, reward, term, trunc = steps[-1]
    assert guess == secret and reward == 1.0 and term and not trunc
    assert obs.startswith("Congratulations!") and "Enter your next guess" not in obs
    assert len(steps) <= 4 and all(s[2] == 0.0 and "Enter your next guess." in s[1]
                                   for s in steps[:-1])
    # the same seed: the same secret and episode; seeds differ in their secrets
    assert _binary_search(env, seed=3) == steps
    assert _binary_search(environments.make(GUESS), seed=3) == steps
    secrets = set()
    for seed in range(8):
        env.reset(seed)
        secrets.add(env.env.game_number)
    assert len(secrets) > 1
    _binary_search(env, seed=3)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("\\boxed{1}")
    with pytest.raises(RuntimeError, match="before reset"):
        environments.make(GUESS).step("\\boxed{1}")


def test_guess_the_number_malformed_and_invalid_actions(gem):
    env = gem_env.make(GUESS)
    env.reset(0)
    # out of range: GEM's invalid_action_reward 0.0, the game goes on
    obs, reward, term, trunc, _ = env.step("\\boxed{11}")
    assert "outside the range" in obs and (reward, term, trunc) == (0.0, False, False)
    # no \boxed{number}: GEM ends the episode with its format-error reward
    obs, reward, term, trunc, _ = env.step("five")
    assert obs == "At turn 2, you did not provide a valid guess."
    assert (reward, term, trunc) == (-0.1, True, False)


# --- GEM: Sudoku -------------------------------------------------------------------------------

def _board(obs):
    """The 4x4 board in an observation's "R1  .  . |  .  ." lines (0: empty)."""
    rows = [line.split()[1:] for line in obs.splitlines() if re.match(r"R\d ", line)]
    return [[0 if c == "." else int(c) for c in row if c != "|"] for row in rows]


def _solve(board, n=4, box=2):
    """Backtracking: fills ``board`` in place, True when solved."""
    for r in range(n):
        for c in range(n):
            if board[r][c] == 0:
                br, bc = r - r % box, c - c % box
                for v in range(1, n + 1):
                    if (v not in board[r] and all(board[i][c] != v for i in range(n))
                            and all(board[i][j] != v for i in range(br, br + box)
                                    for j in range(bc, bc + box))):
                        board[r][c] = v
                        if _solve(board, n, box):
                            return True
                        board[r][c] = 0
                return False
    return True


def test_sudoku_invalid_moves_and_solve(gem):
    env = environments.make(SUDOKU)
    obs, info = env.reset(0)
    assert obs.endswith(info["suffix"]) and "Here is the current board layout" in obs
    board = _board(obs)
    assert len(board) == 4 and all(len(row) == 4 for row in board)
    empty = [(r, c) for r in range(4) for c in range(4) if board[r][c] == 0]
    filled = [(r, c) for r in range(4) for c in range(4) if board[r][c]]
    assert empty and filled
    # overwriting a prefilled cell: GEM's invalid_action_reward (0.0), the game goes on
    r, c = filled[0]
    obs, reward, term, trunc, _ = env.step(f"\\boxed{{{r + 1} {c + 1} {board[r][c]}}}")
    assert "already filled" in obs and (reward, term, trunc) == (0.0, False, False)
    assert _board(obs) == board  # the board is shown again, unchanged
    solution = [row[:] for row in board]
    assert _solve(solution)
    # a wrong number in an empty cell: the same 0.0, board unchanged
    r, c = empty[0]
    wrong = next(v for v in range(1, 5) if v != solution[r][c])
    obs, reward, term, _, _ = env.step(f"\\boxed{{{r + 1} {c + 1} {wrong}}}")
    assert "violates Sudoku rules" in obs and (reward, term) == (0.0, False)
    total = 0.0
    for i, (r, c) in enumerate(empty):
        obs, reward, term, trunc, _ = env.step(f"\\boxed{{{r + 1} {c + 1} {solution[r][c]}}}")
        total += reward
        assert reward == pytest.approx(1 / len(empty))
        if i < len(empty) - 1:
            assert not term and _board(obs)[r][c] == solution[r][c]
    assert term and not trunc and obs == "Congratulations! You have completed the Sudoku puzzle!"
    assert total == pytest.approx(1.0)


def test_gem_random_state_is_per_environment(gem):
    """2048 draws its new tiles from the global generators in step: interleaving another
    environment does not change an episode, and the caller's global state is left alone."""
    moves = ["\\boxed{left}", "\\boxed{up}", "\\boxed{right}", "\\boxed{down}"]

    def play(other=None):
        env = gem_env.make("game:Game2048-v0-easy")
        out = [env.reset(0)[0]]
        if other:
            other.reset(1)
        for m in moves:
            out.append(env.step(m)[0])
            if other:
                other.step(moves[0])
                random.random(), np.random.random()
        return out

    alone = play()
    assert play(gem_env.make("game:Game2048-v0-easy")) == alone
    # the caller's global generators: untouched by construction, reset and step
    state = random.getstate(), np.random.get_state()[1].copy()
    env = gem_env.make("game:Game2048-v0-easy")
    env.reset(5)
    env.step(moves[0])
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()


def test_gem_types_terminal_marker_and_bad_ids(gem, monkeypatch):
    from gem.envs.registration import ENV_REGISTRY, EnvSpec
    from gem.utils.constants import TERMINAL_STATE

    class NumpyEnv(gem.Env):  # a GEM env answering in numpy types, ending on TERMINAL_STATE
        def __init__(self, bonus: float = 0.5, **_):
            self.bonus = bonus

        def reset(self, seed=None):
            return "question?", {"level": np.int64(3)}

        def step(self, action):
            return TERMINAL_STATE, np.float32(self.bonus), np.bool_(True), np.bool_(False), {
                "correct": np.bool_(True)}

    monkeypatch.setitem(ENV_REGISTRY, "qa:TrustrlNumpy", EnvSpec("qa:TrustrlNumpy", NumpyEnv))
    env = environments.make("gem:qa:TrustrlNumpy", bonus=0.25)
    obs, info = env.reset(0)
    assert obs == "question?" and type(info["level"]) is int
    obs, reward, term, trunc, info = env.step("x")
    assert obs == "" and reward == 0.25 and type(reward) is float
    assert term is True and trunc is False and info["correct"] is True
    with pytest.raises(ValueError, match=r"takes no argument \['bonsu'\]; valid: \['bonus'\]"):
        gem_env.make("qa:TrustrlNumpy", bonsu=1.0)
    with pytest.raises(ValueError, match=r"'game:Sudoku-v0-eassy'; did you mean "
                                         r"\['game:Sudoku-v0-easy'.*with prefix 'game:'"):
        environments.make("game:Sudoku-v0-eassy")
    with pytest.raises(ValueError, match=r"unknown GEM environment 'nope'.*prefixes \[.*'rg'"):
        environments.make("gem:nope")


# --- reasoning-gym -----------------------------------------------------------------------------

def test_reasoning_gym_scores_and_determinism(rg):
    env = environments.make("reasoning_gym:arc_1d")
    assert isinstance(env, gem_env.ReasoningGymEnv)
    question, info = env.reset(7)
    answer = info["answer"]
    assert "Input:" in question and answer
    assert env.step(f"The output is \\boxed{{{answer}}}") == (
        "", 1.0, True, False, {"answer": answer, "expected": answer})
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(answer)
    assert env.reset(7) == (question, info)  # deterministic per seed
    assert env.step(answer)[1] == 1.0  # no \boxed: the whole text, stripped
    env.reset(7)
    assert env.step("\\boxed{0 0 0}")[1] < 1.0
    assert environments.make("reasoning_gym:arc_1d").reset(7)[0] == question
    assert env.reset(8)[0] != question


def test_reasoning_gym_bad_names_and_arguments(rg):
    with pytest.raises(ValueError, match=r"unknown reasoning-gym dataset 'arc_1dd'; did you "
                                         r"mean \['arc_1d'.*valid: \[.*'basic_arithmetic'"):
        environments.make("reasoning_gym:arc_1dd")
    with pytest.raises(ValueError, match=r"'arc_1d': bad arguments \{'sizes': 3\}.*valid: "
                                         r"\[.*'min_size'"):
        environments.make("reasoning_gym:arc_1d", sizes=3)


# --- through TokenEnv --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from trustrl.data.tokenizer import train_bpe
    texts = ["You are playing Guess The Number. The target number is higher than 5.",
             "At turn 1, you guessed 5, and the target number is lower than 5. \\boxed{5}"] * 20
    return train_bpe(texts, vocab_size=300)


def test_token_env_chatml(gem, tokenizer):
    template = environments.TurnTemplate("chatml")
    tenv = environments.TokenEnv(environments.make(GUESS), tokenizer, template)
    direct = environments.make(GUESS)
    seed = next(s for s in range(20) if direct.reset(s) and direct.env.game_number != 5)
    obs, _ = direct.reset(seed)
    ids = tenv.reset(seed)
    assert tokenizer.decode(ids) == template.first(obs, tokenizer)
    assert tokenizer.decode(ids).startswith("<|im_start|>user\nYou are playing Guess The Number")
    expected = direct.step("\\boxed{5}")[0]
    action = tokenizer.encode("\\boxed{5}") + [template.end_of_turn(tokenizer)]
    step = tenv.step(action, ended=True)
    assert (step.reward, step.terminated, step.truncated) == (0.0, False, False)
    text = tokenizer.decode(step.obs_ids)
    assert text == f"\n<|im_start|>user\n{expected}<|im_end|>\n<|im_start|>assistant\n"
    assert "than 5." in text and text.count("<|im_start|>") == 2
