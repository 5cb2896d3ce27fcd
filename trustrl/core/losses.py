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

One method adds a differentiable per-token term to that surrogate (Method.penalty): drpo's
advantage-weighted quadratic |A| mu (r - 1)^2 / (2 eps), whose derivative w.r.t. logp is known
in closed form, so logp_grad and the loss-fused head stay exact. One method's weight is not
min(r, C) (Method.weight): minpro_clip's min(rho_bar r, C), rho_bar the smallest ratio of the
row's earlier response tokens.

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
    params: dict  # the method's PARAMS values (defaults filled in), Python floats


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


# ------------------------------------------------------------ the trust-region family (issue 32)
# Each mask below is read against the reference code named in its docstring. They anchor on mu
# (rollout_logp) and measure with the CURRENT pi (stop-gradient): the references measure with
# pi_old / pi_proximal (the trainer's log-probs before this update), which is pi on the first
# optimizer step of an iteration. Masked tokens stay in every aggregation denominator, as in
# AReaL (loss_mask_count taken before the rejection mask), slime and TRL (the loss is multiplied
# by the mask); SkyRL multiplies its loss_mask, so its token-mean denominator drops them.


def _m_icepop(x: _Inputs):
    """IcePop (arXiv 2510.18855), both advantage signs: block iff r < low or r > high with
    r = pi / mu; ties kept (low <= r <= high is kept). Weight min(r, C) on the kept tokens.

    Source: areal-project/AReaL @ cbff54d, areal/utils/functional/functional.py
    apply_rejection_sampling (level=token, action=mask, metric=ratio: keep iff
    lower <= exp(logp_prox - logp_behave) <= upper; behave_imp_weight = that ratio, 0 if
    masked) with examples/math/gsm8k_icepop.yaml (lower 0.5, upper 5.0); the same test in
    THUDM/slime @ 624b824 slime/backends/megatron_utils/loss.py icepop_function
    (ice_ratio >= tis_clip_low & ice_ratio <= tis_clip, weight ice_ratio else 0) and SkyRL
    @ a9564572 off_policy_correction_utils.compute_token_mask. A mask (weight 0), not a clip."""
    lo, hi = x.params["icepop_low"], x.params["icepop_high"]
    return (x.ratio < lo) | (x.ratio > hi), jnp.abs(x.ratio - 1)


def _m_kpop(x: _Inputs):
    """KPop, both advantage signs: block iff max(KL_b(pi || mu), KL_b(mu || pi)) > phi, with
    KL_b the Bernoulli KL of the sampled token's probabilities,
    KL_b(p || q) = p log(p / q) + (1 - p) log((1 - p) / (1 - q)).

    Source: areal-project/AReaL @ cbff54d, areal/utils/functional/functional.py
    apply_rejection_sampling metric="binary_kl" (metric = max(kl_fwd, kl_rev), kept iff
    metric <= upper) and compute_binary_kl_divergence (probabilities clamped to
    [1e-8, 1 - 1e-8]; here divergences.binary_kl's log1mexp form, equal away from p = 1 where
    the clamp rounds to 1 in float32); phi = upper = 2.0 in examples/math/gsm8k_kpop.yaml and
    docs/en/algorithms/grpo_series.md. Weight min(r, C) on the kept tokens."""
    # both directions of divergences.binary_kl (each >= 0); XLA computes the exp / log1mexp of
    # pi and of mu that the two calls share once
    kl = jnp.maximum(divergences.binary_kl(x.logp, x.rollout_logp),   # KL(mu || pi)
                     divergences.binary_kl(x.rollout_logp, x.logp))   # KL(pi || mu)
    return kl > x.params["kpop_phi"], kl


def _seq_mean(v, mask):
    """Per-row mean of v over the response tokens, [B, 1] (0 for a row without any)."""
    return jnp.sum(v * mask, axis=-1, keepdims=True) / jnp.maximum(
        jnp.sum(mask, axis=-1, keepdims=True), 1.0)


def _m_opsm(x: _Inputs):
    """Off-policy sequence masking (DeepSeek-V3.2 sec. 3.1) on the GRPO clipped objective:
    block a token iff the PPO / GRPO clip test on r = pi / mu blocks it (eps_low = delta_low,
    eps_high = delta_high, as ppo_clip), or A_t < 0 and its sequence's

        kl_b = sum_t m_bt (log mu_bt - log pi_bt) / max(sum_t m_bt, 1) > opsm_delta.

    Source: THUDM/slime @ 624b824, slime/utils/ppo_utils.py compute_opsm_mask (seq_kl as
    above with old = rollout log-probs under --use-rollout-logprobs; mask = (advantage < 0) &
    (seq_kl > opsm_delta), the advantage per token; --opsm-delta default 1e-4) applied to
    compute_policy_loss's clipped loss in slime/backends/megatron_utils/loss.py; identical
    rule in huggingface/trl @ f2cd577 GRPOTrainer.get_off_policy_mask (off_policy_mask_threshold).
    Sequence-level (the mean runs over the row's mask): not elementwise."""
    kl = _seq_mean(x.rollout_logp - x.logp, x.mask)
    seq = (x.adv < 0) & (kl > x.params["opsm_delta"])
    blocked = _clip_block(x.adv, x.ratio, x.delta_low, x.delta_high) | seq
    return blocked, jnp.broadcast_to(kl, x.logp.shape)


def _m_geo_seq_mask(x: _Inputs):
    """SkyRL's geometric sequence mask: block the whole sequence iff
    g_b = exp(sum_t m_bt log r_bt / max(sum_t m_bt, 1)) is < geo_low or > geo_high
    (ties kept), r = pi / mu; weight min(r, C) per token.

    Source: NovaSky-AI/SkyRL @ a9564572,
    skyrl/backends/skyrl_train/utils/off_policy_correction_utils.py compute_sequence_mask
    (sequence_mask_metric="geometric"; safe_exp_delta clips the log at 20) with
    skyrl/train/config/config.py geo_mask_low 0.99 / geo_mask_high 1.01; this row is that mask
    with tis_ratio_type="token" (token_tis_ratio_clip_high = is_cap). Not elementwise."""
    log_g = _seq_mean(jnp.clip(x.logp - x.rollout_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP),
                      x.mask)
    g = jnp.exp(jnp.clip(log_g, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    seq = (g < x.params["geo_low"]) | (g > x.params["geo_high"])
    return jnp.broadcast_to(seq, x.logp.shape), jnp.broadcast_to(jnp.abs(g - 1), x.logp.shape)


def _quantile_order(mask, q: float):
    """(n, h, lo, hi) per row [B, 1]: the response-token count n, the quantile's fractional
    position h = (n - 1) q among the sorted values, and the order statistics around it,
    lo = floor h, hi = min(lo + 1, n - 1) (linear interpolation between them)."""
    n = jnp.sum(mask > 0, axis=-1, keepdims=True)
    h = (jnp.maximum(n, 1) - 1).astype(jnp.float32) * q
    lo = jnp.floor(h).astype(jnp.int32)
    return n, h, lo, jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))


def _row_quantile(v, mask, q: float):
    """Per-row q-quantile of v over the response tokens, [B, 1], with linear interpolation
    between order statistics (torch.quantile's / numpy's default): sorted s, h = (n - 1) q,
    s[floor h] + (h - floor h) (s[floor h + 1] - s[floor h]); 0 for a row without tokens."""
    srt = jnp.sort(jnp.where(mask > 0, v, jnp.inf), axis=-1)
    n, h, lo, hi = _quantile_order(mask, q)
    s_lo = jnp.take_along_axis(srt, lo, axis=-1)
    s_hi = jnp.take_along_axis(srt, hi, axis=-1)
    return jnp.where(n > 0, s_lo + (h - lo) * (s_hi - s_lo), 0.0)


def _clipped_row_quantile(v, mask, q: float, low: float, high: float):
    """clip(_row_quantile(v, mask, q), low, high), [B, 1], without the per-row sort where the
    clip decides: a row whose order statistic above the quantile is <= low (at least hi + 1 of
    its values <= low) gives low, one whose statistic below it is >= high (at most lo values
    < high) gives high, with lo = floor((n - 1) q), hi = min(lo + 1, n - 1) (the quantile lies
    between them); a row without tokens gives low, as clip(0, low, high). The sort runs only
    when some row is undecided (a lax.cond over the batch), and then gives the same values."""
    m = mask > 0
    n, _, lo, hi = _quantile_order(mask, q)
    at_low = jnp.sum(m & (v <= low), axis=-1, keepdims=True) >= hi + 1
    at_high = jnp.sum(m & (v < high), axis=-1, keepdims=True) <= lo
    decided = at_low | at_high | (n == 0)
    fast = jnp.where(at_high & (n > 0), high, low).astype(jnp.float32)
    return jax.lax.cond(jnp.all(decided), lambda: fast, lambda: jnp.where(
        decided, fast, jnp.clip(_row_quantile(v, mask, q), low, high)).astype(jnp.float32))


PREFIX_BLOCK = 32  # _prefix_sum's block


def _prefix_sum(v):
    """Inclusive prefix sum along the last axis, in blocks of PREFIX_BLOCK: within a block a
    matmul with the upper-triangular ones (f32, precision HIGHEST: no bf16 passes on TPU), then
    the block totals' prefix (an associative scan over T / PREFIX_BLOCK) added. Exact for
    0 / 1 counts (integers below 2^24); for other values the rounding of any summation order.
    On XLA:CPU at [1024, 1024] ~1.2 ms against ~3-5 ms for lax.associative_scan and ~6-11 ms
    for jnp.cumsum (a reduce-window)."""
    *lead, t = v.shape
    k = PREFIX_BLOCK
    nb = -(-t // k)
    x = jnp.pad(v, [(0, 0)] * len(lead) + [(0, nb * k - t)]).reshape(*lead, nb, k)
    tri = jnp.triu(jnp.ones((k, k), v.dtype))  # [j, i] = 1 where j <= i
    within = jnp.matmul(x, tri, precision=jax.lax.Precision.HIGHEST)
    before = jax.lax.associative_scan(jnp.add, within[..., -1], axis=-1) - within[..., -1]
    return (within + before[..., None]).reshape(*lead, nb * k)[..., :t]


def _m_cppo(x: _Inputs):
    """CPPO (arXiv 2606.10968): a position-weighted Binary-TV threshold with a cumulative prefix
    budget. Over a row's response tokens (the mask: t = 1 .. T in order, T = their number),

        D_t = |pi_t - mu_t|,  w_t = 1 - (1 - w_min) (t - 1) / max(T - 1, 1),  Z_t = w_t D_t,
        S_{t-1} = sum_{j<t} Z_j,  W_{t-1} = sum_{j<t} w_j   (0 at t = 1),
        db = clip(quantile_0.9(D_1..D_T), delta_b, 2 delta_b)   (linear interpolation),
        c_t = min(delta, delta + db W_{t-1} - S_{t-1}),

    and a token is kept iff A_t (r_t - 1) <= 0 (it moves back towards mu, or A = 0) or
    Z_t <= c_t; weight min(r, C), r = pi / mu (C = inf in the reference). S counts every
    earlier response token, blocked or not; the quantile reads the whole row (not causal),
    with the current pi, as the reference. delta = cppo_delta (0.15: the reference's comment
    quotes the paper's Table 3, 0.15 for dense models and 0.20 for 30B-A3B, its class default),
    w_min = cppo_w_min 0.8, delta_b = cppo_delta_b 0.02. Reported divergence: Z_t.

    Source: Tencent-Hunyuan/UniRL @ 30899fcf, unirl/algorithms/cppo.py _cppo_mask / _cppo_loss
    (a per-sequence loop over packed responses; here cumulative sums along the row) and
    CPPO/README.md @ 097515bf. The paper's main table used DPPO's Top-K TV as D_t; the
    reference ships this Binary-TV variant, which is what this row is. Sequence-level (the
    budget and the quantile read the whole row): not elementwise."""
    p = x.params
    m = (x.mask > 0).astype(jnp.float32)
    d = jnp.abs(jnp.exp(x.logp) - jnp.exp(x.rollout_logp)) * m
    n = jnp.sum(m, axis=-1, keepdims=True)
    # prefix sums along the row (_prefix_sum); W_{t-1} in closed form,
    # sum_{i<t} (1 - c (i - 1) / (T - 1)) = (t - 1) - c (t - 1) (t - 2) / (2 (T - 1))
    pos = _prefix_sum(m)  # t of each response token (1-based; exact: small integers)
    c, span = 1.0 - p["cppo_w_min"], jnp.maximum(n - 1.0, 1.0)
    w = (1.0 - c * (pos - 1.0) / span) * m
    z = w * d
    s_prev = _prefix_sum(z) - z
    w_prev = ((pos - 1.0) - c * (pos - 1.0) * (pos - 2.0) / (2.0 * span)) * m
    db = _clipped_row_quantile(d, m, 0.9, p["cppo_delta_b"], 2.0 * p["cppo_delta_b"])
    c = jnp.minimum(p["cppo_delta"], p["cppo_delta"] + db * w_prev - s_prev)
    keep = (x.adv * (x.ratio - 1.0) <= 0) | (z <= c)
    return ~keep, z


def _minpro_prefix(x: _Inputs):
    """MinPRO's prefix factor rho_bar_t [B, T]: the smallest r_i = pi / mu (clamped, stop-
    gradient) over the row's response tokens BEFORE t (exclusive; mask-0 tokens transparent),
    1 where there is none."""
    masked = jnp.where(x.mask > 0, x.ratio, jnp.inf)
    inclusive = jax.lax.associative_scan(jnp.minimum, masked, axis=-1)
    exclusive = jnp.concatenate([jnp.full_like(masked[..., :1], jnp.inf), inclusive[..., :-1]],
                                axis=-1)
    return jnp.where(jnp.isinf(exclusive), 1.0, exclusive)


def _minpro_ratio(x: _Inputs):
    """MinPRO's combined ratio rho_bar_t r_t (the row's weight; see _m_minpro_clip)."""
    return _minpro_prefix(x) * x.ratio


def _m_minpro_clip(x: _Inputs):
    """MinPRO (arXiv 2601.22718) with the PPO / GRPO hard clip on the combined ratio, the
    variant of the only reference code found. Over a row's response tokens (mask 1, in order),

        r_t = exp(clip(log pi_t - log mu_t, -20, 20)),
        rho_bar_t = min_{i < t} r_i   (earlier response tokens only; 1 for the first),
        c_t = sg(rho_bar_t) r_t,
        L_t = max(-c_t A_t, -clip(c_t, 1 - eps_low, 1 + eps_high) A_t),

    so d L_t / d log pi_t = -rho_bar_t r_t A_t unless the clip is active (blocked: A_t > 0 and
    c_t > 1 + eps_high, or A_t < 0 and c_t < 1 - eps_low, strict), and 0 there. Here: the
    PPO clip test on c_t blocks (eps = delta_low / delta_high, as ppo_clip) and the weight is
    min(c_t, C) (C = is_cap; inf, none, in the reference). Reported divergence: |c_t - 1|.

    Source: Yifei-Zuo/miles @ 8d16871a, miles/backends/training_utils/loss_hub/math_utils.py
    compute_minpro_prefix_min (torch.cummin over ratios with mask-0 tokens +inf, shifted one
    to the right, inf -> 1; detached) and compute_minpro_loss (the formula above; torch.maximum
    of the two surrogates), with eps_clip / eps_clip_high 0.2 / 0.28 in its
    tests/fast/backends/training_utils/loss/test_minpro_loss.py @ edff1704. Its docstring: the
    paper wraps rho_bar_t r_t in a CISPO-style soft clip and this kernel, "matching xorl's
    minpro_loss.py", applies the hard min-rule instead. That soft-clip form (the paper's) is
    not implemented: the paper's method section could not be read, so its exact clip is
    unknown. Sequence-level (a prefix minimum along the row): not elementwise."""
    c = _minpro_ratio(x)
    return _clip_block(x.adv, c, x.delta_low, x.delta_high), jnp.abs(c - 1.0)


@jax.jit  # eager callers compile the bisection once per shape, not per call
def m2po_blocked(old_logp, rollout_logp, mask, threshold):
    """M2PO's batch-level mask (arXiv 2510.01161), [B, T] bool: over ALL response tokens of the
    given batch, m2_t = (log mu_t - log pi_old_t)^2; sorted descending, the k largest are
    blocked, k the first index whose suffix mean sum(m2_sorted[k:]) / (n - k) < threshold (n - 1
    if none: one token stays), so the kept tokens' mean m2 is below the threshold. Ties keep
    index order (a stable sort: among equal values the earlier tokens are blocked first).

    Computed without a sort (XLA:CPU sorts 1M values in ~0.4 s): the kept tokens' mean only
    grows as larger values join, so the cut value u (the smallest m2 whose "all tokens with m2
    <= u" set has mean >= threshold) is found by bisection over float32 bit patterns (m2 >= 0:
    integer order is float order; 32 masked sums of m2 - threshold). Every token above u is
    blocked, every one below is kept, and of the g tokens equal to u the last j in index order
    are kept, j the largest count with mean < threshold: j < slack / (u - threshold), slack =
    sum over the kept-below tokens of (threshold - m2). Summing m2 - threshold (not m2, then
    comparing with threshold n) keeps the boundary test free of the cancellation between two
    large sums; where a token's inclusion moves the mean across the threshold by less than the
    float32 rounding of the sums, either answer is the rule's (tests/core: the float64 NumPy
    transcription of AReaL's sort agrees on random and tie-heavy batches).

    A batch statistic: the train step computes it ONCE over the whole minibatch, before the
    micro-batch split, and hands it to each micro-batch (exact under train.microbatches > 1);
    policy_loss without divergence= computes it over the rows it is given.

    Source: areal-project/AReaL @ cbff54d, areal/trainer/ppo/actor.py _apply_m2po_masking and
    _get_m2po_loss_mask (delta = old_logp - prox_logp: behaviour = rollout log-probs minus the
    recomputed proximal ones; m2 = delta^2 over the loss-mask-selected tokens), called in
    grpo_loss_fn when actor.m2_threshold is set (examples/math/gsm8k_m2po.yaml: 0.04)."""
    shape = jnp.shape(rollout_logp)
    m2 = jnp.square(_f32(rollout_logp) - _f32(old_logp)).reshape(-1)
    valid = (jnp.asarray(mask) > 0).reshape(-1)
    thr = jnp.asarray(threshold, jnp.float32)
    over = m2 - thr
    top = jnp.int32(0x7F800000)  # +inf's bit pattern
    # padding gets the largest int32 (above every float's pattern, NaN's included)
    bits = jnp.where(valid, jax.lax.bitcast_convert_type(m2, jnp.int32), jnp.iinfo(jnp.int32).max)
    first = jnp.min(bits)

    def mean_reaches(b):  # the valid tokens with m2 <= value(b): non-empty, mean >= threshold
        return (b >= first) & (jnp.sum(jnp.where(bits <= b, over, 0.0)) >= 0)

    def halve(_, lo_hi):  # invariant: mean_reaches(lo) false (or lo = -1), (hi) true
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        reach = mean_reaches(mid)
        return jnp.where(reach, lo, mid), jnp.where(reach, mid, hi)

    _, cut = jax.lax.fori_loop(0, 32, halve, (jnp.int32(-1), top))
    below, tie = bits < cut, bits == cut
    slack = -jnp.sum(jnp.where(below, over, 0.0))
    u = jax.lax.bitcast_convert_type(cut, jnp.float32)
    g = jnp.sum(tie.astype(jnp.int32))
    room = jnp.where(u > thr, slack / jnp.where(u > thr, u - thr, 1.0), 0.0)
    j = jnp.clip(jnp.ceil(room).astype(jnp.int32) - 1, 0, g)
    j = jnp.where(jnp.any(below) | (j > 0), j, 1)  # one token always stays
    # index order within the tie at u (an int32 associative_scan: exact, and ~4x jnp.cumsum's
    # speed on XLA:CPU at 1M tokens)
    rank = jax.lax.associative_scan(jnp.add, tie.astype(jnp.int32)) - 1
    blocked = valid & ((bits > cut) | (tie & (rank < g - j)))
    return (mean_reaches(top) & blocked).reshape(shape)


def _m_m2po(x: _Inputs):
    """M2PO on the decoupled PPO objective: block a token iff the batch-level second-moment mask
    (m2po_blocked, given as the divergence input, 1 = blocked) blocks it, or the PPO clip test on
    pi / pi_old blocks it (eps = delta_low / delta_high, as ppo_clip_recompute); weight
    min(pi / mu, C). Reported divergence: m2 = (log mu - log pi_old)^2.

    Source: AReaL @ cbff54d (m2po_blocked's docstring) with use_decoupled_loss (ratio pi / pi_prox
    clipped, times the behaviour weight pi_prox / mu: d/d log pi = -A pi / mu where unclipped).
    Elementwise once the batch mask is given."""
    ratio_old = _ratio(x.logp, x.old_logp)
    blocked = _clip_block(x.adv, ratio_old, x.delta_low, x.delta_high) | (x.divergence > 0.5)
    return blocked, jnp.square(x.rollout_logp - x.old_logp)


def _p_drpo(x: _Inputs, logp):
    """DRPO's penalty (arXiv 2606.09821 sec. 3, Eq. 8): the per-token loss is

        L_t = -A_t r_t + |A_t| mu_t (r_t - 1)^2 / (2 eps),   r_t = pi / mu = exp(clip(log pi -
                                                               log mu, -20, 20)), mu_t = exp(log mu)

    (eps = drpo_eps, 12.5). This returns the second term (differentiable in ``logp``) and its
    closed-form derivative w.r.t. log pi, |A| mu (r - 1) r / eps (0 where the clip is active, as
    torch.clamp's gradient). The first term is the row's weight min(r, C) (C = is_cap = inf in
    the reference), so d L_t / d log pi = -r (A - |A| (pi - mu) / eps): Table 1's smooth weight
    1 - sign(A (r - 1)) |pi - mu| / eps. Elementwise.

    Source: Tencent-Hunyuan/UniRL @ 1a7b501e, unirl/algorithms/drpo.py _drpo_loss (mu_weighted
    True = verl spo_adaptive_eps; DRPOConfig.drpo_epsilon 12.5, "regularization threshold",
    paper sec. 4; examples/ar/qwen3_drpo_4b_base_dapo_sglang.yaml)."""
    scale = jnp.abs(x.adv) * jnp.exp(x.rollout_logp) / (2.0 * x.params["drpo_eps"])
    d = logp - x.rollout_logp
    value = scale * jnp.square(jnp.exp(jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - 1.0)
    inside = jnp.abs(x.logp - x.rollout_logp) <= LOG_RATIO_CLAMP
    grad = jnp.where(inside, 2.0 * scale * (x.ratio - 1.0) * x.ratio, 0.0)
    return value, jax.lax.stop_gradient(grad)


class Param(NamedTuple):
    """A method parameter: its default (also configs/default.py's c.loss.<name> and
    resume.ADDED_FIELDS) and its valid interval (a ValueError naming it otherwise)."""
    default: float
    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False


# Method parameters beyond delta_low / delta_high / is_cap / alpha, passed as policy_loss(...,
# params={name: value}) and in the loss config as loss.<name>. A method reads only the names in
# its Method.params; the others are ignored.
PARAMS = {
    "icepop_low": Param(0.5, 0.0, open_low=True),     # IcePop: keep low <= pi/mu <= high
    "icepop_high": Param(5.0, 0.0, open_low=True),
    "kpop_phi": Param(2.0, 0.0, open_low=True),       # KPop: max binary KL threshold
    "opsm_delta": Param(1e-4, 0.0),                   # OPSM: mean log(mu/pi) threshold
    "geo_low": Param(0.99, 0.0, 1.0, open_low=True),  # SkyRL geometric sequence mask band
    "geo_high": Param(1.01, 1.0),
    "drpo_eps": Param(12.5, 0.0, open_low=True),     # DRPO: regularization threshold eps
    "m2po_threshold": Param(0.04, 0.0, open_low=True),  # M2PO: kept tokens' mean m2 < this
    "cppo_delta": Param(0.15, 0.0, open_low=True),   # CPPO: Binary-TV threshold delta
    "cppo_w_min": Param(0.8, 0.0, 1.0),              # CPPO: position weight at the last token
    "cppo_delta_b": Param(0.02, 0.0),                # CPPO: prefix budget floor (ceiling 2x)
}
# (low, high) pairs that must satisfy low < high
PARAM_ORDER = (("icepop_low", "icepop_high"), ("geo_low", "geo_high"))


def check_params(params: dict, where: str = "") -> None:
    """Each value a finite number in its Param interval, ordered pairs ordered; a ValueError
    naming ``where + name`` (config_validation passes where="loss.")."""
    for name, v in params.items():
        if name not in PARAMS:
            raise ValueError(f"unknown loss parameter {where}{name!r}; valid: "
                             f"{', '.join(where + k for k in PARAMS)}")
        p = PARAMS[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}{name} must be a finite number, got {v!r}")
        below = v <= p.low if p.open_low else v < p.low
        above = v >= p.high if p.open_high else v > p.high
        if below or above:
            lo = f"{'(' if p.open_low else '['}{p.low}"
            hi = "inf)" if math.isinf(p.high) else f"{p.high}{')' if p.open_high else ']'}"
            raise ValueError(f"{where}{name} must be in {lo}, {hi}, got {v}")
    for lo, hi in PARAM_ORDER:
        if lo in params and hi in params and not params[lo] < params[hi]:
            raise ValueError(f"{where}{lo}={params[lo]} must be < {where}{hi}={params[hi]}")


class Method(NamedTuple):
    """A loss method: its mask and what the train step must hand it besides (logp, rollout_logp,
    advantages, mask). Everything that depends on the method reads this table."""
    mask: Callable  # _Inputs -> (blocked [B, T] bool, divergence used [B, T])
    # The divergence= the caller computes: "" none (the mask uses logp / rollout_logp / old_logp
    # only), "topk" (log pi at mu's recorded top-K ids -> divergences.topk_*; the sampler must
    # record_topk), "full" (exact over the vocabulary from mu's parameters, the fused head's
    # tv / kl), "binary" (divergences.binary_* of the sampled token: trm_seq's per-token input),
    # "m2po" (m2po_blocked over the whole minibatch, 1 = blocked; policy_loss computes it over
    # its rows when not given).
    divergence: str = ""
    measure: str = ""            # "tv" | "kl" of a topk / full divergence
    needs_old_logp: bool = False  # the recomputed pi_old log-probs (a score pass per iteration)
    needs_alpha: bool = False    # relax_*: the mu cutoff alpha
    ratio_clip: bool = False     # delta_low is a ratio-clip epsilon, so it must be < 1
    elementwise: bool = True     # the mask is per token (logp_grad, the loss-fused head); not
    #                              trm_seq, opsm, geo_seq_mask, cppo, minpro_clip (read the row)
    params: tuple = ()           # the PARAMS this method reads (loss.<name> in the config)
    # A differentiable per-token term added to the loss (drpo): (_Inputs, logp) -> (value [B, T],
    # its derivative w.r.t. logp [B, T], stop-gradient, for logp_grad); None: none. Elementwise.
    penalty: Callable | None = None
    # The weight before the cap, _Inputs -> [B, T] stop-gradient; None: r = pi / mu (minpro_clip:
    # rho_bar r)
    weight: Callable | None = None


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
    # the trust-region family after DPPO (issue 32; docs/trust_region_family.md)
    "icepop": Method(_m_icepop, params=("icepop_low", "icepop_high")),
    "kpop": Method(_m_kpop, params=("kpop_phi",)),
    "opsm": Method(_m_opsm, ratio_clip=True, elementwise=False, params=("opsm_delta",)),
    "geo_seq_mask": Method(_m_geo_seq_mask, elementwise=False, params=("geo_low", "geo_high")),
    # no mask, weight min(r, C), plus the advantage-weighted quadratic penalty beyond Binary-TV
    "drpo": Method(_m_none, params=("drpo_eps",), penalty=_p_drpo),
    # the batch-level second-moment mask: divergence= m2po_blocked over the whole minibatch
    "m2po": Method(_m_m2po, divergence="m2po", needs_old_logp=True, ratio_clip=True,
                   params=("m2po_threshold",)),
    # position-weighted Binary-TV with a cumulative prefix budget per sequence
    "cppo": Method(_m_cppo, elementwise=False, params=("cppo_delta", "cppo_w_min",
                                                       "cppo_delta_b")),
    # the GRPO clip on rho_bar r (the prefix minimum of the earlier ratios times r), weight rho_bar r
    "minpro_clip": Method(_m_minpro_clip, ratio_clip=True, elementwise=False,
                          weight=_minpro_ratio),
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


def method_params(method: str, params=None) -> dict:
    """The values of ``method``'s PARAMS: ``params`` (a mapping of PARAMS names; names the
    method does not read are ignored) over the defaults, checked (check_params)."""
    spec = method_spec(method)
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown loss parameter(s) {unknown}; valid: {', '.join(PARAMS)}")
    used = {k: params.get(k, PARAMS[k].default) for k in spec.params}
    check_params(used)
    return {k: float(v) for k, v in used.items()}


def _validate(logp, rollout_logp, advantages, mask, method, delta_low, delta_high, is_cap, agg,
              old_logp, divergence, alpha, params=None):
    spec = method_spec(method)
    method_params(method, params)
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
    if spec.divergence not in ("", "m2po") and divergence is None:
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
                      alpha=None, params=None) -> LossTerms:
    """Like policy_loss, but returns (loss_sum, denom, metrics) for exact micro-batching."""
    _validate(logp, rollout_logp, advantages, mask, method, delta_low, delta_high, is_cap, agg,
              old_logp, divergence, alpha, params)
    logp_f = jnp.asarray(logp, jnp.float32)
    mask_f = _f32(mask)
    if METHODS[method].divergence == "m2po" and divergence is None:  # over the rows given
        divergence = m2po_blocked(old_logp, rollout_logp, mask_f,
                                  method_params(method, params)["m2po_threshold"])
    x, (blocked, div_used, weight, truncated, coef) = _coef(
        logp_f, rollout_logp, advantages, mask_f, method=method, delta_low=delta_low,
        delta_high=delta_high, is_cap=is_cap, old_logp=old_logp, divergence=divergence,
        alpha=alpha, params=params)
    per_token = -coef * jnp.exp(logp_f - jax.lax.stop_gradient(logp_f))
    penalty = METHODS[method].penalty
    if penalty is not None:
        per_token = per_token + penalty(x, logp_f)[0]
    num_w, denom = aggregation_weights(mask_f, agg)
    loss_sum = jnp.sum(per_token * num_w)
    lp, lmu, adv, ratio = x.logp, x.rollout_logp, x.adv, x.ratio
    metrics = _metrics(lp, lmu, adv, mask_f, blocked, div_used, weight, truncated, ratio)
    return LossTerms(loss_sum, denom, metrics)


def _f32(a):
    return None if a is None else jax.lax.stop_gradient(jnp.asarray(a, jnp.float32))


def _coef(logp, rollout_logp, advantages, mask, *, method, delta_low, delta_high, is_cap,
          old_logp, divergence, alpha, params=None):
    """The stop-gradient per-token coefficient M * w * A of every method (and its parts):
    (inputs, (blocked, divergence used, weight, truncated, coef)). Elementwise over any token
    shape, except the non-elementwise methods (a max / mean over the last axis)."""
    lp, lmu = _f32(logp), _f32(rollout_logp)
    adv = _f32(advantages)
    if adv.ndim == lp.ndim - 1:
        adv = jnp.broadcast_to(adv[..., None], lp.shape)
    ratio = _ratio(lp, lmu)
    x = _Inputs(lp, lmu, adv, _f32(mask), ratio, _f32(old_logp), _f32(divergence),
                float(delta_low), float(delta_high), None if alpha is None else float(alpha),
                method_params(method, params))
    blocked, div_used = METHODS[method].mask(x)
    keep = 1.0 - blocked.astype(jnp.float32)
    if method == "cispo":  # MiniMax CISPO: every token kept, weight sg(clip(r, 1-eps_l, 1+eps_h))
        weight = jnp.clip(ratio, 1 - delta_low, 1 + delta_high)
        truncated = (ratio < 1 - delta_low) | (ratio > 1 + delta_high)
    else:
        raw = ratio if METHODS[method].weight is None else METHODS[method].weight(x)
        weight = jnp.minimum(raw, is_cap)
        truncated = raw > is_cap
    weight = jnp.minimum(weight, is_cap)
    coef = jax.lax.stop_gradient(keep * weight * adv)
    return x, (blocked, div_used, weight, truncated, coef)


def logp_grad(logp, rollout_logp, advantages, agg_weight, *, method, delta_low, delta_high,
              is_cap=float("inf"), old_logp=None, divergence=None, alpha=None, params=None):
    """d loss / d logp per token, (-M * min(r, C) * A + d penalty / d logp) * agg_weight
    (agg_weight: the aggregation's num_w / denom; the penalty: Method.penalty, drpo's),
    elementwise over any token shape: what autodiff of policy_loss_terms' loss_sum / denom gives,
    computed without a backward pass (the loss-fused vocabulary head, trustrl.model.vocab_head,
    uses it inside its forward chunks). Not for the sequence-level
    masks (Method.elementwise False: trm_seq, opsm, geo_seq_mask, cppo, minpro_clip)."""
    if method not in METHODS or not METHODS[method].elementwise:
        raise ValueError(f"logp_grad is elementwise; method {method!r} is not (valid: "
                         f"{', '.join(m for m, spec in METHODS.items() if spec.elementwise)})")
    ones = jnp.ones(jnp.shape(logp), jnp.float32)
    x, (*_, coef) = _coef(logp, rollout_logp, advantages, ones, method=method,
                          delta_low=delta_low, delta_high=delta_high, is_cap=is_cap,
                          old_logp=old_logp, divergence=divergence, alpha=alpha,
                          params=params)
    g = -coef
    if METHODS[method].penalty is not None:
        g = g + METHODS[method].penalty(x, x.logp)[1]
    return g * _f32(agg_weight)


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
                alpha=None, params=None):
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
      params: the method's own parameters, a mapping of PARAMS names (icepop_low / icepop_high,
        kpop_phi, opsm_delta, geo_low / geo_high, drpo_eps, m2po_threshold) to numbers; a name
        the method does not read is ignored, one it reads and is not given takes
        PARAMS[name].default. The train step passes loss.<name> (or that default) for each
        name in METHODS[method].params.
    Returns:
      (loss scalar, metrics dict of scalars). d loss / d logp = -M * min(r, C) * A * agg weight,
      plus the derivative of a method's penalty term (drpo) times the agg weight.
    """
    terms = policy_loss_terms(logp, rollout_logp, advantages, mask, method=method,
                              delta_low=delta_low, delta_high=delta_high, is_cap=is_cap, agg=agg,
                              old_logp=old_logp, divergence=divergence, alpha=alpha,
                              params=params)
    loss = terms.loss_sum / jnp.maximum(terms.denom, 1e-8)
    return loss, {**terms.metrics, "loss/value": loss}
