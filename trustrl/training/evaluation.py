"""Held-out evaluation: greedy pass@1, and pass@k / maj@k from k samples per prompt.

pass@k uses the unbiased estimator of Chen et al. (2021) with n = k samples (then simply
"any correct"); maj@k is the accuracy of the most frequent extracted answer.
"""
from __future__ import annotations

from collections import Counter

import jax
import numpy as np


def pass_at_k(correct: np.ndarray, k: int) -> float:
    """correct: [num_prompts, n] booleans. Unbiased pass@k averaged over prompts."""
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n={n}, got k={k}")
    c = correct.sum(1)
    # 1 - C(n - c, k) / C(n, k), computed as a product to stay exact for small n
    fail = np.ones(len(c))
    for i in range(k):
        fail *= np.clip((n - c - i) / (n - i), 0, None)
    return float(np.mean(1 - fail))


def standard_error(per_prompt) -> float:
    """The standard error of the mean over prompts (the independent units: a prompt's k
    samples are correlated) of each prompt's mean reward; NaN for one prompt."""
    per_prompt = np.asarray(per_prompt, np.float64)
    n = len(per_prompt)
    return float(per_prompt.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


def majority_at_k(answers: list[list[str | None]], truth_ok) -> float:
    """answers[p]: extracted answers of prompt p; truth_ok(p, answer) -> bool."""
    hits = []
    for p, ans in enumerate(answers):
        votes = Counter(a for a in ans if a is not None)
        hits.append(bool(votes) and truth_ok(p, votes.most_common(1)[0][0]))
    return float(np.mean(hits)) if hits else 0.0


def _greedy(run, params_roll, prompts, key):
    """The held-out greedy responses. One sampler's KV cache on the chips at a time (what
    aot_check counts): the rollout sampler's goes before the greedy pass, the greedy one's
    before the sampled pass (and before anything scores the responses)."""
    run.sampler.release()
    greedy = run.eval_greedy.generate(params_roll, prompts, 1, key)
    run.eval_greedy.release()
    return greedy


def evaluate(run, params_roll, key, cfg) -> dict:
    if run.episodes is not None:  # environment episodes: held-out seeds
        return run.episodes.evaluate(params_roll, key)
    if run.reward is not None:  # RLHF: the reward model's held-out score
        return evaluate_reward_model(run, params_roll, key, cfg)
    env = run.env
    examples = env.eval_examples(cfg.eval.num_prompts)
    prompts = env.encode_prompts(examples)
    answers = [ex["answer"] for ex in examples]
    greedy = _greedy(run, params_roll, prompts, key)
    rew_g = env.score(env.decode_responses(greedy), answers)
    # num_prompts lets readers give each score its sampling error (trustrl.analysis.summary)
    out = {"eval/pass@1": float(np.mean(rew_g >= env.correct_threshold)),
           "eval/num_prompts": len(examples)}
    k = cfg.eval.k
    if k > 1:
        sampled = run.sampler.generate(params_roll, prompts, k, jax.random.fold_in(key, 1))
        texts = env.decode_responses(sampled)
        rew = env.score(texts, [a for a in answers for _ in range(k)])
        correct = (rew >= env.correct_threshold).reshape(len(examples), k)
        extracted = [env.extract_answer(t) for t in texts]
        grouped = [extracted[i * k:(i + 1) * k] for i in range(len(examples))]
        out[f"eval/pass@{k}"] = pass_at_k(correct, k)
        out[f"eval/maj@{k}"] = majority_at_k(
            grouped, lambda p, a: env.answer_matches(a, answers[p]))
        out["eval/sampled_reward_mean"] = float(rew.mean())
        out["eval/sampled_reward_se"] = standard_error(rew.reshape(len(examples), k).mean(1))
    return out


def evaluate_reward_model(run, params_roll, key, cfg) -> dict:
    """An RLHF run's held-out evaluation: the reward model's raw score of greedy responses
    (``eval/rm_score``) and of k samples per prompt (``eval/sampled_rm_score``), with standard
    errors over prompts, the greedy responses' length, and the task's hidden ground truth where
    it has one (``eval/ground_truth``: synthetic preference tasks), the score that tells reward
    hacking (the reward model's score rising while the ground truth does not) from learning."""
    from trustrl.infra import multihost
    env, reward = run.env, run.reward
    examples = env.eval_examples(cfg.eval.num_prompts)
    prompts = env.encode_prompts(examples)
    texts_in = [env.prompt_messages(ex) for ex in examples]
    greedy = _greedy(run, params_roll, prompts, key)
    texts = env.decode_responses(greedy)
    scores, _ = reward.scores(texts_in, texts)
    out = {"eval/rm_score": float(scores.mean()), "eval/rm_score_se": standard_error(scores),
           "eval/response_length": float(multihost.to_host(greedy.response_mask).sum(1).mean()),
           "eval/num_prompts": len(examples)}
    out.update(reward.ground_truth_metrics(texts_in, texts, prefix="eval/"))
    k = cfg.eval.k
    if k > 1:
        sampled = run.sampler.generate(params_roll, prompts, k, jax.random.fold_in(key, 1))
        texts = env.decode_responses(sampled)
        many = [p for p in texts_in for _ in range(k)]
        scores, _ = reward.scores(many, texts)
        out["eval/sampled_rm_score"] = float(scores.mean())
        out["eval/sampled_rm_score_se"] = standard_error(scores.reshape(len(examples), k).mean(1))
        out.update(reward.ground_truth_metrics(many, texts, prefix="eval/sampled_"))
    return out
