"""Eval estimators and the loop's reward shaping options, on hand-computed examples."""
import types

import numpy as np
import pytest

from configs import default
from trustrl.training import evaluation, loop as train, rewarding
from trustrl.rollout.record import FINISH_EOS, FINISH_LENGTH


def test_pass_at_k_unbiased_estimator():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    # prompt 0: 1 - C(3,2)/C(4,2) = 0.5; prompt 1: 0; prompt 2: 1
    assert evaluation.pass_at_k(correct, 2) == pytest.approx((0.5 + 0 + 1) / 3)
    assert evaluation.pass_at_k(correct, 1) == pytest.approx((0.25 + 0 + 1) / 3)
    assert evaluation.pass_at_k(correct, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="1 <= k <= n=4"):
        evaluation.pass_at_k(correct, 5)


def test_majority_at_k():
    answers = [["3", "4", "4", None], [None, None], ["7", "8"]]
    gold = ["4", "1", "8"]
    # prompt 0: "4" wins; prompt 1: no answer; prompt 2: tie -> first seen ("7") -> wrong
    got = evaluation.majority_at_k(answers, lambda p, a: a == gold[p])
    assert got == pytest.approx(1 / 3)


class _Env:
    def decode_responses(self, r):
        return ["a", "b", "c"]

    def score(self, texts, answers):
        return np.array([1.0, 0.0, 1.0], np.float32)


@pytest.mark.parametrize("mode,want", [("none", [1, 0, 1]), ("penalty", [1, 0, -1])])
def test_overlong_penalty(mode, want):
    cfg = default.get_config("tiny")
    cfg.rollout.overlong = mode
    cfg.rollout.overlong_penalty = -1.0
    r = types.SimpleNamespace(finish_reason=np.array([FINISH_EOS, FINISH_EOS, FINISH_LENGTH]))
    got, metrics = rewarding.rollout_rewards(_Env(), r, [{"answer": "x"}] * 3, 1, cfg)
    np.testing.assert_array_equal(got, want)
    assert metrics == {}  # a verifier's reward: no reward-model diagnostics
