"""RLHF rewards: a learned reward model scores the policy's responses (the paper's sec. 7.2).

    reward = RewardModelReward(cfg, mesh, (config, params, program), tokenizer)
    rewards, metrics = reward(prompts, responses, lengths)   # [N] float32, per-iteration metrics

The policy's and the reward model's tokenizers differ in general (Qwen3 policy, Llama-3.1 reward
model), so a response is never handed over as token ids: the policy's ids are detokenised once
(TaskEnv.decode_responses) and the conversation is re-rendered with the reward model's own chat
template, Skywork-style: ``[{"role": "user", "content": prompt}, {"role": "assistant",
"content": response}]`` without a generation prompt, tokenised by the reward model's tokenizer
without extra special tokens (the template writes them; what ``apply_chat_template(tokenize=
True)`` gives). ``reward_model.template="plain"`` renders ``prompt + "\\n\\n" + response``
instead (for reward models without a template). A rendering longer than
``reward_model.max_length`` tokens is truncated (``truncation``: "right" keeps the start,
transformers' default side; "left" keeps the end) and counted (``reward/rm_truncated_frac``).

Scoring: rows are sorted by length and packed into batches of ``reward_model.batch_size`` rows
(0: one batch), each right-padded to a multiple of ``reward_model.bucket`` columns (one compile
per width) and to a multiple of the mesh's batch shards; the jitted, sharded
``trustrl.reward_model.score_program`` runs on the run's mesh. Padding rows are dropped.

Shaping, in this order, each off by default (the paper's setup: the raw score, which is what
its reward curves plot; it is silent on normalisation and penalties):
    r = clip(normalise(s), -clip, clip) - length_penalty * n / max_new_tokens - kl_coef * KL
    normalise: "none" | "batch" ((s - mean) / std over the iteration's rows) | "running"
               (the same with the mean / std of every score seen so far, Welford, checkpointed)
    clip: |r| <= clip after normalising (0: off)
    length_penalty: n = the response's token count
    kl_coef: KL = sum over the response's tokens of (log mu - log pi_ref), the k1 estimate of
             KL(mu || pi_ref) for tokens sampled from mu, with pi_ref the run's initial policy
             scored by the trainer's scoring pass (loop.py adds it after that pass).
Diagnostics every iteration: the raw score's mean / std, the response length, the Pearson
correlation of score and length (``reward/rm_length_corr``; a rising one is the usual sign of
reward hacking by length), the truncated fraction, and the task's ground truth where it has one
(``reward/ground_truth_mean``: the synthetic "wordpref" task's hidden rule).
"""
from __future__ import annotations

import math

import jax
import numpy as np

from trustrl.infra import multihost, sharding

NORMALIZE = ("none", "batch", "running")
TEMPLATES = ("chat", "plain")
TRUNCATION = ("right", "left")


def enabled(cfg) -> bool:
    """reward_model.hf_dir set: rewards come from a reward model, not the task's verifier."""
    return bool(cfg.get("reward_model", {}).get("hf_dir", ""))


# ----------------------------------------------------------------------------- re-templating


def messages_of(prompt) -> list[dict]:
    """A prompt given as text (one user message) or as [{"role", "content"}, ...] messages
    (a multi-turn conversation: TaskEnv.prompt_messages) -> the message list."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def last_user_text(prompt) -> str:
    """The last user message of a prompt (text or messages)."""
    users = [m["content"] for m in messages_of(prompt) if m["role"] == "user"]
    return users[-1] if users else ""


def render(tokenizer, prompt, response: str, template: str = "chat") -> str:
    """The reward model's text of one exchange (see the module docstring): ``prompt`` text or
    a conversation's messages, then the response as the assistant turn. ``tokenizer``: a
    trustrl.data.tokenizer.Tokenizer (not imported here: config validation reads this
    module's choices and stays shallow). "plain" joins the messages' contents and the response
    with blank lines."""
    messages = messages_of(prompt)
    if template == "plain":
        return "\n\n".join([m["content"] for m in messages] + [response])
    if template != "chat":
        raise ValueError(f"reward_model.template={template!r} is not valid; choose one of "
                         f"{list(TEMPLATES)}")
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def encode(tokenizer, prompts, responses, *, template: str = "chat",
           max_length: int, truncation: str = "right") -> tuple[list[list[int]], np.ndarray]:
    """(the reward model's token ids of each exchange, which of them were truncated)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"reward_model.truncation={truncation!r} is not valid; choose one of "
                         f"{list(TRUNCATION)}")
    texts = [render(tokenizer, p, r, template) for p, r in zip(prompts, responses)]
    ids = tokenizer.encode_batch(texts)
    truncated = np.array([len(x) > max_length for x in ids], bool)
    cut = (lambda x: x[:max_length]) if truncation == "right" else (lambda x: x[-max_length:])
    return [cut(x) if t else x for x, t in zip(ids, truncated)], truncated


def pack(token_lists, *, pad_id: int, bucket: int = 64, batch_size: int = 0,
         row_multiple: int = 1):
    """[(row indices, tokens [R, W] int32, valid [R, W] bool)]: the rows sorted by length,
    ``batch_size`` rows per batch (0: all), right-padded to W = a multiple of ``bucket``
    columns and to R = a multiple of ``row_multiple`` rows. A padding row holds one valid
    ``pad_id`` (so no row attends nothing) and is not among the indices."""
    if not token_lists:
        return []
    if any(len(x) == 0 for x in token_lists):
        raise ValueError("a reward model input rendered to no tokens")
    order = np.argsort([len(x) for x in token_lists], kind="stable")
    size = batch_size or len(order)
    out = []
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        width = bucket * math.ceil(max(len(token_lists[i]) for i in idx) / bucket)
        rows = row_multiple * math.ceil(len(idx) / row_multiple)
        tokens = np.full((rows, width), pad_id, np.int32)
        valid = np.zeros((rows, width), bool)
        valid[len(idx):, 0] = True
        for r, i in enumerate(idx):
            tokens[r, :len(token_lists[i])] = token_lists[i]
            valid[r, :len(token_lists[i])] = True
        out.append((idx, tokens, valid))
    return out


def positions_of(valid) -> np.ndarray:
    """RoPE positions [B, T] int32 of right-padded rows (numpy; transformer.positions_from_mask
    on the host)."""
    return np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)


def score_ids(program, params, ids, *, pad_id: int, mesh=None, bucket: int = 64,
              batch_size: int = 0) -> np.ndarray:
    """Scores [N] float32 of token-id rows, in their order, by a reward model's jitted
    ``program`` (trustrl.reward_model.score_program): packed by ``pack`` (rows padded to the
    mesh's batch shards), placed on ``mesh``, gathered back."""
    shape = dict(mesh.shape) if mesh is not None else {}
    rows = int(np.prod([shape.get(a, 1) for a in sharding.BATCH_AXES]))
    out = np.zeros(len(ids), np.float32)
    for idx, tokens, valid in pack(ids, pad_id=pad_id, bucket=bucket, batch_size=batch_size,
                                   row_multiple=rows):
        args = (tokens, positions_of(valid), valid)
        if mesh is not None:
            args = tuple(multihost.to_global(a, sharding.batch_sharding(mesh)) for a in args)
        out[idx] = multihost.to_host(sharding.cpu_sync(program(params, *args)))[:len(idx)]
    return out


# ----------------------------------------------------------------------------- shaping


class RunningMoments:
    """Mean and variance of every value seen (Welford / Chan et al.'s parallel update)."""

    def __init__(self, count: float = 0.0, mean: float = 0.0, m2: float = 0.0):
        self.count, self.mean, self.m2 = float(count), float(mean), float(m2)

    def update(self, x) -> None:
        x = np.asarray(x, np.float64).ravel()
        if not x.size:
            return
        n, mean = x.size, float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


def normalize(scores, how: str, moments: RunningMoments | None = None, eps: float = 1e-6):
    """(s - mean) / (std + eps) over the batch ("batch") or everything seen so far including
    this batch ("running": ``moments`` is updated first); "none" returns ``scores``."""
    scores = np.asarray(scores, np.float32)
    if how == "none":
        return scores
    if how == "batch":
        return ((scores - scores.mean()) / (scores.std() + eps)).astype(np.float32)
    if how == "running":
        moments.update(scores)
        return ((scores - moments.mean) / (moments.std + eps)).astype(np.float32)
    raise ValueError(f"reward_model.normalize={how!r} is not valid; choose one of "
                     f"{list(NORMALIZE)}")


def sequence_kl(rollout_logp, ref_logp, mask) -> np.ndarray:
    """Per response: sum_t mask * (log mu - log pi_ref), [B] float32 (numpy in, numpy out)."""
    diff = np.asarray(rollout_logp, np.float32) - np.asarray(ref_logp, np.float32)
    return np.where(np.asarray(mask) > 0, diff, 0.0).sum(1).astype(np.float32)


def correlation(x, y) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# ----------------------------------------------------------------------------- the reward


class RewardModelReward:
    """The run's reward model (cfg.reward_model) on the run's mesh; see the module docstring."""

    def __init__(self, cfg, mesh, model, tokenizer, *, ground_truth=None):
        """``model``: (config, params, program) of trustrl.reward_model (load_hf_dir and
        score_program on ``mesh``) and ``tokenizer`` its tokenizer, loaded by the caller
        (trustrl.training.experiment.reward_scorer)."""
        rm = cfg.reward_model
        self.cfg, self.mesh = rm, mesh
        self.max_new_tokens = int(cfg.rollout.max_new_tokens)
        self.config, self.params, self.program = model
        self.tokenizer = tokenizer
        pad = self.config.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.pad_id or 0))
        self.moments = RunningMoments()
        self.ground_truth = ground_truth  # (prompts, responses) -> [N], or None

    def scores(self, prompts, responses) -> tuple[np.ndarray, np.ndarray]:
        """(raw scores [N] float32, truncated [N] bool) of the exchanges."""
        ids, truncated = encode(self.tokenizer, prompts, responses, template=self.cfg.template,
                                max_length=int(self.cfg.max_length),
                                truncation=self.cfg.get("truncation", "right"))
        out = score_ids(self.program, self.params, ids, pad_id=self.pad_id, mesh=self.mesh,
                        bucket=int(self.cfg.bucket), batch_size=int(self.cfg.batch_size))
        if not np.all(np.isfinite(out)):
            bad = np.flatnonzero(~np.isfinite(out))
            raise FloatingPointError(f"the reward model ({self.cfg.hf_dir}) gave non-finite "
                                     f"scores for {len(bad)} of {len(out)} responses (rows "
                                     f"{bad[:5].tolist()}...)")
        return out, truncated

    def __call__(self, prompts, responses, lengths) -> tuple[np.ndarray, dict]:
        """(shaped rewards [N] float32 before the KL penalty, metrics)."""
        raw, truncated = self.scores(prompts, responses)
        lengths = np.asarray(lengths, np.float32)
        r = normalize(raw, self.cfg.normalize, self.moments)
        if self.cfg.clip:
            r = np.clip(r, -self.cfg.clip, self.cfg.clip)
        if self.cfg.length_penalty:
            r = r - np.float32(self.cfg.length_penalty) * lengths / self.max_new_tokens
        metrics = {"reward/rm_mean": float(raw.mean()), "reward/rm_std": float(raw.std()),
                   "reward/rm_length_corr": correlation(raw, lengths),
                   "reward/rm_truncated_frac": float(truncated.mean())}
        metrics.update(self.ground_truth_metrics(prompts, responses))
        return r.astype(np.float32), metrics

    def ground_truth_metrics(self, prompts, responses, prefix: str = "reward/") -> dict:
        """{prefix + "ground_truth_mean", prefix + "ground_truth_se" (over the responses)}
        when the task has a hidden ground truth (a synthetic preference task), else {}."""
        if self.ground_truth is None:
            return {}
        g = np.asarray(self.ground_truth([last_user_text(p) for p in prompts],
                                         list(responses)), np.float64)
        se = float(g.std(ddof=1) / math.sqrt(len(g))) if len(g) > 1 else float("nan")
        return {f"{prefix}ground_truth_mean": float(g.mean()), f"{prefix}ground_truth_se": se}


def reference_params(params):
    """A copy of the initial policy's parameters (train_step donates the state's), the KL
    penalty's pi_ref; on resume ``experiment.build`` rebuilds the same initial policy."""
    return jax.tree.map(lambda x: x.copy(), params)
