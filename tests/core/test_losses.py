"""Loss library: hand-computed masks and gradients for every method, a slow reference, errors."""
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.core import losses
from trustrl.core.losses import METHODS, policy_loss, policy_loss_terms

INF = float("inf")


def grad_wrt_logp(method, pi, mu, adv, mask=None, **kw):
    lp, lmu = jnp.log(jnp.asarray(pi, jnp.float32)), jnp.log(jnp.asarray(mu, jnp.float32))
    mask = jnp.ones_like(lp) if mask is None else jnp.asarray(mask, jnp.float32)
    kw.setdefault("delta_low", 0.2)
    kw.setdefault("delta_high", 0.2)
    fn = lambda x: policy_loss(x, lmu, jnp.asarray(adv, jnp.float32), mask, method=method,
                               agg="token-sum", **kw)[0]
    return np.asarray(jax.grad(fn)(lp))


# --------------------------------------------------------------------- hand-computed tables
# Tokens (pi, mu, A) in one row; token-sum aggregation so grad = -keep * w * A exactly.
PI = [[0.80, 0.80, 0.20, 0.20, 0.60, 1e-2, 0.80, 0.50]]
MU = [[0.50, 0.50, 0.50, 0.50, 0.50, 1e-4, 0.99, 0.50]]
ADV = [[1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 0.0]]
RATIO = np.array(PI) / np.array(MU)


@pytest.mark.parametrize("method,dl,dh,keep", [
    # tok: up+A>0 TV.3 | up,A<0 | down,A<0 TV.3 | down,A>0 | TV.1 | rare r=100 | 0.99->0.8 | A=0
    # DPPO with delta_low = 0.15 (A<0 side), delta_high = 0.2 (A>0 side): the rare token moved
    # little mass (kept), the frequent 0.99 -> 0.8 token moved 0.19 (blocked).
    ("dppo_binary_tv", 0.15, 0.2, [0, 1, 0, 1, 1, 1, 0, 1]),
    # GRPO-ClipHigher (0.2 / 0.28), r: 1.6, 1.6, .4, .4, 1.2, 100, .808, 1 -- the reverse verdict
    ("ppo_clip", 0.2, 0.28, [0, 1, 0, 1, 1, 0, 1, 1]),
    ("pg_is", 0.2, 0.2, [1, 1, 1, 1, 1, 1, 1, 1]),
    # mask_neg blocks only A<0 with mu - pi >= delta_low (0.15): tokens 2 (0.3) and 6 (0.19)
    ("mask_neg", 0.15, 0.2, [1, 1, 0, 1, 1, 1, 0, 1]),
])
def test_hand_masks(method, dl, dh, keep):
    g = grad_wrt_logp(method, PI, MU, ADV, delta_low=dl, delta_high=dh)
    want = -np.array([keep]) * RATIO * np.array(ADV)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_binary_kl_hand_mask():
    # Binary KL(mu||pi): token 0 (0.5->0.8): 0.5 ln(.5/.8) + .5 ln(.5/.2) = 0.2231 > 0.05: blocked.
    # token 4 (0.5->0.6): 0.0204 < 0.05: kept. token 5 (1e-4->1e-2): ~0.0095 kept.
    # token 6 (0.99->0.8, A<0): 0.99 ln(.99/.8)+.01 ln(.01/.2) = 0.1810 > 0.05: blocked.
    g = grad_wrt_logp("dppo_binary_kl", PI, MU, ADV, delta_low=0.05, delta_high=0.05)
    keep = np.array([[0, 1, 0, 1, 1, 1, 0, 1]])
    np.testing.assert_allclose(g, -keep * RATIO * np.array(ADV), rtol=1e-5, atol=1e-7)


def test_cispo_weight_is_clipped_ratio_no_mask():
    g = grad_wrt_logp("cispo", PI, MU, ADV, delta_low=0.2, delta_high=0.28)
    w = np.clip(RATIO, 0.8, 1.28)
    np.testing.assert_allclose(g, -w * np.array(ADV), rtol=1e-5, atol=1e-7)


def test_is_cap_truncates_weight_and_reports_it():
    g = grad_wrt_logp("pg_is", PI, MU, ADV, is_cap=5.0)
    w = np.minimum(RATIO, 5.0)  # only the rare token (r = 100) is truncated
    np.testing.assert_allclose(g, -w * np.array(ADV), rtol=1e-5, atol=1e-7)
    _, m = policy_loss(jnp.log(jnp.array(PI)), jnp.log(jnp.array(MU)), jnp.array(ADV),
                       jnp.ones((1, 8)), method="pg_is", delta_low=.2, delta_high=.2, is_cap=5.0)
    assert float(m["loss/is_trunc_frac"]) == pytest.approx(1 / 8)
    assert float(m["loss/ratio_max"]) == pytest.approx(100.0, rel=1e-4)


def test_dppo_uses_is_cap_only_when_given():
    # The rare token (r = 100) is inside DPPO's TV trust region: it gets weight 100 with C = inf
    # and 5 with C = 5. (No hidden dual-clip constant.)
    g_inf = grad_wrt_logp("dppo_binary_tv", PI, MU, ADV)
    g_5 = grad_wrt_logp("dppo_binary_tv", PI, MU, ADV, is_cap=5.0)
    assert g_inf[0, 5] == pytest.approx(-100.0, rel=1e-4)
    assert g_5[0, 5] == pytest.approx(-5.0, rel=1e-6)


def test_ties_at_threshold_are_kept():
    lp, lmu = jnp.array([[0.0, -1.0]]), jnp.array([[-0.5, -0.2]])  # token 0 up, token 1 down
    adv, mask = jnp.array([[1.0, -1.0]]), jnp.ones((1, 2))
    from trustrl.core.divergences import binary_tv
    d_hi, d_lo = (np.float32(v) for v in np.asarray(binary_tv(lp, lmu))[0])
    r_hi, r_lo = np.asarray(jnp.exp(lp - lmu))[0]  # the f32 ratios exactly as XLA computes them
    down = lambda v: float(np.nextafter(v, np.float32(0)))
    up = lambda v: float(np.nextafter(v, np.float32(2)))
    cases = {  # method: ((delta_low, delta_high) exactly at the tie, (..) one ulp inside)
        "dppo_binary_tv": ((float(d_lo), float(d_hi)), (down(d_lo), down(d_hi))),
        "ppo_clip": ((1 - float(r_lo), float(r_hi) - 1), (1 - up(r_lo), down(r_hi) - 1)),
    }
    for method, (tie, inside) in cases.items():
        def g(dl, dh):
            f = lambda x: policy_loss(x, lmu, adv, mask, method=method, delta_low=dl,
                                      delta_high=dh, agg="token-sum")[0]
            return np.asarray(jax.grad(f)(lp))[0]
        assert np.all(g(*tie) != 0), method  # D == delta: kept
        np.testing.assert_array_equal(g(*inside), [0.0, 0.0])  # D just above delta: blocked


def test_zero_advantage_never_masked_and_zero_grad():
    g = grad_wrt_logp("ppo_clip", [[0.9]], [[0.1]], [[0.0]])
    assert g[0, 0] == 0.0
    _, m = policy_loss(jnp.log(jnp.array([[0.9, 0.9]])), jnp.log(jnp.array([[0.1, 0.1]])),
                       jnp.array([0.0]), jnp.ones((1, 2)), method="ppo_clip", delta_low=.2,
                       delta_high=.2)
    assert float(m["loss/masked_frac"]) == 0.0


def test_padding_gets_no_gradient_and_is_not_counted():
    g = grad_wrt_logp("pg_is", [[0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5]], [[1.0, 1.0, 1.0]],
                      mask=[[1, 1, 0]])
    np.testing.assert_allclose(g, [[-1, -1, 0]])
    # token-mean denominator counts the 2 response tokens only
    lp = jnp.log(jnp.full((1, 3), 0.5))
    fn = lambda x: policy_loss(x, lp, jnp.array([1.0]), jnp.array([[1, 1, 0]]), method="pg_is",
                               delta_low=.2, delta_high=.2)[0]
    np.testing.assert_allclose(jax.grad(fn)(lp), [[-0.5, -0.5, 0]])


def test_relax_ablation():
    # mu = 0.05 < alpha = 0.1: rare tokens are never clipped on the relaxed side.
    pi, mu = [[0.2, 0.01, 0.9, 0.4]], [[0.05, 0.05, 0.6, 0.6]]
    adv = [[1.0, -1.0, 1.0, -1.0]]  # r: 4 (A>0, rare), .2 (A<0, rare), 1.5 (A>0), .667 (A<0)
    r = np.array(pi) / np.array(mu)
    cases = {"relax_high": [1, 0, 0, 0], "relax_low": [0, 1, 0, 0], "relax_both": [1, 1, 0, 0]}
    for method, keep in cases.items():
        g = grad_wrt_logp(method, pi, mu, adv, alpha=0.1)
        np.testing.assert_allclose(g, -np.array([keep]) * r * np.array(adv), rtol=1e-5,
                                   err_msg=method)
    g = grad_wrt_logp("ppo_clip", pi, mu, adv)
    np.testing.assert_allclose(g, 0.0, atol=1e-7)  # all four clipped without relaxation


def test_recompute_methods_anchor_on_old_logp_but_weight_on_mu():
    pi, mu, old = [[0.8, 0.8]], [[0.5, 0.79]], [[0.79, 0.5]]
    adv = [[1.0, 1.0]]
    kw = dict(old_logp=jnp.log(jnp.array(old)))
    r = np.array(pi) / np.array(mu)
    # ppo_clip_recompute (MiniRL): clip test on pi/pi_old; weight still pi/mu.
    g = grad_wrt_logp("ppo_clip_recompute", pi, mu, adv, **kw)
    np.testing.assert_allclose(g, -np.array([[1, 0]]) * r, rtol=1e-5)
    # MiniRL-TIS: same mask, weight capped at 3 (token 0: 1.6 < 3)
    g = grad_wrt_logp("ppo_clip_recompute", pi, mu, adv, is_cap=1.5, **kw)
    np.testing.assert_allclose(g, -np.array([[1, 0]]) * np.minimum(r, 1.5), rtol=1e-5)
    g = grad_wrt_logp("dppo_binary_tv_recompute", pi, mu, adv, **kw)
    np.testing.assert_allclose(g, -np.array([[1, 0]]) * r, rtol=1e-5)
    g = grad_wrt_logp("dppo_binary_kl_recompute", pi, mu, adv, delta_low=0.05,
                      delta_high=0.05, **kw)
    np.testing.assert_allclose(g, -np.array([[1, 0]]) * r, rtol=1e-5)


def test_given_divergence_methods_and_trm_seq():
    pi, mu, adv = [[0.6, 0.6, 0.4]], [[0.5, 0.5, 0.5]], [[1.0, -1.0, -1.0]]
    div = jnp.array([[0.3, 0.3, 0.1]])
    r = np.array(pi) / np.array(mu)
    for method in ["dppo_topk_tv", "dppo_topk_kl", "dppo_full_tv", "dppo_full_kl"]:
        g = grad_wrt_logp(method, pi, mu, adv, divergence=div)
        # token 0: up, A>0, D .3 > .2 blocked; token 1: up, A<0 kept; token 2: D .1 kept
        np.testing.assert_allclose(g, -np.array([[0, 1, 1]]) * r * np.array(adv), rtol=1e-5)
    # trm_seq: the whole response is masked when max D > delta_high, regardless of direction.
    pi2, mu2, adv2 = pi * 2, mu * 2, [[1.0, -1.0, -1.0]] * 2
    div2 = jnp.array([[0.3, 0.1, 0.1], [0.1, 0.15, 0.05]])
    g = grad_wrt_logp("trm_seq", pi2, mu2, adv2, divergence=div2, mask=[[1, 1, 1], [1, 1, 1]])
    want = -np.array([[0, 0, 0], [1, 1, 1]]) * (np.array(pi2) / np.array(mu2)) * np.array(adv2)
    np.testing.assert_allclose(g, want, rtol=1e-5)
    # a divergence spike on a padding token does not mask the sequence
    g = grad_wrt_logp("trm_seq", pi, mu, adv, divergence=jnp.array([[0.9, 0.1, 0.1]]),
                      mask=[[0, 1, 1]])
    np.testing.assert_allclose(g, -np.array([[0, 1, 1]]) * r * np.array(adv), rtol=1e-5)


# ------------------------------------------------------------ PPO equivalence with D = |r - 1|

def test_dppo_with_abs_ratio_divergence_is_ppo_clip():
    rng = np.random.default_rng(0)
    lmu = jnp.asarray(np.log(rng.uniform(0.05, 1, (4, 16))), jnp.float32)
    lp = lmu + jnp.asarray(rng.normal(0, 0.4, (4, 16)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(4, 16)) > 0.2, jnp.float32)
    eps_l, eps_h = 0.2, 0.28
    div = jnp.abs(jnp.exp(lp - lmu) - 1)

    def ppo(x):  # the textbook clipped surrogate, token-mean
        r = jnp.exp(x - lmu)
        a = adv[:, None]
        obj = jnp.minimum(r * a, jnp.clip(r, 1 - eps_l, 1 + eps_h) * a)
        return -jnp.sum(obj * mask) / jnp.sum(mask)

    dppo = lambda x: policy_loss(x, lmu, adv, mask, method="dppo_topk_tv", delta_low=eps_l,
                                 delta_high=eps_h, divergence=div)[0]
    clip = lambda x: policy_loss(x, lmu, adv, mask, method="ppo_clip", delta_low=eps_l,
                                 delta_high=eps_h)[0]
    g_ppo, g_dppo, g_clip = jax.grad(ppo)(lp), jax.grad(dppo)(lp), jax.grad(clip)(lp)
    assert float(jnp.sum(g_ppo == 0)) > 5  # the test data does exercise the clip
    np.testing.assert_allclose(g_dppo, g_ppo, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_clip, g_ppo, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------- random inputs vs a slow reference

def _ref_keep(method, pi, mu, old, a, d, dl, dh, alpha):
    """Scalar, literal transcription of PAPER sec. 2-4 for one token (slow reference)."""
    r = pi / mu
    if method == "dppo_binary_tv":
        return not ((a > 0 and pi - mu > dh) or (a < 0 and mu - pi > dl))
    if method == "dppo_binary_kl":
        kl = mu * math.log(mu / pi) + (1 - mu) * math.log((1 - mu) / (1 - pi))
        return not ((a > 0 and r > 1 and kl > dh) or (a < 0 and r < 1 and kl > dl))
    if method.startswith("dppo_") and not method.endswith("recompute"):
        return not ((a > 0 and r > 1 and d > dh) or (a < 0 and r < 1 and d > dl))
    if method == "dppo_binary_tv_recompute":
        return not ((a > 0 and pi - old > dh) or (a < 0 and old - pi > dl))
    if method == "dppo_binary_kl_recompute":
        kl = old * math.log(old / pi) + (1 - old) * math.log((1 - old) / (1 - pi))
        return not ((a > 0 and pi > old and kl > dh) or (a < 0 and pi < old and kl > dl))
    clip_block = lambda rr: (a > 0 and rr > 1 + dh) or (a < 0 and rr < 1 - dl)
    if method == "ppo_clip":
        return not clip_block(r)
    if method == "ppo_clip_recompute":
        return not clip_block(pi / old)
    if method in ("pg_is", "cispo"):
        return True
    if method.startswith("relax_"):
        side = method.split("_")[1]
        hi, lo = a > 0 and r > 1 + dh, a < 0 and r < 1 - dl
        if mu < alpha and side in ("high", "both"):
            hi = False
        if mu < alpha and side in ("low", "both"):
            lo = False
        return not (hi or lo)
    if method == "mask_neg":
        return not (a < 0 and mu - pi >= dl)
    if method == "icepop":  # PARAMS defaults: keep 0.5 <= r <= 5
        return bool(0.5 <= r <= 5.0)
    if method == "kpop":  # PARAMS default phi = 2: both Bernoulli KL directions <= 2
        kl = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        return bool(max(kl(pi, mu), kl(mu, pi)) <= 2.0)
    raise AssertionError(method)


# (drpo's penalty term and m2po's batch mask: their references are in
# test_trust_region_family.py)
@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].elementwise
                                    and METHODS[m].penalty is None
                                    and METHODS[m].divergence != "m2po"])
@pytest.mark.parametrize("agg", losses.AGGREGATIONS)
def test_random_vs_slow_reference(method, agg):
    rng = np.random.default_rng(zlib.crc32(f"{method}/{agg}".encode()))
    B, T = 3, 7
    mu = rng.uniform(0.01, 0.99, (B, T))
    pi = np.clip(mu + rng.normal(0, 0.2, (B, T)), 0.005, 0.995)
    old = np.clip(mu + rng.normal(0, 0.05, (B, T)), 0.005, 0.995)
    adv = rng.choice([-1.5, 0.0, 0.7], size=(B,))
    mask = (rng.uniform(size=(B, T)) > 0.25).astype(np.float64)
    d = rng.uniform(0, 0.4, (B, T))
    dl, dh, cap, alpha = 0.15, 0.25, 2.0, 0.3
    kw = dict(delta_low=dl, delta_high=dh, is_cap=cap, agg=agg,
              old_logp=jnp.log(jnp.asarray(old, jnp.float32)),
              divergence=jnp.asarray(d, jnp.float32), alpha=alpha)
    lp = jnp.log(jnp.asarray(pi, jnp.float32))
    lmu = jnp.log(jnp.asarray(mu, jnp.float32))
    fn = lambda x: policy_loss(x, lmu, jnp.asarray(adv, jnp.float32), jnp.asarray(mask),
                               method=method, **kw)[0]
    got = np.asarray(jax.grad(fn)(lp))
    # slow reference: per-token loop, aggregation weights written out per mode
    pi32, mu32 = np.exp(np.asarray(lp, np.float64)), np.exp(np.asarray(lmu, np.float64))
    old32 = np.exp(np.log(old.astype(np.float32)).astype(np.float64))
    want = np.zeros((B, T))
    n_tok = mask.sum()
    n_seq = (mask.sum(1) > 0).sum()
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            r = pi32[b, t] / mu32[b, t]
            keep = _ref_keep(method, pi32[b, t], mu32[b, t], old32[b, t], adv[b], d[b, t],
                             dl, dh, alpha)
            w = np.clip(r, 1 - dl, 1 + dh) if method == "cispo" else r
            w = min(w, cap)
            agg_w = {"token-mean": 1 / n_tok, "token-sum": 1.0,
                     "seq-mean-token-mean": 1 / (mask[b].sum() * n_seq),
                     "seq-mean-token-sum": 1 / n_seq,
                     "seq-mean-token-sum-norm": 1 / (n_seq * T)}[agg]
            want[b, t] = -keep * w * adv[b] * agg_w
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    # the loss-fused head's per-token form (losses.logp_grad), elementwise: on flat tokens
    num_w, denom = losses.aggregation_weights(jnp.asarray(mask), agg)
    flat = lambda x: jnp.reshape(x, (-1,))
    direct = losses.logp_grad(
        flat(lp), flat(lmu), flat(jnp.broadcast_to(jnp.asarray(adv, jnp.float32)[:, None], lp.shape)),
        flat(num_w / denom), method=method, delta_low=dl, delta_high=dh, is_cap=cap,
        old_logp=flat(kw["old_logp"]), divergence=flat(kw["divergence"]), alpha=alpha)
    np.testing.assert_allclose(np.asarray(direct).reshape(B, T), want, rtol=2e-5, atol=1e-7)


# ----------------------------------------------------------------------------- aggregation

def test_aggregation_worked_example():
    # Two sequences, per-token loss -A*r with r = 1: values -A. Seq 0: 2 tokens, seq 1: 1 token.
    lp = jnp.zeros((2, 3)) - 1.0
    adv = jnp.array([1.0, 3.0])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
    want = {"token-mean": -(1 + 1 + 3) / 3, "token-sum": -5.0,
            "seq-mean-token-mean": -(1 + 3) / 2, "seq-mean-token-sum": -(2 + 3) / 2,
            "seq-mean-token-sum-norm": -5 / (2 * 3)}
    for agg, value in want.items():
        loss, _ = policy_loss(lp, lp, adv, mask, method="pg_is", delta_low=.2, delta_high=.2,
                              agg=agg)
        assert float(loss) == pytest.approx(value, rel=1e-6), agg


@pytest.mark.parametrize("agg", losses.AGGREGATIONS)
def test_microbatch_terms_accumulate_exactly(agg):
    rng = np.random.default_rng(3)
    lp = jnp.asarray(np.log(rng.uniform(0.1, 1, (4, 6))), jnp.float32)
    lmu = jnp.asarray(np.log(rng.uniform(0.1, 1, (4, 6))), jnp.float32)
    adv = jnp.asarray(rng.normal(size=4), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(4, 6)) > 0.3, jnp.float32)
    kw = dict(method="dppo_binary_tv", delta_low=0.2, delta_high=0.2, agg=agg)
    full = policy_loss(lp, lmu, adv, mask, **kw)[0]
    parts = [policy_loss_terms(lp[i:i + 2], lmu[i:i + 2], adv[i:i + 2], mask[i:i + 2], **kw)
             for i in (0, 2)]
    acc = sum(p.loss_sum for p in parts) / sum(p.denom for p in parts)
    if agg == "token-sum":
        acc = sum(p.loss_sum for p in parts)
    assert float(acc) == pytest.approx(float(full), rel=1e-6)


def test_masked_tokens_stay_in_denominator():
    lp, lmu = jnp.log(jnp.array([[0.9, 0.5]])), jnp.log(jnp.array([[0.1, 0.5]]))
    f = lambda x: policy_loss(x, lmu, jnp.array([1.0]), jnp.ones((1, 2)), method="ppo_clip",
                              delta_low=.2, delta_high=.2)[0]
    np.testing.assert_allclose(jax.grad(f)(lp), [[0.0, -0.5]])  # 1/2, not 1/1


# -------------------------------------------------------------------------------- metrics

def test_metrics_values():
    lp, lmu = jnp.log(jnp.array(PI)), jnp.log(jnp.array(MU))
    _, m = policy_loss(lp, lmu, jnp.array(ADV), jnp.ones((1, 8)), method="dppo_binary_tv",
                       delta_low=0.15, delta_high=0.2)
    # blocked: tokens 0 (A>0), 2 and 6 (A<0); 7 tokens have A != 0
    assert float(m["loss/masked_frac"]) == pytest.approx(3 / 7)
    assert float(m["loss/masked_frac_pos"]) == pytest.approx(1 / 7)
    assert float(m["loss/masked_frac_neg"]) == pytest.approx(2 / 7)
    diff = np.array(PI) - np.array(MU)
    assert float(m["loss/pi_mu_absdiff_mean"]) == pytest.approx(np.abs(diff).mean(), rel=1e-5)
    assert float(m["loss/pi_mu_diff_max"]) == pytest.approx(0.3, rel=1e-5)
    assert float(m["loss/pi_mu_diff_min"]) == pytest.approx(-0.3, rel=1e-5)
    assert float(m["loss/div_max"]) == pytest.approx(0.3, rel=1e-5)
    assert float(m["loss/ratio_min"]) == pytest.approx(0.4, rel=1e-5)
    assert set(m) >= {"loss/is_weight_mean", "loss/is_trunc_frac", "loss/ratio_mean",
                      "loss/div_mean", "loss/value"}


def test_jit_and_no_retrace():
    import chex
    lp = jnp.log(jnp.full((2, 4), 0.5))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, y):
        return policy_loss(x, y, jnp.ones(2), jnp.ones((2, 4)), method="dppo_binary_kl",
                           delta_low=0.05, delta_high=0.05)[0]

    for _ in range(3):
        step(lp, lp + 0.01)
    step(lp * 2, lp)


def test_extreme_ratio_is_clamped_and_finite():
    lp, lmu = jnp.array([[0.0]]), jnp.array([[-80.0]])  # r = e^80 without the clamp
    loss, m = policy_loss(lp, lmu, jnp.array([1.0]), jnp.ones((1, 1)), method="pg_is",
                          delta_low=.2, delta_high=.2)
    assert np.isfinite(float(loss))
    assert float(m["loss/ratio_max"]) == pytest.approx(math.exp(20), rel=1e-5)


# ------------------------------------------------------------------------------ bad input

BASE = dict(logp=jnp.zeros((2, 3)), rollout_logp=jnp.zeros((2, 3)), advantages=jnp.ones(2),
            mask=jnp.ones((2, 3)))


@pytest.mark.parametrize("kw,msg", [
    (dict(method="dppo"), "unknown loss method 'dppo'; valid methods: dppo_binary_tv"),
    (dict(method="ppo_clip", delta_low=0.0), "delta_low must be a finite number > 0"),
    (dict(method="ppo_clip", delta_high=-1.0), "delta_high must be a finite number > 0"),
    (dict(method="ppo_clip", agg="mean"), "unknown aggregation 'mean'; valid: token-mean"),
    (dict(method="dppo_topk_tv"), "needs divergence="),
    (dict(method="dppo_full_kl"), "needs divergence="),
    (dict(method="trm_seq"), "needs divergence="),
    (dict(method="ppo_clip_recompute"), "needs old_logp="),
    (dict(method="dppo_binary_kl_recompute"), "rollout_logp is not substituted"),
    (dict(method="relax_both"), "needs alpha in"),
    (dict(method="pg_is", is_cap=0.0), "is_cap must be > 0"),
    (dict(method="pg_is", rollout_logp=jnp.zeros((2, 4))), "rollout_logp shape"),
    (dict(method="pg_is", advantages=jnp.ones(3)), "advantages must be"),
    (dict(method="pg_is", logp=jnp.zeros(3)), "logp must be"),
    (dict(method="pg_is", rollout_logp=jnp.array([[0.0, jnp.nan, 0.0], [0.0] * 3])),
     "rollout_logp has 1 non-finite values on response tokens"),
    (dict(method="pg_is", rollout_logp=jnp.array([[0.0, -jnp.inf, 0.0], [0.0] * 3])),
     "first at index \\(0, 1\\)"),
])
def test_bad_input(kw, msg):
    args = {**BASE, "delta_low": 0.2, "delta_high": 0.2, **kw}
    with pytest.raises(ValueError, match=msg):
        policy_loss(**args)


def test_nonfinite_on_padding_is_allowed():
    lmu = jnp.array([[0.0, -jnp.inf]])
    loss, _ = policy_loss(jnp.zeros((1, 2)), lmu, jnp.ones(1), jnp.array([[1.0, 0.0]]),
                          method="pg_is", delta_low=.2, delta_high=.2)
    assert np.isfinite(float(loss))


def test_logp_grad_refuses_the_sequence_level_mask():
    with pytest.raises(ValueError, match="trm_seq"):
        losses.logp_grad(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), jnp.ones(3), method="trm_seq",
                         delta_low=0.1, delta_high=0.1)
