"""The Rollout record: the only thing the trainer consumes from a sampler.

Layout (B = num_prompts * group_size rows; the group_size samples of a prompt are adjacent):

    prompt_tokens      [B, P] int32   LEFT-padded prompt (pad id 0 at the left), so every
                                      response starts at column P of ``tokens``.
    prompt_mask        [B, P] int32   1 on real prompt tokens.
    response_tokens    [B, N] int32   sampled tokens; 0 after the end of the response.
    response_mask      [B, N] int32   1 on generated tokens up to and including EOS.
    rollout_logp       [B, N] f32     log mu(y_t | s_t): log-prob of the sampled token under the
                                      sampling distribution WITH temperature applied, normalised
                                      over the FULL vocabulary (see note on truncation). 0 on
                                      padding.
    rollout_topk_ids   [B, N, K] i32  mu's K most likely ids (sampled token forced into the last
    rollout_topk_logp  [B, N, K] f32  slot when absent) and their log mu; id 0 / log-prob 0 pad.
    finish_reason      [B] int32      FINISH_EOS or FINISH_LENGTH.
    group_index        [B] int32      index of the prompt within the batch.
    routed_experts     [B, P + N, M, k] uint8 / uint16, optional (None: not recorded; R3,
                                      rollout routing replay). For every position of ``tokens``
                                      the k experts each of the M sparse layers of a mixture-of-
                                      experts policy (ModelConfig.sparse_layers, in order) routed
                                      that token to when the engine processed it: prompt
                                      positions from the prefill, response positions 0 .. N-2
                                      from the decode steps that consumed them (the EOS token
                                      included when a later step consumed it). Positions never
                                      processed (left padding, the last response token, tokens
                                      after EOS; an external engine: also the EOS token) hold 0;
                                      their outputs are unused. dtype: ``routes_dtype``, the
                                      smallest unsigned integer that holds num_experts - 1. The
                                      layout of ``transformer.forward(..., routes=)``, which
                                      takes it as it is.

Truncated sampling (top-p / top-k < vocab): the sampler draws from the renormalised truncated
distribution but records rollout_logp and top-K under the untruncated tempered softmax, which is
what the trainer can recompute from its logits. The anchor mu is then not the exact sampling
distribution; the sampler warns once when truncation is on.

An external engine (e.g. an OpenAI-compatible server returning ``logprobs`` and
``top_logprobs``) can fill the same record; ``validate`` checks it before training.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax.numpy as jnp
import numpy as np

FINISH_EOS, FINISH_LENGTH = 0, 1


@flax.struct.dataclass
class Rollout:
    prompt_tokens: Any
    prompt_mask: Any
    response_tokens: Any
    response_mask: Any
    rollout_logp: Any
    rollout_topk_ids: Any
    rollout_topk_logp: Any
    finish_reason: Any
    group_index: Any
    routed_experts: Any = None

    @property
    def tokens(self):
        """[B, P + N] prompt followed by response; the input of the trainer's forward."""
        return jnp.concatenate([self.prompt_tokens, self.response_tokens], axis=1)

    @property
    def valid_mask(self):
        """[B, P + N] attention validity (left padding off; tokens after EOS are causal-only)."""
        return jnp.concatenate([self.prompt_mask, jnp.ones_like(self.response_tokens)], axis=1)

    @property
    def positions(self):
        """[B, P + N] RoPE positions counting real tokens only (left padding gets 0)."""
        return jnp.maximum(jnp.cumsum(self.valid_mask, axis=1) - 1, 0).astype(jnp.int32)

    @property
    def prompt_len(self) -> int:
        return self.prompt_tokens.shape[1]

    def response_lengths(self):
        return jnp.sum(self.response_mask, axis=1)


class RouteLayout(NamedTuple):
    """A mixture-of-experts policy's routing shape, what an external engine's routed experts
    need to become Rollout.routed_experts: the engine's ``num_layers`` (L; SGLang returns one
    row per decoder layer), the ``sparse_layers`` with experts (the M kept, in order),
    ``experts_per_tok`` (k) and ``num_experts`` (X). ``RouteLayout.of(model_cfg)``."""
    num_layers: int
    sparse_layers: tuple
    experts_per_tok: int
    num_experts: int

    @classmethod
    def of(cls, model_cfg) -> "RouteLayout":
        """From a trustrl ModelConfig (num_layers, sparse_layers, num_experts_per_tok,
        num_experts); a model without experts is an error."""
        if not getattr(model_cfg, "sparse_layers", ()):
            raise ValueError("routed experts are recorded for a mixture-of-experts model; this "
                             "config has no layer with experts (num_experts=0)")
        return cls(int(model_cfg.num_layers), tuple(model_cfg.sparse_layers),
                   int(model_cfg.num_experts_per_tok), int(model_cfg.num_experts))


def routes_dtype(num_experts: int):
    """The smallest unsigned integer dtype that holds expert ids 0 .. num_experts - 1 (the dtype
    of Rollout.routed_experts): uint8 up to 256 experts, uint16 up to 65,536."""
    if not isinstance(num_experts, (int, np.integer)) or not 1 <= num_experts <= 1 << 16:
        raise ValueError(f"num_experts must be an int in [1, 65536] to record routed experts, "
                         f"got {num_experts!r}")
    return jnp.dtype(jnp.uint8 if num_experts <= 1 << 8 else jnp.uint16)


def validate_routes(r: Rollout, num_experts: int | None = None):
    """Checks Rollout.routed_experts (when present): [B, P + N, M, k], an integer dtype, ids in
    [0, num_experts) when ``num_experts`` is given. Raises ValueError naming the problem."""
    routes = r.routed_experts
    if routes is None:
        return
    b, p = np.shape(r.prompt_tokens)
    n = np.shape(r.response_tokens)[1]
    shape = np.shape(routes)
    if len(shape) != 4 or shape[:2] != (b, p + n) or 0 in shape[2:]:
        raise ValueError(f"Rollout.routed_experts has shape {shape}, expected [B, P + N, M, k] = "
                         f"[{b}, {p + n}, M, k] (M sparse layers >= 1, k experts per token >= 1)")
    dtype = np.dtype(getattr(routes, "dtype", np.asarray(routes).dtype))
    if dtype.kind not in "iu":
        raise ValueError(f"Rollout.routed_experts has dtype {dtype}; expert ids must be integers "
                         "(record.routes_dtype(num_experts))")
    ids = np.asarray(routes)
    if ids.size and ids.min() < 0:
        raise ValueError(f"Rollout.routed_experts holds negative expert ids (min {ids.min()})")
    if num_experts is not None and ids.size and ids.max() >= num_experts:
        raise ValueError(f"Rollout.routed_experts holds expert id {ids.max()}, outside [0, "
                         f"num_experts={num_experts})")


def validate(r: Rollout, vocab_size: int | None = None, num_experts: int | None = None):
    """Host-side checks of a rollout before training. Raises ValueError naming the problem.
    ``num_experts``: also checks the routed experts' ids against it (``validate_routes``)."""
    b, n = np.shape(r.response_tokens)
    shapes = {"response_mask": (b, n), "rollout_logp": (b, n), "prompt_mask": np.shape(
        r.prompt_tokens), "finish_reason": (b,), "group_index": (b,)}
    for name, want in shapes.items():
        if np.shape(getattr(r, name)) != want:
            raise ValueError(f"Rollout.{name} has shape {np.shape(getattr(r, name))}, "
                             f"expected {want}")
    if np.shape(r.prompt_tokens)[0] != b:
        raise ValueError(f"Rollout.prompt_tokens has {np.shape(r.prompt_tokens)[0]} rows, "
                         f"responses have {b}")
    if r.rollout_topk_ids is not None:
        if np.shape(r.rollout_topk_ids)[:2] != (b, n) or (
                np.shape(r.rollout_topk_ids) != np.shape(r.rollout_topk_logp)):
            raise ValueError("Rollout.rollout_topk_ids / rollout_topk_logp must both be [B, N, K]"
                             f", got {np.shape(r.rollout_topk_ids)} and "
                             f"{np.shape(r.rollout_topk_logp)}")
    mask = np.asarray(r.response_mask) > 0
    logp = np.asarray(r.rollout_logp, np.float64)
    bad = mask & ~np.isfinite(logp)
    if bad.any():
        raise ValueError(f"Rollout.rollout_logp has {int(bad.sum())} non-finite values on "
                         "response tokens; the rollout engine must return finite log-probs")
    if (logp[mask] > 1e-4).any():
        raise ValueError(f"Rollout.rollout_logp has positive log-probs (max "
                         f"{logp[mask].max():.3g}); expected log-probabilities <= 0")
    if vocab_size is not None:
        toks = np.asarray(r.response_tokens)[mask]
        if toks.size and (toks.min() < 0 or toks.max() >= vocab_size):
            raise ValueError(f"Rollout.response_tokens outside [0, {vocab_size})")
    validate_routes(r, num_experts)


def mismatch_stats(trainer_logp, rollout_logp, mask) -> dict:
    """Training-inference mismatch at equal parameters: mean |pi - mu|, max / min (pi - mu).

    The paper's stability diagnostic (sec. 5): pi from the trainer's forward, mu from the
    rollout engine, both on the same sampled tokens.
    """
    mask = jnp.asarray(mask, jnp.float32)
    diff = jnp.exp(jnp.asarray(trainer_logp, jnp.float32)) - jnp.exp(
        jnp.asarray(rollout_logp, jnp.float32))
    n = jnp.maximum(mask.sum(), 1.0)
    has = mask.sum() > 0
    return {
        "rollout/mismatch_mean": jnp.sum(jnp.abs(diff) * mask) / n,
        "rollout/mismatch_max": jnp.where(has, jnp.max(jnp.where(mask > 0, diff, -jnp.inf)), 0.),
        "rollout/mismatch_min": jnp.where(has, jnp.min(jnp.where(mask > 0, diff, jnp.inf)), 0.),
        "rollout/logp_absdiff_max": jnp.where(has, jnp.max(jnp.abs(
            jnp.asarray(trainer_logp) - jnp.asarray(rollout_logp)) * mask), 0.),
    }


MU_BUCKETS = (0.0, 0.01, 0.1, 0.5, 1.0)


def mismatch_by_mu(trainer_logp, rollout_logp, mask, edges=MU_BUCKETS) -> list[dict]:
    """The mismatch per bucket of the rollout probability mu of the sampled token (host numpy):
    per bucket [lo, hi), the share of tokens, mean |pi - mu|, mean |log pi - log mu| and the
    largest ratio max(pi/mu, mu/pi). Shows where the ratio is noisy (the paper: rare tokens)."""
    lp, lm = np.asarray(trainer_logp, np.float64), np.asarray(rollout_logp, np.float64)
    m = np.asarray(mask) > 0
    lp, lm = lp[m], lm[m]
    mu = np.exp(lm)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (mu >= lo) & ((mu < hi) if hi < edges[-1] else (mu <= hi))
        d = lp[sel] - lm[sel]
        out.append({"mu_low": lo, "mu_high": hi, "tokens": int(sel.sum()),
                    "share": float(sel.mean()) if sel.size else 0.0,
                    "mean_abs_diff": (float(np.abs(np.exp(lp[sel]) - mu[sel]).mean())
                                      if d.size else np.nan),
                    "mean_abs_log_ratio": float(np.abs(d).mean()) if d.size else np.nan,
                    "max_ratio": float(np.exp(np.abs(d).max())) if d.size else np.nan})
    return out
