"""Policy-gradient losses with trust regions: DPPO and the PPO / GRPO-family baselines.

Every method is one (mask, weight) pair in the form of PAPER Eq. 23:

    grad = E_{y~mu} [ sum_t M_t * min(r_t, C) * A_t * grad log pi(y_t|s_t) ],   r_t = pi / mu

with M_t and the weight stop-gradient. M_t = 0 blocks a token (exactly zero gradient, no
clipping of the objective value). DPPO (Eq. 12) blocks only moves AWAY from the trust region:

    M_t = 0  if (A_t > 0 and r_t > 1 and D_t > delta_high) or (A_t < 0 and r_t < 1 and D_t > delta_low)

with D_t = D(mu(.|s_t) || pi(.|s_t)) anchored on the ROLLOUT distribution mu. Ties at a
threshold are kept (strict inequalities throughout, except mask_neg which follows sec. 5.3's
"mu - pi >= 0.5").

The per-token loss is written in score-function form, -A * sg(M * w) * exp(logp - sg(logp)):
its value is the surrogate -M * w * A and its gradient w.r.t. logp is exactly -M * w * A (times
the aggregation weight). Reference codebases that use the ratio form -A * M * r agree in the
gradient wherever r < C; compare gradients, not loss values.

Numerics: everything in float32; log-ratios are clamped to +-LOG_RATIO_CLAMP before exp, so the
largest representable ratio is e^20 (a token whose true ratio is larger gets weight e^20 when
is_cap = inf).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trustrl.core import divergences

LOG_RATIO_CLAMP = 20.0

AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")


class _Inputs(NamedTuple):
    """Stop-gradient float32 views shared by the mask functions ([B, T] each)."""
    logp: jax.Array
    rollout_logp: jax.Array
    adv: jax.Array
    mask: jax.Array
    ratio: jax.Array  # pi / mu, clamped
    old_logp: jax.Array | None
    divergence: jax.Array | None
    delta_low: float
    delta_high: float
    alpha: float | None


def _dppo_block(adv, up, down, div, delta_low, delta_high):
    """Eq. 12: block only moves away from the trust region."""
    return ((adv > 0) & up & (div > delta_high)) | ((adv < 0) & down & (div > delta_low))


def _clip_block(adv, ratio, delta_low, delta_high):
    """PPO / GRPO clip test on a ratio: the tokens whose clipped surrogate has zero gradient."""
    return ((adv > 0) & (ratio > 1 + delta_high)) | ((adv < 0) & (ratio < 1 - delta_low))


def _ratio(logp, anchor_logp):
    return jnp.exp(jnp.clip(logp - anchor_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


# Each returns (blocked [B,T] bool, divergence used [B,T]).
def _m_dppo_binary(div_fn, anchor):
    def fn(x: _Inputs):
        anchor_logp = x.rollout_logp if anchor == "rollout" else x.old_logp
        div = div_fn(x.logp, anchor_logp)
        blocked = _dppo_block(x.adv, x.logp > anchor_logp, x.logp < anchor_logp, div,
                              x.delta_low, x.delta_high)
        return blocked, div
    return fn


def _m_dppo_given(x: _Inputs):
    # Direction test on the sampled token (PAPER sec. 3), magnitude from the given divergence.
    blocked = _dppo_block(x.adv, x.logp > x.rollout_logp, x.logp < x.rollout_logp, x.divergence,
                          x.delta_low, x.delta_high)
    return blocked, x.divergence


def _m_ppo_clip(x: _Inputs):
    return _clip_block(x.adv, x.ratio, x.delta_low, x.delta_high), jnp.abs(x.ratio - 1)


def _m_ppo_clip_recompute(x: _Inputs):
    ratio_old = _ratio(x.logp, x.old_logp)
    return _clip_block(x.adv, ratio_old, x.delta_low, x.delta_high), jnp.abs(ratio_old - 1)


def _m_none(x: _Inputs):
    # Mask-free methods: report binary TV as the monitored divergence.
    return jnp.zeros(x.logp.shape, bool), divergences.binary_tv(x.logp, x.rollout_logp)


def _m_relax(side):
    def fn(x: _Inputs):
        rare = jnp.exp(x.rollout_logp) < x.alpha
        high = (x.adv > 0) & (x.ratio > 1 + x.delta_high)
        low = (x.adv < 0) & (x.ratio < 1 - x.delta_low)
        if side in ("high", "both"):
            high = high & ~rare
        if side in ("low", "both"):
            low = low & ~rare
        return high | low, jnp.abs(x.ratio - 1)
    return fn


def _m_mask_neg(x: _Inputs):
    diff = jnp.exp(x.rollout_logp) - jnp.exp(x.logp)  # mu - pi
    return (x.adv < 0) & (diff >= x.delta_low), jnp.abs(diff)


def _m_trm_seq(x: _Inputs):
    div = jnp.where(x.mask > 0, x.divergence, 0.0)
    seq_blocked = jnp.max(div, axis=-1, keepdims=True) > x.delta_high
    return jnp.broadcast_to(seq_blocked, x.logp.shape), x.divergence


class Method(NamedTuple):
    """A loss method: its mask and what the train step must hand it besides (logp, rollout_logp,
    advantages, mask). Everything that depends on the method reads this table."""
    mask: Callable  # _Inputs -> (blocked [B, T] bool, divergence used [B, T])
    # The divergence= the caller computes: "" none (the mask uses logp / rollout_logp / old_logp
    # only), "topk" (log pi at mu's recorded top-K ids -> divergences.topk_*; the sampler must
    # record_topk), "full" (exact over the vocabulary from mu's parameters, the fused head's
    # tv / kl), "binary" (divergences.binary_* of the sampled token: trm_seq's per-token input).
    divergence: str = ""
    measure: str = ""            # "tv" | "kl" of a topk / full divergence
    needs_old_logp: bool = False  # the recomputed pi_old log-probs (a score pass per iteration)
    needs_alpha: bool = False    # relax_*: the mu cutoff alpha
    ratio_clip: bool = False     # delta_low is a ratio-clip epsilon, so it must be < 1
    elementwise: bool = True     # the mask is per token (logp_grad, the loss-fused head); not
    #                              trm_seq, whose mask is a max over the sequence


METHODS = {
    "dppo_binary_tv": Method(_m_dppo_binary(divergences.binary_tv, "rollout")),
    "dppo_binary_kl": Method(_m_dppo_binary(divergences.binary_kl, "rollout")),
    "dppo_topk_tv": Method(_m_dppo_given, divergence="topk", measure="tv"),
    "dppo_topk_kl": Method(_m_dppo_given, divergence="topk", measure="kl"),
    "dppo_full_tv": Method(_m_dppo_given, divergence="full", measure="tv"),
    "dppo_full_kl": Method(_m_dppo_given, divergence="full", measure="kl"),
    "dppo_binary_tv_recompute": Method(_m_dppo_binary(divergences.binary_tv, "old"),
                                       needs_old_logp=True),
    "dppo_binary_kl_recompute": Method(_m_dppo_binary(divergences.binary_kl, "old"),
                                       needs_old_logp=True),
    "ppo_clip": Method(_m_ppo_clip, ratio_clip=True),
    "ppo_clip_recompute": Method(_m_ppo_clip_recompute, needs_old_logp=True, ratio_clip=True),
    "pg_is": Method(_m_none),
    "cispo": Method(_m_none, ratio_clip=True),
    "relax_high": Method(_m_relax("high"), needs_alpha=True, ratio_clip=True),
    "relax_low": Method(_m_relax("low"), needs_alpha=True, ratio_clip=True),
    "relax_both": Method(_m_relax("both"), needs_alpha=True, ratio_clip=True),
    "mask_neg": Method(_m_mask_neg),
    "trm_seq": Method(_m_trm_seq, divergence="binary", elementwise=False),
}


def method_spec(method: str) -> Method:
    """METHODS[method], or a ValueError naming the valid methods."""
    if method not in METHODS:
        raise ValueError(f"unknown loss method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method]


class LossTerms(NamedTuple):
    """loss = loss_sum / denom. Summing both over micro-batches gives the exact full-batch loss."""
    loss_sum: jax.Array
    denom: jax.Array
    metrics: dict


def _is_concrete(x):
    return not isinstance(x, jax.core.Tracer)


def _validate(logp, rollout_logp, advantages, mask, method, delta_low, delta_high, is_cap, agg,
              old_logp, divergence, alpha):
    spec = method_spec(method)
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; valid: {', '.join(AGGREGATIONS)}")
    for name, d in (("delta_low", delta_low), ("delta_high", delta_high)):
        if not (isinstance(d, (int, float)) and math.isfinite(d) and d > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {d!r}")
    if not (is_cap > 0):
        raise ValueError(f"is_cap must be > 0 (use float('inf') for no cap), got {is_cap!r}")
    if spec.ratio_clip:
        if delta_low >= 1:
            raise ValueError(f"{method}: ratio clip eps delta_low must be < 1, got {delta_low}")
    if jnp.ndim(logp) != 2:
        raise ValueError(f"logp must be [B, T], got shape {jnp.shape(logp)}")
    shape = jnp.shape(logp)
    for name, arr in (("rollout_logp", rollout_logp), ("mask", mask), ("old_logp", old_logp),
                      ("divergence", divergence)):
        if arr is not None and jnp.shape(arr) != shape:
            raise ValueError(f"{name} shape {jnp.shape(arr)} != logp shape {shape}")
    if jnp.shape(advantages) not in (shape, shape[:1]):
        raise ValueError(f"advantages must be [B] or [B, T] = {shape[:1]} or {shape}, "
                         f"got {jnp.shape(advantages)}")
    if spec.divergence and divergence is None:
        raise ValueError(f"method {method!r} needs divergence= [B, T] (computed with "
                         "trustrl.core.divergences in the train step)")
    if spec.needs_old_logp and old_logp is None:
        raise ValueError(f"method {method!r} needs old_logp= [B, T], the recomputed pi_old "
                         "log-probs; rollout_logp is not substituted")
    if spec.needs_alpha:
        if alpha is None or not (0 < alpha <= 1):
            raise ValueError(f"method {method!r} needs alpha in (0, 1], got {alpha!r}")
    # Value checks run when the inputs are concrete (eager calls, host-side batch checks);
    # under jit the trainer validates the rollout record before the step.
    for name, arr in (("rollout_logp", rollout_logp), ("old_logp", old_logp),
                      ("advantages", advantages), ("divergence", divergence)):
        if arr is None or not _is_concrete(arr) or not _is_concrete(mask):
            continue
        a = np.asarray(arr, dtype=np.float64)
        m = np.asarray(mask) > 0
        if a.shape != m.shape:
            m = m.any(axis=-1)
        bad = ~np.isfinite(a) & m
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} has {int(bad.sum())} non-finite values on response tokens "
                             f"(first at index {idx}: {a[idx]})")


def aggregation_weights(mask, agg):
    """Per-token weights and the denominator: loss = sum(l * mask * num_w) / denom.

    Returns (num_w [B, T], denom scalar). Sequences count when they have >= 1 response token.
    Masked (blocked) tokens stay in every denominator; only padding (mask = 0) is excluded.
    """
    mask = mask.astype(jnp.float32)
    tokens_per_seq = jnp.sum(mask, axis=-1, keepdims=True)
    num_seqs = jnp.sum(tokens_per_seq > 0).astype(jnp.float32)
    if agg == "token-mean":
        return mask, jnp.sum(mask)
    if agg == "token-sum":
        return mask, jnp.float32(1.0)
    if agg == "seq-mean-token-mean":
        return mask / jnp.maximum(tokens_per_seq, 1.0), num_seqs
    if agg == "seq-mean-token-sum":
        return mask, num_seqs
    if agg == "seq-mean-token-sum-norm":
        return mask, num_seqs * mask.shape[-1]
    raise ValueError(f"unknown aggregation {agg!r}; valid: {', '.join(AGGREGATIONS)}")


def policy_loss_terms(logp, rollout_logp, advantages, mask, *, method, delta_low, delta_high,
                      is_cap=float("inf"), agg="token-mean", old_logp=None, divergence=None,
                      alpha=None) -> LossTerms:
    """Like policy_loss, but returns (loss_sum, denom, metrics) for exact micro-batching."""
    _validate(logp, rollout_logp, advantages, mask, method, delta_low, delta_high, is_cap, agg,
              old_logp, divergence, alpha)
    logp_f = jnp.asarray(logp, jnp.float32)
    mask_f = _f32(mask)
    x, (blocked, div_used, weight, truncated, coef) = _coef(
        logp_f, rollout_logp, advantages, mask_f, method=method, delta_low=delta_low,
        delta_high=delta_high, is_cap=is_cap, old_logp=old_logp, divergence=divergence,
        alpha=alpha)
    per_token = -coef * jnp.exp(logp_f - jax.lax.stop_gradient(logp_f))
    num_w, denom = aggregation_weights(mask_f, agg)
    loss_sum = jnp.sum(per_token * num_w)
    lp, lmu, adv, ratio = x.logp, x.rollout_logp, x.adv, x.ratio
    metrics = _metrics(lp, lmu, adv, mask_f, blocked, div_used, weight, truncated, ratio)
    return LossTerms(loss_sum, denom, metrics)


def _f32(a):
    return None if a is None else jax.lax.stop_gradient(jnp.asarray(a, jnp.float32))


def _coef(logp, rollout_logp, advantages, mask, *, method, delta_low, delta_high, is_cap,
          old_logp, divergence, alpha):
    """The stop-gradient per-token coefficient M * w * A of every method (and its parts):
    (inputs, (blocked, divergence used, weight, truncated, coef)). Elementwise over any token
    shape, except trm_seq (a max over the last axis)."""
    lp, lmu = _f32(logp), _f32(rollout_logp)
    adv = _f32(advantages)
    if adv.ndim == lp.ndim - 1:
        adv = jnp.broadcast_to(adv[..., None], lp.shape)
    ratio = _ratio(lp, lmu)
    x = _Inputs(lp, lmu, adv, _f32(mask), ratio, _f32(old_logp), _f32(divergence),
                float(delta_low), float(delta_high), None if alpha is None else float(alpha))
    blocked, div_used = METHODS[method].mask(x)
    keep = 1.0 - blocked.astype(jnp.float32)
    if method == "cispo":  # MiniMax CISPO: every token kept, weight sg(clip(r, 1-eps_l, 1+eps_h))
        weight = jnp.clip(ratio, 1 - delta_low, 1 + delta_high)
        truncated = (ratio < 1 - delta_low) | (ratio > 1 + delta_high)
    else:
        weight = jnp.minimum(ratio, is_cap)
        truncated = ratio > is_cap
    weight = jnp.minimum(weight, is_cap)
    coef = jax.lax.stop_gradient(keep * weight * adv)
    return x, (blocked, div_used, weight, truncated, coef)


def logp_grad(logp, rollout_logp, advantages, agg_weight, *, method, delta_low, delta_high,
              is_cap=float("inf"), old_logp=None, divergence=None, alpha=None):
    """d loss / d logp per token, -M * min(r, C) * A * agg_weight (agg_weight: the aggregation's
    num_w / denom), elementwise over any token shape: what autodiff of policy_loss_terms'
    loss_sum / denom gives, computed without a backward pass (the loss-fused vocabulary head,
    trustrl.model.vocab_head, uses it inside its forward chunks). Not for trm_seq (a sequence-level
    mask)."""
    if method not in METHODS or not METHODS[method].elementwise:
        raise ValueError(f"logp_grad is elementwise; method {method!r} is not (valid: "
                         f"{', '.join(m for m, spec in METHODS.items() if spec.elementwise)})")
    ones = jnp.ones(jnp.shape(logp), jnp.float32)
    _, (*_, coef) = _coef(logp, rollout_logp, advantages, ones, method=method,
                          delta_low=delta_low, delta_high=delta_high, is_cap=is_cap,
                          old_logp=old_logp, divergence=divergence, alpha=alpha)
    return -coef * _f32(agg_weight)


def _masked_mean(x, m):
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _masked_max(x, m):
    return jnp.where(jnp.any(m > 0), jnp.max(jnp.where(m > 0, x, -jnp.inf)), 0.0)


def _masked_min(x, m):
    return -_masked_max(-x, m)


def _metrics(lp, lmu, adv, mask, blocked, div, weight, truncated, ratio):
    nonzero = mask * (adv != 0)
    n_nonzero = jnp.maximum(jnp.sum(nonzero), 1.0)
    blocked = blocked.astype(jnp.float32)
    diff = jnp.exp(lp) - jnp.exp(lmu)  # pi - mu on the sampled token
    return {
        "loss/masked_frac": jnp.sum(blocked * nonzero) / n_nonzero,
        "loss/masked_frac_pos": jnp.sum(blocked * nonzero * (adv > 0)) / n_nonzero,
        "loss/masked_frac_neg": jnp.sum(blocked * nonzero * (adv < 0)) / n_nonzero,
        "loss/pi_mu_absdiff_mean": _masked_mean(jnp.abs(diff), mask),
        "loss/pi_mu_diff_max": _masked_max(diff, mask),
        "loss/pi_mu_diff_min": _masked_min(diff, mask),
        "loss/div_mean": _masked_mean(div, mask),
        "loss/div_max": _masked_max(div, mask),
        "loss/is_weight_mean": _masked_mean(weight, mask),
        "loss/is_trunc_frac": _masked_mean(truncated.astype(jnp.float32), mask),
        "loss/ratio_mean": _masked_mean(ratio, mask),
        "loss/ratio_max": _masked_max(ratio, mask),
        "loss/ratio_min": _masked_min(ratio, mask),
    }


def policy_loss(logp, rollout_logp, advantages, mask, *, method, delta_low, delta_high,
                is_cap=float("inf"), agg="token-mean", old_logp=None, divergence=None,
                alpha=None):
    """Trust-region policy-gradient loss (PAPER Eq. 12 / 23 and the sec. 4 baselines).

    Args:
      logp: [B, T] current policy log-prob of the sampled tokens (differentiable).
      rollout_logp: [B, T] mu's log-prob of the same tokens, recorded at sampling time.
      advantages: [B] or [B, T].
      mask: [B, T] response mask (1 = response token, 0 = prompt / padding).
      method: one of METHODS (its mask and needs). ppo_clip uses eps_low = delta_low,
        eps_high = delta_high; pg_is with finite is_cap is PG-TIS.
      delta_low / delta_high: thresholds for the A < 0 / A > 0 side (> 0).
      is_cap: IS weight cap C (inf = none).
      agg: one of AGGREGATIONS.
      old_logp: [B, T] recomputed pi_old log-probs (only *_recompute methods).
      divergence: [B, T] token divergence D(mu || pi) (top-K, full and trm_seq methods).
      alpha: mu cutoff of the relax_* ablation.
    Returns:
      (loss scalar, metrics dict of scalars). d loss / d logp = -M * min(r, C) * A * agg weight.
    """
    terms = policy_loss_terms(logp, rollout_logp, advantages, mask, method=method,
                              delta_low=delta_low, delta_high=delta_high, is_cap=is_cap, agg=agg,
                              old_logp=old_logp, divergence=divergence, alpha=alpha)
    loss = terms.loss_sum / jnp.maximum(terms.denom, 1e-8)
    return loss, {**terms.metrics, "loss/value": loss}
